//! HTTP: health and readiness (DESIGN §8). The guild API, metrics and the router arrive with the
//! HTTP work; this module already owns the listener so they slot in as routes.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::node::StatusHandle;

/// Bound on gathering the node's status for one request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway pod's routes: `GET /healthz` (the process answers: 200 `ok`) and `GET /readyz`
/// (200 when every owned partition is open and every owned shard is receiving dispatches, else
/// 503; the body is the node's status as JSON either way).
pub fn router(status: StatusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(status)
}

async fn readyz(State(status): State<StatusHandle>) -> impl IntoResponse {
    match status.status(STATUS_TIMEOUT).await {
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
