//! The actor tree (DESIGN §3), started and stopped through [`Node`].
//!
//! ```text
//! NodeActor (root supervisor)            root.rs
//! ├── LitestreamActor (child mode)      litestream.rs    `litestream replicate`, restart policy
//! └── ShardGroupActor ×owned shards     shard_group.rs   one-for-all, restart policy
//!     ├── ShardActor                    shard/mod.rs     lifecycle, watchdog, fatal closes
//!     │   └── pump task                 shard/pump.rs    owns the twilight Shard, routes dispatches
//!     └── PartitionActor ×(P/S)         partition.rs     one SQLite file each
//! ```
//! The shard's other files (table in [`shard`]): `shard/deliver.rs` (what the pump sends its
//! partitions, within the in-flight budget), `shard/route.rs` (guild → which partition),
//! `shard/session_start.rs` (a new session committed by every partition, then the replica) and
//! `shard/status.rs` (phase, status, the counters the pump shares with the actor).
//! Every supervisor uses [`crate::supervision::RestartTracker`]; none relies on ractor's default,
//! which stops the parent on any child exit.

pub mod dead_letter;
pub mod discord;
pub mod identify_queue;
pub mod litestream;
pub mod metrics;
pub mod partition;
pub mod root;
pub mod shard;
pub mod shard_group;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, Message, RpcReplyPort};
use twilight_gateway::{ConfigBuilder, Intents};

use crate::cluster::ReleasedPosition;
use crate::config::{Config, ReplicationMode};
use crate::ownership::{PartitionId, Topology};
use crate::replication::{self, Epochs, process::ReplicaSync};
use crate::store::{Checkpointer, PartitionStore};
use crate::supervision::RestartPolicy;
use identify_queue::{IdentifyQueue, IdentifySlots, SystemClock};
use litestream::LitestreamArgs;
pub use root::NodeStatus;
use root::{NodeActor, NodeArgs, NodeMsg};

/// What every actor of the tree shares, read-only.
pub struct NodeContext {
    /// The validated config.
    pub config: Config,
    /// Shards, partitions, pods (DESIGN §2).
    pub topology: Topology,
    /// twilight shard config (token, intents, gateway URL, the shared identify queue), without a
    /// session; each shard start adds its own.
    pub gateway: twilight_gateway::Config<IdentifyQueue>,
    /// Restart policy of every supervisor.
    pub policy: RestartPolicy,
    /// Forces uploads through the Litestream child (`replication.mode = "child"`); shards use it
    /// to make each new gateway session durable on the replica before applying its dispatches.
    pub replica_sync: Option<ReplicaSync>,
}

/// Errors of starting, querying and stopping the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// `DISCORD_TOKEN` is not set.
    #[error("DISCORD_TOKEN is not set: the gateway needs the bot token")]
    MissingToken,
    /// `GET /gateway/bot` failed.
    #[error("cannot fetch {url}")]
    GatewayBot {
        /// The URL requested.
        url: String,
        #[source]
        /// The underlying error.
        source: reqwest::Error,
    },
    /// `GET /gateway/bot` answered with an error status.
    #[error("{url} answered HTTP {status}{}", if *.status == 401 { " (Discord rejected DISCORD_TOKEN)" } else { "" })]
    GatewayBotStatus {
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The actor tree could not start (a partition file could not be opened, …).
    #[error("cannot start the node: {0}")]
    Start(String),
    /// An actor did not answer in time or is gone.
    #[error("{what} did not answer: {reason}")]
    Call {
        /// Which actor.
        what: &'static str,
        /// Timeout or gone.
        reason: String,
    },
    /// A supervisor gave up; the node stopped.
    #[error("node failed: {0}")]
    Failed(String),
    /// Restore before open or the Litestream setup failed; no partition was opened.
    #[error(transparent)]
    Replication(#[from] crate::replication::ReplicationError),
}

/// Sends `msg` and waits at most `timeout` for the reply.
///
/// # Errors
/// [`NodeError::Call`] on timeout or if the actor is gone.
pub async fn call<M: Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    msg: impl FnOnce(RpcReplyPort<T>) -> M,
    timeout: Duration,
) -> Result<T, NodeError> {
    let what = std::any::type_name::<M>()
        .rsplit("::")
        .next()
        .unwrap_or("actor");
    match actor.call(msg, Some(timeout)).await {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(NodeError::Call {
            what,
            reason: format!("timed out after {timeout:?}"),
        }),
        Ok(CallResult::SenderError) => Err(NodeError::Call {
            what,
            reason: "dropped the request".into(),
        }),
        Err(e) => Err(NodeError::Call {
            what,
            reason: e.to_string(),
        }),
    }
}

/// A running node: the root of the actor tree plus what is needed to watch and stop it.
pub struct Node {
    actor: ActorRef<NodeMsg>,
    join: tokio::task::JoinHandle<()>,
    failure: Arc<Mutex<Option<String>>>,
    shutdown_timeout: Duration,
    ctx: Arc<NodeContext>,
}

/// Starts shard groups on a running [`Node`] (see [`Node::adder`]).
#[derive(Clone)]
pub struct ShardAdder {
    ctx: Arc<NodeContext>,
    actor: ActorRef<NodeMsg>,
    timeout: Duration,
}

impl ShardAdder {
    /// Makes the partitions of `shards` ready and starts their groups (DESIGN §6, §7): restores
    /// the partitions that need it before any of them is opened ([`replication::prepare`]),
    /// opens each file once (creating and migrating it, recording its lease epoch, checking it
    /// against the position its previous holder released), hands them to the Litestream child,
    /// and starts one group per shard. Returns the restore decisions once every group runs.
    ///
    /// `leased` says what this process's leases hold for those partitions (ignored with
    /// `replication.mode = "off"`): each one's epoch (it replicates to that generation and
    /// records the epoch in its file; 0 for the prefix without an epoch), and the position the
    /// previous holder released.
    ///
    /// # Errors
    /// [`NodeError::Replication`] if a restore fails (no partition of `shards` was opened then),
    /// [`NodeError::Start`] if a file cannot be opened or a group cannot start,
    /// [`NodeError::Call`] if the tree does not answer.
    pub async fn add(
        &self,
        shards: Vec<u32>,
        leased: Leased,
    ) -> Result<Vec<replication::restore::Outcome>, NodeError> {
        let config = &self.ctx.config;
        let epochs: Epochs = shards
            .iter()
            .flat_map(|&s| self.ctx.topology.partitions_of_shard(s))
            .map(|p| (p, leased.epochs.get(&p).copied().unwrap_or_default()))
            .collect();
        let outcomes = replication::prepare(config, &epochs).await?;
        if config.replication.mode != ReplicationMode::Off {
            create_partition_files(config, &epochs, leased.released).await?;
        }
        call(
            &self.actor,
            |r| NodeMsg::AddShards(shards, epochs, r),
            self.timeout,
        )
        .await??;
        Ok(outcomes)
    }

    /// Stops the groups of `shards` from writing at once (their lease was lost, DESIGN §7): no
    /// close frame, no drain, no final sync; Litestream stops replicating their partitions.
    /// Returns once nothing writes them; they can be added again with [`Self::add`].
    ///
    /// # Errors
    /// [`NodeError::Call`] if the tree does not answer; [`NodeError::Replication`] if the
    /// Litestream child could not be started again without them.
    pub async fn fence(&self, shards: Vec<u32>) -> Result<(), NodeError> {
        call(
            &self.actor,
            |r| NodeMsg::FenceShards(shards, r),
            self.timeout,
        )
        .await?
    }
}

impl Node {
    /// Starts the whole node at once: [`Node::launch`], then [`ShardAdder::add`] for every owned
    /// shard (`cluster.ordinal` under DESIGN §2's assignment) with `leased`. Returns once every
    /// partition file is open and every shard is connecting. The demo and single-process runs
    /// use it; `shardlite run` with leases adds each shard group as its leases arrive instead.
    ///
    /// # Errors
    /// As [`Node::launch`] and [`ShardAdder::add`].
    pub async fn start(config: Config, leased: Leased) -> Result<Node, NodeError> {
        let node = Node::launch(config.clone()).await?;
        let shards = config.topology().shards_of_pod(config.cluster.ordinal);
        node.adder().add(shards, leased).await?;
        Ok(node)
    }

    /// Fetches `/gateway/bot`, stops a previous run's Litestream child still running, and starts
    /// the tree without shard groups: the root, and in child mode the Litestream actor (which
    /// starts its process with the first partitions). Nothing is restored or opened yet; shard
    /// groups join with [`ShardAdder::add`]. In external mode `litestream.yml` is written here,
    /// once, for every owned partition (its sidecar reads it when it starts).
    ///
    /// # Errors
    /// [`NodeError::MissingToken`], [`NodeError::GatewayBot`]/[`NodeError::GatewayBotStatus`],
    /// [`NodeError::Replication`] if the rendered file cannot be written, or
    /// [`NodeError::Start`] if the tree cannot start.
    pub async fn launch(config: Config) -> Result<Node, NodeError> {
        let token = config
            .discord
            .token
            .clone()
            .ok_or(NodeError::MissingToken)?;
        let topology = config.topology();
        let info = discord::gateway_bot(&config.discord.api_url, &token).await?;
        if info.shards > topology.shards() {
            tracing::warn!(
                recommended = info.shards,
                configured = topology.shards(),
                "Discord recommends more shards than discord.shards; plan a reshard"
            );
        }
        let gateway_url = config
            .discord
            .gateway_url
            .clone()
            .unwrap_or_else(|| info.url.trim_end_matches('/').to_owned());
        // Pods take turns on the identify buckets they share; the wall clock tells whose turn it is.
        let slots = IdentifySlots::new(
            &topology,
            config.cluster.ordinal,
            info.session_start_limit.max_concurrency,
            Duration::from_millis(config.discord.identify_clock_skew_ms),
            Arc::new(SystemClock),
        );
        let queue = IdentifyQueue::with_slots(
            &info.session_start_limit,
            config.discord.identify_reserve,
            slots,
        );
        let gateway = ConfigBuilder::new(
            token.expose().to_owned(),
            Intents::from_bits_truncate(config.discord.intents),
        )
        .proxy_url(gateway_url)
        .queue(queue)
        .build();
        let owned = topology.partitions_of_pod(config.cluster.ordinal);
        let data_dir = replication::litestream_config::absolute_data_dir(&config);
        let pid_file = data_dir.join("litestream.pid");
        let litestream = match config.replication.mode {
            ReplicationMode::Child => {
                // Before restore touches any file: a previous run's Litestream may still be
                // making its final sync, and two processes on one replica path corrupt it.
                replication::process::stop_leftover(&pid_file).await;
                Some(LitestreamArgs {
                    bin: config.replication.litestream_bin.clone(),
                    pid_file,
                    socket: data_dir.join(replication::litestream_config::SOCKET_NAME),
                    config_file: data_dir.join(replication::litestream_config::FILE_NAME),
                    policy: RestartPolicy::from(&config.supervision),
                    config: config.clone(),
                    epochs: Epochs::new(),
                })
            }
            ReplicationMode::External => {
                // External mode is single-pod, on generation 0 (see `replication::generations`).
                let epochs: Epochs = owned.iter().map(|p| (*p, 0)).collect();
                replication::write_config(&config, &epochs)?;
                None
            }
            ReplicationMode::Off => None,
        };
        // Litestream's final sync on stop comes on top of the tree's own drain.
        let shutdown_timeout = Duration::from_secs(config.supervision.shutdown_timeout_secs)
            + if litestream.is_some() {
                replication::process::STOP_BOUND + Duration::from_secs(10)
            } else {
                Duration::ZERO
            };
        let replica_sync = litestream
            .as_ref()
            .map(|args| ReplicaSync::new(&args.bin, &args.socket));
        let ctx = Arc::new(NodeContext {
            replica_sync,
            policy: RestartPolicy::from(&config.supervision),
            topology,
            gateway,
            config,
        });
        let failure = Arc::new(Mutex::new(None));
        let (actor, join) = Actor::spawn(
            None,
            NodeActor,
            NodeArgs {
                ctx: ctx.clone(),
                failure: failure.clone(),
                litestream,
            },
        )
        .await
        .map_err(|e| NodeError::Start(e.to_string()))?;
        Ok(Node {
            actor,
            join,
            failure,
            shutdown_timeout,
            ctx,
        })
    }

    /// A handle that starts shard groups on this node; cheap to clone, usable while the node
    /// itself is borrowed (waiting for [`Node::failed`]).
    pub fn adder(&self) -> ShardAdder {
        ShardAdder {
            ctx: self.ctx.clone(),
            actor: self.actor.clone(),
            timeout: self.shutdown_timeout,
        }
    }

    /// The status of every owned shard and partition.
    ///
    /// # Errors
    /// [`NodeError::Call`] if the tree does not answer.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        call(&self.actor, NodeMsg::Status, self.shutdown_timeout).await
    }

    /// A handle for status queries that can be cloned into other tasks (HTTP).
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle {
            actor: self.actor.clone(),
        }
    }

    /// Graceful stop (DESIGN §5): every shard closes with the resume code, every partition commits
    /// what it holds, within `supervision.shutdown_timeout_secs`.
    ///
    /// # Errors
    /// [`NodeError::Call`] if the stop did not finish in time (the tree is killed then);
    /// [`NodeError::Failed`] if the node had already failed.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        let result = call(&self.actor, NodeMsg::Shutdown, self.shutdown_timeout).await;
        self.actor.stop(None);
        if tokio::time::timeout(self.shutdown_timeout, self.join)
            .await
            .is_err()
        {
            tracing::warn!("node did not stop in time");
        }
        if let Some(reason) = self.failure.lock().expect("not poisoned").take() {
            return Err(NodeError::Failed(reason));
        }
        result
    }

    /// Resolves when the node stops on its own (a supervisor gave up), with why.
    pub async fn failed(&mut self) -> NodeError {
        // A JoinError means the root panicked; the failure text says more when there is one.
        let _ = (&mut self.join).await;
        let reason = self.failure.lock().expect("not poisoned").take();
        NodeError::Failed(reason.unwrap_or_else(|| "the root actor stopped".into()))
    }
}

/// Opens (creating and migrating) every owned partition file once, after restore decided and
/// before Litestream starts, and records the lease epoch it is written under from now on:
/// Litestream replicates the files that exist when it starts at once, and a file created later
/// only after its next directory check — a short run could end before that and its final sync
/// would miss the partition.
async fn create_partition_files(
    config: &Config,
    epochs: &Epochs,
    released: HashMap<PartitionId, ReleasedPosition>,
) -> Result<(), NodeError> {
    let data_dir = config.storage.data_dir.clone();
    let checkpointer = checkpointer(config.replication.mode);
    let epochs = epochs.clone();
    tokio::task::spawn_blocking(move || {
        for (p, epoch) in epochs {
            let mut store =
                PartitionStore::open(&PartitionStore::path_in(&data_dir, p), p, checkpointer)
                    .map_err(|e| NodeError::Start(crate::error_chain(&e)))?;
            if epoch > 0 {
                store
                    .record_epoch(epoch)
                    .map_err(|e| NodeError::Start(crate::error_chain(&e)))?;
            }
            if let Some(position) = released.get(&p) {
                check_released_position(&store, position);
            }
        }
        Ok(())
    })
    .await
    .expect("opening partition files does not panic")
}

/// Checks that a partition file, as restored or kept, reaches the position its previous holder
/// released (DESIGN §7 handoff): that holder's final sync was confirmed before it released, so
/// a file behind it means the object store lost or hid what it had acknowledged. Not fatal: the
/// shard resumes the same session from the file's own applied sequence, and Discord replays the
/// rest while the session is resumable; the warning and `shardlite_restores_behind_release_total`
/// say that the store misbehaved.
fn check_released_position(store: &PartitionStore, position: &ReleasedPosition) {
    let shard = store.partition().0 % position.shard_total.max(1);
    let applied = store
        .applied_session(shard, position.shard_total)
        .ok()
        .flatten();
    let reaches = applied.as_ref().is_some_and(|a| {
        a.session_id == position.session_id && a.applied_seq >= position.applied_seq
    });
    if !reaches {
        ::metrics::counter!("shardlite_restores_behind_release_total").increment(1);
        tracing::warn!(partition = %store.partition(),
            file_seq = applied.as_ref().map(|a| a.applied_seq),
            file_session = applied.as_ref().map(|a| a.session_id.as_str()),
            released_seq = position.applied_seq, released_session = %position.session_id,
            "partition file is behind the position its previous holder released; the object \
             store lost or hid acknowledged uploads. Resuming from the file's own sequence");
    }
}

/// What this process's partition leases say about its owned partitions (DESIGN §7), for
/// [`Node::start`]. Empty without leases (`replication.mode = "off"`, the demo).
#[derive(Clone, Debug, Default)]
pub struct Leased {
    /// The lease epoch of each partition: the replica generation it writes.
    pub epochs: Epochs,
    /// The position the previous holder released, for partitions whose lease was released on
    /// purpose (not taken over after a crash).
    pub released: HashMap<PartitionId, ReleasedPosition>,
}

/// Who checkpoints partition files under replication `mode`: Litestream whenever it replicates
/// them (child or external), SQLite otherwise. See [`Checkpointer`] for why.
pub(crate) fn checkpointer(mode: ReplicationMode) -> Checkpointer {
    match mode {
        ReplicationMode::Child | ReplicationMode::External => Checkpointer::Litestream,
        ReplicationMode::Off => Checkpointer::Sqlite,
    }
}

/// Cloneable status access to a running node.
#[derive(Clone)]
pub struct StatusHandle {
    actor: ActorRef<NodeMsg>,
}

impl StatusHandle {
    /// Same as [`Node::status`], bounded by `timeout`.
    ///
    /// # Errors
    /// [`NodeError::Call`] if the tree does not answer in time.
    pub async fn status(&self, timeout: Duration) -> Result<NodeStatus, NodeError> {
        call(&self.actor, NodeMsg::Status, timeout).await
    }
}
