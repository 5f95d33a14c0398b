//! The shard actor: one Discord gateway connection, read by a pump task that routes dispatches.
//!
//! twilight's `Shard` sends heartbeats only while its stream is polled, so it cannot live inside an
//! actor that also waits on other messages: a pump task owns it and polls it continuously, decoding
//! each frame, routing each dispatch to the partition of its guild (DESIGN §2) and sending the
//! partitions periodic watermarks. The actor owns the pump (aborting it when the actor's state is
//! dropped, even on kill), answers status and close requests, and runs the liveness watchdog that
//! restarts a silent shard independently of twilight (DESIGN §3).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{Semaphore, mpsc, oneshot};
use twilight_gateway::error::ReceiveMessageErrorType;
use twilight_gateway::{
    CloseFrame, Config, EventTypeFlags, Message, Session, Shard, ShardId, ShardState,
};
use twilight_model::gateway::event::{DispatchEvent, Event, GatewayEvent};

use super::identify_queue::IdentifyQueue;
use super::metrics as metric;
use super::partition::PartitionMsg;
use crate::ownership::{PartitionId, Topology};
use crate::store::{AppliedSession, Op, SessionStart};

/// How long a graceful close waits for Discord to acknowledge the close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watchdog looks at the shard's last activity.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);
/// Bound on the partitions committing a session start.
const SESSION_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a malformed frame goes into the log.
const LOGGED_FRAME_BYTES: usize = 200;

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
    /// Discord closed with a code that forbids reconnecting (4004, 4010–4014): restarting cannot
    /// help, an operator must fix the token, shard count or intents.
    /// The WebSocket close code.
    Fatal {
        /// The close code Discord sent.
        code: u16,
    },
    /// The stream ended for another reason.
    Ended,
}

/// The shard's connection phase, as `/readyz` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardPhase {
    /// Connecting, identifying or waiting for the identify queue.
    Connecting,
    /// RESUME sent, replay in progress.
    Resuming,
    /// Receiving dispatches.
    Active,
    /// Disconnected; twilight is reconnecting.
    Disconnected,
    /// Closed by a fatal close code; not retried.
    FatallyClosed,
}

impl ShardPhase {
    fn from_state(state: ShardState) -> Self {
        match state {
            ShardState::Active => Self::Active,
            ShardState::Resuming => Self::Resuming,
            ShardState::Identifying => Self::Connecting,
            ShardState::Disconnected { .. } => Self::Disconnected,
            ShardState::FatallyClosed => Self::FatallyClosed,
        }
    }

    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> Self {
        [
            Self::Connecting,
            Self::Resuming,
            Self::Active,
            Self::Disconnected,
            Self::FatallyClosed,
        ]
        .get(usize::from(v))
        .copied()
        .unwrap_or(Self::Connecting)
    }
}

/// What a shard reports about itself.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ShardStatus {
    /// Shard number.
    pub shard: u32,
    /// Connection phase.
    pub phase: ShardPhase,
    /// Current Discord session id, if any.
    pub session_id: Option<String>,
    /// Highest sequence routed to the partitions.
    pub last_seq: u64,
    /// READY received by this incarnation (each one cost an identify).
    pub identifies: u32,
    /// RESUMED received by this incarnation.
    pub resumes: u32,
    /// Fatal close code, if the shard stopped for one.
    pub fatal_close_code: Option<u16>,
    /// The pump is waiting for its partitions to commit (`storage.max_in_flight` dispatches are
    /// routed and uncommitted) and reads nothing from the socket meanwhile.
    #[serde(default)]
    pub backpressured: bool,
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
}

/// How a shard makes a new gateway session durable on the replica (DESIGN §5).
///
/// A new session's dispatches can be recovered after a lost disk only by resuming that session,
/// and a resume needs the session id: so the replica must hold the session start before anything
/// of the session is applied. Without this a disk lost within about a second of a new session
/// (Litestream's first upload comes about 1 s after it starts) restored files that predated the
/// session, the shard identified again, and what the old session had delivered was lost (11–22k
/// of 60k messages in `exactly_once::kill9_with_lost_data_dir_restores_from_the_replica`).
/// Later dispatches need no sync: the replica's applied sequence trails by the replication lag,
/// and a resume from there replays the rest within Discord's resume window.
#[derive(Clone, Debug)]
pub struct SessionSync {
    /// The Litestream child's control socket.
    pub sync: crate::replication::process::ReplicaSync,
    /// The shard's partition files, absolute, as in the rendered `litestream.yml`.
    pub files: Vec<std::path::PathBuf>,
}

/// How many silence timeouts a shard may wait on backpressure before the watchdog restarts it.
const BACKPRESSURE_SILENCE_FACTOR: u32 = 10;

/// Bound on the session-start sync: past it the shard goes on (the data is committed locally) and
/// logs that the session is not yet on the replica.
const SESSION_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Live counters the pump writes and the actor reads.
struct Live {
    started: Instant,
    last_activity_ms: AtomicU64,
    last_seq: AtomicU64,
    phase: AtomicU8,
    identifies: AtomicU32,
    resumes: AtomicU32,
    fatal: AtomicBool,
    fatal_code: AtomicU32,
    session_id: Mutex<Option<String>>,
    /// The pump waits for the partitions (backpressure), not for the socket: not silence.
    backpressured: AtomicBool,
}

impl Live {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
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
        let ShardArgs {
            shard_id,
            topology,
            gateway,
            resume,
            partitions,
            in_flight,
            watermark_interval,
            silence_timeout,
            session_sync,
        } = args;
        let mut builder = twilight_gateway::ConfigBuilder::from(gateway);
        if let Some(s) = &resume {
            tracing::info!(shard = shard_id, session = %s.session_id, seq = s.applied_seq, "resuming session");
            builder = builder
                .session(Session::new(s.applied_seq, s.session_id.clone()))
                .resume_url(s.resume_url.clone());
        } else {
            tracing::info!(shard = shard_id, "no resumable session; identifying");
        }
        let shard = Shard::with_config(ShardId::new(shard_id, topology.shards()), builder.build());
        let live = Arc::new(Live {
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            last_seq: AtomicU64::new(resume.as_ref().map_or(0, |s| s.applied_seq)),
            phase: AtomicU8::new(ShardPhase::Connecting.to_u8()),
            identifies: AtomicU32::new(0),
            resumes: AtomicU32::new(0),
            fatal: AtomicBool::new(false),
            fatal_code: AtomicU32::new(0),
            session_id: Mutex::new(resume.as_ref().map(|s| s.session_id.clone())),
            backpressured: AtomicBool::new(false),
        });
        let (control, control_rx) = mpsc::unbounded_channel();
        let pump = Pump {
            shard_id,
            topology,
            shard,
            partitions,
            in_flight,
            live: live.clone(),
            last_watermark: 0,
            last_close_code: None,
            session_id: resume.as_ref().map(|s| s.session_id.clone()),
            session_sync,
            unknown_kinds: std::collections::HashSet::new(),
        };
        let handle = tokio::spawn(pump.run(myself.clone(), control_rx, watermark_interval));
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
                let _ = reply.send(state.status());
            }
            ShardMsg::Watchdog => {
                let silent = state.live.silent_for();
                // A pump held back by slow partitions reads nothing by design, and restarting
                // the group would not make the disk faster; only a commit that never finishes
                // (a hung disk) is worth a restart, and that is judged on a longer bound.
                let backpressured = state.live.backpressured.load(Ordering::Relaxed);
                let limit = if backpressured {
                    state.silence_timeout * BACKPRESSURE_SILENCE_FACTOR
                } else {
                    state.silence_timeout
                };
                if !state.live.fatal.load(Ordering::Relaxed) && silent > limit {
                    let why = if backpressured {
                        "held back by partitions whose commits do not finish"
                    } else {
                        "no frame, no heartbeat ACK"
                    };
                    return Err(format!(
                        "shard {} silent for {}s ({why}); restarting",
                        state.shard_id,
                        silent.as_secs()
                    )
                    .into());
                }
            }
            ShardMsg::PumpExited(PumpExit::Fatal { code }) => {
                tracing::error!(
                    shard = state.shard_id,
                    code,
                    "Discord closed the shard with a fatal code; not retrying. 4004: check DISCORD_TOKEN; \
                     4010/4011: check discord.shards; 4013/4014: check discord.intents and the bot's \
                     privileged intents in the developer portal"
                );
                myself.stop(Some(format!("{FATAL_PREFIX}{code}")));
            }
            ShardMsg::PumpExited(PumpExit::Ended) => {
                return Err(format!("shard {} gateway stream ended", state.shard_id).into());
            }
        }
        Ok(())
    }
}

/// Stop reason of a shard closed by a fatal code: `"fatal close code 4004"`. Its supervisor reads
/// it to tell a fatal stop from a failure.
pub const FATAL_PREFIX: &str = "fatal close code ";

impl ShardActorState {
    fn status(&self) -> ShardStatus {
        let fatal = self.live.fatal.load(Ordering::Relaxed);
        ShardStatus {
            shard: self.shard_id,
            phase: ShardPhase::from_u8(self.live.phase.load(Ordering::Relaxed)),
            session_id: self.live.session_id.lock().expect("not poisoned").clone(),
            last_seq: self.live.last_seq.load(Ordering::Relaxed),
            identifies: self.live.identifies.load(Ordering::Relaxed),
            resumes: self.live.resumes.load(Ordering::Relaxed),
            fatal_close_code: fatal
                .then(|| u16::try_from(self.live.fatal_code.load(Ordering::Relaxed)).unwrap_or(0)),
            backpressured: self.live.backpressured.load(Ordering::Relaxed),
        }
    }
}

/// The task that owns twilight's `Shard`.
struct Pump {
    shard_id: u32,
    topology: Topology,
    shard: Shard<IdentifyQueue>,
    partitions: Vec<ActorRef<PartitionMsg>>,
    in_flight: Arc<Semaphore>,
    live: Arc<Live>,
    last_watermark: u64,
    /// Code of the last close frame seen (twilight reports fatal codes only this way).
    last_close_code: Option<u16>,
    /// The session the partitions were last told about (the resumed one at start).
    session_id: Option<String>,
    /// Replica sync after each session start, when Litestream runs as our child.
    session_sync: Option<SessionSync>,
    /// Event types already reported as unknown (logged once each).
    unknown_kinds: std::collections::HashSet<String>,
}

impl Pump {
    async fn run(
        mut self,
        actor: ActorRef<ShardMsg>,
        mut control: mpsc::UnboundedReceiver<oneshot::Sender<u64>>,
        watermark_interval: Duration,
    ) {
        let mut watermark = tokio::time::interval(watermark_interval);
        watermark.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let exit = loop {
            tokio::select! {
                biased;
                Some(done) = control.recv() => {
                    self.close().await;
                    self.send_watermark();
                    // The closer may have given up waiting; the shard is closed either way.
                    let _ = done.send(self.live.last_seq.load(Ordering::Relaxed));
                    return;
                }
                item = self.shard.next() => match item {
                    Some(item) => {
                        if let Some(exit) = self.on_item(item).await {
                            break exit;
                        }
                    }
                    None => break self.fatal_exit().unwrap_or(PumpExit::Ended),
                },
                _ = watermark.tick() => self.send_watermark(),
            }
        };
        if let PumpExit::Fatal { code } = exit {
            self.live.fatal.store(true, Ordering::Relaxed);
            self.live
                .fatal_code
                .store(u32::from(code), Ordering::Relaxed);
        }
        self.live.phase.store(
            ShardPhase::from_state(self.shard.state()).to_u8(),
            Ordering::Relaxed,
        );
        // If the actor is gone, so is whoever could act on this.
        let _ = actor.cast(ShardMsg::PumpExited(exit));
    }

    fn fatal_exit(&self) -> Option<PumpExit> {
        (self.shard.state() == ShardState::FatallyClosed).then(|| PumpExit::Fatal {
            code: self.last_close_code.unwrap_or(0),
        })
    }

    /// Handles one stream item; `Some` ends the pump.
    async fn on_item(
        &mut self,
        item: Result<Message, twilight_gateway::error::ReceiveMessageError>,
    ) -> Option<PumpExit> {
        self.live.touch();
        self.live.phase.store(
            ShardPhase::from_state(self.shard.state()).to_u8(),
            Ordering::Relaxed,
        );
        match item {
            Ok(Message::Text(text)) => {
                self.on_text(text).await;
                None
            }
            Ok(Message::Close(frame)) => {
                tracing::info!(shard = self.shard_id, ?frame, "gateway connection closed");
                metrics::counter!(metric::RECONNECTS, "shard" => self.shard_id.to_string())
                    .increment(1);
                self.last_close_code = frame.as_ref().map(|f| f.code);
                self.fatal_exit()
            }
            Err(e) => {
                match e.kind() {
                    ReceiveMessageErrorType::Deserializing { event } => {
                        metrics::counter!(metric::MALFORMED, "shard" => self.shard_id.to_string())
                            .increment(1);
                        tracing::warn!(shard = self.shard_id, error = %e,
                            frame = %truncate(event, LOGGED_FRAME_BYTES), "malformed gateway frame skipped");
                    }
                    ReceiveMessageErrorType::Reconnect => {
                        tracing::info!(shard = self.shard_id, error = %e, "gateway reconnecting");
                    }
                    _ => tracing::warn!(shard = self.shard_id, error = %e, "gateway receive error"),
                }
                None
            }
        }
    }

    async fn on_text(&mut self, text: String) {
        // An event type twilight does not know parses to nothing; keep its frame instead.
        let unknown = super::dead_letter::unknown_event(&text);
        let parsed = if unknown.is_some() {
            Ok(None)
        } else {
            twilight_gateway::parse(text, EventTypeFlags::all())
        };
        // twilight has already tracked this frame's sequence and session, whatever its payload.
        if let Some(session) = self.shard.session() {
            self.live
                .last_seq
                .store(session.sequence(), Ordering::Relaxed);
        }
        // A new session is detected from twilight's own session id, not from decoding READY: a
        // READY this crate cannot fully decode must still reset the partitions' sequences, or
        // every dispatch of the new session up to the old applied sequence would be skipped as a
        // duplicate.
        let session_changed = self
            .shard
            .session()
            .is_some_and(|s| self.session_id.as_deref() != Some(s.id()));
        if session_changed {
            let ready = match &parsed {
                Ok(Some(GatewayEvent::Dispatch(_, DispatchEvent::Ready(r)))) => Some(r),
                _ => None,
            };
            self.start_session(ready).await;
        }
        let (seq, event) = match parsed {
            Ok(Some(GatewayEvent::Dispatch(seq, event))) => (seq, event),
            Ok(_) => {
                // Gateway ops twilight handles itself, or a dispatch of an unknown event type.
                if let Some(letter) = unknown {
                    if self.unknown_kinds.insert(letter.kind.clone()) {
                        tracing::info!(shard = self.shard_id, kind = %letter.kind,
                            "dispatches of an event type twilight does not know are kept as dead letters");
                    }
                    self.dead_letter(letter).await;
                }
                return;
            }
            Err(e) => {
                metrics::counter!(metric::MALFORMED, "shard" => self.shard_id.to_string())
                    .increment(1);
                let error = crate::error_chain(&e);
                let (frame, letter) = match e.kind() {
                    ReceiveMessageErrorType::Deserializing { event } => (
                        truncate(event, LOGGED_FRAME_BYTES).to_owned(),
                        super::dead_letter::undecodable(event, error.clone()),
                    ),
                    _ => (String::new(), None),
                };
                match letter {
                    Some(letter) => {
                        tracing::warn!(shard = self.shard_id, seq = letter.seq, kind = %letter.kind,
                            %error, %frame, "malformed dispatch kept as a dead letter");
                        self.dead_letter(letter).await;
                    }
                    None => tracing::warn!(shard = self.shard_id, %error, %frame,
                        "malformed dispatch skipped (no sequence to keep it by)"),
                }
                return;
            }
        };
        if let DispatchEvent::Resumed = &event {
            self.live.resumes.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::RESUMES, "shard" => self.shard_id.to_string()).increment(1);
            tracing::info!(shard = self.shard_id, seq, "session resumed");
            return;
        }
        let Some(target) = self.route(event) else {
            return;
        };
        let (index, event) = target;
        if !self.acquire_in_flight().await {
            return; // closed only when the group is going away
        }
        self.send(
            &self.partitions[index],
            Op::Dispatch {
                seq,
                event: Box::new(event),
            },
        );
    }

    /// Routes a dead letter like a dispatch: to its guild's partition, or the shard's home
    /// partition when it names no guild (or one of another shard, which a partition of ours must
    /// not hold — its sequence still has to advance here).
    async fn dead_letter(&mut self, letter: crate::store::DeadLetter) {
        let Ok(index) = self
            .partition_index(letter.guild_id)
            .or_else(|_| self.partition_index(None))
        else {
            return;
        };
        if !self.acquire_in_flight().await {
            return;
        }
        metrics::counter!(metric::DEAD_LETTERS, "shard" => self.shard_id.to_string()).increment(1);
        self.send(&self.partitions[index], Op::DeadLetter(Box::new(letter)));
    }

    /// Takes one in-flight permit (returned when the partition commits the op); false when the
    /// budget is closed (the group is going away). Bounds what is routed but not committed:
    /// waiting here stops reading the socket, which pushes back on the sender through TCP instead
    /// of growing mailboxes without limit.
    async fn acquire_in_flight(&mut self) -> bool {
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

    /// Tells every partition that a new session started (its sequences restart at 1), then waits
    /// until each has committed that, so a crash right after READY cannot leave partitions that
    /// disagree on the session (which would cost an identify where a resume was possible); with
    /// [`SessionSync`], then waits until the replica holds it too.
    /// `ready` carries the guild list when READY decoded; without it guilds only become stale.
    async fn start_session(
        &mut self,
        ready: Option<&twilight_model::gateway::payload::incoming::Ready>,
    ) {
        let Some(session) = self.shard.session() else {
            return;
        };
        let session_id = session.id().to_owned();
        let resume_url = ready
            .map(|r| r.resume_gateway_url.clone())
            .or_else(|| self.shard.resume_url().map(str::to_owned))
            .unwrap_or_default();
        self.live.identifies.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::IDENTIFIES, "shard" => self.shard_id.to_string()).increment(1);
        *self.live.session_id.lock().expect("not poisoned") = Some(session_id.clone());
        tracing::info!(shard = self.shard_id, session = %session_id,
            guilds = ready.map(|r| r.guilds.len()), "session started (identify)");
        self.session_id = Some(session_id.clone());
        self.last_watermark = 0;
        let shards = self.topology.shards();
        let mut per_partition: Vec<Option<Vec<u64>>> =
            vec![ready.map(|_| Vec::new()); self.partitions.len()];
        for g in ready.iter().flat_map(|r| &r.guilds) {
            let p = self.topology.partition_of_guild(g.id.get());
            if let Some(Some(list)) = per_partition.get_mut((p.0 / shards) as usize) {
                list.push(g.id.get());
            }
        }
        // Waiting for the partitions and the replica, not for the socket.
        self.live.backpressured.store(true, Ordering::Relaxed);
        self.commit_session_start(session_id, resume_url, per_partition)
            .await;
        self.live.backpressured.store(false, Ordering::Relaxed);
        self.live.touch();
    }

    /// The second half of [`Self::start_session`]: every partition commits the session start,
    /// then (with [`SessionSync`]) the replica confirms it.
    async fn commit_session_start(
        &mut self,
        session_id: String,
        resume_url: String,
        per_partition: Vec<Option<Vec<u64>>>,
    ) {
        let shards = self.topology.shards();
        for (partition, guilds) in self.partitions.iter().zip(per_partition) {
            let start = SessionStart {
                shard_id: self.shard_id,
                shard_total: shards,
                session_id: session_id.clone(),
                resume_url: resume_url.clone(),
                guilds,
            };
            self.send(partition, Op::Session(start));
        }
        let drained = futures_util::future::join_all(
            self.partitions
                .iter()
                .map(|p| super::call(p, PartitionMsg::Drain, SESSION_COMMIT_TIMEOUT)),
        )
        .await;
        if let Some(Err(e)) = drained.into_iter().find(Result::is_err) {
            // The partition is failing; its group restarts everyone, which is the right outcome.
            tracing::warn!(shard = self.shard_id, error = %e, "session start not committed everywhere");
            return;
        }
        if let Some(s) = &self.session_sync
            && let Err(e) = s
                .sync
                .sync_wait(s.files.clone(), SESSION_SYNC_TIMEOUT, "at session start")
                .await
        {
            tracing::warn!(shard = self.shard_id, error = %e,
                "new session not confirmed on the replica: a disk lost now would cost an identify");
        }
    }

    /// Finds the partition of a dispatch: its guild's (DESIGN §2), or the shard's home partition for
    /// events without a guild. A guild that is not ours (Discord's formula says another shard) is
    /// dropped with a warning rather than written into the wrong file.
    fn route(&self, event: DispatchEvent) -> Option<(usize, DispatchEvent)> {
        let event = Event::from(event);
        let guild = event.guild_id().map(|g| g.get());
        let Ok(index) = self.partition_index(guild) else {
            tracing::warn!(shard = self.shard_id, guild, kind = ?event.kind(),
                "dispatch for a guild of another shard dropped");
            return None;
        };
        let event = DispatchEvent::try_from(event).ok()?;
        Some((index, event))
    }

    /// Index into `partitions` of where a dispatch of `guild` goes (DESIGN §2): the guild's
    /// partition, or the shard's home partition for a dispatch without a guild. `Err` names the
    /// partition when Discord's formula puts the guild on another shard: no file of ours may hold
    /// it.
    fn partition_index(&self, guild: Option<u64>) -> Result<usize, PartitionId> {
        let partition = guild.map_or_else(
            || self.topology.home_partition(self.shard_id),
            |g| self.topology.partition_of_guild(g),
        );
        if self.topology.shard_of_partition(partition) != self.shard_id {
            return Err(partition);
        }
        usize::try_from(partition.0 / self.topology.shards()).map_err(|_| partition)
    }

    fn send(&self, partition: &ActorRef<PartitionMsg>, op: Op) {
        if partition.cast(PartitionMsg::Op(op)).is_err() {
            // The partition died; its group restarts everyone and resumes from what it committed.
            tracing::debug!(shard = self.shard_id, "partition gone; op dropped");
        }
    }

    /// Tells every partition that everything up to the current sequence has been routed.
    fn send_watermark(&mut self) {
        let seq = self.live.last_seq.load(Ordering::Relaxed);
        if seq <= self.last_watermark || self.shard.session().is_none() {
            return;
        }
        self.last_watermark = seq;
        for p in &self.partitions {
            self.send(p, Op::Watermark(seq));
        }
    }

    /// Closes with Discord's resume close code (4000), so the session stays resumable, and reads
    /// until the close completes; frames that arrive meanwhile are still routed.
    async fn close(&mut self) {
        self.shard.close(CloseFrame::RESUME);
        let deadline = tokio::time::sleep(CLOSE_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                item = self.shard.next() => match item {
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(Message::Text(text))) => self.on_text(text).await,
                    Some(Err(_)) => {}
                },
                () = &mut deadline => {
                    tracing::warn!(shard = self.shard_id, "close not acknowledged in time");
                    break;
                }
            }
        }
        if let Some(session) = self.shard.session() {
            self.live
                .last_seq
                .store(session.sequence(), Ordering::Relaxed);
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
