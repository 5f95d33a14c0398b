//! The websocket side: a gateway v10 server speaking JSON text frames over plain `ws://`.
//!
//! Protocol (Discord docs, "Gateway"): on connect the server sends HELLO (op 10); op 1
//! HEARTBEAT → op 11 ACK; op 2 IDENTIFY starts a session (READY, GUILD_CREATE per guild, then
//! the shard's script); op 6 RESUME replays the session's dispatches after the given sequence,
//! then RESUMED, then the script continues; an unknown, discarded or expired session gets
//! op 9 `d: false` (rules in `session.rs`). Fatal problems close the socket with Discord's close
//! codes (4004 authentication failed or no session start left, 4010 invalid shard, 4011
//! sharding required, …). A client closing with 1000/1001 discards its session.
//!
//! One task per connection. It never blocks on a single thing: a biased `select!` waits on
//! shutdown, on being superseded (another connection took the shard), on injected faults, on
//! the next client frame, on the end of a stall, and on script pacing; frames are written with
//! `feed` and one `flush` per batch of [`BATCH`] (notes §2: per-frame flushes cost most of the
//! throughput).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_websockets::{CloseCode, Message, ServerBuilder, WebSocketStream};
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::Fault;
use super::payload::{self, RenderCtx};
use super::session::{Claim, FaultReq, FaultTx, Opened, Outgoing, Resumed, Runtime};

/// Frames written between two flushes.
const BATCH: usize = 64;
/// How long a closing connection waits for the client's close reply.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for connections to close before aborting them (a connection
/// waiting for a silent client's close reply is aborted after this).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Discord gateway close codes used here (Discord docs, "Opcodes and Status Codes").
mod close {
    pub const UNKNOWN_ERROR: u16 = 4000;
    pub const UNKNOWN_OPCODE: u16 = 4001;
    pub const DECODE_ERROR: u16 = 4002;
    pub const NOT_AUTHENTICATED: u16 = 4003;
    pub const AUTHENTICATION_FAILED: u16 = 4004;
    pub const ALREADY_AUTHENTICATED: u16 = 4005;
    pub const INVALID_SHARD: u16 = 4010;
    pub const SHARDING_REQUIRED: u16 = 4011;
    /// Websocket "normal closure" (RFC 6455); from a client it invalidates the session.
    pub const NORMAL: u16 = 1000;
    /// Websocket "going away" (RFC 6455), sent when the simulator shuts down; from a client it
    /// invalidates the session.
    pub const GOING_AWAY: u16 = 1001;

    /// Discord's reason text for a close code (used for injected closes).
    pub fn reason(code: u16) -> &'static str {
        match code {
            4000 => "Unknown error.",
            4001 => "Unknown opcode.",
            4002 => "Error while decoding payload.",
            4003 => "Not authenticated.",
            4004 => "Authentication failed.",
            4005 => "Already authenticated.",
            4007 => "Invalid seq.",
            4008 => "Rate limited.",
            4009 => "Session timed out.",
            4010 => "Invalid shard.",
            4011 => "Sharding required.",
            4012 => "Invalid API version.",
            4013 => "Invalid intent(s).",
            4014 => "Disallowed intent(s).",
            _ => "Closed by an injected fault.",
        }
    }

    /// Close codes after which Discord wants a new session (the old one is discarded).
    pub fn discards_session(code: u16) -> bool {
        matches!(code, 4004 | 4007 | 4009..=4014)
    }
}

/// Accept connections until `shutdown` turns true, then give open connections
/// [`SHUTDOWN_GRACE`] to close and abort the rest.
pub(crate) async fn serve(
    rt: Arc<Runtime>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let for_conns = shutdown.clone();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let conn = rt.next_conn_id();
                    let span = info_span!("gateway_conn", conn, %peer);
                    let stop = for_conns.clone();
                    conns.spawn(connection(rt.clone(), tcp, conn, stop).instrument(span));
                }
                Err(error) => {
                    warn!(%error, "gateway accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(
            open = conns.len(),
            "aborting gateway connections after shutdown grace"
        );
        conns.abort_all();
    }
}

/// Fill the pacing token bucket with `rate` tokens per second until shutdown. Tokens are
/// added on an interval tick from the elapsed time (no drift); at most about two ticks' worth
/// are kept, so a shard that was idle cannot burst far above `rate`.
pub(crate) async fn pace(pacer: Arc<Semaphore>, rate: u32, mut shutdown: watch::Receiver<bool>) {
    let rate = u64::from(rate.max(1));
    let period = Duration::from_nanos((1_000_000_000 / rate).max(1_000_000));
    let per_tick = (rate * period.as_nanos() as u64).div_ceil(1_000_000_000);
    let cap = (2 * per_tick).max(BATCH as u64) as usize;
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = tokio::time::Instant::now();
    let mut added = 0u64;
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => return,
            now = ticks.tick() => {
                let due = (u128::from(rate) * now.duration_since(start).as_nanos() / 1_000_000_000) as u64;
                let fresh = due.saturating_sub(added) as usize;
                added = due;
                let room = cap.saturating_sub(pacer.available_permits());
                if fresh.min(room) > 0 {
                    pacer.add_permits(fresh.min(room));
                }
            }
        }
    }
}

/// Why a connection task ended.
#[derive(Debug)]
enum End {
    /// The client closed or dropped the socket.
    ClientGone,
    /// We closed it (close code sent).
    Closed(u16),
    /// We dropped the TCP connection (injected fault).
    Dropped,
    /// Writing or reading failed.
    Io(tokio_websockets::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientGone => f.write_str("client went away"),
            End::Closed(code) => write!(f, "closed by the simulator with code {code}"),
            End::Dropped => f.write_str("dropped by the simulator (injected fault)"),
            End::Io(error) => write!(f, "socket error: {error}"),
        }
    }
}

impl From<tokio_websockets::Error> for End {
    fn from(e: tokio_websockets::Error) -> Self {
        End::Io(e)
    }
}

/// The shard a connection streams, once IDENTIFY or RESUME succeeded.
struct Stream {
    shard: u32,
    session: Arc<str>,
    owner: watch::Receiver<u64>,
    script_done: bool,
}

struct Conn {
    rt: Arc<Runtime>,
    ws: WebSocketStream<TcpStream>,
    id: u64,
    stream: Option<Stream>,
    /// Given to the runtime when this connection takes a shard, so faults reach it.
    faults_tx: FaultTx,
    faults_rx: mpsc::UnboundedReceiver<FaultReq>,
    /// Silent (no ACK, no dispatch) until then: [`Fault::StopAcks`].
    stalled_until: Option<Instant>,
    /// Counted in a shard's `connections` already.
    counted: bool,
    /// Reported once the connection task has finished (faults that end the connection).
    ack_on_end: Option<oneshot::Sender<()>>,
    /// The script hold ([`Runtime::set_script_limit`]): a connection at the hold waits here.
    script_limit: watch::Receiver<u64>,
}

/// What woke the connection loop.
enum Wake {
    Shutdown,
    Superseded,
    Frame(Option<Result<Message, tokio_websockets::Error>>),
    Fault(Option<FaultReq>),
    StallOver,
    Send,
    Permit,
    /// The script hold moved.
    HoldMoved,
}

async fn connection(rt: Arc<Runtime>, tcp: TcpStream, id: u64, shutdown: watch::Receiver<bool>) {
    if let Err(error) = tcp.set_nodelay(true) {
        debug!(%error, "set_nodelay failed");
    }
    let ws = match ServerBuilder::new().accept(tcp).await {
        Ok((_request, ws)) => ws,
        Err(error) => {
            debug!(%error, "websocket handshake failed");
            return;
        }
    };
    let (faults_tx, faults_rx) = mpsc::unbounded_channel();
    let script_limit = rt.watch_script_limit();
    let mut conn = Conn {
        rt,
        ws,
        id,
        stream: None,
        faults_tx,
        faults_rx,
        stalled_until: None,
        counted: false,
        ack_on_end: None,
        script_limit,
    };
    let end = conn.run(shutdown).await;
    if let Some(stream) = &conn.stream {
        conn.rt.disconnected(stream.shard, id, &stream.session);
        debug!(shard = stream.shard, session = %stream.session, %end, "gateway connection ended");
    } else {
        debug!(%end, "gateway connection ended without a session");
    }
    if matches!(end, End::Dropped) {
        // SO_LINGER 0: closing sends RST instead of FIN, the most abrupt end there is. It
        // cannot block (the deprecation is about non-zero linger times).
        #[allow(deprecated)]
        if let Err(error) = conn.ws.get_ref().set_linger(Some(Duration::ZERO)) {
            debug!(%error, "set_linger failed");
        }
    }
    let ack = conn.ack_on_end.take();
    drop(conn);
    if let Some(ack) = ack {
        let _ = ack.send(());
    }
}

/// Wait until `shutdown` turns true (or its sender is gone, which also means shutdown).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // Returning the `Ref` would hold a lock guard across awaits; only the event matters.
    let _stop_or_gone = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Wait until the shard's owner is no longer `id` (never returns when `owner` is `None`).
async fn superseded(owner: Option<&mut watch::Receiver<u64>>, id: u64) {
    let Some(owner) = owner else {
        return std::future::pending().await;
    };
    loop {
        if *owner.borrow_and_update() != id {
            return;
        }
        if owner.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Wait for one pacing token and keep it (the caller accounts for it).
async fn one_token(pacer: Option<&Semaphore>) {
    match pacer {
        Some(pacer) => match pacer.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_closed) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl Conn {
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> End {
        let hello = payload::hello(self.rt.config.heartbeat_interval_ms);
        if let Err(e) = self.ws.send(Message::text(hello)).await {
            return End::Io(e);
        }
        loop {
            if self.stalled_until.is_some_and(|t| t <= Instant::now()) {
                self.stalled_until = None;
            }
            let stalled = self.stalled_until.is_some();
            // Mark the hold as seen before reading it, so a move after the check still wakes us.
            self.script_limit.borrow_and_update();
            let script_left = !stalled && self.stream.as_ref().is_some_and(|s| !s.script_done);
            let held = script_left && !self.rt.script_room();
            let streaming = script_left && !held;
            let pacer = self.rt.pacer.clone();
            // Tokens already granted for this turn (unpaced: always a full batch).
            let mut granted = if streaming {
                take_tokens(pacer.as_deref(), BATCH)
            } else {
                0
            };
            let wake = {
                let Conn {
                    ws,
                    stream,
                    id,
                    faults_rx,
                    stalled_until,
                    script_limit,
                    ..
                } = self;
                let stall_end = stalled_until.unwrap_or_else(Instant::now);
                tokio::select! {
                    biased;
                    () = stopped(&mut shutdown) => Wake::Shutdown,
                    () = superseded(stream.as_mut().map(|s| &mut s.owner), *id) => Wake::Superseded,
                    req = faults_rx.recv() => Wake::Fault(req),
                    frame = ws.next() => Wake::Frame(frame),
                    () = tokio::time::sleep_until(stall_end), if stalled => Wake::StallOver,
                    _ = script_limit.changed(), if held => Wake::HoldMoved,
                    () = std::future::ready(()), if granted > 0 => Wake::Send,
                    () = one_token(pacer.as_deref()), if streaming && granted == 0 && pacer.is_some() => Wake::Permit,
                }
            };
            let result = match wake {
                Wake::Shutdown => Err(self
                    .close_now(close::GOING_AWAY, "simulator shutting down")
                    .await),
                Wake::Superseded => {
                    if let Some(stream) = &self.stream {
                        info!(shard = stream.shard, session = %stream.session, "connection superseded");
                    }
                    Err(self
                        .close(close::UNKNOWN_ERROR, "Superseded by a newer connection.")
                        .await)
                }
                Wake::Frame(frame) => self.on_frame(frame).await,
                Wake::Fault(Some(req)) => self.apply_fault(req).await,
                // Unreachable: this connection holds a sender.
                Wake::Fault(None) | Wake::StallOver | Wake::Send | Wake::HoldMoved => Ok(()),
                Wake::Permit => {
                    granted = 1 + take_tokens(pacer.as_deref(), BATCH - 1);
                    Ok(())
                }
            };
            if let Err(end) = result {
                give_back(pacer.as_deref(), granted);
                return end;
            }
            let still_streaming = self.stalled_until.is_none()
                && self.stream.as_ref().is_some_and(|s| !s.script_done);
            if granted > 0 && still_streaming {
                if let Err(end) = self.send_script(granted).await {
                    return end;
                }
            } else {
                give_back(pacer.as_deref(), granted);
            }
        }
    }

    /// Handle one client frame. `Err` ends the connection.
    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, tokio_websockets::Error>>,
    ) -> Result<(), End> {
        let message = match frame {
            None => return Err(End::ClientGone),
            Some(Err(e)) => return Err(End::Io(e)),
            Some(Ok(message)) => message,
        };
        if let Some((code, _reason)) = message.as_close() {
            // Discord docs: closing with 1000 or 1001 invalidates the session.
            if matches!(u16::from(code), close::NORMAL | close::GOING_AWAY)
                && let Some(stream) = &self.stream
            {
                info!(shard = stream.shard, session = %stream.session, code = u16::from(code),
                      "client closed its session");
                self.rt.discard(stream.shard, &stream.session);
            }
            // tokio-websockets has queued the close reply; only polling again sends it (and then
            // ends the stream). Discord echoes the close frame, and a client that initiated the
            // close (twilight closing with 4000 to keep its session) waits for that echo: without
            // it the client sees a dropped connection and reconnects.
            // A client that vanishes before the echo is gone either way.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.next()).await;
            return Err(End::ClientGone);
        }
        let Some(text) = message.as_text() else {
            return Ok(()); // ping/pong are answered by tokio-websockets; binary is ignored
        };
        let command: Command = match serde_json::from_str(text) {
            Ok(command) => command,
            Err(error) => {
                debug!(%error, "undecodable client payload");
                return Err(self
                    .close(close::DECODE_ERROR, "Error while decoding payload.")
                    .await);
            }
        };
        match command.op {
            1 => {
                if let (Some(stream), Some(seq)) = (&self.stream, command.d.as_u64()) {
                    self.rt.heartbeat(stream.shard, &stream.session, seq);
                }
                if self.stalled_until.is_none() {
                    self.ws.send(Message::text(payload::HEARTBEAT_ACK)).await?;
                }
                Ok(())
            }
            2 => self.identify(command.d).await,
            6 => self.resume(command.d).await,
            // Presence, voice state and request-guild-members are accepted and ignored.
            3 | 4 | 8 if self.stream.is_some() => Ok(()),
            3 | 4 | 8 => Err(self
                .close(close::NOT_AUTHENTICATED, "Not authenticated.")
                .await),
            _ => Err(self.close(close::UNKNOWN_OPCODE, "Unknown opcode.").await),
        }
    }

    async fn identify(&mut self, d: serde_json::Value) -> Result<(), End> {
        if self.stream.is_some() {
            return Err(self
                .close(close::ALREADY_AUTHENTICATED, "Already authenticated.")
                .await);
        }
        let Ok(identify) = serde_json::from_value::<Identify>(d) else {
            return Err(self
                .close(close::DECODE_ERROR, "Error while decoding payload.")
                .await);
        };
        if !self.token_ok(&identify.token) {
            return Err(self
                .close(close::AUTHENTICATION_FAILED, "Authentication failed.")
                .await);
        }
        let [shard, total] = identify.shard.unwrap_or([0, 1]);
        let expected = u64::from(self.rt.config.shards);
        if total < expected {
            return Err(self
                .close(close::SHARDING_REQUIRED, "Sharding required.")
                .await);
        }
        if total != expected || shard >= total {
            return Err(self.close(close::INVALID_SHARD, "Invalid shard.").await);
        }
        let shard = shard as u32;
        self.count(shard);
        if !self.rt.take_session_start() {
            warn!(shard, "identify refused: no session start left");
            return Err(self
                .close(close::AUTHENTICATION_FAILED, "Authentication failed.")
                .await);
        }
        let owner = self.rt.watch_owner(shard);
        let opened = self.rt.identify(shard, self.id, self.faults_tx.clone());
        info!(shard, session = %opened.session, redelivered = opened.redelivered, "identify");
        self.open(shard, owner, opened).await
    }

    /// Count this connection for `shard` (once).
    fn count(&mut self, shard: u32) {
        if !self.counted {
            self.counted = true;
            self.rt.count_connection(shard);
        }
    }

    async fn resume(&mut self, d: serde_json::Value) -> Result<(), End> {
        if self.stream.is_some() {
            return Err(self
                .close(close::ALREADY_AUTHENTICATED, "Already authenticated.")
                .await);
        }
        let Ok(resume) = serde_json::from_value::<Resume>(d) else {
            return Err(self
                .close(close::DECODE_ERROR, "Error while decoding payload.")
                .await);
        };
        if !self.token_ok(&resume.token) {
            return Err(self
                .close(close::AUTHENTICATION_FAILED, "Authentication failed.")
                .await);
        }
        // A session id names its shard; try the shard it names, then all (ids are unique).
        let seq = resume.seq.unwrap_or(0);
        for shard in 0..self.rt.config.shards {
            let owner = self.rt.watch_owner(shard);
            let faults = self.faults_tx.clone();
            match self
                .rt
                .resume(shard, &resume.session_id, seq, self.id, faults)
            {
                Resumed::Unknown => {}
                Resumed::Refused { reason } => {
                    self.count(shard);
                    info!(shard, session = %resume.session_id, seq, reason, "resume refused");
                    self.ws
                        .send(Message::text(payload::INVALID_SESSION))
                        .await?;
                    return Ok(());
                }
                Resumed::Opened(opened) => {
                    self.count(shard);
                    info!(shard, session = %opened.session, seq, replayed = opened.backlog.len() - 1, "resume");
                    return self.open(shard, owner, opened).await;
                }
            }
        }
        info!(session = %resume.session_id, seq, "resume of unknown session");
        self.ws
            .send(Message::text(payload::INVALID_SESSION))
            .await?;
        Ok(())
    }

    fn token_ok(&self, token: &str) -> bool {
        token.strip_prefix("Bot ").unwrap_or(token) == self.rt.config.token
    }

    /// Session opened: remember the shard and write the backlog.
    async fn open(
        &mut self,
        shard: u32,
        owner: watch::Receiver<u64>,
        opened: Opened,
    ) -> Result<(), End> {
        self.stream = Some(Stream {
            shard,
            session: opened.session.clone(),
            owner,
            script_done: opened.script_done,
        });
        for chunk in opened.backlog.chunks(BATCH) {
            self.write(shard, &opened.session, chunk).await?;
        }
        Ok(())
    }

    /// Apply an injected fault (see [`Fault`]). `Err` ends the connection.
    async fn apply_fault(&mut self, req: FaultReq) -> Result<(), End> {
        let FaultReq { fault, done } = req;
        let Some(stream) = &self.stream else {
            // No longer holds a shard (gave it up after INVALID_SESSION): dropping `done`
            // reports "no connection".
            return Ok(());
        };
        let (shard, session) = (stream.shard, stream.session.clone());
        info!(shard, session = %session, ?fault, "injecting fault");
        match fault {
            Fault::DropConnection => {
                self.ack_on_end = Some(done);
                Err(End::Dropped)
            }
            Fault::StopAcks { millis } => {
                self.stalled_until = Some(Instant::now() + Duration::from_millis(millis));
                let _ = done.send(());
                Ok(())
            }
            Fault::Reconnect => {
                self.ws.send(Message::text(payload::RECONNECT)).await?;
                let _ = done.send(());
                Ok(())
            }
            Fault::InvalidSession { resumable } => {
                let frame = if resumable {
                    payload::INVALID_SESSION_RESUMABLE
                } else {
                    payload::INVALID_SESSION
                };
                if !resumable {
                    self.rt.discard(shard, &session);
                }
                // Stop streaming and give the shard up before the client can come back.
                self.rt.disconnected(shard, self.id, &session);
                self.stream = None;
                self.stalled_until = None;
                self.ws.send(Message::text(frame)).await?;
                let _ = done.send(());
                Ok(())
            }
            Fault::Close { code } => {
                if close::discards_session(code) {
                    self.rt.discard(shard, &session);
                }
                self.ack_on_end = Some(done);
                Err(self.close(code, close::reason(code)).await)
            }
            Fault::Malformed => {
                self.ws.send(Message::text(payload::BROKEN_FRAME)).await?;
                let _ = done.send(());
                Ok(())
            }
        }
    }

    /// Claim up to `granted` script events and write them.
    async fn send_script(&mut self, granted: usize) -> Result<(), End> {
        let pacer = self.rt.pacer.clone();
        let Some(stream) = self.stream.as_mut() else {
            give_back(pacer.as_deref(), granted);
            return Ok(());
        };
        let (shard, session) = (stream.shard, stream.session.clone());
        match self.rt.claim(shard, self.id, &session, granted) {
            Claim::Superseded => {
                give_back(pacer.as_deref(), granted);
                Err(self
                    .close(close::UNKNOWN_ERROR, "Superseded by a newer connection.")
                    .await)
            }
            Claim::Events { items, script_done } => {
                stream.script_done = script_done;
                give_back(pacer.as_deref(), granted - items.len());
                if script_done {
                    info!(shard, session = %session, "script fully sent");
                }
                self.write(shard, &session, &items).await
            }
        }
    }

    /// Render, feed and flush `items`, then record them as delivered.
    async fn write(
        &mut self,
        shard: u32,
        session: &Arc<str>,
        items: &[Outgoing],
    ) -> Result<(), End> {
        if items.is_empty() {
            return Ok(());
        }
        let ctx = RenderCtx {
            world: &self.rt.world,
            shard,
            session,
            gateway_url: &self.rt.gateway_url,
        };
        for item in items {
            let json = match item.seq {
                Some(seq) => payload::dispatch(&ctx, seq, item.entry),
                None => payload::BROKEN_FRAME.to_owned(),
            };
            self.ws.feed(Message::text(json)).await?;
        }
        self.ws.flush().await?;
        self.rt.delivered(shard, session, items);
        Ok(())
    }

    /// Send a close frame and end without waiting for the client's reply (shutdown).
    async fn close_now(&mut self, code: u16, reason: &str) -> End {
        let frame = Message::close(CloseCode::try_from(code).ok(), reason);
        match tokio::time::timeout(CLOSE_TIMEOUT, self.ws.send(frame)).await {
            Ok(Ok(())) | Err(_) => End::Closed(code),
            Ok(Err(e)) => End::Io(e),
        }
    }

    /// Send a close frame with a Discord close code and wait briefly for the reply.
    async fn close(&mut self, code: u16, reason: &str) -> End {
        let frame = Message::close(CloseCode::try_from(code).ok(), reason);
        match tokio::time::timeout(CLOSE_TIMEOUT, async {
            self.ws.send(frame).await?;
            while let Some(next) = self.ws.next().await {
                next?;
            }
            Ok::<(), tokio_websockets::Error>(())
        })
        .await
        {
            Ok(Ok(())) | Err(_) => End::Closed(code),
            Ok(Err(e)) => {
                debug!(error = %e, code, "error while closing");
                End::Closed(code)
            }
        }
    }
}

/// Take up to `want` pacing tokens without waiting (all of them when unpaced).
fn take_tokens(pacer: Option<&Semaphore>, want: usize) -> usize {
    let Some(pacer) = pacer else { return want };
    let n = pacer.available_permits().min(want);
    if n == 0 {
        return 0;
    }
    match pacer.try_acquire_many(n as u32) {
        Ok(permit) => {
            permit.forget();
            n
        }
        // Another shard took them first; wait for the next tick.
        Err(_) => 0,
    }
}

/// Return unused pacing tokens.
fn give_back(pacer: Option<&Semaphore>, n: usize) {
    if let Some(pacer) = pacer
        && n > 0
    {
        pacer.add_permits(n);
    }
}

/// A client payload: opcode and data (Discord docs, "Gateway Events → Payload Structure").
#[derive(Deserialize)]
struct Command {
    op: u8,
    #[serde(default)]
    d: serde_json::Value,
}

/// The fields of IDENTIFY (op 2) the simulator checks.
#[derive(Deserialize)]
struct Identify {
    token: String,
    /// `[shard_id, num_shards]`; Discord treats a missing value as `[0, 1]`.
    shard: Option<[u64; 2]>,
}

/// RESUME (op 6).
#[derive(Deserialize)]
struct Resume {
    token: String,
    session_id: String,
    seq: Option<u64>,
}

/// The address a URL should name for a bound listener (`0.0.0.0` → `127.0.0.1`).
pub(crate) fn url_host(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}
