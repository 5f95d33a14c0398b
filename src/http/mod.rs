//! HTTP: health, readiness and Prometheus metrics (DESIGN §8). The guild API and the router arrive
//! with the HTTP work; this module already owns the listener so they slot in as routes.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::node::StatusHandle;

/// Bound on gathering the node's status for one request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    status: StatusHandle,
    metrics: PrometheusHandle,
}

/// The gateway pod's routes, none of them authenticated (health and metrics never are):
/// - `GET /healthz`: 200 `ok` while the process answers;
/// - `GET /readyz`: 200 when every owned partition is open and every owned shard is receiving
///   dispatches, else 503; the body is the node's status as JSON either way;
/// - `GET /metrics`: Prometheus text format (see [`crate::node::metrics`] for the names).
pub fn router(status: StatusHandle, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { status, metrics })
}

async fn metrics_text(State(app): State<AppState>) -> impl IntoResponse {
    // Sequence gauges are read from the tree at scrape time rather than pushed on every dispatch.
    if let Ok(status) = app.status.status(STATUS_TIMEOUT).await {
        crate::node::metrics::record_status(&status);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
}

async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    match app.status.status(STATUS_TIMEOUT).await {
        Ok(s) if s.ready => (
            StatusCode::OK,
            Json(serde_json::to_value(s).unwrap_or_default()),
        ),
        Ok(s) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::to_value(s).unwrap_or_default()),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "error": e.to_string() })),
        ),
    }
}

/// Serves `router` on `listener` until `shutdown` resolves.
///
/// # Errors
/// The I/O error that stopped the server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
