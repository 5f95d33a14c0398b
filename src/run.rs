//! `shardlite run`: the main job — the actor tree plus its HTTP endpoints, until told to stop.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::{LeaseError, LeaseKeeper, LeaseWait, Leases, ReleasedPosition};
use crate::config::{Config, ReplicationMode};
use crate::node::{Leased, Node, NodeError};
use crate::ownership::{PartitionId, Topology};
use crate::replication::Epochs;
use crate::store::PartitionStore;

/// How often readiness is checked until the ready file is written.
const READY_POLL: Duration = Duration::from_millis(100);
/// Pause between passes over generations that could not be retired yet.
const RETIRE_RETRY: Duration = Duration::from_secs(30);

/// The lease acquisition of one shard group: resolves with the shard and its leases.
type AcquiringGroup<'a> = std::pin::Pin<
    Box<dyn Future<Output = Result<(u32, Vec<crate::cluster::Acquired>), LeaseError>> + Send + 'a>,
>;

/// Longest a fence of one shard group may take before the process stops every write by exiting
/// (DESIGN §7: a lost lease must stop its writes before a contender can take it over, TTL / 3
/// after the write deadline at the shortest).
const FENCE_BOUND: Duration = Duration::from_secs(5);

/// How long a fenced group waits before it contends for its leases again: a contender taking
/// the group over looks every sixth of a TTL (every second once it sees a release), so it gets
/// the leases this process just released first, rather than each process ending up with part of
/// the group and waiting on the other for good.
fn refence_pause(config: &Config) -> Duration {
    Duration::from_secs(config.cluster.lease_ttl_secs) / 6 + Duration::from_secs(2)
}

/// Acquires the leases of `shard`'s partitions into `keeper` (see [`crate::cluster::Acquirer`]).
fn acquire_group<'a>(
    keeper: &LeaseKeeper,
    topology: &Topology,
    shard: u32,
    waits: &'a tokio::sync::watch::Sender<std::collections::BTreeMap<PartitionId, LeaseWait>>,
) -> AcquiringGroup<'a> {
    acquire_group_after(keeper, topology, shard, waits, Duration::ZERO)
}

/// [`acquire_group`] after a pause.
fn acquire_group_after<'a>(
    keeper: &LeaseKeeper,
    topology: &Topology,
    shard: u32,
    waits: &'a tokio::sync::watch::Sender<std::collections::BTreeMap<PartitionId, LeaseWait>>,
    pause: Duration,
) -> AcquiringGroup<'a> {
    let acquirer = keeper.acquirer();
    let partitions = topology.partitions_of_shard(shard);
    Box::pin(async move {
        tokio::time::sleep(pause).await;
        acquirer
            .acquire(&partitions, waits)
            .await
            .map(|acquired| (shard, acquired))
    })
}

/// A batch of shard groups being made ready: resolves with their shards once they run.
type AddingShards = std::pin::Pin<Box<dyn Future<Output = Result<Vec<u32>, NodeError>> + Send>>;

/// Aborts a background task when dropped (when `run` returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes superseded replica generations of the partitions of `epochs` once
/// `cluster.superseded_retention_secs` has passed and each current generation has data
/// (DESIGN §7), retrying what could not be done yet every 30 s. Failures are logged, never
/// fatal: an old generation left behind costs storage, not correctness.
async fn retire_superseded_generations(config: Config, epochs: Epochs) {
    tokio::time::sleep(Duration::from_secs(
        config.cluster.superseded_retention_secs,
    ))
    .await;
    let store = match crate::cluster::connect(&config) {
        Ok(store) => store,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "superseded replica generations are not retired");
            return;
        }
    };
    let mut pending = epochs;
    loop {
        let mut done = Vec::new();
        for (&partition, &epoch) in &pending {
            match crate::replication::generations::retire_superseded(
                store.as_ref(),
                &config,
                partition,
                epoch,
            )
            .await
            {
                Ok(Some(deleted)) => {
                    if deleted > 0 {
                        tracing::info!(%partition, epoch, deleted, "superseded replica generations deleted");
                    }
                    done.push(partition);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%partition, error = %crate::error_chain(&e),
                    "superseded replica generations not deleted yet"),
            }
        }
        for partition in done {
            pending.remove(&partition);
        }
        if pending.is_empty() {
            return;
        }
        tokio::time::sleep(RETIRE_RETRY).await;
    }
}

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
    /// A local guard refused the start: the data directory is in use, or was written with
    /// another partition count.
    #[error(transparent)]
    Local(#[from] crate::cluster::LocalError),
    /// The object store cannot hold leases (`cluster.pods > 1`): it ignores a precondition, or
    /// cannot be reached for the check.
    #[error(transparent)]
    ObjectStore(#[from] crate::cluster::BucketError),
    /// A partition lease could not be taken (another partition count in the bucket, a
    /// garbled lease object).
    #[error(transparent)]
    Lease(#[from] crate::cluster::LeaseError),
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

impl RunError {
    /// The process exit code for this error: 2 for what the operator fixes in the config or the
    /// deployment (a changed partition count, an object store that ignores preconditions,
    /// refused credentials or a missing bucket), 1 for everything else.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Local(e) if e.is_config() => 2,
            RunError::ObjectStore(e) if e.is_deployment_error() => 2,
            RunError::Lease(crate::cluster::LeaseError::PartitionsChanged { .. }) => 2,
            RunError::Lease(e) if e.is_deployment_error() => 2,
            _ => 1,
        }
    }
}

/// Why a reload (SIGHUP with a changed config file) was refused; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadRefused {
    /// The new config is the running one: nothing to do.
    #[error("the config did not change")]
    Unchanged,
    /// A key that only a restart can change (the data dir lock, the listening socket), or that
    /// is a data migration (`cluster.partitions`, DESIGN §7), differs.
    #[error("{key} cannot change by SIGHUP ({running} → {new}); {remedy}")]
    Fixed {
        /// The config key.
        key: &'static str,
        /// The running value.
        running: String,
        /// The value in the new config.
        new: String,
        /// What the operator can do instead.
        remedy: &'static str,
    },
    /// The new config needs an object store the running pod cannot use (unreachable, or it
    /// ignores the preconditions leases need).
    #[error("the new config's object store cannot be used")]
    ObjectStore(#[source] Box<RunError>),
}

/// Compares the running config with a new one (SIGHUP): `Ok` when the new one can replace it by
/// a drained handoff inside this process.
///
/// # Errors
/// [`ReloadRefused::Unchanged`] for an identical config; [`ReloadRefused::Fixed`] when
/// `storage.data_dir`, `http.listen` or `cluster.partitions` differ.
pub fn check_reload(running: &Config, new: &Config) -> Result<(), ReloadRefused> {
    if running == new {
        return Err(ReloadRefused::Unchanged);
    }
    let fixed = |key, running: String, new: String, remedy| {
        Err(ReloadRefused::Fixed {
            key,
            running,
            new,
            remedy,
        })
    };
    if running.storage.data_dir != new.storage.data_dir {
        return fixed(
            "storage.data_dir",
            running.storage.data_dir.display().to_string(),
            new.storage.data_dir.display().to_string(),
            "restart the process",
        );
    }
    if running.http.listen != new.http.listen {
        return fixed(
            "http.listen",
            running.http.listen.to_string(),
            new.http.listen.to_string(),
            "restart the process",
        );
    }
    if running.cluster.partitions != new.cluster.partitions {
        return fixed(
            "cluster.partitions",
            running.cluster.partitions.to_string(),
            new.cluster.partitions.to_string(),
            "changing the partition count is a data migration, not supported",
        );
    }
    Ok(())
}

/// Runs the node and its HTTP server until `shutdown` resolves, then stops gracefully.
///
/// Each config received on `reloads` (the binary sends one per SIGHUP, read from the same file)
/// that [`check_reload`] accepts replaces the running one by a drained handoff inside this
/// process: shards closed with the resume code, partitions drained, the final
/// `litestream sync -wait`, every lease released with its position — then the new config runs
/// from its lease acquisition on, like a restart that keeps the data dir lock, the HTTP socket
/// and the metrics. Shards the pod keeps resume their sessions; shards it gains wait for their
/// leases. Reloads are applied once the pod is ready; one received while it starts waits until
/// then.
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
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    for (key, url) in config.plaintext_discord_urls() {
        tracing::warn!(key, url = %url,
            "plain-text Discord URL to another host: the bot token and every event cross the network unencrypted");
    }
    // Held until this function returns: nothing below touches the data dir without it.
    let lock = crate::cluster::DataDirLock::acquire(&config.storage.data_dir)?;
    tracing::debug!(lock = %lock.path().display(), "data dir locked");
    preflight(&config).await?;
    // Everything that can fail cheaply fails before the leases are taken.
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
    // Served from here on: while the pod waits for leases, /readyz says for which.
    let (waits_tx, waits) = tokio::sync::watch::channel(Default::default());
    let (node_tx, node_rx) = tokio::sync::watch::channel(None);
    let (epochs_tx, epochs_rx) = tokio::sync::watch::channel(Default::default());
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(crate::http::serve(
        listener,
        crate::http::router(
            crate::http::PodStatus {
                waits,
                node: node_rx,
                epochs: epochs_rx,
            },
            metrics,
            config.http.api_token.clone(),
            config.storage.data_dir.clone(),
        ),
        async move {
            // Either a stop request or the sender dropped: both mean stop.
            let _ = http_stopped.await;
        },
    ));
    tracing::info!(http = %http_addr, "serving /healthz, /readyz and /metrics");
    let pod = Pod {
        waits: waits_tx,
        node: node_tx,
        epochs: epochs_tx,
        ready_file,
        http: http_addr,
    };
    tokio::pin!(shutdown);
    let mut config = config;
    let outcome = loop {
        match run_config(&config, &pod, &mut shutdown, &mut reloads).await {
            Ok(Ended::Stopped) => break Ok(()),
            Ok(Ended::Reload(new)) => {
                // Its object store was checked when the reload was accepted; what is left is
                // recording the (possibly new) shard total with the data.
                if let Err(e) = check_recorded_topology(&new) {
                    break Err(e);
                }
                tracing::info!("running the new config");
                config = *new;
            }
            Err(e) => break Err(e),
        }
    };
    // The server may already be gone; stopping it is best effort.
    let _ = stop_http.send(());
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "http server error");
    }
    drop(lock);
    outcome
}

/// What a run of one config shares with the next: the channels `/readyz` reads and where
/// readiness is announced.
struct Pod {
    waits: tokio::sync::watch::Sender<std::collections::BTreeMap<PartitionId, LeaseWait>>,
    node: tokio::sync::watch::Sender<Option<crate::node::StatusHandle>>,
    epochs: tokio::sync::watch::Sender<std::collections::BTreeMap<PartitionId, u64>>,
    ready_file: Option<PathBuf>,
    http: SocketAddr,
}

/// How a run of one config ended without an error.
enum Ended {
    /// `shutdown` resolved: the process stops.
    Stopped,
    /// An accepted reload: the new config runs next.
    Reload(Box<Config>),
}

/// The checks a config passes before anything is written under it:
/// [`check_recorded_topology`], then [`check_store`].
async fn preflight(config: &Config) -> Result<(), RunError> {
    check_recorded_topology(config)?;
    check_store(config).await
}

/// The partition count recorded in the data dir is the configured one; records the shard total.
fn check_recorded_topology(config: &Config) -> Result<(), RunError> {
    Ok(crate::cluster::check_topology(
        &config.storage.data_dir,
        config.discord.shards,
        config.cluster.partitions,
    )?)
}

/// The object store is reachable, and with several pods it enforces the preconditions leases
/// need.
async fn check_store(config: &Config) -> Result<(), RunError> {
    if config.replication.mode != ReplicationMode::Off {
        // An unreachable store fails the start at once, naming it (the lease client and
        // Litestream would both retry for a long time first).
        crate::replication::restore::probe_endpoint(config)
            .await
            .map_err(|e| RunError::Node(e.into()))?;
    }
    if config.cluster.pods > 1 {
        check_object_store(config).await?;
    }
    Ok(())
}

/// Runs the node under `config`, from lease acquisition to the release: until `shutdown`
/// resolves, the node fails, or a reload is accepted.
///
/// The node is launched without shard groups; each owned shard's group starts as soon as the
/// leases of its partitions are held (DESIGN §7): its stale files moved aside, its partitions
/// restored and opened, Litestream given them, the group started. Groups whose leases arrive
/// while another batch is being restored start together in the next batch. So a pod gaining
/// shards from several pods in a rolling update resumes each one as its old owner releases it,
/// not all of them after the last release.
async fn run_config(
    config: &Config,
    pod: &Pod,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    reloads: &mut tokio::sync::mpsc::Receiver<Config>,
) -> Result<Ended, RunError> {
    use futures_util::StreamExt as _;
    let config_topology = config.topology();
    let ordinal = config.cluster.ordinal;
    let data_dir = config.storage.data_dir.clone();
    let mut keeper = match config.replication.mode {
        ReplicationMode::Off => None,
        ReplicationMode::Child | ReplicationMode::External => Some(lease_keeper(config)?),
    };
    // Launching writes no partition file: nothing is restored, opened or uploaded before this
    // process holds the lease of the partition (DESIGN §7).
    let mut node = tokio::select! {
        node = Node::launch(config.clone()) => node?,
        () = shutdown.as_mut() => return Ok(Ended::Stopped),
    };
    let status = node.status_handle();
    pod.node.send_replace(Some(status.clone()));
    // One lease acquisition per owned shard, all at once (a partition's TTL runs while it is
    // watched, and every one must run in parallel).
    let mut acquiring = futures_util::stream::FuturesUnordered::new();
    let mut pending: Vec<(u32, Vec<crate::cluster::Acquired>)> = Vec::new();
    match &keeper {
        Some(keeper) => {
            for shard in config_topology.shards_of_pod(ordinal) {
                acquiring.push(acquire_group(keeper, &config_topology, shard, &pod.waits));
            }
        }
        None => pending.extend(
            config_topology
                .shards_of_pod(ordinal)
                .into_iter()
                .map(|s| (s, Vec::new())),
        ),
    }
    // The batch of groups being made ready (restores, files, Litestream), if any.
    let mut adding: Option<AddingShards> = None;
    let mut started: Vec<u32> = Vec::new();
    // The shards of the batch in `adding`, and acquisitions that lost a lease meanwhile.
    let mut adding_shards: Vec<u32> = Vec::new();
    let mut tainted: std::collections::HashSet<u32> = std::collections::HashSet::new();
    let mut epochs = Epochs::new();
    let ready = async {
        loop {
            if status.status(READY_POLL * 50).await.is_ok_and(|s| s.ready) {
                break;
            }
            tokio::time::sleep(READY_POLL).await;
        }
        tracing::info!("ready");
        if let Some(path) = &pod.ready_file {
            write_ready_file(
                path,
                &serde_json::json!({ "pid": std::process::id(), "http": pod.http.to_string() }),
            )?;
        }
        Ok::<_, RunError>(())
    };
    tokio::pin!(ready);
    let mut is_ready = false;
    // Aborted when this run ends (a reload starts the next run's own).
    let mut retirement: Option<AbortOnDrop> = None;
    let outcome = loop {
        if adding.is_none() && !pending.is_empty() {
            let batch = std::mem::take(&mut pending);
            let shards: Vec<u32> = batch.iter().map(|(s, _)| *s).collect();
            let acquired: Vec<crate::cluster::Acquired> =
                batch.into_iter().flat_map(|(_, a)| a).collect();
            let released: HashMap<PartitionId, ReleasedPosition> = acquired
                .iter()
                .filter_map(|a| Some((a.partition, a.released.clone()?)))
                .collect();
            if let Err(e) = move_aside_stale_files(&data_dir, &released) {
                break Err(RunError::Node(e.into()));
            }
            // The fence (DESIGN §7): in child mode each partition replicates to its lease
            // epoch's generation. External mode stays on generation 0 (its sidecar cannot
            // follow a new epoch at every start; it is single-pod only).
            let batch_epochs: Epochs = match config.replication.mode {
                ReplicationMode::Child => acquired.iter().map(|a| (a.partition, a.epoch)).collect(),
                _ => Epochs::new(),
            };
            epochs.extend(batch_epochs.iter().map(|(p, e)| (*p, *e)));
            pod.epochs.send_replace(epochs.clone());
            tracing::info!(shards = ?shards, "partitions leased; restoring and starting their shard groups");
            adding_shards.clone_from(&shards);
            let adder = node.adder();
            let leased = Leased {
                epochs: batch_epochs,
                released,
            };
            adding = Some(Box::pin(async move {
                adder.add(shards.clone(), leased).await.map(|_| shards)
            }));
        }
        let mut lost_lease = None;
        tokio::select! {
            Some(acquired) = acquiring.next(), if !acquiring.is_empty() => match acquired {
                Ok((shard, _)) if tainted.remove(&shard) => {
                    // A lease of it was lost while the others were awaited: start over.
                    if let Some(keeper) = keeper.as_mut() {
                        keeper
                            .release_fenced(None, &config_topology.partitions_of_shard(shard))
                            .await;
                        acquiring.push(acquire_group_after(
                            keeper,
                            &config_topology,
                            shard,
                            &pod.waits,
                            refence_pause(config),
                        ));
                    }
                }
                Ok(group) => pending.push(group),
                Err(e) => break Err(RunError::Lease(e)),
            },
            added = async { adding.as_mut().expect("guarded").await }, if adding.is_some() => {
                adding = None;
                adding_shards.clear();
                match added {
                    Ok(shards) => started.extend(shards),
                    Err(e) => break Err(RunError::Node(e)),
                }
            },
            r = &mut ready, if !is_ready => match r {
                Ok(()) => {
                    is_ready = true;
                    // Every partition has uploaded its first snapshot into its new generation
                    // by now: the older ones can go after the retention period.
                    if !epochs.is_empty() {
                        retirement = Some(AbortOnDrop(tokio::spawn(
                            retire_superseded_generations(config.clone(), epochs.clone()),
                        )));
                    }
                }
                Err(e) => break Err(e),
            },
            () = shutdown.as_mut() => break Ok(Ended::Stopped),
            e = node.failed() => break Err(RunError::Node(e)),
            lost = async {
                match keeper.as_mut() {
                    Some(keeper) => keeper.lost().await,
                    None => std::future::pending().await,
                }
            } => lost_lease = Some(lost),
            // Reloads wait until the pod is ready: a drain in the middle of a start would hand
            // over partitions that have not uploaded their first snapshot yet.
            // Nor while groups are being added or wait to be (after a fence).
            Some(new) = reloads.recv(), if is_ready && adding.is_none() && pending.is_empty() => {
                // Several SIGHUPs in a row: the newest file is the one that counts.
                let mut new = new;
                while let Ok(newer) = reloads.try_recv() {
                    new = newer;
                }
                match accept_reload(config, &new).await {
                    Ok(()) => break Ok(Ended::Reload(Box::new(new))),
                    Err(ReloadRefused::Unchanged) => {
                        tracing::info!("SIGHUP: the config did not change; nothing to do");
                    }
                    Err(refused) => tracing::error!(error = %crate::error_chain(&refused),
                        "SIGHUP: new config refused; the running config stays"),
                }
            }
        }
        if let (Some(lost), Some(keeper)) = (lost_lease, keeper.as_mut()) {
            let shard = config_topology.shard_of_partition(lost.partition);
            let group = config_topology.partitions_of_shard(shard);
            ::metrics::counter!("shardlite_lease_losses_total", "shard" => shard.to_string())
                .increment(1);
            tracing::error!(shard, partition = %lost.partition, error = %crate::error_chain(&lost.error),
                "partition lease lost: fencing its shard group (no more writes, no drain), then waiting for the lease again");
            if started.contains(&shard) {
                // While a batch is being added the tree is busy with it (restores, Litestream
                // taking the partitions on, a forced sync that would upload this group too): a
                // fence could only come after it, and this group writes meanwhile.
                if adding.is_some() {
                    fence_and_exit(&data_dir, &lost.error);
                }
                // Well within the TTL / 3 between the write deadline and a contender's takeover.
                match tokio::time::timeout(FENCE_BOUND, node.adder().fence(vec![shard])).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(shard, error = %crate::error_chain(&e), "the fence was not confirmed");
                        fence_and_exit(&data_dir, &lost.error);
                    }
                    Err(_) => {
                        tracing::error!(shard, bound = ?FENCE_BOUND, "the fence was not confirmed in time");
                        fence_and_exit(&data_dir, &lost.error);
                    }
                }
                started.retain(|s| *s != shard);
                for p in &group {
                    epochs.remove(p);
                }
                pod.epochs.send_replace(epochs.clone());
            } else if adding_shards.contains(&shard) {
                // Its partitions are being restored or handed to Litestream: the only way to
                // be sure nothing of them writes is to stop the process.
                fence_and_exit(&data_dir, &lost.error);
            } else if let Some(i) = pending.iter().position(|(s, _)| *s == shard) {
                pending.remove(i);
            } else {
                // Its leases are still being acquired: the ones held so far go back when the
                // acquisition completes, and it starts over.
                tainted.insert(shard);
                keeper.release_fenced(Some(lost), &[]).await;
                continue;
            }
            keeper.release_fenced(Some(lost), &group).await;
            acquiring.push(acquire_group_after(
                keeper,
                &config_topology,
                shard,
                &pod.waits,
                refence_pause(config),
            ));
        }
    };
    // No lease joins the keeper after this, and no batch is half started: a restore still
    // running is killed (it writes a temporary file only), and the groups a batch already
    // handed to the tree stop with it.
    drop(acquiring);
    drop(adding);
    let outcome = match outcome {
        // The tree itself failed: there is nothing left to drain.
        Err(RunError::Node(NodeError::Failed(e))) => Err(RunError::Node(NodeError::Failed(e))),
        // Stopping on request, for a reload, or after another error (a restore, the ready
        // file): stop gracefully either way, so shards keep their sessions and the replica gets
        // the final state.
        other => {
            match &other {
                Ok(Ended::Reload(_)) => tracing::info!(
                    "config changed: closing shards with the resume code, draining partitions \
                     and releasing their leases"
                ),
                _ => tracing::info!(
                    "stopping: closing shards with the resume code, draining partitions"
                ),
            }
            let stopped = match keeper.as_mut() {
                None => node.shutdown().await,
                // The final sync uploads: a lease lost meanwhile fences it like any other write.
                Some(keeper) => tokio::select! {
                    stopped = node.shutdown() => stopped,
                    lost = keeper.lost() => fence_and_exit(&data_dir, &lost.error),
                },
            }
            .map_err(RunError::from);
            pod.node.send_replace(None);
            pod.epochs.send_replace(Default::default());
            pod.waits.send_replace(Default::default());
            crate::node::metrics::record_stopped(&config_topology.shards_of_pod(ordinal));
            match keeper {
                // Only after a complete stop and final sync: the next owner restores what the
                // replica has and resumes from it. Partitions of groups that never started
                // release without a position (nothing was written under their epoch).
                Some(keeper) if stopped.is_ok() => {
                    // A batch whose add was dropped at the stop may have started its groups all
                    // the same (the tree finishes a message it began): they ran and were
                    // drained, so they release with their positions too.
                    let written: Vec<PartitionId> = started
                        .iter()
                        .chain(&adding_shards)
                        .flat_map(|&s| config_topology.partitions_of_shard(s))
                        .collect();
                    let positions = released_positions(&data_dir, &written, &config_topology);
                    keeper.release(positions).await;
                }
                Some(_) => tracing::warn!(
                    "the stop did not complete; leases are left to expire after their TTL"
                ),
                None => {}
            }
            match other {
                Ok(ended) => stopped.map(|()| ended),
                Err(e) => Err(e),
            }
        }
    };
    drop(retirement);
    outcome
}

/// [`check_reload`], then [`check_store`] for the new config, before anything running is
/// stopped (the recorded partition count needs no check: [`check_reload`] refuses a change).
async fn accept_reload(running: &Config, new: &Config) -> Result<(), ReloadRefused> {
    check_reload(running, new)?;
    check_store(new)
        .await
        .map_err(|e| ReloadRefused::ObjectStore(Box::new(e)))
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

/// With several pods, leases need an object store that enforces conditional writes
/// (DESIGN §7): checked once at start, before anything is written.
async fn check_object_store(config: &Config) -> Result<(), crate::cluster::BucketError> {
    let store = crate::cluster::connect(config)?;
    let endpoint = config.replication.endpoint.as_deref().unwrap_or_default();
    crate::cluster::verify_conditional_writes(store.as_ref(), &config.replication.prefix, endpoint)
        .await?;
    tracing::info!(endpoint, "object store enforces If-None-Match and If-Match");
    Ok(())
}

/// A lease keeper for this pod's partitions, holding none yet (DESIGN §7).
fn lease_keeper(config: &Config) -> Result<LeaseKeeper, RunError> {
    let store = crate::cluster::connect(config)?;
    let ttl = Duration::from_secs(config.cluster.lease_ttl_secs);
    let leases = Leases::new(
        store,
        &config.replication.prefix,
        crate::cluster::holder_name(config.cluster.ordinal),
        ttl,
        config.cluster.partitions,
    );
    Ok(LeaseKeeper::new(Arc::new(leases), ttl))
}

/// What each partition file applied, read after the node stopped: the next owner resumes from
/// there. A file that cannot be read records no position (the next owner then trusts its
/// restore alone).
fn released_positions(
    data_dir: &Path,
    owned: &[PartitionId],
    topology: &Topology,
) -> HashMap<PartitionId, ReleasedPosition> {
    owned
        .iter()
        .filter_map(|&p| {
            let store =
                PartitionStore::open_read_only(&PartitionStore::path_in(data_dir, p), p).ok()?;
            let shard = topology.shard_of_partition(p);
            let applied = store.applied_session(shard, topology.shards()).ok()??;
            Some((
                p,
                ReleasedPosition {
                    shard_total: applied.shard_total,
                    session_id: applied.session_id,
                    resume_url: applied.resume_url,
                    applied_seq: applied.applied_seq,
                },
            ))
        })
        .collect()
}

/// A lease is gone: another process may own the partition from now on. This process must not
/// write it again — no drain, no final sync — so the Litestream child is killed (SIGKILL, not
/// SIGTERM, which would start its final upload; its pid is read from `data_dir/litestream.pid`,
/// without asking an actor that may be busy) and the process exits 1 at once, before any
/// supervisor could start a new child or commit another batch. Kubernetes or systemd restarts
/// it, and the restarted process waits for the lease like any other contender.
fn fence_and_exit(data_dir: &Path, lost: &LeaseError) -> ! {
    tracing::error!(error = %crate::error_chain(lost),
        "partition lease lost: stopping every write now and exiting");
    let pid = std::fs::read_to_string(data_dir.join("litestream.pid"))
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    if let Some(pid) = pid {
        crate::replication::process::signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
    eprintln!("error: {}", crate::error_chain(lost));
    std::process::exit(1)
}

/// A local partition file behind the position its lease's previous holder released is stale:
/// another pod wrote the partition since (a shard that moved away and back, an old volume put
/// back). Kept, it would pass `quick_check`, and Litestream would continue the replica from it,
/// rolling back what the other pod uploaded. It is moved aside (`NAME.stale-UNIXSECS`, never
/// deleted), so restore before open brings the replica's copy.
fn move_aside_stale_files(
    data_dir: &Path,
    released: &HashMap<PartitionId, ReleasedPosition>,
) -> Result<(), crate::replication::ReplicationError> {
    for (&p, position) in released {
        let path = PartitionStore::path_in(data_dir, p);
        if !path.exists() {
            continue;
        }
        // A file that cannot be read is not judged here: restore before open checks its health
        // and moves it aside as corrupt if it is.
        let Ok(store) = PartitionStore::open_read_only(&path, p) else {
            continue;
        };
        // The position was recorded under the releasing holder's shard total, which a
        // reshard (S → 2S) changes: compare with the session the file holds under that total.
        let shard = p.0 % position.shard_total.max(1);
        let Ok(local) = store.applied_session(shard, position.shard_total) else {
            continue;
        };
        drop(store);
        let current = local.as_ref().is_some_and(|a| {
            a.session_id == position.session_id && a.applied_seq >= position.applied_seq
        });
        if !current {
            tracing::warn!(partition = %p, file = %path.display(),
                local_seq = local.as_ref().map(|a| a.applied_seq),
                released_seq = position.applied_seq,
                "local partition file is behind what its last owner released; moving it aside");
            crate::replication::restore::move_aside(&path, "stale")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::PartitionId;

    #[test]
    fn what_the_operator_must_fix_exits_2_and_passing_failures_exit_1() {
        let request = |source| {
            RunError::Lease(LeaseError::Request {
                partition: PartitionId(3),
                source,
            })
        };
        let refused = request(object_store::Error::PermissionDenied {
            path: "t/leases/p0003".into(),
            source: "403 Forbidden".into(),
        });
        assert_eq!(refused.exit_code(), 2);
        let flaky = request(object_store::Error::Generic {
            store: "S3",
            source: "connection reset".into(),
        });
        assert_eq!(flaky.exit_code(), 1);
        let changed = RunError::Lease(LeaseError::PartitionsChanged {
            partition: PartitionId(0),
            recorded: 64,
            configured: 128,
        });
        assert_eq!(changed.exit_code(), 2);
    }

    #[test]
    fn a_reload_is_refused_when_nothing_changed_or_a_fixed_key_did() {
        let running = Config::default();
        assert!(matches!(
            check_reload(&running, &running.clone()),
            Err(ReloadRefused::Unchanged)
        ));
        let mut scaled = running.clone();
        scaled.cluster.pods = 3;
        check_reload(&running, &scaled).unwrap();
        let mut moved = running.clone();
        moved.storage.data_dir = "/elsewhere".into();
        let refused = check_reload(&running, &moved).unwrap_err().to_string();
        assert!(
            refused.starts_with("storage.data_dir cannot change by SIGHUP"),
            "{refused}"
        );
        let mut listen = running.clone();
        listen.http.listen = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(
            check_reload(&running, &listen),
            Err(ReloadRefused::Fixed {
                key: "http.listen",
                ..
            })
        ));
        let mut partitions = running.clone();
        partitions.cluster.partitions = running.cluster.partitions * 2;
        let refused = check_reload(&running, &partitions).unwrap_err().to_string();
        assert!(
            refused.contains(&format!(
                "cluster.partitions cannot change by SIGHUP ({} → {})",
                running.cluster.partitions,
                running.cluster.partitions * 2
            )),
            "{refused}"
        );
    }
}
