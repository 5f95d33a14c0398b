//! The REST side (axum): the one Discord route a gateway client needs, plus a status page.
//!
//! - `GET /api/v10/gateway/bot` (Discord docs, "Topics → Gateway → Get Gateway Bot"), with
//!   `Authorization: Bot <token>`: `{"url", "shards", "session_start_limit": {"total",
//!   "remaining", "reset_after" (ms), "max_concurrency"}}`; a wrong or missing token gives
//!   401 `{"message": "401: Unauthorized", "code": 0}` as Discord does.
//! - `GET /api/v10/gateway` (no auth): `{"url"}`.
//! - `GET /api/sim/status` (no auth): [`SimStatus`](super::SimStatus) as JSON.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::session::Runtime;

/// Identifies allowed per `reset_after` window (Discord's default for bots).
const SESSION_START_TOTAL: u32 = 1000;
/// Length of the identify window, in ms (24 h).
const SESSION_START_RESET_AFTER_MS: u64 = 86_400_000;

/// The router for the REST listener.
pub(crate) fn router(rt: Arc<Runtime>) -> Router {
    Router::new()
        .route("/api/v10/gateway/bot", get(gateway_bot))
        .route("/api/v10/gateway", get(gateway))
        .route("/api/sim/status", get(status))
        .with_state(rt)
}

async fn gateway_bot(State(rt): State<Arc<Runtime>>, headers: HeaderMap) -> Response {
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bot "))
        .is_some_and(|token| token == rt.config.token);
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "message": "401: Unauthorized", "code": 0 })),
        )
            .into_response();
    }
    Json(json!({
        "url": rt.gateway_url,
        "shards": rt.config.shards,
        "session_start_limit": {
            "total": SESSION_START_TOTAL,
            "remaining": SESSION_START_TOTAL,
            "reset_after": SESSION_START_RESET_AFTER_MS,
            "max_concurrency": rt.config.max_concurrency,
        },
    }))
    .into_response()
}

async fn gateway(State(rt): State<Arc<Runtime>>) -> Response {
    Json(json!({ "url": rt.gateway_url })).into_response()
}

async fn status(State(rt): State<Arc<Runtime>>) -> Response {
    Json(rt.status()).into_response()
}
