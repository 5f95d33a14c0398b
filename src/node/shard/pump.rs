//! The pump: the task that owns twilight's `Shard`, polls it continuously and routes what it reads.
//!
//! twilight sends heartbeats only while its stream is polled, so the `Shard` cannot live inside an
//! actor that also waits on other messages. The pump reads frame after frame: each dispatch goes to
//! the partition of its guild (DESIGN §2) within the in-flight budget, undecodable or unknown
//! dispatches go there as dead letters, a new session is committed by every partition before its
//! dispatches, and the partitions get periodic watermarks — all sent through [`Delivery`]. It writes
//! what it sees into [`Live`] for the actor, closes with the resume code when the actor asks, and
//! tells the actor when the stream ends on its own ([`PumpExit`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt as _;
use ractor::ActorRef;
use tokio::sync::{mpsc, oneshot};
use twilight_gateway::error::{ReceiveMessageError, ReceiveMessageErrorType};
use twilight_gateway::{CloseFrame, EventTypeFlags, Message, Session, Shard, ShardId, ShardState};
use twilight_model::gateway::event::{DispatchEvent, GatewayEvent};
use twilight_model::gateway::payload::incoming::Ready;

use super::deliver::Delivery;
use super::status::Live;
use super::{CLOSE_TIMEOUT, FatalClose, PumpExit, ShardArgs, ShardMsg};
use crate::node::dead_letter;
use crate::node::identify_queue::IdentifyQueue;
use crate::node::metrics as metric;
use crate::store::DeadLetter;

/// How much of a malformed frame goes into the log.
const LOGGED_FRAME_BYTES: usize = 200;

/// The task that owns twilight's `Shard`.
pub(super) struct Pump {
    shard_id: u32,
    shard: Shard<IdentifyQueue>,
    /// Everything sent to the partitions goes through here.
    delivery: Delivery,
    live: Arc<Live>,
    /// How often the partitions get a watermark.
    watermark_interval: Duration,
    /// Code of the last close frame seen (twilight reports fatal codes only this way).
    last_close_code: Option<u16>,
    /// The session the partitions were last told about (the resumed one at start).
    session_id: Option<String>,
    /// Event types already reported as unknown (logged once each).
    unknown_kinds: HashSet<String>,
}

impl Pump {
    /// The pump of a shard starting with `args`: twilight's `Shard` resumes `args.resume` at its
    /// applied sequence, or identifies when there is none.
    pub(super) fn new(args: ShardArgs, live: Arc<Live>) -> Self {
        let ShardArgs {
            shard_id,
            topology,
            gateway,
            resume,
            partitions,
            in_flight,
            watermark_interval,
            session_sync,
            silence_timeout: _,
            fatal_close: _,
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
        let delivery = Delivery::new(
            shard_id,
            topology,
            partitions,
            in_flight,
            live.clone(),
            session_sync,
        );
        Self {
            shard_id,
            shard,
            delivery,
            live,
            watermark_interval,
            last_close_code: None,
            session_id: resume.map(|s| s.session_id),
            unknown_kinds: HashSet::new(),
        }
    }

    /// Reads until the actor asks for a close (answered on the request's sender with the last
    /// sequence routed) or the stream ends (reported to `actor` as [`ShardMsg::PumpExited`]).
    pub(super) async fn run(
        mut self,
        actor: ActorRef<ShardMsg>,
        mut control: mpsc::UnboundedReceiver<oneshot::Sender<u64>>,
    ) {
        let mut watermark = tokio::time::interval(self.watermark_interval);
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
        if let PumpExit::Fatal(close) = exit {
            // Recorded before the actor hears of it: the group reads it when the actor stops.
            self.live.fatal.record(close);
        }
        self.live.set_phase(self.shard.state());
        // If the actor is gone, so is whoever could act on this.
        let _ = actor.cast(ShardMsg::PumpExited(exit));
    }

    fn fatal_exit(&self) -> Option<PumpExit> {
        (self.shard.state() == ShardState::FatallyClosed).then(|| {
            PumpExit::Fatal(FatalClose {
                code: self.last_close_code.unwrap_or(0),
            })
        })
    }

    /// Handles one stream item; `Some` ends the pump.
    async fn on_item(&mut self, item: Result<Message, ReceiveMessageError>) -> Option<PumpExit> {
        self.live.touch();
        self.live.set_phase(self.shard.state());
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

    /// One text frame: parsed, its session followed, then routed by what it is.
    async fn on_text(&mut self, text: String) {
        // An event type twilight does not know parses to nothing; keep its frame instead.
        let unknown = dead_letter::unknown_event(&text);
        let parsed = if unknown.is_some() {
            Ok(None)
        } else {
            twilight_gateway::parse(text, EventTypeFlags::all())
        };
        self.follow_session(&parsed).await;
        match parsed {
            Ok(Some(GatewayEvent::Dispatch(seq, event))) => self.on_dispatch(seq, event).await,
            // Gateway ops twilight handles itself, or a dispatch of an unknown event type.
            Ok(_) => {
                if let Some(letter) = unknown {
                    self.on_unknown_event(letter).await;
                }
            }
            Err(e) => self.on_undecodable(&e).await,
        }
    }

    /// Records the frame's sequence, and starts a new session in the partitions when twilight's
    /// session changed.
    async fn follow_session(&mut self, parsed: &Result<Option<GatewayEvent>, ReceiveMessageError>) {
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
            let ready = match parsed {
                Ok(Some(GatewayEvent::Dispatch(_, DispatchEvent::Ready(r)))) => Some(r),
                _ => None,
            };
            self.start_session(ready).await;
        }
    }

    /// Routes a decoded dispatch to its partition; RESUMED is only counted.
    async fn on_dispatch(&mut self, seq: u64, event: DispatchEvent) {
        if let DispatchEvent::Resumed = &event {
            self.live.resumes.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::RESUMES, "shard" => self.shard_id.to_string()).increment(1);
            tracing::info!(shard = self.shard_id, seq, "session resumed");
            return;
        }
        self.delivery.dispatch(seq, event).await;
    }

    /// A dispatch of an event type twilight does not know: kept as a dead letter.
    async fn on_unknown_event(&mut self, letter: DeadLetter) {
        if self.unknown_kinds.insert(letter.kind.clone()) {
            tracing::info!(shard = self.shard_id, kind = %letter.kind,
                "dispatches of an event type twilight does not know are kept as dead letters");
        }
        self.delivery.dead_letter(letter).await;
    }

    /// A frame twilight could not decode: kept as a dead letter when it is a dispatch with a
    /// sequence, skipped otherwise.
    async fn on_undecodable(&mut self, e: &ReceiveMessageError) {
        metrics::counter!(metric::MALFORMED, "shard" => self.shard_id.to_string()).increment(1);
        let error = crate::error_chain(e);
        let (frame, letter) = match e.kind() {
            ReceiveMessageErrorType::Deserializing { event } => (
                truncate(event, LOGGED_FRAME_BYTES).to_owned(),
                dead_letter::undecodable(event, error.clone()),
            ),
            _ => (String::new(), None),
        };
        match letter {
            Some(letter) => {
                tracing::warn!(shard = self.shard_id, seq = letter.seq, kind = %letter.kind,
                    %error, %frame, "malformed dispatch kept as a dead letter");
                self.delivery.dead_letter(letter).await;
            }
            None => tracing::warn!(shard = self.shard_id, %error, %frame,
                "malformed dispatch skipped (no sequence to keep it by)"),
        }
    }

    /// Tells every partition that a new session started (its sequences restart at 1), then waits
    /// until each has committed that, so a crash right after READY cannot leave partitions that
    /// disagree on the session (which would cost an identify where a resume was possible); with
    /// [`super::SessionSync`], then waits until the replica holds it too
    /// ([`Delivery::start_session`]).
    /// `ready` carries the guild list when READY decoded; without it guilds only become stale.
    async fn start_session(&mut self, ready: Option<&Ready>) {
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
        self.delivery
            .start_session(&session_id, &resume_url, ready)
            .await;
    }

    /// Tells every partition that everything up to the current sequence has been routed.
    fn send_watermark(&mut self) {
        if self.shard.session().is_some() {
            self.delivery
                .watermark(self.live.last_seq.load(Ordering::Relaxed));
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
