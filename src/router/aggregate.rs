//! `GET /v1/ownership` on the router: every pod's own `GET {peer}/v1/ownership`, asked at once,
//! side by side. A pod that does not answer is data (`"up": false`), not an error: the page is
//! for finding out which pods are down.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use super::Shared;
use super::error::ApiError;
use super::request_id::X_REQUEST_ID;
use crate::error_chain;

/// Bound on one pod's whole answer (connect, headers, body).
pub const OWNERSHIP_TIMEOUT: Duration = Duration::from_secs(2);

/// One pod's answer.
struct PodAnswer {
    /// The HTTP status, if the pod answered at all.
    status: Option<StatusCode>,
    /// The pod's entry in `pods`.
    entry: Value,
}

/// Handles `GET /v1/ownership`: 200 `{"pods": [...]}` in ordinal order, one entry per pod:
/// `{"ordinal": 0, "url": "…", "up": true, "status": 200, "ownership": <the pod's JSON>}` (a body
/// that is not JSON comes as the string `"body"` instead), or `{"ordinal": 1, "url": "…",
/// "up": false, "error": "…"}`. The client's `Authorization` and `X-Request-Id` are passed on.
///
/// # Errors
/// [`ApiError::Unauthorized`] when every pod answered 401: the client's credentials are wrong,
/// which the page must not hide behind 200.
pub async fn ownership(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let config = state.config();
    let mut forwarded = HeaderMap::new();
    for name in [header::AUTHORIZATION, X_REQUEST_ID] {
        if let Some(value) = headers.get(&name) {
            forwarded.insert(name, value.clone());
        }
    }
    let polls = (0..config.cluster.pods)
        .map(|pod| ask(&state.client, pod, config.cluster.peer_url(pod), &forwarded));
    let answers = futures_util::future::join_all(polls).await;
    if !answers.is_empty()
        && answers
            .iter()
            .all(|a| a.status == Some(StatusCode::UNAUTHORIZED))
    {
        return Err(ApiError::Unauthorized);
    }
    Ok(Json(json!({
        "pods": answers.into_iter().map(|a| a.entry).collect::<Vec<_>>(),
    })))
}

/// Asks pod `pod` at `url` for its ownership, within [`OWNERSHIP_TIMEOUT`].
async fn ask(client: &reqwest::Client, pod: u32, url: String, headers: &HeaderMap) -> PodAnswer {
    let exchange = async {
        let response = client
            .get(format!("{url}/v1/ownership"))
            .headers(headers.clone())
            .send()
            .await?;
        let status = response.status();
        Ok::<_, reqwest::Error>((status, response.bytes().await?))
    };
    match tokio::time::timeout(OWNERSHIP_TIMEOUT, exchange).await {
        Ok(Ok((status, body))) => {
            let mut entry = json!({
                "ordinal": pod, "url": url, "up": true, "status": status.as_u16(),
            });
            match serde_json::from_slice::<Value>(&body) {
                Ok(ownership) => entry["ownership"] = ownership,
                Err(_) => entry["body"] = String::from_utf8_lossy(&body).into(),
            }
            PodAnswer {
                status: Some(status),
                entry,
            }
        }
        Ok(Err(e)) => PodAnswer {
            status: None,
            entry: json!({ "ordinal": pod, "url": url, "up": false, "error": error_chain(&e) }),
        },
        Err(_) => PodAnswer {
            status: None,
            entry: json!({
                "ordinal": pod, "url": url, "up": false,
                "error": format!("no answer within {} s", OWNERSHIP_TIMEOUT.as_secs()),
            }),
        },
    }
}
