//! `shardlite run`: the main job — the actor tree plus its HTTP endpoints, until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::node::{Node, NodeError};

/// How often readiness is checked until the ready file is written.
const READY_POLL: Duration = Duration::from_millis(100);

/// Errors of the main job.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The HTTP listener could not be bound.
    #[error("cannot listen on http.listen = {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        #[source]
        /// The underlying error.
        source: std::io::Error,
    },
    /// The node failed to start or stopped on its own.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The Prometheus recorder could not be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    /// The ready file could not be written.
    #[error("cannot write ready file {path}")]
    ReadyFile {
        /// The file or directory involved.
        path: PathBuf,
        #[source]
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Runs the node and its HTTP server until `shutdown` resolves, then stops gracefully.
///
/// Once the node is ready (every owned partition open, every shard receiving), writes
/// `{"pid": N, "http": "ADDR"}` to `ready_file` if given, so callers can bind port 0.
///
/// # Errors
/// [`RunError`]: the listener, the node start, a node failure while running, or the ready file.
pub async fn run(
    config: Config,
    ready_file: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let addr = config.http.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Listen { addr, source })?;
    let http_addr = listener
        .local_addr()
        .map_err(|source| RunError::Listen { addr, source })?;
    // The process-wide recorder behind the `metrics` macros; /metrics renders it.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| RunError::Metrics(e.to_string()))?;
    let mut node = Node::start(config).await?;
    let status = node.status_handle();
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(crate::http::serve(
        listener,
        crate::http::router(status.clone(), metrics),
        async move {
            // Either a stop request or the sender dropped: both mean stop.
            let _ = http_stopped.await;
        },
    ));
    tracing::info!(http = %http_addr, "serving /healthz, /readyz and /metrics");
    let ready = async {
        loop {
            if status.status(READY_POLL * 50).await.is_ok_and(|s| s.ready) {
                break;
            }
            tokio::time::sleep(READY_POLL).await;
        }
        tracing::info!("ready");
        match &ready_file {
            Some(path) => write_ready_file(
                path,
                &serde_json::json!({ "pid": std::process::id(), "http": http_addr.to_string() }),
            ),
            None => Ok(()),
        }
    };
    tokio::pin!(shutdown);
    let outcome = tokio::select! {
        r = async { ready.await?; std::future::pending::<Result<(), RunError>>().await } => r,
        () = &mut shutdown => Ok(()),
        e = node.failed() => Err(RunError::Node(e)),
    };
    let outcome = match outcome {
        Err(RunError::Node(e)) => Err(RunError::Node(e)),
        // Stopping on request, or after another error (the ready file): stop gracefully either
        // way, so shards keep their sessions and the replica gets the final state.
        other => {
            tracing::info!("stopping: closing shards with the resume code, draining partitions");
            let stopped = node.shutdown().await.map_err(RunError::from);
            other.and(stopped)
        }
    };
    // The server may already be gone; stopping it is best effort.
    let _ = stop_http.send(());
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "http server error");
    }
    outcome
}

/// Writes `value` as JSON to `path` atomically (temp file in the same directory, then rename), so
/// a reader never sees a partial file.
///
/// # Errors
/// [`RunError::ReadyFile`] on any I/O error.
pub fn write_ready_file(path: &Path, value: &serde_json::Value) -> Result<(), RunError> {
    crate::write_atomic(path, &value.to_string()).map_err(|source| RunError::ReadyFile {
        path: path.to_owned(),
        source,
    })
}

/// `shardlite simulate`: runs the Discord simulator until `shutdown`, printing its URLs and
/// writing `{"pid", "gateway_url", "api_url"}` to `ready_file` once it listens.
///
/// # Errors
/// The simulator's start error, or [`RunError::ReadyFile`].
pub async fn run_simulator(
    args: &crate::cli::SimulateArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use crate::simulator::{SimConfig, Simulator};
    let sim = Simulator::start(SimConfig {
        seed: args.seed,
        guilds: args.guilds,
        shards: args.shards,
        messages: args.messages,
        rate: args.rate,
        inject_malformed: args.inject_malformed,
        gateway_listen: args.gateway_listen,
        api_listen: args.api_listen,
        ..SimConfig::default()
    })
    .await?;
    println!("gateway_url = {}", sim.gateway_url());
    println!("api_url     = {}", sim.api_url());
    if let Some(path) = &args.ready_file {
        write_ready_file(
            path,
            &serde_json::json!({
                "pid": std::process::id(),
                "gateway_url": sim.gateway_url(),
                "api_url": sim.api_url(),
            }),
        )?;
    }
    shutdown.await;
    sim.shutdown().await;
    Ok(())
}
