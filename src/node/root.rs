//! The root supervisor: the Litestream child (in child mode) and one shard group per owned shard
//! whose partitions are ready (leased, restored, created: [`NodeMsg::AddShards`]).
//!
//! Groups restart their own children, the Litestream actor its process; one that gives up is
//! escalated here, and the node stops with that reason, so the process exits non-zero and its
//! own supervisor (systemd, Kubernetes) decides what comes next — Erlang's escalation rule.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent};

use super::litestream::{LitestreamActor, LitestreamArgs, LitestreamMsg, LitestreamStatus};
use super::shard::ShardPhase;
use super::shard_group::{GroupStatus, ShardGroupActor, ShardGroupArgs, ShardGroupMsg};
use super::{NodeContext, NodeError};
use crate::replication::process::STOP_BOUND;

/// Bound on one group's status answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages of [`NodeActor`].
pub enum NodeMsg {
    /// Report every group's status.
    Status(RpcReplyPort<NodeStatus>),
    /// Stop every group gracefully, then reply.
    Shutdown(RpcReplyPort<()>),
    /// Start the groups of these shards: their partition files exist (restored or created) and
    /// hold their epochs. In child mode Litestream takes them on first (each partition to the
    /// generation of its epoch in the map), so it replicates them from their first commit.
    /// Replies once the groups run, or with why they could not start.
    AddShards(
        Vec<u32>,
        crate::replication::Epochs,
        RpcReplyPort<Result<(), NodeError>>,
    ),
    /// Stop the groups of these shards from writing at once, without a drain (a partition
    /// lease of theirs was lost, DESIGN §7): each group kills its children
    /// ([`ShardGroupMsg::Fence`]) and is removed, and Litestream stops replicating their
    /// partitions. Replies once nothing writes them; the shards are then pending again.
    FenceShards(Vec<u32>, RpcReplyPort<Result<(), NodeError>>),
}

/// The node's status, as `/readyz` serves it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    /// This pod's ordinal and the pod count.
    pub ordinal: u32,
    /// Pod count.
    pub pods: u32,
    /// Discord shard total and partition count.
    pub shard_total: u32,
    /// Partition count.
    pub partitions_total: u32,
    /// Shards this pod owns.
    pub owned_shards: Vec<u32>,
    /// Owned shards whose group has not started yet: their leases are awaited or their
    /// partitions are being restored.
    #[serde(default)]
    pub pending_shards: Vec<u32>,
    /// One entry per owned shard.
    pub groups: Vec<GroupStatus>,
    /// The Litestream child, in `replication.mode = "child"`.
    pub litestream: Option<LitestreamStatus>,
    /// Every owned partition is open and every owned shard is receiving dispatches (DESIGN §8).
    pub ready: bool,
}

/// Start arguments.
pub struct NodeArgs {
    /// Shared node context.
    pub ctx: Arc<NodeContext>,
    /// Where the reason goes when the node stops on its own.
    pub failure: Arc<Mutex<Option<String>>>,
    /// Run Litestream as a supervised child (`replication.mode = "child"`).
    pub litestream: Option<LitestreamArgs>,
}

/// State of the root.
pub struct NodeState {
    ctx: Arc<NodeContext>,
    groups: Vec<(u32, ActorRef<ShardGroupMsg>)>,
    litestream: Option<ActorRef<LitestreamMsg>>,
    failure: Arc<Mutex<Option<String>>>,
    stopping: bool,
    /// Groups removed on purpose (fenced): their termination is not a failure.
    removed: Vec<ractor::ActorId>,
}

/// The root supervisor; see the module docs.
pub struct NodeActor;

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let topology = args.ctx.topology;
        let ordinal = args.ctx.config.cluster.ordinal;
        // Litestream first (every partition file already exists, created after restore), so it
        // replicates each partition from its first commit.
        let litestream = match args.litestream {
            Some(ls) => Some(
                Actor::spawn_linked(None, LitestreamActor, ls, myself.get_cell())
                    .await
                    .map_err(|e| match e {
                        // The child's own error, with its causes (which ractor's text leaves out).
                        SpawnErr::StartupFailed(e) => {
                            format!("litestream: {}", crate::error_chain(e.as_ref()))
                        }
                        e => format!("litestream: {e}"),
                    })?
                    .0,
            ),
            None => None,
        };
        let groups = Vec::new();
        tracing::info!(ordinal, shards = ?topology.shards_of_pod(ordinal), "node started; shard groups start as their partitions are ready");
        Ok(NodeState {
            ctx: args.ctx,
            groups,
            litestream,
            failure: args.failure,
            stopping: false,
            removed: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Status(reply) => {
                // Gathered in a task of its own, so Shutdown and supervision events never queue
                // behind status calls (probes, scrapes).
                let status = state.status();
                tokio::spawn(async move {
                    // A timed-out asker is not our failure.
                    let _ = reply.send(status.await);
                });
            }
            NodeMsg::AddShards(shards, epochs, reply) => {
                if state.stopping {
                    let _ = reply.send(Err(NodeError::Start("the node is stopping".into())));
                    return Ok(());
                }
                let result = state.add_shards(&myself, shards, epochs).await;
                let _ = reply.send(result);
            }
            NodeMsg::FenceShards(shards, reply) => {
                let result = state.fence_shards(shards).await;
                let _ = reply.send(result);
            }
            NodeMsg::Shutdown(reply) => {
                state.stopping = true;
                join_all(state.groups.iter().map(|(_, g)| {
                    super::call(
                        g,
                        ShardGroupMsg::Shutdown,
                        Duration::from_secs(state.ctx.config.supervision.shutdown_timeout_secs),
                    )
                }))
                .await
                .into_iter()
                .filter_map(Result::err)
                .for_each(|e| tracing::warn!(error = %e, "shard group did not stop cleanly"));
                // Last: every partition has committed, so Litestream's final sync carries it all.
                if let Some(ls) = &state.litestream {
                    let outcome =
                        super::call(ls, LitestreamMsg::Stop, STOP_BOUND + Duration::from_secs(5))
                            .await
                            .and_then(|r| r.map_err(NodeError::from));
                    if let Err(e) = outcome {
                        let e = crate::error_chain(&e);
                        tracing::error!(error = %e, "litestream did not confirm the final state");
                        // A stop that may not have replicated everything is not a clean stop.
                        *state.failure.lock().expect("not poisoned") =
                            Some(format!("litestream stop: {e}"));
                    }
                }
                // The asker may have timed out; stopping goes on regardless.
                let _ = reply.send(());
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let cell = match &evt {
            SupervisionEvent::ActorFailed(cell, _)
            | SupervisionEvent::ActorTerminated(cell, ..) => Some(cell.get_id()),
            _ => None,
        };
        if cell.is_some_and(|id| state.removed.contains(&id)) {
            return Ok(()); // a fenced group, stopped on purpose
        }
        let reason = match evt {
            SupervisionEvent::ActorFailed(_, err) => crate::error_chain(err.as_ref()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                format!(
                    "{:?} stopped: {}",
                    cell.get_id(),
                    reason.unwrap_or_default()
                )
            }
            _ => return Ok(()),
        };
        if state.stopping {
            return Ok(());
        }
        tracing::error!(%reason, "a supervised child gave up; stopping the node");
        *state.failure.lock().expect("not poisoned") = Some(reason.clone());
        state.stopping = true;
        myself.stop(Some(reason));
        Ok(())
    }
}

impl NodeState {
    /// See [`NodeMsg::AddShards`].
    async fn add_shards(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        shards: Vec<u32>,
        epochs: crate::replication::Epochs,
    ) -> Result<(), NodeError> {
        if let Some(ls) = &self.litestream {
            super::call(
                ls,
                |r| LitestreamMsg::Add(epochs, r),
                STOP_BOUND + Duration::from_secs(5),
            )
            .await??;
        }
        for shard_id in shards {
            if self.groups.iter().any(|(s, _)| *s == shard_id) {
                continue;
            }
            let group_args = ShardGroupArgs {
                shard_id,
                ctx: self.ctx.clone(),
                litestream: self.litestream.clone(),
            };
            let (group, _) =
                Actor::spawn_linked(None, ShardGroupActor, group_args, myself.get_cell())
                    .await
                    .map_err(|e| NodeError::Start(format!("shard group {shard_id}: {e}")))?;
            self.groups.push((shard_id, group));
            tracing::info!(shard = shard_id, "shard group started");
        }
        Ok(())
    }

    /// See [`NodeMsg::FenceShards`].
    async fn fence_shards(&mut self, shards: Vec<u32>) -> Result<(), NodeError> {
        let (fenced, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.groups)
            .into_iter()
            .partition(|(s, _)| shards.contains(s));
        self.groups = kept;
        join_all(
            fenced
                .iter()
                .map(|(_, g)| super::call(g, ShardGroupMsg::Fence, STATUS_TIMEOUT)),
        )
        .await
        .into_iter()
        .filter_map(Result::err)
        .for_each(|e| tracing::warn!(error = %e, "a fenced shard group did not confirm"));
        for (_, group) in &fenced {
            self.removed.push(group.get_id());
            // Whatever it still runs dies with it (a kill skips its drain).
            group.kill();
        }
        if let Some(ls) = &self.litestream {
            let partitions: Vec<_> = shards
                .iter()
                .flat_map(|&s| self.ctx.topology.partitions_of_shard(s))
                .collect();
            super::call(
                ls,
                |r| LitestreamMsg::Remove(partitions, r),
                STATUS_TIMEOUT * 2,
            )
            .await??;
        }
        Ok(())
    }

    /// A future gathering the node's status from clones of the children's refs.
    fn status(&self) -> impl Future<Output = NodeStatus> + Send + 'static {
        let topology = self.ctx.topology;
        let ordinal = self.ctx.config.cluster.ordinal;
        let groups: Vec<ActorRef<ShardGroupMsg>> =
            self.groups.iter().map(|(_, g)| g.clone()).collect();
        let owned_shards = topology.shards_of_pod(ordinal);
        let pending_shards: Vec<u32> = owned_shards
            .iter()
            .copied()
            .filter(|s| !self.groups.iter().any(|(g, _)| g == s))
            .collect();
        let litestream = self.litestream.clone();
        async move {
            let statuses: Vec<GroupStatus> = join_all(
                groups
                    .iter()
                    .map(|g| super::call(g, ShardGroupMsg::Status, STATUS_TIMEOUT)),
            )
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect();
            let per_shard = (topology.partitions() / topology.shards()) as usize;
            let ready = pending_shards.is_empty()
                && statuses.len() == groups.len()
                && statuses.iter().all(|g| {
                    g.partitions.len() == per_shard
                        && g.shard_status
                            .as_ref()
                            .is_some_and(|s| s.phase == ShardPhase::Active)
                });
            let litestream = match &litestream {
                Some(ls) => super::call(ls, LitestreamMsg::Status, STATUS_TIMEOUT)
                    .await
                    .ok(),
                None => None,
            };
            NodeStatus {
                litestream,
                ordinal,
                pods: topology.pods(),
                shard_total: topology.shards(),
                partitions_total: topology.partitions(),
                owned_shards,
                pending_shards,
                groups: statuses,
                ready,
            }
        }
    }
}
