//! The shard group: supervisor of one shard and the partitions it carries (one-for-all).
//!
//! A shard and its partitions fail together (DESIGN §3): if a partition cannot write, the shard
//! must not keep routing into it, and if the shard dies, buffered ops die with it. So any child
//! failure stops every child, waits the policy's backoff, and starts the group again: partitions
//! first (open files, read what they committed), then the shard, which resumes from the minimum
//! applied sequence when the partitions agree on a session (DESIGN §5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::Semaphore;

use super::NodeContext;
use super::litestream::LitestreamMsg;
use super::partition::{FileLock, PartitionActor, PartitionArgs, PartitionMsg, PartitionStatus};
use super::shard::{
    FatalClose, FatalCloseSlot, SessionSync, ShardActor, ShardArgs, ShardMsg, ShardStatus,
};
use crate::ownership::PartitionId;
use crate::replication::process::STOP_BOUND;
use crate::store::{AppliedSession, FileHealth, PartitionStore, file_health};
use crate::supervision::{Decision, RestartTracker};

/// Bound on one child's answer to a status or drain request.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a child's status answer: a partition busy with a long commit (a lock held by another
/// connection, a slow disk) answers only after it, and `/readyz` must not wait that long. A
/// partition that does not answer in time is reported as busy.
const STATUS_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on a child's stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages of [`ShardGroupActor`].
pub enum ShardGroupMsg {
    /// Start the children again after a failure (sent after the backoff). Carries the generation
    /// it was scheduled for, so a stale restart is ignored.
    Restart(u64),
    /// Report the group's status.
    Status(RpcReplyPort<GroupStatus>),
    /// Graceful stop: close the shard with the resume code, drain the partitions, stop them.
    Shutdown(RpcReplyPort<()>),
    /// Stop writing at once (a partition lease was lost, DESIGN §7): every child is killed —
    /// no close frame, so the Discord session stays resumable for the next owner; no drain, so
    /// nothing buffered is committed — and the group restarts nothing. Replies once the children
    /// are gone (a batch already on a blocking thread may still finish committing locally; the
    /// replica no longer takes it).
    Fence(RpcReplyPort<()>),
}

/// What a group reports: its shard, its partitions, and why it is not running if it is not.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    /// Shard number.
    pub shard: u32,
    /// The shard's status; None while restarting.
    pub shard_status: Option<ShardStatus>,
    /// Fatal close code that stopped the shard for good, if any.
    pub fatal_close_code: Option<u16>,
    /// The partitions' statuses, in partition order; empty while restarting.
    pub partitions: Vec<PartitionStatus>,
    /// Restarts of this group since the node started.
    pub restarts: u32,
}

/// Start arguments.
pub struct ShardGroupArgs {
    /// The shard this group runs.
    pub shard_id: u32,
    /// Shared node context (config, topology, gateway config, restart policy).
    pub ctx: Arc<NodeContext>,
    /// The Litestream child's actor (`replication.mode = "child"`): restores this group's files
    /// when a restart finds them missing or corrupt.
    pub litestream: Option<ActorRef<LitestreamMsg>>,
}

/// State of a running group.
pub struct ShardGroupState {
    shard_id: u32,
    ctx: Arc<NodeContext>,
    litestream: Option<ActorRef<LitestreamMsg>>,
    shard: Option<ActorRef<ShardMsg>>,
    partitions: Vec<ActorRef<PartitionMsg>>,
    /// One per partition of the shard, kept across restarts (see [`PartitionArgs::file_lock`]).
    file_locks: Vec<FileLock>,
    tracker: RestartTracker,
    generation: u64,
    restarts: u32,
    /// Set by the shard when Discord closes it with a fatal code; from then on the group runs
    /// its partitions without a shard. One slot for the group's life, passed to every shard.
    fatal_close: FatalCloseSlot,
    stopping: bool,
}

/// The supervisor; see the module docs.
pub struct ShardGroupActor;

impl Actor for ShardGroupActor {
    type Msg = ShardGroupMsg;
    type State = ShardGroupState;
    type Arguments = ShardGroupArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let file_locks = args
            .ctx
            .topology
            .partitions_of_shard(args.shard_id)
            .iter()
            .map(|_| FileLock::default())
            .collect();
        let mut state = ShardGroupState {
            file_locks,
            shard_id: args.shard_id,
            tracker: RestartTracker::new(args.ctx.policy),
            ctx: args.ctx,
            litestream: args.litestream,
            shard: None,
            partitions: Vec::new(),
            generation: 0,
            restarts: 0,
            fatal_close: FatalCloseSlot::default(),
            stopping: false,
        };
        state.start_children(&myself).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardGroupMsg::Restart(generation) => {
                if generation == state.generation && !state.stopping {
                    state.restarts += 1;
                    metrics::counter!(super::metrics::GROUP_RESTARTS, "shard" => state.shard_id.to_string())
                        .increment(1);
                    let started = match state.repair_files().await {
                        Ok(()) => state.start_children(&myself).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = started {
                        let e = crate::error_chain(e.as_ref());
                        tracing::warn!(shard = state.shard_id, error = %e, "shard group restart failed");
                        // A restart that cannot start counts as one more failure of the group.
                        let reason = format!("restart failed: {e}");
                        state.on_failure(&myself, reason).await?;
                    }
                }
            }
            ShardGroupMsg::Status(reply) => {
                // Gathered in a task of its own: a supervisor never waits on its children's
                // answers, so restarts and Shutdown are not queued behind slow status calls.
                let status = state.status();
                tokio::spawn(async move {
                    // A timed-out asker is not our failure.
                    let _ = reply.send(status.await);
                });
            }
            ShardGroupMsg::Fence(reply) => {
                state.stopping = true;
                state.kill_children().await;
                let _ = reply.send(());
            }
            ShardGroupMsg::Shutdown(reply) => {
                state.stopping = true;
                state.shutdown().await;
                // The asker may have timed out; the group is stopped either way.
                let _ = reply.send(());
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
        let (cell, reason) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                // The shard records a fatal close before it stops (see `FatalCloseSlot`): a
                // fatally closed shard is not restarted.
                if state.fatal_close.get().is_some() && state.is_current_shard(&cell) {
                    state.shard = None;
                    return Ok(());
                }
                let reason = reason.unwrap_or_else(|| "stopped".into());
                (cell, format!("stopped unexpectedly: {reason}"))
            }
            _ => return Ok(()),
        };
        if state.stopping || !state.is_current_child(&cell) {
            return Ok(()); // a child we stopped ourselves, or one of an older generation
        }
        tracing::warn!(shard = state.shard_id, %reason, "shard group child failed; restarting the group");
        state.on_failure(&myself, reason).await
    }
}

impl ShardGroupState {
    /// One-for-all: stops every child, then restarts the group after the policy's backoff, or
    /// gives up (escalating to the node) past the restart intensity.
    async fn on_failure(
        &mut self,
        myself: &ActorRef<ShardGroupMsg>,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        self.stop_children().await;
        match self.tracker.on_failure(Instant::now()) {
            Decision::RestartAfter(delay) => {
                self.generation += 1;
                let generation = self.generation;
                myself.send_after(delay, move || ShardGroupMsg::Restart(generation));
                Ok(())
            }
            Decision::GiveUp { failures } => Err(format!(
                "shard group {} gave up after {failures} failures within {}s; last: {reason}",
                self.shard_id,
                self.ctx.policy.window.as_secs()
            )
            .into()),
        }
    }

    /// Before a restart reopens the group's files (DESIGN §3): a file that is missing, empty or
    /// fails `PRAGMA quick_check` is restored from its replica through the Litestream child, so
    /// the shard resumes from what the restored file says it applied and the resume replays the
    /// rest. Without this a lost file would reopen as a new empty partition and its session would
    /// be gone. Healthy files (the usual case: a write or socket failure) cost one quick_check.
    ///
    /// # Errors
    /// A file is unusable and there is no child to restore it (`replication.mode` is `off` or
    /// `external`), or the restore failed: the restart fails and counts as a failure.
    async fn repair_files(&self) -> Result<(), ActorProcessingErr> {
        let data_dir = self.ctx.config.storage.data_dir.clone();
        let partitions = self.ctx.topology.partitions_of_shard(self.shard_id);
        let replicated = self.ctx.config.replication.mode != crate::config::ReplicationMode::Off;
        let checked = {
            let partitions = partitions.clone();
            let locks = self.file_locks.clone();
            tokio::task::spawn_blocking(move || {
                partitions
                    .into_iter()
                    .zip(locks)
                    .map(|(p, lock)| {
                        // Waits out a batch a killed incarnation may still be committing.
                        let _held = super::partition::hold(&lock);
                        (p, file_health(&PartitionStore::path_in(&data_dir, p)))
                    })
                    // Without replication an empty file holds nothing to lose: reopening it
                    // creates the schema (e.g. after a full disk left it at 0 bytes).
                    .filter(|(_, health)| {
                        *health != FileHealth::Healthy
                            && (replicated || *health != FileHealth::Empty)
                    })
                    .collect::<Vec<_>>()
            })
            .await?
        };
        if checked.is_empty() {
            return Ok(());
        }
        let listed = checked
            .iter()
            .map(|(p, health)| format!("{p} ({health:?})"))
            .collect::<Vec<_>>()
            .join(", ");
        let Some(litestream) = &self.litestream else {
            return Err(format!(
                "partition files unusable: {listed}; replication.mode = \"{}\" has no replica \
                 this process can restore from (move the files aside to start those partitions \
                 empty, or restore them and restart)",
                self.ctx.config.replication.mode
            )
            .into());
        };
        tracing::warn!(shard = self.shard_id, files = %listed,
            "partition files unusable at group restart; restoring them from the replica");
        let bad: Vec<PartitionId> = checked.into_iter().map(|(p, _)| p).collect();
        // Restores run `restore_parallelism` at a time, each bounded by `restore_timeout_secs`,
        // after the child's stop.
        let rounds = bad
            .len()
            .div_ceil(self.ctx.config.replication.restore_parallelism.max(1));
        let timeout = Duration::from_secs(self.ctx.config.replication.restore_timeout_secs)
            * u32::try_from(rounds).unwrap_or(u32::MAX)
            + STOP_BOUND;
        let outcomes =
            super::call(litestream, |r| LitestreamMsg::Restore(bad, r), timeout).await??;
        for o in outcomes {
            tracing::info!(shard = self.shard_id, partition = %o.partition, decision = ?o.decision,
                moved_aside = ?o.moved_aside, "partition restored at group restart");
        }
        Ok(())
    }

    /// Spawns the partitions, reads what they committed, then spawns the shard resuming from it.
    async fn start_children(
        &mut self,
        myself: &ActorRef<ShardGroupMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &self.ctx;
        let topology = ctx.topology;
        let storage = &ctx.config.storage;
        let in_flight = Arc::new(Semaphore::new(storage.max_in_flight));
        let dir = storage.data_dir.join("partitions");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for (partition, file_lock) in topology
            .partitions_of_shard(self.shard_id)
            .into_iter()
            .zip(self.file_locks.clone())
        {
            let args = PartitionArgs {
                file_lock,
                partition,
                path: PartitionStore::path_in(&storage.data_dir, partition),
                shard_id: self.shard_id,
                shard_total: topology.shards(),
                batch_max: storage.batch_max,
                flush_interval: Duration::from_millis(storage.flush_interval_ms),
                in_flight: in_flight.clone(),
                checkpointer: super::checkpointer(ctx.config.replication.mode),
            };
            let (actor, _) = Actor::spawn_linked(None, PartitionActor, args, myself.get_cell())
                .await
                .map_err(|e| format!("partition {partition}: {e}"))?;
            self.partitions.push(actor);
        }
        let sessions: Vec<Option<AppliedSession>> = join_all(
            self.partitions
                .iter()
                .map(|p| super::call(p, PartitionMsg::Status, CALL_TIMEOUT)),
        )
        .await
        .into_iter()
        .map(|s| s.map(|s| s.session))
        .collect::<Result<_, _>>()?;
        if let Some(FatalClose { code }) = self.fatal_close.get() {
            // Discord refused this shard for good (token, shard count, intents): another connect
            // would only spend an identify. The partitions still serve what they hold.
            tracing::warn!(
                shard = self.shard_id,
                code,
                "shard stays closed after a fatal close code"
            );
            return Ok(());
        }
        let resume = resume_point(&sessions);
        let args = ShardArgs {
            shard_id: self.shard_id,
            topology,
            gateway: ctx.gateway.clone(),
            resume,
            partitions: self.partitions.clone(),
            in_flight,
            watermark_interval: Duration::from_millis(storage.watermark_interval_ms),
            silence_timeout: Duration::from_secs(ctx.config.supervision.shard_silence_timeout_secs),
            session_sync: ctx.replica_sync.clone().map(|sync| {
                let data_dir =
                    crate::replication::litestream_config::absolute_data_dir(&ctx.config);
                SessionSync {
                    sync,
                    files: topology
                        .partitions_of_shard(self.shard_id)
                        .into_iter()
                        .map(|p| PartitionStore::path_in(&data_dir, p))
                        .collect(),
                }
            }),
            fatal_close: self.fatal_close.clone(),
        };
        let (shard, _) = Actor::spawn_linked(None, ShardActor, args, myself.get_cell())
            .await
            .map_err(|e| format!("shard {}: {e}", self.shard_id))?;
        self.shard = Some(shard);
        Ok(())
    }

    fn is_current_shard(&self, cell: &ActorCell) -> bool {
        self.shard
            .as_ref()
            .is_some_and(|s| s.get_id() == cell.get_id())
    }

    fn is_current_child(&self, cell: &ActorCell) -> bool {
        self.is_current_shard(cell) || self.partitions.iter().any(|p| p.get_id() == cell.get_id())
    }

    /// Stops the shard first (no more routing), then all partitions at once; kills what does not
    /// stop in time.
    async fn stop_children(&mut self) {
        async fn stop(cell: ActorCell) {
            if cell.stop_and_wait(None, Some(STOP_TIMEOUT)).await.is_err() {
                cell.kill();
            }
        }
        if let Some(shard) = self.shard.take() {
            stop(shard.get_cell()).await;
        }
        let partitions = std::mem::take(&mut self.partitions);
        join_all(partitions.iter().map(|p| stop(p.get_cell()))).await;
    }

    /// Kills the shard and every partition at once (see [`ShardGroupMsg::Fence`]).
    async fn kill_children(&mut self) {
        let mut cells: Vec<ActorCell> = self
            .shard
            .take()
            .map(|s| s.get_cell())
            .into_iter()
            .collect();
        cells.extend(
            std::mem::take(&mut self.partitions)
                .iter()
                .map(|p| p.get_cell()),
        );
        join_all(cells.into_iter().map(|cell| async move {
            if cell.kill_and_wait(Some(STOP_TIMEOUT)).await.is_err() {
                tracing::warn!(actor = ?cell.get_id(), "a fenced group's child did not confirm its kill");
            }
        }))
        .await;
        tracing::warn!(
            shard = self.shard_id,
            "shard group fenced: its children were killed"
        );
    }

    async fn shutdown(&mut self) {
        if let Some(shard) = &self.shard {
            match super::call(shard, ShardMsg::Close, CALL_TIMEOUT).await {
                Ok(seq) => {
                    tracing::info!(shard = self.shard_id, seq, "shard closed with resume code")
                }
                Err(e) => tracing::warn!(shard = self.shard_id, error = %e, "shard close failed"),
            }
        }
        let drained = join_all(
            self.partitions
                .iter()
                .map(|p| super::call(p, PartitionMsg::Drain, CALL_TIMEOUT)),
        )
        .await;
        for r in drained {
            if let Err(e) = r {
                tracing::warn!(shard = self.shard_id, error = %e, "partition drain failed");
            }
        }
        self.stop_children().await;
    }

    /// A future gathering the group's status from clones of the children's refs.
    fn status(&self) -> impl Future<Output = GroupStatus> + Send + 'static {
        let shard = self.shard.clone();
        let partitions = self.partitions.clone();
        let ids = self.ctx.topology.partitions_of_shard(self.shard_id);
        let (shard_id, fatal_close_code, restarts) = (
            self.shard_id,
            self.fatal_close.get().map(|f| f.code),
            self.restarts,
        );
        async move {
            let shard_status = match &shard {
                Some(s) => super::call(s, ShardMsg::Status, STATUS_CALL_TIMEOUT)
                    .await
                    .ok(),
                None => None,
            };
            let partitions = join_all(
                partitions
                    .iter()
                    .map(|p| super::call(p, PartitionMsg::Status, STATUS_CALL_TIMEOUT)),
            )
            .await
            .into_iter()
            .zip(ids)
            .map(|(status, id)| status.unwrap_or_else(|_| PartitionStatus::busy(id)))
            .collect();
            GroupStatus {
                shard: shard_id,
                shard_status,
                fatal_close_code,
                partitions,
                restarts,
            }
        }
    }
}

/// Where the shard resumes (DESIGN §5): if every partition committed the same session, at the
/// minimum of their applied sequences (so no partition misses a dispatch; the ones ahead skip the
/// replay up to their own `applied_seq`); otherwise nowhere — the shard must identify.
pub fn resume_point(sessions: &[Option<AppliedSession>]) -> Option<AppliedSession> {
    let first = sessions.first()?.as_ref()?;
    let mut min = first.clone();
    for s in sessions {
        let s = s.as_ref()?;
        if s.session_id != first.session_id || s.shard_total != first.shard_total {
            return None;
        }
        min.applied_seq = min.applied_seq.min(s.applied_seq);
    }
    Some(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, seq: u64) -> Option<AppliedSession> {
        Some(AppliedSession {
            shard_id: 0,
            shard_total: 4,
            session_id: id.into(),
            resume_url: "ws://x".into(),
            applied_seq: seq,
        })
    }

    #[test]
    fn resumes_at_the_minimum_when_partitions_agree() {
        assert_eq!(resume_point(&[s("a", 9), s("a", 4), s("a", 7)]), s("a", 4));
    }

    #[test]
    fn identifies_when_any_partition_disagrees_or_has_nothing() {
        assert_eq!(resume_point(&[s("a", 9), s("b", 4)]), None);
        assert_eq!(resume_point(&[s("a", 9), None]), None);
        assert_eq!(resume_point(&[]), None);
    }
}
