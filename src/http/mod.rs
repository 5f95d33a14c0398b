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
use tokio::sync::watch;

use crate::cluster::LeaseWaits;
use crate::node::StatusHandle;

/// Bound on gathering the node's status for one request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the pod is in its life, for `/readyz` and `/metrics`: the partition leases it still
/// waits for while it starts, then the running node. Cloned into every request.
#[derive(Clone)]
pub struct PodStatus {
    /// Leases still waited for (empty once all are held, or without leases).
    pub waits: LeaseWaits,
    /// The node, once started.
    pub node: watch::Receiver<Option<StatusHandle>>,
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    status: PodStatus,
    metrics: PrometheusHandle,
}

/// The gateway pod's routes, none of them authenticated (health and metrics never are):
/// - `GET /healthz`: 200 `ok` while the process answers;
/// - `GET /readyz`: once the node runs, 200 when every owned partition is open and every owned
///   shard is receiving dispatches, else 503, with the node's status as JSON either way. Before
///   that, while the pod waits for partition leases, `{"phase": "waiting_for_leases",
///   "waiting_for_leases": {"p0003": {holder, epoch, free_within_secs, live}}, "ready": …}`:
///   200 and ready (for what it holds: nothing yet) when every holder waited for is a live
///   process — it renewed while watched — so a rolling update goes on and restarts the pod that
///   will release them (DESIGN §7 "Readiness during a handoff"); 503 while some lease is held
///   by a process that may have crashed (it runs out within a TTL). Otherwise 503
///   `{"ready": false, "phase": "starting"}` (restoring, opening);
/// - `GET /metrics`: Prometheus text format (see [`crate::node::metrics`] for the names;
///   `shardlite_leases_waiting` counts the leases still waited for).
pub fn router(status: PodStatus, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { status, metrics })
}

async fn metrics_text(State(app): State<AppState>) -> impl IntoResponse {
    metrics::gauge!("shardlite_leases_waiting").set(app.status.waits.borrow().len() as f64);
    // Sequence gauges are read from the tree at scrape time rather than pushed on every dispatch.
    let node = app.status.node.borrow().clone();
    if let Some(node) = node
        && let Ok(status) = node.status(STATUS_TIMEOUT).await
    {
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
    let node = app.status.node.borrow().clone();
    let Some(node) = node else {
        let waits = app.status.waits.borrow().clone();
        let ready = !waits.is_empty() && waits.values().all(|w| w.live);
        return if waits.is_empty() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "ready": false, "phase": "starting" })),
            )
        } else {
            (
                if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                Json(serde_json::json!({
                    "ready": ready,
                    "phase": "waiting_for_leases",
                    "waiting_for_leases": waits
                        .iter()
                        .map(|(p, w)| (p.to_string(), w))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                })),
            )
        };
    };
    match node.status(STATUS_TIMEOUT).await {
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
