//! An in-tree Discord gateway v10 simulator, for tests, benches and the demo.
//!
//! It plays Discord (DESIGN §10): a deterministic world of guilds with snowflake ids spread
//! over shards by Discord's formula `(guild_id >> 22) % shards`, a per-shard script of
//! dispatches (MESSAGE_CREATE plus roughly one update/delete/member/channel event per ten
//! creates), a websocket gateway speaking JSON over plain `ws://` on loopback, and the REST
//! route `GET /api/v10/gateway/bot`. Real clients (twilight 0.18) accept it unchanged. It
//! records every dispatch it sends so tests can compare what was sent with what was stored.
//! It depends on no other module of this crate: it is the other side of the wire.
//!
//! # Layout
//! - `mod.rs` (this file): public API — [`SimConfig`], [`Simulator`], record types, [`SimError`].
//! - `world.rs`: the deterministic world and per-shard scripts; snowflakes; [`Expected`].
//! - `payload.rs`: JSON rendering of HELLO, READY, GUILD_CREATE, MESSAGE_CREATE, ….
//! - `session.rs`: runtime state — script cursors, session logs (for replay), the record.
//! - `gateway.rs`: the websocket server (HELLO/heartbeat/identify/resume/replay, close codes).
//! - `api.rs`: the axum REST server (Discord routes, status, fault-injection control).
//!
//! # Rules the simulator keeps
//! - A shard's script cursor only moves forward: a script event is sent at most once as a
//!   dispatch that is neither a replay nor a redelivery, whatever clients do; a new session
//!   continues the script where the last one stopped.
//! - One live connection per shard: a newer IDENTIFY/RESUME for a shard closes the older
//!   connection with close code 4000. That code is reconnectable, so a client that is still
//!   alive resumes and takes the shard back: run one client per shard.
//! - Sessions expire like Discord's: a session stays resumable while a connection holds it and
//!   for [`SimConfig::resume_window`] after its last connection ended, as long as at most
//!   [`SimConfig::resume_window_events`] dispatches would have to be replayed. Otherwise RESUME
//!   gets op 9 `d: false` (counted in [`ShardStatus::resumes_refused`]) and the session is
//!   discarded. INVALID_SESSION `false`, close codes 4004, 4007, 4009 and 4010–4014 (sent by a
//!   [`Fault`]) and a client closing with 1000/1001 (Discord docs: that invalidates the session)
//!   discard it as well.
//! - **Simulator choice — redelivery on a new session.** Discord loses, for a client that must
//!   identify again, the dispatches of the old session it had not processed. That is realistic
//!   but makes "no message lost" untestable, so by default
//!   ([`SimConfig::resend_unacknowledged_on_identify`]) an IDENTIFY whose shard's latest session
//!   can no longer be resumed first re-sends, as new dispatches of the new session flagged
//!   [`SentDispatch::redelivery`], every script event of that lost session with a sequence above
//!   the last one the client reported (heartbeat `d`, or the `seq` of its refused RESUME), then
//!   continues the script. Clients must be idempotent by Discord id (a message can then arrive
//!   twice, under different sessions). An IDENTIFY while the previous session is still
//!   resumable is the client's choice: nothing is re-sent.
//! - Sequence numbers are per session, start at 1 (READY) and have no gaps.
//! - Intents are not enforced: every shard gets every event of its guilds.
//! - Session start limit: each accepted IDENTIFY uses one of
//!   [`SimConfig::session_start_remaining`] (reported by `/gateway/bot`); once none is left,
//!   IDENTIFY is closed with 4004 "Authentication failed." (Discord resets the token of a bot
//!   that exceeds the limit, so its next IDENTIFY fails authentication; twilight treats 4004 as
//!   fatal). RESUME does not use session starts.
//!
//! # Fault injection
//! [`Simulator::inject`] (or `POST {api_url}/sim/shards/{shard}/faults` with a [`Fault`] as
//! JSON) applies a [`Fault`] to the connection holding a shard: drop the TCP connection, go
//! silent (a zombie connection), op 7 RECONNECT, op 9 INVALID_SESSION, a close code, or a
//! broken JSON frame. A twilight client recovers from each (except fatal close codes, after
//! which a new client must identify) and the script keeps flowing.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shardlite::simulator::SimError> {
//! use shardlite::simulator::{SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig { guilds: 50, messages: 1_000, ..SimConfig::default() }).await?;
//! // point a client at sim.gateway_url() / sim.api_url(), then:
//! sim.wait_all_sent(std::time::Duration::from_secs(10)).await?;
//! assert_eq!(sim.status().messages_sent, 1_000);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

mod api;
mod gateway;
mod payload;
mod session;
mod world;

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::session::Runtime;
use self::world::World;

/// Simulator settings. Every field has a default (see [`SimConfig::default`]); the same
/// config (same `seed`) always produces the same world, scripts and [`Expected`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// Seed of the world and scripts. Default 42.
    pub seed: u64,
    /// Number of guilds. Default 2 000.
    pub guilds: u32,
    /// Discord shard total the simulator expects in IDENTIFY (`shard: [id, total]`) and
    /// returns from `/gateway/bot`. Must be ≥ 1. Default 4.
    pub shards: u32,
    /// Total MESSAGE_CREATE dispatches over all shards (≤ `u32::MAX`; needs `guilds > 0` when
    /// non-zero). Default 200 000.
    pub messages: u64,
    /// Script dispatches per second over the whole simulator (all shards share one token
    /// bucket); `None` = as fast as the sockets take them. READY, GUILD_CREATE, replays and
    /// RESUMED are not paced. Must be ≥ 1 when set. Default `None`.
    pub rate: Option<u32>,
    /// The bot token clients must present, without the `Bot ` prefix (which clients may
    /// send). Default `"simulated-token"`.
    pub token: String,
    /// `heartbeat_interval` sent in HELLO, in ms. Default 41 250 (Discord's usual value).
    pub heartbeat_interval_ms: u64,
    /// `session_start_limit.max_concurrency` returned by `/gateway/bot`. Default 16.
    pub max_concurrency: u16,
    /// Insert three fault frames into each shard's script after ~10 % of it: broken JSON (no
    /// sequence), a dispatch of unknown type `SHARDLITE_UNKNOWN_EVENT`, and a GUILD_MEMBER_ADD
    /// without `guild_id`. They never change [`Expected`]. Default `false`.
    pub inject_malformed: bool,
    /// Gateway listen address. Default `127.0.0.1:0` (an ephemeral port).
    pub gateway_listen: SocketAddr,
    /// REST listen address. Default `127.0.0.1:0`.
    pub api_listen: SocketAddr,
    /// How long a session stays resumable after its last connection ended; `None` = forever.
    /// Discord does not publish its window (sessions are resumable for "a while", observed in
    /// the order of minutes); the default is 60 s, long enough for any restart a test makes and
    /// short enough to expire in a test that waits for it. A session whose connection is
    /// still open (e.g. a zombie) is always resumable. Default `Some(60 s)`.
    pub resume_window: Option<Duration>,
    /// Refuse a RESUME that would replay more than this many dispatches (Discord buffers a
    /// limited number of events per session); `None` = no limit. Default `None`.
    pub resume_window_events: Option<u64>,
    /// When a shard IDENTIFYs while its latest session can no longer be resumed, re-send that
    /// session's script events after the last sequence the client reported (see the module
    /// docs, "Simulator choice"). `false` = Discord's behaviour: those events are lost to the
    /// client (and count as sent). Default `true`.
    pub resend_unacknowledged_on_identify: bool,
    /// `session_start_limit.remaining` at start; each accepted IDENTIFY uses one, and an
    /// IDENTIFY with none left is closed with 4004. Default 1 000 (Discord's daily limit).
    pub session_start_remaining: u32,
    /// The snowflake "process id" (bits 12–16, 0–31) of every id the world generates. Two worlds
    /// with different values never share an id, whatever their seeds, so a test can feed one
    /// node two worlds (e.g. before and after a reshard) and check the union. Default 0.
    pub id_process: u8,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 42,
            guilds: 2_000,
            shards: 4,
            messages: 200_000,
            rate: None,
            token: "simulated-token".to_owned(),
            heartbeat_interval_ms: 41_250,
            max_concurrency: 16,
            inject_malformed: false,
            gateway_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            resume_window: Some(Duration::from_secs(60)),
            resume_window_events: None,
            resend_unacknowledged_on_identify: true,
            session_start_remaining: 1_000,
            id_process: 0,
        }
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("seed", &self.seed)
            .field("guilds", &self.guilds)
            .field("shards", &self.shards)
            .field("messages", &self.messages)
            .field("rate", &self.rate)
            .field("token", &"<redacted>")
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("max_concurrency", &self.max_concurrency)
            .field("inject_malformed", &self.inject_malformed)
            .field("gateway_listen", &self.gateway_listen)
            .field("api_listen", &self.api_listen)
            .field("resume_window", &self.resume_window)
            .field("resume_window_events", &self.resume_window_events)
            .field(
                "resend_unacknowledged_on_identify",
                &self.resend_unacknowledged_on_identify,
            )
            .field("session_start_remaining", &self.session_start_remaining)
            .field("id_process", &self.id_process)
            .finish()
    }
}

impl SimConfig {
    /// Check the rules documented on the fields.
    fn validate(&self) -> Result<(), SimError> {
        let invalid = |reason: &str| {
            Err(SimError::InvalidConfig {
                reason: reason.to_owned(),
            })
        };
        if self.shards == 0 {
            return invalid("shards must be at least 1");
        }
        if self.messages > u64::from(u32::MAX) {
            return invalid("messages must be at most 4294967295");
        }
        if self.messages > 0 && self.guilds == 0 {
            return invalid("messages need at least one guild");
        }
        if self.rate == Some(0) {
            return invalid("rate must be at least 1 dispatch per second");
        }
        if self.id_process > 31 {
            return invalid("id_process must be at most 31 (5 bits of a snowflake)");
        }
        Ok(())
    }
}

/// Errors of the simulator's public operations.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The config breaks a rule documented on [`SimConfig`].
    #[error("invalid simulator config: {reason}")]
    InvalidConfig {
        /// The rule that was broken.
        reason: String,
    },
    /// Binding a listener failed (address in use, permission…).
    #[error("failed to bind {addr}")]
    Bind {
        /// The address from the config.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading a bound listener's address failed.
    #[error("failed to read the bound address of the {listener} listener")]
    LocalAddr {
        /// `"gateway"` or `"api"`.
        listener: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// [`Simulator::inject`] named a shard outside `0..SimConfig::shards`.
    #[error("unknown shard {shard}")]
    UnknownShard {
        /// The shard id given.
        shard: u32,
    },
    /// [`Simulator::inject`]: no connection holds the shard (none identified or resumed it, or
    /// it ended before the fault could be applied).
    #[error("no connection holds shard {shard}")]
    NoConnection {
        /// The shard id given.
        shard: u32,
    },
    /// [`Simulator::inject`]: the fault cannot be sent (e.g. a reserved close code).
    #[error("invalid fault: {reason}")]
    InvalidFault {
        /// What is wrong with it.
        reason: String,
    },
    /// [`Simulator::wait_all_sent`] ran out of time.
    #[error(
        "timed out after {timeout:?} waiting for every script to be sent ({sent} of {total} events sent)"
    )]
    WaitAllSent {
        /// The timeout given.
        timeout: Duration,
        /// Script events sent at least once so far, over all shards.
        sent: u64,
        /// Script events in all shards' scripts.
        total: u64,
    },
}

/// Type of a recorded dispatch (the gateway event name `t`, Discord docs "Gateway Events").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DispatchKind {
    /// READY.
    Ready,
    /// RESUMED.
    Resumed,
    /// GUILD_CREATE.
    GuildCreate,
    /// MESSAGE_CREATE.
    MessageCreate,
    /// MESSAGE_UPDATE.
    MessageUpdate,
    /// MESSAGE_DELETE.
    MessageDelete,
    /// GUILD_MEMBER_ADD.
    GuildMemberAdd,
    /// GUILD_MEMBER_REMOVE.
    GuildMemberRemove,
    /// CHANNEL_CREATE.
    ChannelCreate,
    /// An event type clients do not know (injected fault `SHARDLITE_UNKNOWN_EVENT`).
    Unknown,
}

/// One dispatch (op 0) the simulator wrote to a socket. Recorded once the batch holding it
/// was flushed; a dispatch on a connection that died before the flush is not recorded (it
/// stays in the session log and a RESUME replays it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentDispatch {
    /// Shard id.
    pub shard: u32,
    /// The session's `session_id`.
    pub session: String,
    /// Sequence number `s` within the session (from 1).
    pub seq: u64,
    /// Event type.
    pub kind: DispatchKind,
    /// Guild the event belongs to (`None` for READY, RESUMED, the unknown-type fault and the
    /// GUILD_MEMBER_ADD-without-guild fault).
    pub guild_id: Option<u64>,
    /// Message id for MESSAGE_CREATE/UPDATE/DELETE.
    pub message_id: Option<u64>,
    /// Re-sent from the session log because of a RESUME.
    pub replay: bool,
    /// A script event of a lost session, re-sent in a new session after IDENTIFY (see
    /// [`SimConfig::resend_unacknowledged_on_identify`]); also set on replays of such entries.
    #[serde(default)]
    pub redelivery: bool,
    /// An injected fault frame (see [`SimConfig::inject_malformed`]). The broken-JSON frame
    /// takes no sequence number and is not recorded.
    pub malformed: bool,
}

/// Snapshot of the simulator's progress (also `GET {api_url}/sim/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStatus {
    /// One entry per shard, by shard id.
    pub shards: Vec<ShardStatus>,
    /// Distinct MESSAGE_CREATE script events sent at least once.
    pub messages_sent: u64,
    /// MESSAGE_CREATE events in all scripts (= `SimConfig::messages`).
    pub messages_total: u64,
    /// Every shard's whole script was sent at least once.
    pub all_sent: bool,
    /// Session starts (IDENTIFYs) left, as `/gateway/bot` reports them.
    #[serde(default)]
    pub session_start_remaining: u32,
    /// Script events claimed for sending over all shards (≥ the sum of `script_sent`, by at
    /// most the batches being written); what [`Simulator::hold_script_at`] counts.
    #[serde(default)]
    pub script_claimed: u64,
}

/// Progress of one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// Shard id.
    pub shard: u32,
    /// Latest session identified or resumed on this shard.
    pub session: Option<String>,
    /// Highest sequence number assigned in that session.
    pub last_seq: u64,
    /// Script events sent (flushed) at least once.
    pub script_sent: u64,
    /// Script events in this shard's script (including injected faults).
    pub script_total: u64,
    /// Accepted IDENTIFYs.
    pub identifies: u32,
    /// Accepted RESUMEs.
    pub resumes: u32,
    /// RESUMEs of this shard's sessions answered with op 9 `d: false` (discarded, expired,
    /// sequence ahead, or too many dispatches to replay).
    #[serde(default)]
    pub resumes_refused: u32,
    /// Websocket connections that presented an IDENTIFY or a RESUME for this shard (each
    /// counted once, whether accepted or not; a connection that never did is counted nowhere).
    #[serde(default)]
    pub connections: u32,
    /// A connection holds this shard now.
    pub connected: bool,
}

/// A fault to inject into the connection holding a shard ([`Simulator::inject`], or
/// `POST {api_url}/sim/shards/{shard}/faults` with this as JSON, e.g.
/// `{"kind":"close","code":4009}`). What twilight 0.18 does on each is noted per variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Close the TCP connection abruptly (RST, no close frame). The client reconnects and
    /// resumes.
    DropConnection,
    /// Go silent for `millis` ms: no heartbeat ACK and no dispatch (a "zombie" connection;
    /// twilight only detects one when *nothing* arrives between two heartbeats, so the
    /// dispatches stop too). The client detects it after one or two heartbeat intervals, drops
    /// the connection and resumes; use a small `heartbeat_interval_ms` in tests. If the stall
    /// ends first, the connection carries on.
    StopAcks {
        /// Duration of the silence, in ms.
        millis: u64,
    },
    /// Send op 7 RECONNECT. The client closes with 4000 and resumes.
    Reconnect,
    /// Send op 9 INVALID_SESSION with `d = resumable` and stop streaming on this connection
    /// (which may IDENTIFY or RESUME again). `false` discards the session: the client closes
    /// with 1000 and identifies again. `true`: it closes with 4000 and resumes.
    InvalidSession {
        /// The `d` of op 9.
        resumable: bool,
    },
    /// Close the websocket with this close code. 4004, 4007, 4009, 4010–4014 also discard the
    /// session (Discord: start a new session). Twilight resumes after reconnectable codes (for
    /// 4007/4009 the RESUME is refused and it identifies again) and ends its stream after the
    /// fatal ones (4004, 4010–4014). Must be a valid, non-reserved websocket close code.
    Close {
        /// The websocket close code.
        code: u16,
    },
    /// Send a text frame of broken JSON (no sequence number). Twilight yields a
    /// deserialization error and carries on.
    Malformed,
}

impl Fault {
    fn validate(&self) -> Result<(), SimError> {
        if let Fault::Close { code } = *self {
            let valid = tokio_websockets::CloseCode::try_from(code).is_ok_and(|c| !c.is_reserved());
            if !valid {
                return Err(SimError::InvalidFault {
                    reason: format!("{code} is not a close code that can be sent"),
                });
            }
        }
        Ok(())
    }
}

/// The world after the whole script, for comparing with what a client stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// Every guild by id.
    pub guilds: BTreeMap<u64, ExpectedGuild>,
    /// Every MESSAGE_CREATE id of all scripts, each once, ascending.
    pub message_ids: Vec<u64>,
}

/// One guild after the whole script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedGuild {
    /// `(guild_id >> 22) % shards`.
    pub shard: u32,
    /// Text channels, including CHANNEL_CREATEs.
    pub channels: u32,
    /// Roles, including @everyone (id = guild id).
    pub roles: u32,
    /// Members after all GUILD_MEMBER_ADD/REMOVE (faults excluded).
    pub members: u32,
    /// MESSAGE_CREATEs in this guild.
    pub messages_created: u32,
    /// MESSAGE_DELETEs in this guild.
    pub messages_deleted: u32,
}

/// Stops the servers when the last [`Simulator`] handle is dropped.
struct Guard {
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// A running simulator. Cheap to clone; dropping the last clone, or [`Simulator::shutdown`],
/// stops both servers (open connections get close code 1001).
#[derive(Clone)]
pub struct Simulator {
    rt: Arc<Runtime>,
    api_url: String,
    guard: Arc<Guard>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("gateway_url", &self.rt.gateway_url)
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Generate the world, bind both listeners, spawn the servers and return once they
    /// accept connections. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`SimError::InvalidConfig`] for a config breaking its documented rules;
    /// [`SimError::Bind`] / [`SimError::LocalAddr`] when a listener cannot be set up.
    pub async fn start(config: SimConfig) -> Result<Simulator, SimError> {
        config.validate()?;
        let gateway_listener = bind(config.gateway_listen).await?;
        let api_listener = bind(config.api_listen).await?;
        let gateway_addr = local_addr(&gateway_listener, "gateway")?;
        let api_addr = local_addr(&api_listener, "api")?;
        let gateway_url = format!("ws://{}", gateway::url_host(gateway_addr));
        let api_url = format!("http://{}/api", gateway::url_host(api_addr));

        // World generation is CPU work (≈ 100 ms per 200 000 messages in release builds).
        let world_config = config.clone();
        let world = match tokio::task::spawn_blocking(move || World::generate(&world_config)).await
        {
            Ok(world) => Arc::new(world),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        };
        let rt = Arc::new(Runtime::new(config, world, gateway_url));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(gateway::serve(
            rt.clone(),
            gateway_listener,
            shutdown_rx.clone(),
        ))];
        if let (Some(pacer), Some(rate)) = (rt.pacer.clone(), rt.config.rate) {
            tasks.push(tokio::spawn(gateway::pace(
                pacer,
                rate,
                shutdown_rx.clone(),
            )));
        }
        let mut api_shutdown = shutdown_rx;
        let api = axum::serve(api_listener, api::router(rt.clone()))
            .with_graceful_shutdown(async move { gateway::stopped(&mut api_shutdown).await });
        tasks.push(tokio::spawn(async move {
            if let Err(error) = api.await {
                warn!(%error, "simulator api server failed");
            }
        }));
        info!(gateway = %rt.gateway_url, api = %api_url, guilds = rt.config.guilds,
              shards = rt.config.shards, messages = rt.config.messages, "simulator listening");
        Ok(Simulator {
            rt,
            api_url,
            guard: Arc::new(Guard {
                shutdown,
                tasks: Mutex::new(tasks),
            }),
        })
    }

    /// Gateway base URL, `ws://127.0.0.1:PORT` without a trailing slash; clients append
    /// `/?v=10&encoding=json` (any request path is accepted). Also READY's
    /// `resume_gateway_url`.
    #[must_use]
    pub fn gateway_url(&self) -> String {
        self.rt.gateway_url.clone()
    }

    /// REST base URL without a version, `http://127.0.0.1:PORT/api`, like Discord's
    /// `https://discord.com/api`.
    #[must_use]
    pub fn api_url(&self) -> String {
        self.api_url.clone()
    }

    /// Every dispatch sent so far, in send order, replays and redeliveries included (flagged
    /// `replay` / `redelivery`).
    #[must_use]
    pub fn record(&self) -> Vec<SentDispatch> {
        self.rt.record()
    }

    /// Progress snapshot.
    #[must_use]
    pub fn status(&self) -> SimStatus {
        self.rt.status()
    }

    /// The world after the whole script (independent of what was sent so far).
    #[must_use]
    pub fn expected(&self) -> Expected {
        self.rt.world.expected.clone()
    }

    /// Wait until every shard's whole script was sent (flushed to a socket) at least once.
    ///
    /// # Errors
    /// [`SimError::WaitAllSent`] when `timeout` passes first.
    pub async fn wait_all_sent(&self, timeout: Duration) -> Result<(), SimError> {
        let mut all_sent = self.rt.watch_all_sent();
        // Err: the sender lives in `rt`, which we hold, so it cannot be dropped.
        if let Ok(Ok(_)) = tokio::time::timeout(timeout, all_sent.wait_for(|done| *done)).await {
            return Ok(());
        }
        let status = self.status();
        Err(SimError::WaitAllSent {
            timeout,
            sent: status.shards.iter().map(|s| s.script_sent).sum(),
            total: status.shards.iter().map(|s| s.script_total).sum(),
        })
    }

    /// Hold the script stream once `total` script events (over all shards, counted from the
    /// start) were claimed for sending; `None` lifts the hold. READY, GUILD_CREATE, replays,
    /// redeliveries and heartbeats are not held. A test uses it to make a precondition true
    /// on any machine — "the stream is not over before this step" — instead of guessing how
    /// fast ingest runs. Lowering the hold below what was already claimed holds at once.
    pub fn hold_script_at(&self, total: Option<u64>) {
        self.rt.set_script_limit(total.unwrap_or(u64::MAX));
    }

    /// Apply `fault` to the connection holding `shard` and return once it was applied (for
    /// [`Fault::Close`], once the close handshake finished or timed out; for
    /// [`Fault::DropConnection`], once the socket is gone).
    ///
    /// # Errors
    /// [`SimError::UnknownShard`]; [`SimError::NoConnection`] when no connection holds the
    /// shard (or it ended first); [`SimError::InvalidFault`] for an unsendable close code.
    pub async fn inject(&self, shard: u32, fault: Fault) -> Result<(), SimError> {
        self.rt.inject(shard, fault).await
    }

    /// Stop both servers (open connections get close code 1001) and wait for their tasks.
    /// Other clones of this handle see a stopped simulator.
    pub async fn shutdown(self) {
        self.guard.shutdown.send_replace(true);
        let tasks = std::mem::take(
            &mut *self
                .guard
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in tasks {
            if let Err(error) = task.await {
                warn!(%error, "simulator task failed");
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, SimError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, name: &'static str) -> Result<SocketAddr, SimError> {
    listener.local_addr().map_err(|source| SimError::LocalAddr {
        listener: name,
        source,
    })
}
