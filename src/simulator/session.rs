//! Runtime state shared by all connections: per-shard script cursors, session logs, the
//! dispatch record and delivery progress.
//!
//! Each shard's state sits behind its own `std::sync::Mutex` (held for microseconds, never
//! across an `.await`). Lock order is shard → record; nothing takes them the other way round.
//! A session log is a `Vec<LogEntry>` indexed by `seq - 1`: 12 bytes per dispatch, never the
//! JSON, which is rendered again from the world on replay.
//!
//! # Session lifetime (see [`SimConfig`] for the knobs)
//! A session is *held* while a connection streams it. When its last holder ends, its resume
//! window starts (`SimConfig::resume_window`). A RESUME is refused (op 9 `d: false`) when the
//! session was discarded, the window has passed, the sequence is ahead of the session, or more
//! than `SimConfig::resume_window_events` dispatches would have to be replayed; a refused
//! session is discarded. Faults (INVALID_SESSION `false`, close codes 4004/4007/4009/4010–4014)
//! and a client closing with 1000/1001 discard it too.
//!
//! Each session remembers the last sequence its client reported (`acked`: heartbeat `d`, or
//! the `seq` of a RESUME, accepted or refused). When a shard IDENTIFYs while its latest
//! session can no longer be resumed, and `SimConfig::resend_unacknowledged_on_identify` is
//! set, the new session first re-sends every script event of that lost session with
//! `seq > acked` (flagged `redelivery`), then continues the script.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::payload::{describe, mix};
use super::world::{ScriptEvent, World};
use super::{DispatchKind, Fault, SentDispatch, ShardStatus, SimConfig, SimError, SimStatus};

/// One dispatch in a session log; its sequence number is its position + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogEntry {
    /// READY, first dispatch of every session.
    Ready,
    /// GUILD_CREATE of guild `guild` as it stood with the shard's script cursor at `at`.
    GuildCreate { guild: u32, at: u32 },
    /// Entry `index` of the shard's script; `redelivery`: put in this session to re-send an
    /// event of a lost session (see the module docs).
    Script { index: u32, redelivery: bool },
    /// RESUMED, after the replay of a RESUME.
    Resumed,
}

/// One frame a connection is about to write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing {
    /// Sequence number; `None` for the broken-JSON fault frame, which takes none.
    pub seq: Option<u64>,
    pub entry: LogEntry,
    /// Re-sent from the session log because of a RESUME.
    pub replay: bool,
}

/// Frames to write after IDENTIFY or RESUME succeeded.
#[derive(Debug)]
pub(crate) struct Opened {
    pub session: Arc<str>,
    /// READY + GUILD_CREATEs (identify), or replayed dispatches + RESUMED (resume).
    pub backlog: Vec<Outgoing>,
    /// The shard's script is already fully claimed.
    pub script_done: bool,
    /// Script events of a lost session re-sent in the backlog (identify only).
    pub redelivered: usize,
}

/// Result of a RESUME.
#[derive(Debug)]
pub(crate) enum Resumed {
    /// The session is not one of this shard's.
    Unknown,
    /// The session is this shard's but cannot be resumed (it is now discarded).
    Refused { reason: &'static str },
    /// Resumed: replay + RESUMED.
    Opened(Opened),
}

/// A fault for the connection holding a shard, and where to report it was applied (dropped
/// unapplied when that connection no longer holds the shard).
#[derive(Debug)]
pub(crate) struct FaultReq {
    pub fault: Fault,
    pub done: oneshot::Sender<()>,
}

/// Where a connection receives faults.
pub(crate) type FaultTx = mpsc::UnboundedSender<FaultReq>;

/// Result of asking for the next script events.
#[derive(Debug)]
pub(crate) enum Claim {
    /// Another connection took the shard over; this one must stop.
    Superseded,
    /// Up to the requested number of events (fewer or none when the script ends).
    Events {
        items: Vec<Outgoing>,
        script_done: bool,
    },
}

/// Compact record entry (the public [`SentDispatch`] is built on demand).
#[derive(Debug, Clone)]
struct RecordEntry {
    shard: u32,
    session: Arc<str>,
    seq: u64,
    kind: DispatchKind,
    guild_id: Option<u64>,
    message_id: Option<u64>,
    replay: bool,
    redelivery: bool,
    malformed: bool,
}

/// One session of a shard.
#[derive(Debug)]
struct SessionRt {
    /// Dispatches by `seq - 1`.
    log: Vec<LogEntry>,
    /// Connection streaming this session now (0 = none).
    holder: u64,
    /// When the last holder ended (`None` while held).
    ended_at: Option<Instant>,
    /// Last sequence the client reported: heartbeat `d` or a RESUME's `seq` (never above
    /// `log.len()`).
    acked: u64,
    /// Can no longer be resumed.
    discarded: bool,
}

impl SessionRt {
    fn new(log: Vec<LogEntry>, holder: u64) -> SessionRt {
        SessionRt {
            log,
            holder,
            ended_at: None,
            acked: 0,
            discarded: false,
        }
    }

    /// The holder `conn` is gone: the resume window starts.
    fn release(&mut self, conn: u64, now: Instant) {
        if self.holder == conn {
            self.holder = 0;
            self.ended_at = Some(now);
        }
    }
}

/// Per-shard state.
#[derive(Debug, Default)]
struct ShardRt {
    /// Next script index no session has been given yet; only ever moves forward.
    cursor: u32,
    /// Bit `i` set = script entry `i` was flushed to some socket at least once.
    sent: Vec<u64>,
    script_sent: u64,
    messages_sent: u64,
    sessions: HashMap<Arc<str>, SessionRt>,
    current_session: Option<Arc<str>>,
    /// Connection id that owns the shard now (0 = none).
    active_conn: u64,
    /// Fault channel of `active_conn`.
    faults: Option<FaultTx>,
    identifies: u32,
    resumes: u32,
    resumes_refused: u32,
    connections: u32,
}

/// Everything the gateway, REST API and public handle share.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub config: SimConfig,
    pub world: Arc<World>,
    /// `ws://127.0.0.1:PORT`, also sent as READY's `resume_gateway_url`.
    pub gateway_url: String,
    /// Token bucket for script dispatches when `config.rate` is set (filled by `gateway.rs`).
    pub pacer: Option<Arc<Semaphore>>,
    shards: Vec<Mutex<ShardRt>>,
    /// Per shard: the connection id that owns it; a superseded connection sees the change.
    owners: Vec<watch::Sender<u64>>,
    record: Mutex<Vec<RecordEntry>>,
    /// `true` once every shard's script was sent at least once.
    all_sent: watch::Sender<bool>,
    completed_shards: AtomicU64,
    next_conn: AtomicU64,
    next_session: AtomicU64,
    /// IDENTIFYs still allowed (`session_start_limit.remaining`).
    session_starts: AtomicU32,
    /// Script events every shard together may claim before the stream holds
    /// ([`crate::simulator::Simulator::hold_script_at`]); `u64::MAX` = no hold.
    script_limit: watch::Sender<u64>,
    /// Script events claimed so far over all shards (each script position counts once: replays
    /// and redeliveries are not script claims).
    script_claimed: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave these structures half-updated in a way that
    // matters more than stopping the simulator would; keep serving.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Runtime {
    pub(crate) fn new(config: SimConfig, world: Arc<World>, gateway_url: String) -> Runtime {
        let shards = world.shards as usize;
        let pacer = config.rate.map(|_| Arc::new(Semaphore::new(0)));
        let mut completed = 0;
        let shard_rts = world
            .scripts
            .iter()
            .map(|script| {
                if script.is_empty() {
                    completed += 1;
                }
                Mutex::new(ShardRt {
                    sent: vec![0; script.len().div_ceil(64)],
                    ..ShardRt::default()
                })
            })
            .collect();
        let (all_sent, _) = watch::channel(completed == shards);
        let session_starts = AtomicU32::new(config.session_start_remaining);
        Runtime {
            config,
            world,
            gateway_url,
            pacer,
            shards: shard_rts,
            owners: (0..shards).map(|_| watch::channel(0).0).collect(),
            record: Mutex::new(Vec::new()),
            all_sent,
            completed_shards: AtomicU64::new(completed as u64),
            next_conn: AtomicU64::new(1),
            next_session: AtomicU64::new(1),
            session_starts,
            script_limit: watch::channel(u64::MAX).0,
            script_claimed: AtomicU64::new(0),
        }
    }

    /// A fresh connection id (never 0).
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Watch the owner of `shard` (the connection id holding it).
    pub(crate) fn watch_owner(&self, shard: u32) -> watch::Receiver<u64> {
        self.owners[shard as usize].subscribe()
    }

    /// Watch whether every script was sent at least once.
    pub(crate) fn watch_all_sent(&self) -> watch::Receiver<bool> {
        self.all_sent.subscribe()
    }

    /// Hold the script stream once `limit` script events were claimed over all shards
    /// (`u64::MAX`: never). Connections waiting at the hold wake when it changes.
    pub(crate) fn set_script_limit(&self, limit: u64) {
        self.script_limit.send_replace(limit);
    }

    /// Watch the script hold; a connection at the hold waits for a change.
    pub(crate) fn watch_script_limit(&self) -> watch::Receiver<u64> {
        self.script_limit.subscribe()
    }

    /// `true` while the hold lets at least one more script event through.
    pub(crate) fn script_room(&self) -> bool {
        self.script_claimed.load(Ordering::Acquire) < *self.script_limit.borrow()
    }

    /// Script events claimed so far over all shards.
    pub(crate) fn script_claimed(&self) -> u64 {
        self.script_claimed.load(Ordering::Acquire)
    }

    /// Reserve up to `want` script events under the hold; returns how many were granted.
    fn reserve_script(&self, want: u64) -> u64 {
        let limit = *self.script_limit.borrow();
        let mut granted = 0;
        // Err only when nothing is left, which `granted = 0` already says.
        let _ = self
            .script_claimed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |claimed| {
                granted = want.min(limit.saturating_sub(claimed));
                (granted > 0).then_some(claimed + granted)
            });
        granted
    }

    /// IDENTIFYs still allowed.
    pub(crate) fn session_start_remaining(&self) -> u32 {
        self.session_starts.load(Ordering::Relaxed)
    }

    /// Use one session start; `false` when none is left.
    pub(crate) fn take_session_start(&self) -> bool {
        self.session_starts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// A connection presented IDENTIFY or RESUME for `shard` (counted once per connection by
    /// the caller).
    pub(crate) fn count_connection(&self, shard: u32) {
        lock(&self.shards[shard as usize]).connections += 1;
    }

    /// Why a RESUME of `session` at `seq` would be refused now, if it would.
    fn refusal(&self, session: &SessionRt, seq: u64, now: Instant) -> Option<&'static str> {
        let len = session.log.len() as u64;
        if session.discarded {
            return Some("session invalidated");
        }
        if seq > len {
            return Some("sequence ahead of the session");
        }
        if session.holder == 0
            && let (Some(window), Some(ended)) = (self.config.resume_window, session.ended_at)
            && now.duration_since(ended) > window
        {
            return Some("resume window expired");
        }
        if self
            .config
            .resume_window_events
            .is_some_and(|max| len - seq > max)
        {
            return Some("too many dispatches to replay");
        }
        None
    }

    /// IDENTIFY accepted: `conn` takes `shard` over and a new session starts with READY and a
    /// GUILD_CREATE per guild of the shard, rendered at the shard's current script cursor,
    /// then (if configured, see the module docs) the redelivery of a lost previous session.
    pub(crate) fn identify(&self, shard: u32, conn: u64, faults: FaultTx) -> Opened {
        let counter = self.next_session.fetch_add(1, Ordering::Relaxed);
        let session: Arc<str> =
            format!("{:016x}{:08x}{:08x}", mix(self.world.seed), shard, counter).into();
        let now = Instant::now();
        let mut guard = lock(&self.shards[shard as usize]);
        let st = &mut *guard;
        let mut redeliver = Vec::new();
        let previous = st
            .current_session
            .as_ref()
            .and_then(|s| st.sessions.get_mut(s));
        if let Some(prev) = previous
            && self.refusal(prev, prev.acked, now).is_some()
        {
            prev.discarded = true;
            let unacked = prev.log[prev.acked as usize..].iter();
            let indices = unacked.filter_map(|e| match e {
                LogEntry::Script { index, .. } => Some(*index),
                _ => None,
            });
            if self.config.resend_unacknowledged_on_identify {
                redeliver.extend(indices);
            } else {
                // Lost to the client, as on Discord: count them as sent so `wait_all_sent`
                // does not wait for events nobody will ever send again.
                for index in indices.collect::<Vec<_>>() {
                    self.mark_sent(st, shard, index);
                }
            }
        }
        self.take_over(st, shard, conn, faults);
        let at = st.cursor;
        let mut log = vec![LogEntry::Ready];
        log.extend(
            self.world.shard_guilds[shard as usize]
                .iter()
                .map(|g| LogEntry::GuildCreate { guild: *g, at }),
        );
        log.extend(redeliver.iter().map(|&index| LogEntry::Script {
            index,
            redelivery: true,
        }));
        let backlog = log
            .iter()
            .enumerate()
            .map(|(i, e)| Outgoing {
                seq: Some(i as u64 + 1),
                entry: *e,
                replay: false,
            })
            .collect();
        st.sessions
            .insert(session.clone(), SessionRt::new(log, conn));
        st.current_session = Some(session.clone());
        st.identifies += 1;
        Opened {
            session,
            backlog,
            script_done: self.script_done(st, shard),
            redelivered: redeliver.len(),
        }
    }

    /// RESUME of `session` at `seq` on `shard`. Accepted (see [`Runtime::refusal`]): `conn`
    /// takes the shard over and gets every dispatch after `seq` again plus RESUMED. Refused:
    /// the session is discarded and counted in `resumes_refused`.
    pub(crate) fn resume(
        &self,
        shard: u32,
        session: &str,
        seq: u64,
        conn: u64,
        faults: FaultTx,
    ) -> Resumed {
        let now = Instant::now();
        let mut guard = lock(&self.shards[shard as usize]);
        let st = &mut *guard;
        let Some((key, s)) = st
            .sessions
            .get_key_value(session)
            .map(|(k, _)| k.clone())
            .and_then(|k| st.sessions.get_mut(&k).map(|s| (k, s)))
        else {
            return Resumed::Unknown;
        };
        if let Some(reason) = self.refusal(s, seq, now) {
            if seq <= s.log.len() as u64 {
                s.acked = seq;
            }
            s.discarded = true;
            st.resumes_refused += 1;
            return Resumed::Refused { reason };
        }
        s.acked = seq;
        s.holder = conn;
        s.ended_at = None;
        let mut backlog: Vec<Outgoing> = s.log[seq as usize..]
            .iter()
            .enumerate()
            .map(|(i, e)| Outgoing {
                seq: Some(seq + i as u64 + 1),
                entry: *e,
                replay: true,
            })
            .collect();
        s.log.push(LogEntry::Resumed);
        backlog.push(Outgoing {
            seq: Some(s.log.len() as u64),
            entry: LogEntry::Resumed,
            replay: false,
        });
        self.take_over(st, shard, conn, faults);
        st.current_session = Some(key.clone());
        st.resumes += 1;
        Resumed::Opened(Opened {
            session: key,
            backlog,
            script_done: self.script_done(st, shard),
            redelivered: 0,
        })
    }

    fn take_over(&self, st: &mut ShardRt, shard: u32, conn: u64, faults: FaultTx) {
        st.active_conn = conn;
        st.faults = Some(faults);
        // Wakes the previous owner (if any), which then closes its socket.
        self.owners[shard as usize].send_replace(conn);
    }

    fn script_done(&self, st: &ShardRt, shard: u32) -> bool {
        st.cursor as usize >= self.world.scripts[shard as usize].len()
    }

    /// Give up to `max` next script events of `shard` to `session` (fewer at the script hold),
    /// if `conn` still owns the shard. Each event gets the session's next sequence number (the broken-JSON fault gets
    /// none and counts as sent at once, as nothing can replay it).
    pub(crate) fn claim(&self, shard: u32, conn: u64, session: &str, max: usize) -> Claim {
        let script = &self.world.scripts[shard as usize];
        let mut st = lock(&self.shards[shard as usize]);
        if st.active_conn != conn {
            return Claim::Superseded;
        }
        let st = &mut *st;
        let Some(log) = st.sessions.get_mut(session).map(|s| &mut s.log) else {
            return Claim::Superseded;
        };
        let left = script.len() - st.cursor as usize;
        let end = st.cursor as usize + self.reserve_script(max.min(left) as u64) as usize;
        let mut items = Vec::with_capacity(end - st.cursor as usize);
        let mut broken = Vec::new();
        for index in st.cursor..end as u32 {
            let entry = LogEntry::Script {
                index,
                redelivery: false,
            };
            if script[index as usize].takes_seq() {
                log.push(entry);
                items.push(Outgoing {
                    seq: Some(log.len() as u64),
                    entry,
                    replay: false,
                });
            } else {
                items.push(Outgoing {
                    seq: None,
                    entry,
                    replay: false,
                });
                broken.push(index);
            }
        }
        st.cursor = end as u32;
        for index in broken {
            self.mark_sent(st, shard, index);
        }
        Claim::Events {
            items,
            script_done: end >= script.len(),
        }
    }

    /// The frames in `items` were flushed to the socket of `session` on `shard`: record them
    /// and mark their script events as sent.
    pub(crate) fn delivered(&self, shard: u32, session: &Arc<str>, items: &[Outgoing]) {
        let mut st = lock(&self.shards[shard as usize]);
        let mut record = lock(&self.record);
        for item in items {
            let mut redelivery = false;
            if let LogEntry::Script {
                index,
                redelivery: r,
            } = item.entry
            {
                self.mark_sent(&mut st, shard, index);
                redelivery = r;
            }
            let Some(seq) = item.seq else { continue };
            let (kind, guild_id, message_id, malformed) = describe(&self.world, shard, item.entry);
            record.push(RecordEntry {
                shard,
                session: session.clone(),
                seq,
                kind,
                guild_id,
                message_id,
                replay: item.replay,
                redelivery,
                malformed,
            });
        }
    }

    fn mark_sent(&self, st: &mut ShardRt, shard: u32, index: u32) {
        let (word, bit) = (index as usize / 64, 1u64 << (index % 64));
        if st.sent[word] & bit != 0 {
            return;
        }
        st.sent[word] |= bit;
        st.script_sent += 1;
        let script = &self.world.scripts[shard as usize];
        if matches!(script[index as usize], ScriptEvent::MessageCreate { .. }) {
            st.messages_sent += 1;
        }
        if st.script_sent == script.len() as u64 {
            let done = self.completed_shards.fetch_add(1, Ordering::AcqRel) + 1;
            if done == u64::from(self.world.shards) {
                self.all_sent.send_replace(true);
            }
        }
    }

    /// The client of `session` reported `seq` in a heartbeat.
    pub(crate) fn heartbeat(&self, shard: u32, session: &str, seq: u64) {
        let mut st = lock(&self.shards[shard as usize]);
        if let Some(s) = st.sessions.get_mut(session)
            && seq <= s.log.len() as u64
        {
            s.acked = seq;
        }
    }

    /// `session` can no longer be resumed.
    pub(crate) fn discard(&self, shard: u32, session: &str) {
        if let Some(s) = lock(&self.shards[shard as usize]).sessions.get_mut(session) {
            s.discarded = true;
        }
    }

    /// Connection `conn`, streaming `session`, ended or gave the session up (INVALID_SESSION):
    /// if it owned `shard`, the shard is now disconnected; if it held `session`, the session's
    /// resume window starts.
    pub(crate) fn disconnected(&self, shard: u32, conn: u64, session: &str) {
        let mut st = lock(&self.shards[shard as usize]);
        if st.active_conn == conn {
            st.active_conn = 0;
            st.faults = None;
        }
        if let Some(s) = st.sessions.get_mut(session) {
            s.release(conn, Instant::now());
        }
    }

    /// Hand `fault` to the connection holding `shard` and wait until it was applied.
    pub(crate) async fn inject(&self, shard: u32, fault: Fault) -> Result<(), SimError> {
        fault.validate()?;
        let Some(st) = self.shards.get(shard as usize) else {
            return Err(SimError::UnknownShard { shard });
        };
        let faults = lock(st)
            .faults
            .clone()
            .ok_or(SimError::NoConnection { shard })?;
        let (done, applied) = oneshot::channel();
        faults
            .send(FaultReq { fault, done })
            .map_err(|_| SimError::NoConnection { shard })?;
        applied.await.map_err(|_| SimError::NoConnection { shard })
    }

    /// Snapshot for [`Simulator::status`](super::Simulator::status).
    pub(crate) fn status(&self) -> SimStatus {
        let mut messages_sent = 0;
        let shards: Vec<ShardStatus> = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let st = lock(m);
                messages_sent += st.messages_sent;
                let last_seq = st
                    .current_session
                    .as_ref()
                    .and_then(|s| st.sessions.get(s))
                    .map_or(0, |s| s.log.len() as u64);
                ShardStatus {
                    shard: i as u32,
                    session: st.current_session.as_deref().map(str::to_owned),
                    last_seq,
                    script_sent: st.script_sent,
                    script_total: self.world.scripts[i].len() as u64,
                    identifies: st.identifies,
                    resumes: st.resumes,
                    resumes_refused: st.resumes_refused,
                    connections: st.connections,
                    connected: st.active_conn != 0,
                }
            })
            .collect();
        let all_sent = shards.iter().all(|s| s.script_sent == s.script_total);
        SimStatus {
            shards,
            messages_sent,
            messages_total: self.world.messages.len() as u64,
            all_sent,
            session_start_remaining: self.session_start_remaining(),
            script_claimed: self.script_claimed(),
        }
    }

    /// Every recorded dispatch, in the order the batches were flushed.
    pub(crate) fn record(&self) -> Vec<SentDispatch> {
        lock(&self.record)
            .iter()
            .map(|r| SentDispatch {
                shard: r.shard,
                session: r.session.to_string(),
                seq: r.seq,
                kind: r.kind,
                guild_id: r.guild_id,
                message_id: r.message_id,
                replay: r.replay,
                redelivery: r.redelivery,
                malformed: r.malformed,
            })
            .collect()
    }
}
