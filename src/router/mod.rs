//! The stateless router, `shardlite router` (DESIGN §8): computes the pod that owns a guild with
//! the pods' own ownership function, guild → partition → shard → pod, and forwards
//! `/v1/guilds/{guild_id}/…` there. It keeps no state but its config: every router and every
//! pod computes the same owner from the same config, with no coordination.
//!
//! Routes:
//! - `ANY /v1/guilds/{guild_id}` and `/v1/guilds/{guild_id}/…`: forwarded to the owner
//!   ([`forward`]); a malformed id is 400 `bad_guild_id`; an unreachable owner is 503
//!   `owner_unavailable` with `Retry-After`, never another pod;
//! - `GET /v1/ownership`: every pod's ownership side by side ([`aggregate`]);
//! - `GET /healthz`: 200 `ok`; `GET /readyz`: 200 `{"ready": true, "mode": "router"}` (stateless:
//!   ready once listening); `GET /metrics`: Prometheus text ([`metrics`]);
//! - anything else: 404 (405 for a known path with another method), as JSON errors
//!   `{"error": {"code", "message"}}` ([`error::ApiError`]).
//!
//! Every response carries `X-Request-Id` ([`request_id`]). This room uses `config` and
//! `ownership` only: no actors, no partitions, no Discord token.

pub mod aggregate;
pub mod error;
pub mod forward;
pub mod guild_id;
pub mod metrics;
pub mod request_id;
pub mod retry;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use figment::providers::Serialized;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{Config, ConfigError, ServiceMode};
pub use error::{ApiError, RouterError};

/// What the handlers share: the current config (replaced when a 421 makes the router read it
/// again), where it came from, and one HTTP client toward the pods (its connection pool).
pub struct Shared {
    config: RwLock<Arc<Config>>,
    config_path: Option<PathBuf>,
    client: reqwest::Client,
    metrics: PrometheusHandle,
}

impl Shared {
    /// The current config.
    fn config(&self) -> Arc<Config> {
        // A panic while the lock was held cannot leave a half-written `Arc`.
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the config again from its file and the environment ([`load_config`]), off the
    /// async threads, and makes it the current one.
    async fn reread_config(&self) -> Result<Arc<Config>, String> {
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || load_config(path.as_deref()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let loaded = Arc::new(loaded);
        let mut current = self.config.write().unwrap_or_else(PoisonError::into_inner);
        if current.cluster != loaded.cluster || current.discord.shards != loaded.discord.shards {
            tracing::info!(
                pods = loaded.cluster.pods,
                shards = loaded.discord.shards,
                partitions = loaded.cluster.partitions,
                "config read again: the topology or peer URLs changed"
            );
        }
        *current = loaded.clone();
        Ok(loaded)
    }
}

/// Loads the config as [`Config::load`] does, with `cluster.mode = "router"` over every source:
/// whatever the file or `SERVICE_MODE` say, a process running the router is validated as one
/// (no ordinal or replication rules, DESIGN §8).
///
/// # Errors
/// As [`Config::load`].
pub fn load_config(file: Option<&Path>) -> Result<Config, ConfigError> {
    Config::from_figment(
        Config::figment(file).merge(Serialized::default("cluster.mode", ServiceMode::Router)),
    )
}

/// The router's HTTP application for `config` (read again from `config_path` on a 421), with
/// `/metrics` rendering `metrics`. Tests can build a handle without installing it:
/// `router::metrics::builder().build_recorder().handle()`.
///
/// # Errors
/// [`RouterError::Client`] if the HTTP client cannot be built.
pub fn app(
    config: Config,
    config_path: Option<PathBuf>,
    metrics: PrometheusHandle,
) -> Result<Router, RouterError> {
    let client = reqwest::Client::builder()
        .connect_timeout(retry::CONNECT_TIMEOUT)
        // Pods are internal addresses: no system proxy, and a redirect goes back to the client.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(RouterError::Client)?;
    let shared = Arc::new(Shared {
        config: RwLock::new(Arc::new(config)),
        config_path,
        client,
        metrics,
    });
    Ok(Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async { Json(serde_json::json!({ "ready": true, "mode": "router" })) }),
        )
        .route("/metrics", get(metrics_text))
        .route("/v1/ownership", get(aggregate::ownership))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
        .layer(axum::middleware::from_fn(metrics::count))
        .layer(axum::middleware::from_fn(request_id::propagate)))
}

async fn metrics_text(State(state): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Every path not routed above: the guild paths (matched here rather than by the route table so
/// that `/v1/guilds`, `/v1/guilds/` and `/v1/guilds//x` answer 400 `bad_guild_id` too), else 404.
async fn fallback(State(state): State<Arc<Shared>>, request: Request) -> Response {
    if guild_id::guild_segment(request.uri().path()).is_some() {
        return match forward::guild_request(state, request).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
    }
    ApiError::NotFound {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
    }
    .into_response()
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; requests in flight are finished.
///
/// # Errors
/// [`RouterError::Serve`] if accepting connections fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(RouterError::Serve)
}

/// `shardlite router` (and `shardlite run` with `cluster.mode = "router"`): binds `http.listen`,
/// installs the process-wide metrics recorder, writes `{"pid": N, "http": "ADDR", "mode":
/// "router"}` to `ready_file` once listening (atomically), and serves until `shutdown`.
///
/// # Errors
/// [`RouterError`]: the listener, the recorder, the HTTP client, the ready file, the server.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let addr = config.http.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RouterError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| RouterError::Listen { addr, source })?;
    let handle = metrics::install()?;
    let topology = config.topology();
    tracing::info!(
        http = %local,
        pods = topology.pods(),
        shards = topology.shards(),
        partitions = topology.partitions(),
        peers = %config.cluster.peer_url_template,
        "router serving /v1/guilds/{{guild_id}}/…, /v1/ownership, /healthz, /readyz and /metrics"
    );
    let app = app(config, config_path, handle)?;
    if let Some(path) = &ready_file {
        let info = serde_json::json!({
            "pid": std::process::id(), "http": local.to_string(), "mode": "router",
        });
        crate::write_atomic(path, &info.to_string()).map_err(|source| RouterError::ReadyFile {
            path: path.clone(),
            source,
        })?;
    }
    serve(listener, app, shutdown).await?;
    tracing::info!("router stopped");
    Ok(())
}
