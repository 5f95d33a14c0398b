//! The pump's side towards its partitions: every op the pump routes goes out through
//! [`Delivery`] — dispatches and dead letters within the shard's in-flight budget (backpressure),
//! watermarks, and a new session's start ([`super::session_start`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ractor::ActorRef;
use tokio::sync::Semaphore;
use twilight_model::gateway::event::DispatchEvent;
use twilight_model::gateway::payload::incoming::Ready;

use super::route::Routes;
use super::session_start::{self, SessionSync};
use super::status::Live;
use crate::node::metrics as metric;
use crate::node::partition::PartitionMsg;
use crate::ownership::Topology;
use crate::store::{DeadLetter, Op};

/// What the pump sends to its shard's partitions, and how much may be in flight.
pub(super) struct Delivery {
    shard_id: u32,
    topology: Topology,
    /// Which partition gets what.
    routes: Routes,
    /// The shard's partition actors, indexed by `partition / shard_total`.
    partitions: Vec<ActorRef<PartitionMsg>>,
    /// Ops routed and not yet committed (`storage.max_in_flight` permits).
    in_flight: Arc<Semaphore>,
    /// Where waiting on the partitions shows as backpressure.
    live: Arc<Live>,
    /// The last watermark sent (0 after a new session).
    last_watermark: u64,
    /// Replica sync after each session start, when Litestream runs as our child.
    session_sync: Option<SessionSync>,
}

impl Delivery {
    /// Delivery to `partitions` of shard `shard_id`, bounded by `in_flight`.
    pub(super) fn new(
        shard_id: u32,
        topology: Topology,
        partitions: Vec<ActorRef<PartitionMsg>>,
        in_flight: Arc<Semaphore>,
        live: Arc<Live>,
        session_sync: Option<SessionSync>,
    ) -> Self {
        Self {
            shard_id,
            topology,
            routes: Routes::new(shard_id, topology),
            partitions,
            in_flight,
            live,
            last_watermark: 0,
            session_sync,
        }
    }

    /// Routes a dispatch to its partition (see [`Routes::dispatch`]) once an in-flight permit is
    /// free.
    pub(super) async fn dispatch(&self, seq: u64, event: DispatchEvent) {
        let Some(target) = self.routes.dispatch(event) else {
            return;
        };
        let (index, event) = target;
        if !self.acquire_in_flight().await {
            return; // closed only when the group is going away
        }
        self.send(
            index,
            Op::Dispatch {
                seq,
                event: Box::new(event),
            },
        );
    }

    /// Routes a dead letter like a dispatch (see [`Routes::dead_letter`]).
    pub(super) async fn dead_letter(&self, letter: DeadLetter) {
        let Some(index) = self.routes.dead_letter(letter.guild_id) else {
            return;
        };
        if !self.acquire_in_flight().await {
            return;
        }
        metrics::counter!(metric::DEAD_LETTERS, "shard" => self.shard_id.to_string()).increment(1);
        self.send(index, Op::DeadLetter(Box::new(letter)));
    }

    /// Tells every partition that everything up to `seq` has been routed, if that is news.
    pub(super) fn watermark(&mut self, seq: u64) {
        if seq <= self.last_watermark {
            return;
        }
        self.last_watermark = seq;
        for index in 0..self.partitions.len() {
            self.send(index, Op::Watermark(seq));
        }
    }

    /// Every partition commits the start of session `session_id` (resumable at `resume_url`),
    /// then, with [`SessionSync`], the replica confirms it; see [`session_start::commit`].
    /// `ready` carries the guild list when READY decoded; without it guilds only become stale.
    pub(super) async fn start_session(
        &mut self,
        session_id: &str,
        resume_url: &str,
        ready: Option<&Ready>,
    ) {
        self.last_watermark = 0;
        let starts = session_start::starts(
            self.shard_id,
            self.topology,
            self.partitions.len(),
            session_id,
            resume_url,
            ready,
        );
        // Waiting for the partitions and the replica, not for the socket.
        self.live.backpressured.store(true, Ordering::Relaxed);
        session_start::commit(
            self.shard_id,
            &self.partitions,
            starts,
            self.session_sync.as_ref(),
        )
        .await;
        self.live.backpressured.store(false, Ordering::Relaxed);
        self.live.touch();
    }

    /// Takes one in-flight permit (returned when the partition commits the op); false when the
    /// budget is closed (the group is going away). Bounds what is routed but not committed:
    /// waiting here stops reading the socket, which pushes back on the sender through TCP instead
    /// of growing mailboxes without limit.
    async fn acquire_in_flight(&self) -> bool {
        // `acquire` even when a permit is free: it takes part in tokio's cooperative budget, so
        // a pump with frames always ready still yields to the partitions now and then. With
        // `try_acquire` on the fast path the node's peak RSS at 20,000 guilds went from 122 to
        // 500+ MiB (bench/README.md).
        let waiting = self.in_flight.available_permits() == 0;
        if waiting {
            self.live.backpressured.store(true, Ordering::Relaxed);
        }
        let permit = self.in_flight.acquire().await;
        if waiting {
            self.live.backpressured.store(false, Ordering::Relaxed);
            // The silence clock restarts: the socket was not read while waiting.
            self.live.touch();
        }
        match permit {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    fn send(&self, index: usize, op: Op) {
        send(self.shard_id, &self.partitions[index], op);
    }
}

/// Casts `op` to a partition of shard `shard_id`.
pub(super) fn send(shard_id: u32, partition: &ActorRef<PartitionMsg>, op: Op) {
    if partition.cast(PartitionMsg::Op(op)).is_err() {
        // The partition died; its group restarts everyone and resumes from what it committed.
        tracing::debug!(shard = shard_id, "partition gone; op dropped");
    }
}
