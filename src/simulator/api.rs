//! The REST side (axum): the one Discord route a gateway client needs, plus a status page.
//!
//! - `GET /api/v10/gateway/bot` (Discord docs, "Topics → Gateway → Get Gateway Bot"), with
//!   `Authorization: Bot <token>`: `{"url", "shards", "session_start_limit": {"total",
//!   "remaining", "reset_after" (ms), "max_concurrency"}}`; a wrong or missing token gives
//!   401 `{"message": "401: Unauthorized", "code": 0}` as Discord does.
//! - `GET /api/v10/gateway` (no auth): `{"url"}`.
//! - `GET /api/sim/status` (no auth): [`SimStatus`](super::SimStatus) as JSON.
//! - `POST /api/sim/shards/{shard}/faults` (no auth), body a [`Fault`] as JSON: inject it into
//!   the connection holding the shard ([`Simulator::inject`](super::Simulator::inject)) and
//!   answer once applied: 204; unknown shard or no connection → 404; a body that is not a
//!   valid fault → 400. Errors are `{"error": "…"}`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::session::Runtime;
use super::{Fault, SimError};

/// Identifies allowed per `reset_after` window (Discord's default for bots); reported as
/// `total` unless `SimConfig::session_start_remaining` is larger.
const SESSION_START_TOTAL: u32 = 1000;
/// Length of the identify window, in ms (24 h).
const SESSION_START_RESET_AFTER_MS: u64 = 86_400_000;

/// The router for the REST listener.
pub(crate) fn router(rt: Arc<Runtime>) -> Router {
    Router::new()
        .route("/api/v10/gateway/bot", get(gateway_bot))
        .route("/api/v10/gateway", get(gateway))
        .route("/api/sim/status", get(status))
        .route("/api/sim/shards/{shard}/faults", post(inject_fault))
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
            "total": SESSION_START_TOTAL.max(rt.config.session_start_remaining),
            "remaining": rt.session_start_remaining(),
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

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn inject_fault(
    State(rt): State<Arc<Runtime>>,
    Path(shard): Path<String>,
    body: Bytes,
) -> Response {
    let Some(shard) = shard.parse::<u32>().ok().filter(|s| *s < rt.config.shards) else {
        return error(StatusCode::NOT_FOUND, format!("unknown shard {shard}"));
    };
    let fault: Fault = match serde_json::from_slice(&body) {
        Ok(fault) => fault,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid fault: {e}")),
    };
    match rt.inject(shard, fault).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ (SimError::UnknownShard { .. } | SimError::NoConnection { .. })) => {
            error(StatusCode::NOT_FOUND, e)
        }
        Err(e @ SimError::InvalidFault { .. }) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
