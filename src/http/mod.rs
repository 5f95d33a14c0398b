//! HTTP on gateway pods (DESIGN §8): health, readiness and Prometheus metrics, open to all; the
//! guild API under `/v1` ([`api`]), behind a bearer token ([`auth`]), reading partition files
//! without slowing ingest ([`reader`]).

pub mod api;
pub mod auth;
pub mod error;
pub mod reader;

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::cluster::LeaseWaits;
use crate::node::StatusHandle;
use crate::ownership::PartitionId;

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
    /// The lease epoch each held partition writes under (empty without leases).
    pub epochs: watch::Receiver<std::collections::BTreeMap<PartitionId, u64>>,
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    status: PodStatus,
    metrics: PrometheusHandle,
    token: auth::ApiToken,
}

/// The gateway pod's routes, none of them authenticated (health and metrics never are):
/// - `GET /healthz`: 200 `ok` while the process answers;
/// - `GET /readyz`: 200 when every owned partition is open and every owned shard is receiving
///   dispatches, else 503, with the node's status as JSON either way. While some shards wait for
///   their partition leases (`pending_shards`; `"phase": "waiting_for_leases"`,
///   `"waiting_for_leases": {"p0003": {holder, epoch, free_within_secs, live}}`), 200 and ready
///   for what it holds when every started shard is active and every lease waited for is held by
///   a live process — it renewed while watched — so a rolling update goes on and restarts the
///   pod that will release them (DESIGN §7 "Readiness during a handoff"); 503 while a leased
///   shard's partitions restore, or some lease is held by a process that may have crashed (it
///   runs out within a TTL). Before the node is launched, 503 `{"ready": false, "phase":
///   "starting"}`. Without the API's bearer token, session ids and resume URLs are left out
///   (they would let anyone resume the bot's sessions);
/// - `GET /metrics`: Prometheus text format (see [`crate::node::metrics`] for the names;
///   `shardlite_leases_waiting` counts the leases still waited for);
/// - `/v1/…`: the guild API ([`api`]), with `Authorization: Bearer $SHARDLITE_API_TOKEN`; 503
///   for every request when no token is configured (never open), 401 for a wrong one. Unknown
///   paths get a JSON 404.
pub fn router(
    status: PodStatus,
    metrics: PrometheusHandle,
    token: Option<crate::config::Secret>,
    data_dir: std::path::PathBuf,
) -> Router {
    let token = auth::ApiToken(token);
    if token.0.is_none() {
        tracing::warn!("SHARDLITE_API_TOKEN is not set: /v1 answers 503 to every request");
    }
    let api = Router::new()
        .route("/v1/guilds/{guild_id}", get(api::guild))
        .route("/v1/guilds/{guild_id}/members/{user_id}", get(api::member))
        .route("/v1/guilds/{guild_id}/messages", get(api::messages))
        .route("/v1/guilds/{guild_id}/stats", get(api::stats))
        .route("/v1/ownership", get(api::ownership))
        .with_state(api::Api::new(status.clone(), reader::Reader::new(data_dir)))
        .route_layer(axum::middleware::from_fn_with_state(
            token.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            status,
            metrics,
            token,
        })
        .merge(api)
        .fallback(|| async {
            error::ApiError::not_found(
                "no_such_route",
                "no such route; see the README's API section",
            )
        })
}

/// Removes every `session_id` and `resume_url` from `value`, at any depth.
fn redact_sessions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("session_id");
            map.remove("resume_url");
            map.values_mut().for_each(redact_sessions);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_sessions),
        _ => {}
    }
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

async fn readyz(State(app): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let (code, Json(mut body)) = readyz_body(&app).await;
    if !app.token.accepts(&headers) {
        redact_sessions(&mut body);
    }
    (code, Json(body))
}

async fn readyz_body(app: &AppState) -> (StatusCode, Json<serde_json::Value>) {
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
        Ok(s) => {
            let waits = app.status.waits.borrow().clone();
            let ready = ready_while_waiting(&s, &waits);
            let mut body = serde_json::to_value(&s).unwrap_or_default();
            if !waits.is_empty() {
                body["phase"] = "waiting_for_leases".into();
                body["waiting_for_leases"] = serde_json::to_value(
                    waits
                        .iter()
                        .map(|(p, w)| (p.to_string(), w))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                )
                .unwrap_or_default();
            }
            body["ready"] = ready.into();
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, Json(body))
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "error": e.to_string() })),
        ),
    }
}

/// Ready for what it holds while it waits for the rest (DESIGN §7 "Readiness during a
/// handoff"): every started group has its shard active and its partitions open, and every
/// shard not started yet waits for leases only, each held by a live process (one seen renewing
/// it), which a rolling update restarts next. A shard whose leases are held but whose
/// partitions are still restoring is not ready, nor one waiting for a holder that may have
/// crashed.
fn ready_while_waiting(
    status: &crate::node::NodeStatus,
    waits: &std::collections::BTreeMap<crate::ownership::PartitionId, crate::cluster::LeaseWait>,
) -> bool {
    let Ok(topology) =
        crate::ownership::Topology::new(status.shard_total, status.partitions_total, status.pods)
    else {
        return false;
    };
    let per_shard = (status.partitions_total / status.shard_total.max(1)) as usize;
    let started_ok = status.groups.len() + status.pending_shards.len() == status.owned_shards.len()
        && status.groups.iter().all(|g| {
            g.partitions.len() == per_shard
                && g.shard_status
                    .as_ref()
                    .is_some_and(|s| s.phase == crate::node::shard::ShardPhase::Active)
        });
    let pending_wait_on_live_holders = status.pending_shards.iter().all(|&shard| {
        topology
            .partitions_of_shard(shard)
            .iter()
            .all(|p| waits.get(p).is_some_and(|w| w.live))
    });
    !status.pending_shards.is_empty() && started_ok && pending_wait_on_live_holders
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves the pod's routes with `token` on an ephemeral loopback port; no node runs.
    async fn serve_without_node(token: Option<&str>) -> String {
        let (_, waits) = watch::channel(Default::default());
        let (_, node) = watch::channel(None);
        let (_, epochs) = watch::channel(Default::default());
        let app = router(
            PodStatus {
                waits,
                node,
                epochs,
            },
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
            token.map(crate::config::Secret::new),
            std::env::temp_dir(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, std::future::pending()));
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn without_a_token_the_api_is_closed_and_health_stays_open() {
        let base = serve_without_node(None).await;
        let client = reqwest::Client::new();
        let resp = client
            .get(format!("{base}/v1/guilds/1"))
            .bearer_auth("anything")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 503);
        assert!(resp.headers().contains_key("retry-after"));
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "api_token_not_configured");
        let health = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status().as_u16(), 200);
    }

    #[tokio::test]
    async fn with_a_token_a_starting_pod_answers_503_and_a_wrong_token_401() {
        let base = serve_without_node(Some("t0ken")).await;
        let client = reqwest::Client::new();
        let get = |auth: &'static str| {
            client
                .get(format!("{base}/v1/guilds/1"))
                .bearer_auth(auth)
                .send()
        };
        assert_eq!(get("t0ke").await.unwrap().status().as_u16(), 401);
        let starting = get("t0ken").await.unwrap();
        assert_eq!(starting.status().as_u16(), 503);
        let body: serde_json::Value = starting.json().await.unwrap();
        assert_eq!(body["error"]["code"], "starting");
        // A malformed id is the client's error whatever the pod's state.
        let bad = client
            .get(format!("{base}/v1/guilds/x"))
            .bearer_auth("t0ken")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status().as_u16(), 400);
    }

    #[test]
    fn sessions_are_redacted_at_any_depth() {
        let mut v = serde_json::json!({"groups": [{"shard_status": {"session_id": "s", "phase": "active"},
            "partitions": [{"session": {"session_id": "s", "resume_url": "wss://r", "applied_seq": 3}}]}]});
        redact_sessions(&mut v);
        let text = v.to_string();
        assert!(
            !text.contains("session_id") && !text.contains("resume_url"),
            "{text}"
        );
        assert!(
            text.contains("applied_seq") && text.contains("active"),
            "{text}"
        );
    }
}
