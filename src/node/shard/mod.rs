//! The shard actor: one Discord gateway connection, read by a pump task that routes dispatches.
//!
//! twilight's `Shard` sends heartbeats only while its stream is polled, so it cannot live inside an
//! actor that also waits on other messages: a pump task owns it and polls it continuously, decoding
//! each frame, routing each dispatch to the partition of its guild (DESIGN §2) and sending the
//! partitions periodic watermarks. The actor owns the pump (aborting it when the actor's state is
//! dropped, even on kill), answers status and close requests, and runs the liveness watchdog that
//! restarts a silent shard independently of twilight (DESIGN §3).
//!
//! | file | owns |
//! |---|---|
//! | `shard/mod.rs` | [`ShardActor`]: messages, start arguments, lifecycle, the watchdog, [`FatalClose`] |
//! | `shard/pump.rs` | the pump task: owns twilight's `Shard`, reads and decodes frames, follows the session, closes |
//! | `shard/deliver.rs` | what the pump sends its partitions: routed ops within the in-flight budget, watermarks, session starts |
//! | `shard/route.rs` | which of the shard's partitions gets a dispatch or a dead letter (DESIGN §2) |
//! | `shard/session_start.rs` | a new session's start, committed by every partition and then the replica ([`SessionSync`]) |
//! | `shard/status.rs` | [`ShardPhase`], [`ShardStatus`] and the live counters the pump writes for the actor |
//!
//! A fatal close code (4004, 4010–4014) ends the shard for good: the pump records it in the
//! [`FatalCloseSlot`] its group passed in [`ShardArgs`], then the actor stops normally. The group
//! reads the slot when the stop's supervision event arrives, and does not restart the shard.

mod deliver;
mod pump;
mod route;
mod session_start;
mod status;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{Semaphore, mpsc, oneshot};
use twilight_gateway::Config;

use super::identify_queue::IdentifyQueue;
use super::partition::PartitionMsg;
use crate::ownership::Topology;
use crate::store::AppliedSession;
use pump::Pump;
pub use session_start::SessionSync;
use status::Live;
pub use status::{ShardPhase, ShardStatus};

/// How long a graceful close waits for Discord to acknowledge the close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watchdog looks at the shard's last activity.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);
/// How many silence timeouts a shard may wait on backpressure before the watchdog restarts it.
const BACKPRESSURE_SILENCE_FACTOR: u32 = 10;

/// Messages of [`ShardActor`].
pub enum ShardMsg {
    /// Close the connection keeping the session resumable (close code 4000), route a final
    /// watermark, and reply with the last sequence routed.
    Close(RpcReplyPort<u64>),
    /// Report the shard's status.
    Status(RpcReplyPort<ShardStatus>),
    /// Liveness check tick.
    Watchdog,
    /// The pump stopped on its own.
    PumpExited(PumpExit),
}

/// Why a pump stopped without being asked to.
#[derive(Debug)]
pub enum PumpExit {
    /// Discord closed with a code that forbids reconnecting: restarting cannot help, an operator
    /// must fix the token, shard count or intents.
    Fatal(FatalClose),
    /// The stream ended for another reason.
    Ended,
}

/// Discord closed the shard with a code that forbids reconnecting (4004, 4010–4014).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FatalClose {
    /// The WebSocket close code Discord sent (0 if the close frame carried none).
    pub code: u16,
}

impl std::fmt::Display for FatalClose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fatal close code {}", self.code)
    }
}

/// Where a shard records its [`FatalClose`] for its group: set at most once, by the pump, before
/// the actor stops; read by the actor (status, watchdog) and by the group.
///
/// Shared state rather than a message to the group, because ractor hands a supervisor its
/// children's supervision events before its ordinary messages: a "fatally closed" message sent
/// just before the stop could be read after the termination it explains, and the group would
/// restart the shard. The slot is written before the stop, so it is set when the event arrives.
#[derive(Clone, Debug, Default)]
pub struct FatalCloseSlot(Arc<OnceLock<FatalClose>>);

impl FatalCloseSlot {
    /// Records `close`; a second close is ignored (the first one ended the shard).
    pub fn record(&self, close: FatalClose) {
        // Err only when a close is already recorded, which is kept.
        let _ = self.0.set(close);
    }

    /// The recorded close, if the shard was fatally closed.
    #[must_use]
    pub fn get(&self) -> Option<FatalClose> {
        self.0.get().copied()
    }
}

/// Start arguments.
pub struct ShardArgs {
    /// Shard number.
    pub shard_id: u32,
    /// Topology: Discord shard total, partitions.
    pub topology: Topology,
    /// twilight config for this shard (token, intents, gateway URL, identify queue), without the
    /// session, which [`ShardArgs::resume`] supplies.
    pub gateway: Config<IdentifyQueue>,
    /// Resume this session at its `applied_seq` instead of identifying.
    pub resume: Option<AppliedSession>,
    /// The shard's partition actors, indexed by `partition / shard_total`.
    pub partitions: Vec<ActorRef<PartitionMsg>>,
    /// In-flight budget shared with the partitions (`storage.max_in_flight` permits).
    pub in_flight: Arc<Semaphore>,
    /// How often the pump sends watermarks.
    pub watermark_interval: Duration,
    /// Silence (no frame at all, ACKs included) after which the watchdog fails the shard.
    pub silence_timeout: Duration,
    /// Make each new session durable on the replica before applying its dispatches (child mode).
    pub session_sync: Option<SessionSync>,
    /// Where the shard records a fatal close before stopping; the group keeps a clone.
    pub fatal_close: FatalCloseSlot,
}

/// Aborts the pump when dropped: the actor's state is dropped however the actor ends (stop, kill,
/// panic), so a pump never outlives its shard actor and never routes into a restarted group.
struct PumpGuard(tokio::task::AbortHandle);

impl Drop for PumpGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// State of a running shard actor.
pub struct ShardActorState {
    shard_id: u32,
    live: Arc<Live>,
    control: mpsc::UnboundedSender<oneshot::Sender<u64>>,
    silence_timeout: Duration,
    _pump: PumpGuard,
}

/// The actor; see the module docs.
pub struct ShardActor;

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardActorState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (shard_id, silence_timeout) = (args.shard_id, args.silence_timeout);
        let live = Arc::new(Live::new(args.resume.as_ref(), args.fatal_close.clone()));
        let (control, control_rx) = mpsc::unbounded_channel();
        let pump = Pump::new(args, live.clone());
        let handle = tokio::spawn(pump.run(myself.clone(), control_rx));
        let abort = handle.abort_handle();
        // A panicking pump must fail the actor (and so restart the group) at once, not sit
        // silent until the watchdog notices.
        let actor = myself.clone();
        tokio::spawn(async move {
            if let Err(e) = handle.await
                && e.is_panic()
            {
                tracing::error!(error = %e, "shard pump panicked");
                // If the actor is gone, so is whoever could act on this.
                let _ = actor.cast(ShardMsg::PumpExited(PumpExit::Ended));
            }
        });
        myself.send_interval(WATCHDOG_PERIOD, || ShardMsg::Watchdog);
        Ok(ShardActorState {
            shard_id,
            live,
            control,
            silence_timeout,
            _pump: PumpGuard(abort),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Close(reply) => {
                let (tx, rx) = oneshot::channel();
                let last = if state.control.send(tx).is_ok() {
                    // The pump bounds the close itself; this bound only guards against a pump
                    // stuck elsewhere (backpressure wait).
                    tokio::time::timeout(CLOSE_TIMEOUT * 2, rx)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_else(|| state.live.last_seq.load(Ordering::Relaxed))
                } else {
                    state.live.last_seq.load(Ordering::Relaxed)
                };
                // The asker may have timed out; the close happened either way.
                let _ = reply.send(last);
            }
            ShardMsg::Status(reply) => {
                // A timed-out asker is not our failure.
                let _ = reply.send(state.live.status(state.shard_id));
            }
            ShardMsg::Watchdog => state.watchdog()?,
            ShardMsg::PumpExited(PumpExit::Fatal(close)) => {
                tracing::error!(
                    shard = state.shard_id,
                    code = close.code,
                    "Discord closed the shard with a fatal code; not retrying. 4004: check DISCORD_TOKEN; \
                     4010/4011: check discord.shards; 4013/4014: check discord.intents and the bot's \
                     privileged intents in the developer portal"
                );
                // The pump recorded `close` in the group's slot before telling us; the reason is
                // for logs only, nothing reads it back.
                myself.stop(Some(close.to_string()));
            }
            ShardMsg::PumpExited(PumpExit::Ended) => {
                return Err(format!("shard {} gateway stream ended", state.shard_id).into());
            }
        }
        Ok(())
    }
}

impl ShardActorState {
    /// The liveness check: fails the actor (and so restarts the group) when the shard has been
    /// silent past its bound, unless it was fatally closed.
    fn watchdog(&self) -> Result<(), ActorProcessingErr> {
        let silent = self.live.silent_for();
        // A pump held back by slow partitions reads nothing by design, and restarting
        // the group would not make the disk faster; only a commit that never finishes
        // (a hung disk) is worth a restart, and that is judged on a longer bound.
        let backpressured = self.live.backpressured.load(Ordering::Relaxed);
        let limit = if backpressured {
            self.silence_timeout * BACKPRESSURE_SILENCE_FACTOR
        } else {
            self.silence_timeout
        };
        if self.live.fatal.get().is_none() && silent > limit {
            let why = if backpressured {
                "held back by partitions whose commits do not finish"
            } else {
                "no frame, no heartbeat ACK"
            };
            return Err(format!(
                "shard {} silent for {}s ({why}); restarting",
                self.shard_id,
                silent.as_secs()
            )
            .into());
        }
        Ok(())
    }
}
