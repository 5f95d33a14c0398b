//! What a shard reports about itself: the [`ShardPhase`] and [`ShardStatus`] that `/readyz` and the
//! metrics show, and [`Live`], the counters the pump writes and the actor reads to build them.
//!
//! The pump and the actor run on different tasks and never wait on each other for a status, so
//! the shared state is atomics (the phase travels as a `u8`, see [`ShardPhase::to_u8`]), plus a
//! mutex for the session id and the typed fatal-close slot the group also reads.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use twilight_gateway::ShardState;

use super::FatalCloseSlot;
use crate::store::AppliedSession;

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
    /// The phase of twilight's shard state.
    fn from_state(state: ShardState) -> Self {
        match state {
            ShardState::Active => Self::Active,
            ShardState::Resuming => Self::Resuming,
            ShardState::Identifying => Self::Connecting,
            ShardState::Disconnected { .. } => Self::Disconnected,
            ShardState::FatallyClosed => Self::FatallyClosed,
        }
    }

    /// The phase as stored in [`Live::phase`].
    fn to_u8(self) -> u8 {
        self as u8
    }

    /// The inverse of [`Self::to_u8`]; an unknown value reads as `Connecting`.
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

/// Live counters the pump writes and the actor reads.
pub(super) struct Live {
    started: Instant,
    last_activity_ms: AtomicU64,
    /// Highest sequence twilight has tracked (routed, or about to be).
    pub(super) last_seq: AtomicU64,
    phase: AtomicU8,
    /// READY (new sessions) seen by this incarnation.
    pub(super) identifies: AtomicU32,
    /// RESUMED seen by this incarnation.
    pub(super) resumes: AtomicU32,
    /// Set once, by the pump, when Discord closes with a fatal code; the group reads it too.
    pub(super) fatal: FatalCloseSlot,
    /// The session the shard is in.
    pub(super) session_id: Mutex<Option<String>>,
    /// The pump waits for the partitions (backpressure), not for the socket: not silence.
    pub(super) backpressured: AtomicBool,
}

impl Live {
    /// Counters of a shard starting now, resuming `resume` if any.
    pub(super) fn new(resume: Option<&AppliedSession>, fatal: FatalCloseSlot) -> Self {
        Self {
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            last_seq: AtomicU64::new(resume.map_or(0, |s| s.applied_seq)),
            phase: AtomicU8::new(ShardPhase::Connecting.to_u8()),
            identifies: AtomicU32::new(0),
            resumes: AtomicU32::new(0),
            fatal,
            session_id: Mutex::new(resume.map(|s| s.session_id.clone())),
            backpressured: AtomicBool::new(false),
        }
    }

    /// Records activity now: the watchdog's silence clock restarts.
    pub(super) fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last [`Self::touch`] (or since the start).
    pub(super) fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Records twilight's current shard state as the phase.
    pub(super) fn set_phase(&self, state: ShardState) {
        self.phase
            .store(ShardPhase::from_state(state).to_u8(), Ordering::Relaxed);
    }

    /// A snapshot for [`ShardStatus`] of shard `shard`.
    pub(super) fn status(&self, shard: u32) -> ShardStatus {
        ShardStatus {
            shard,
            phase: ShardPhase::from_u8(self.phase.load(Ordering::Relaxed)),
            session_id: self.session_id.lock().expect("not poisoned").clone(),
            last_seq: self.last_seq.load(Ordering::Relaxed),
            identifies: self.identifies.load(Ordering::Relaxed),
            resumes: self.resumes.load(Ordering::Relaxed),
            fatal_close_code: self.fatal.get().map(|f| f.code),
            backpressured: self.backpressured.load(Ordering::Relaxed),
        }
    }
}
