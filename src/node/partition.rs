//! The partition actor: owns one SQLite file and applies its shard's dispatches in batches.
//!
//! Input arrives as [`Op`]s in the order the shard routed them (one sender, FIFO mailbox), so a
//! watermark `w` processed here means every dispatch `<= w` for this partition is already buffered
//! or committed. Ops are buffered and committed together — when `batch_max` ops are waiting, on the
//! flush timer, or on drain — in one transaction with the new applied sequence. The SQLite work runs
//! under `spawn_blocking` so no tokio worker ever blocks on disk (DESIGN §3).
//!
//! A buffered op that is lost (crash, kill) is not lost to the partition: it was never committed,
//! so the applied sequence on disk is older than it and the shard's resume replays it.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::Semaphore;

use crate::ownership::PartitionId;
use crate::store::{AppliedSession, BatchOutcome, Checkpointer, Op, PartitionStore, StoreError};

/// Messages of [`PartitionActor`].
pub enum PartitionMsg {
    /// One routed op (dispatch, session start or watermark) from the shard's pump.
    Op(Op),
    /// Timer tick: commit whatever is buffered.
    Flush,
    /// Commit everything buffered, then reply with the committed session (graceful stop, tests).
    Drain(RpcReplyPort<Option<AppliedSession>>),
    /// Report the committed session and counters.
    Status(RpcReplyPort<PartitionStatus>),
}

/// What a partition reports about itself.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: PartitionId,
    /// The committed session and applied sequence (None before the first session start).
    pub session: Option<AppliedSession>,
    /// Ops waiting in the buffer.
    pub buffered: usize,
    /// Totals of the batches committed by this incarnation.
    pub dispatches_applied: u64,
    /// Dispatches skipped as already applied (resume replays).
    pub duplicates_skipped: u64,
    /// The partition did not answer within the status bound (a commit is taking long: a lock
    /// held by another connection, a slow disk); the other fields are then unknown and zero.
    #[serde(default)]
    pub busy: bool,
}

impl PartitionStatus {
    /// The report of a partition that did not answer in time.
    pub fn busy(partition: PartitionId) -> Self {
        Self {
            partition,
            session: None,
            buffered: 0,
            dispatches_applied: 0,
            duplicates_skipped: 0,
            busy: true,
        }
    }
}

/// Start arguments.
pub struct PartitionArgs {
    /// The partition this actor owns.
    pub partition: PartitionId,
    /// Its file (DESIGN §4 path), already restored if replication is on.
    pub path: std::path::PathBuf,
    /// The shard carrying it and the shard total: which `shard_session` row is ours.
    pub shard_id: u32,
    /// Discord shard total.
    pub shard_total: u32,
    /// Commit when this many ops are buffered (`storage.batch_max`).
    pub batch_max: usize,
    /// Commit at least this often while ops are buffered (`storage.flush_interval_ms`).
    pub flush_interval: Duration,
    /// The shard's in-flight budget: one permit returns per dispatch committed or dropped.
    pub in_flight: Arc<Semaphore>,
    /// Who checkpoints the file's WAL (Litestream when it replicates the file).
    pub checkpointer: Checkpointer,
    /// Held while the file is opened and while a batch commits. It outlives incarnations (the
    /// group keeps it): a partition killed while its batch runs on a blocking thread (the thread
    /// cannot be cancelled) would otherwise commit after its replacement read the applied
    /// session, leaving the replacement with a stale one. The killed incarnation's connection
    /// closes just after its batch, unlocked; that close writes nothing (WAL mode, and no
    /// checkpoint on close under Litestream).
    pub file_lock: FileLock,
}

/// See [`PartitionArgs::file_lock`].
pub type FileLock = Arc<std::sync::Mutex<()>>;

/// Takes `lock`; a poisoned lock only means an earlier holder panicked, and the file is guarded
/// by SQLite's own transactions, so it is used as is.
pub(super) fn hold(lock: &FileLock) -> std::sync::MutexGuard<'_, ()> {
    lock.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// State of a running partition actor.
pub struct PartitionState {
    partition: PartitionId,
    /// `None` only while a batch is being written on a blocking thread.
    store: Option<PartitionStore>,
    session: Option<AppliedSession>,
    buffer: Vec<Op>,
    batch_max: usize,
    in_flight: Arc<Semaphore>,
    totals: BatchOutcome,
    file_lock: FileLock,
}

/// The actor; see the module docs.
pub struct PartitionActor;

impl Actor for PartitionActor {
    type Msg = PartitionMsg;
    type State = PartitionState;
    type Arguments = PartitionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let PartitionArgs {
            partition,
            path,
            shard_id,
            shard_total,
            checkpointer,
            file_lock,
            ..
        } = args;
        let lock = file_lock.clone();
        let (store, session) = tokio::task::spawn_blocking(move || {
            let _held = hold(&lock);
            let store = PartitionStore::open(&path, partition, checkpointer)?;
            let session = store.applied_session(shard_id, shard_total)?;
            Ok::<_, StoreError>((store, session))
        })
        .await?
        .map_err(|e| crate::error_chain(&e))?;
        tracing::debug!(%partition, ?session, "partition open");
        myself.send_interval(args.flush_interval, || PartitionMsg::Flush);
        Ok(PartitionState {
            partition,
            store: Some(store),
            session,
            buffer: Vec::with_capacity(args.batch_max),
            batch_max: args.batch_max,
            in_flight: args.in_flight,
            totals: BatchOutcome::default(),
            file_lock,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PartitionMsg::Op(op) => {
                state.buffer.push(op);
                if state.buffer.len() >= state.batch_max {
                    state.flush().await?;
                }
            }
            PartitionMsg::Flush => state.flush().await?,
            PartitionMsg::Drain(reply) => {
                state.flush().await?;
                // The asker may have given up waiting (timeout); nothing else to do then.
                let _ = reply.send(state.session.clone());
            }
            PartitionMsg::Status(reply) => {
                // As above: a timed-out asker is not our failure.
                let _ = reply.send(state.status());
            }
        }
        Ok(())
    }
}

impl PartitionState {
    /// Commits the buffer in one transaction off the async threads; returns the permits of the
    /// dispatches it held to the shard. On error the actor fails and its group restarts.
    async fn flush(&mut self) -> Result<(), ActorProcessingErr> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.buffer);
        let dispatches = ops.iter().filter(|op| op.is_dispatch()).count();
        let mut store = self.store.take().expect("store is present between batches");
        let mut session = self.session.clone();
        let lock = self.file_lock.clone();
        let (store, result, ops) = tokio::task::spawn_blocking(move || {
            let _held = hold(&lock);
            let result = store.apply(&mut session, &ops).map(|o| (o, session));
            (store, result, ops)
        })
        .await
        .expect("apply does not panic");
        self.store = Some(store);
        // The whole chain: the supervisor logs only this text ("… p0003: database is locked").
        let (outcome, session) = result.map_err(|e| crate::error_chain(&e))?;
        self.session = session;
        self.totals.applied += outcome.applied;
        self.totals.duplicates += outcome.duplicates;
        self.totals.ignored += outcome.ignored;
        self.totals.new_messages += outcome.new_messages;
        if outcome.unsessioned > 0 {
            tracing::warn!(partition = %self.partition, dropped = outcome.unsessioned,
                "dispatches arrived before any session start");
        }
        self.in_flight.add_permits(dispatches);
        metrics::counter!(super::metrics::DISPATCHES_APPLIED, "partition" => self.partition.to_string())
            .increment(outcome.applied + outcome.ignored);
        // Reuse the allocation for the next batch.
        self.buffer = ops;
        self.buffer.clear();
        Ok(())
    }

    fn status(&self) -> PartitionStatus {
        PartitionStatus {
            partition: self.partition,
            session: self.session.clone(),
            buffered: self.buffer.len(),
            dispatches_applied: self.totals.applied + self.totals.ignored,
            duplicates_skipped: self.totals.duplicates,
            busy: false,
        }
    }
}
