//! Fault injection, resume windows, redelivery on a new session and the session start limit,
//! against real twilight shards. Waits are bounded by deadlines; the only sleep lets a resume
//! window pass on purpose.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use twilight_gateway::{
    CloseFrame, Event, EventTypeFlags, Message, Session, Shard, ShardId, StreamExt as _,
};

use super::tests::{Seen, TOKEN, builder, close_code, drive, shard_messages};
use super::*;

/// What a spawned twilight shard reports.
#[derive(Debug)]
enum Ev {
    Message(u64),
    Ready,
    Resumed,
    Close(Option<u16>),
    Error,
    Ended,
}

/// A twilight shard polled by its own task (so the test can inject faults meanwhile, and a
/// close handshake never waits for the test), and what it saw so far.
#[derive(Debug, Default)]
struct Client {
    rx: Option<mpsc::UnboundedReceiver<Ev>>,
    task: Option<JoinHandle<()>>,
    messages: Vec<u64>,
    distinct: BTreeSet<u64>,
    ready: u32,
    resumed: u32,
    closes: Vec<Option<u16>>,
    errors: u32,
    /// The current shard's stream ended (fatal close).
    ended: bool,
    /// Shards started so far.
    shards: u32,
}

impl Client {
    fn spawn(shard: Shard) -> Client {
        let mut client = Client::default();
        client.start(shard);
        client
    }

    /// Poll `shard` from now on (after the previous one ended), keeping the tallies.
    fn start(&mut self, mut shard: Shard) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.task = Some(tokio::spawn(async move {
            while let Some(item) = shard.next_event(EventTypeFlags::all()).await {
                let ev = match item {
                    Ok(Event::MessageCreate(m)) => Ev::Message(m.id.get()),
                    Ok(Event::Ready(_)) => Ev::Ready,
                    Ok(Event::Resumed) => Ev::Resumed,
                    Ok(Event::GatewayClose(frame)) => Ev::Close(frame.map(|f| f.code)),
                    Ok(_) => continue,
                    Err(_) => Ev::Error,
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
            let _ = tx.send(Ev::Ended);
        }));
        self.rx = Some(rx);
        self.ended = false;
        self.shards += 1;
    }

    /// Take events until `done(self)` (→ `true`) or the shard's stream ends (→ `false`).
    /// Panics at the deadline.
    async fn until(&mut self, deadline: Instant, done: impl Fn(&Client) -> bool) -> bool {
        while !done(self) {
            if self.ended {
                return false;
            }
            let rx = self.rx.as_mut().expect("client started");
            let ev = timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("deadline passed; client: {}", self.summary()))
                .unwrap_or(Ev::Ended);
            match ev {
                Ev::Message(id) => {
                    self.messages.push(id);
                    self.distinct.insert(id);
                }
                Ev::Ready => self.ready += 1,
                Ev::Resumed => self.resumed += 1,
                Ev::Close(code) => self.closes.push(code),
                Ev::Error => self.errors += 1,
                Ev::Ended => self.ended = true,
            }
        }
        true
    }

    fn summary(&self) -> String {
        format!(
            "{} messages ({} distinct), ready {}, resumed {}, closes {:?}, errors {}, ended {}, shards {}",
            self.messages.len(),
            self.distinct.len(),
            self.ready,
            self.resumed,
            self.closes,
            self.errors,
            self.ended,
            self.shards
        )
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn new_shard(sim: &Simulator, total: u32, id: u32) -> Shard {
    Shard::with_config(ShardId::new(id, total), builder(sim, TOKEN).build())
}

/// A shard that resumes `session` (at `seq`) on its first connection.
fn resuming_shard(sim: &Simulator, session: &Session, seq: u64) -> Shard {
    let config = builder(sim, TOKEN)
        .session(Session::new(seq, session.id().to_owned()))
        .resume_url(sim.gateway_url())
        .build();
    Shard::with_config(ShardId::new(0, 1), config)
}

/// No script MESSAGE_CREATE was sent twice as a dispatch that is neither a replay nor a
/// redelivery.
fn assert_no_fresh_duplicates(record: &[SentDispatch]) {
    let mut fresh: Vec<u64> = record
        .iter()
        .filter(|d| d.kind == DispatchKind::MessageCreate && !d.replay && !d.redelivery)
        .filter_map(|d| d.message_id)
        .collect();
    let n = fresh.len();
    fresh.sort_unstable();
    fresh.dedup();
    assert_eq!(fresh.len(), n, "a message was sent twice as fresh");
}

/// Fresh at most once, and every script MESSAGE_CREATE sent at least once in some form (an
/// event claimed by a session whose connection died before the flush is first sent by a
/// replay or a redelivery).
fn assert_fresh_at_most_once(sim: &Simulator, record: &[SentDispatch]) {
    assert_no_fresh_duplicates(record);
    let all: BTreeSet<u64> = record
        .iter()
        .filter(|d| d.kind == DispatchKind::MessageCreate)
        .filter_map(|d| d.message_id)
        .collect();
    let want: BTreeSet<u64> = sim.expected().message_ids.into_iter().collect();
    assert_eq!(all, want, "every message sent at least once");
}

/// Wait until no connection holds shard 0 (the server saw the client go).
async fn disconnected(sim: &Simulator, deadline: Instant) {
    while sim.status().shards[0].connected {
        assert!(Instant::now() < deadline, "shard 0 still connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Outcome {
    status: ShardStatus,
    record: Vec<SentDispatch>,
    client: Client,
}

/// One shard streams its script; after 300 messages `fault` is injected; the client (a new
/// one if the fault was fatal) must end up with every message of the script.
async fn recovers_from(fault: Fault) -> Outcome {
    let sim = Simulator::start(SimConfig {
        guilds: 20,
        shards: 1,
        messages: 1_500,
        rate: Some(4_000),
        heartbeat_interval_ms: 250,
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let want = shard_messages(&sim, 0);
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut client = Client::spawn(new_shard(&sim, 1, 0));
    assert!(client.until(deadline, |c| c.messages.len() >= 300).await);
    sim.inject(0, fault.clone()).await.expect("inject");
    while !client
        .until(deadline, |c| c.distinct.len() >= want.len())
        .await
    {
        // A fatal close ends twilight's stream; a new process would identify again.
        assert_eq!(client.shards, 1, "{fault:?}: {}", client.summary());
        client.start(new_shard(&sim, 1, 0));
    }
    assert_eq!(
        client.distinct, want,
        "{fault:?}: every message reached the client"
    );
    sim.wait_all_sent(Duration::from_secs(5))
        .await
        .expect("all sent");
    let record = sim.record();
    assert_fresh_at_most_once(&sim, &record);
    let status = sim.status().shards[0].clone();
    sim.shutdown().await;
    Outcome {
        status,
        record,
        client,
    }
}

/// `(identifies, resumes, resumes_refused)`.
fn counts(o: &Outcome) -> (u32, u32, u32) {
    (
        o.status.identifies,
        o.status.resumes,
        o.status.resumes_refused,
    )
}

fn redelivered(record: &[SentDispatch]) -> usize {
    record
        .iter()
        .filter(|d| d.redelivery && d.kind == DispatchKind::MessageCreate)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_connection_is_resumed() {
    let o = recovers_from(Fault::DropConnection).await;
    assert_eq!(counts(&o), (1, 1, 0));
    assert_eq!(o.status.connections, 2);
    assert_eq!((o.client.ready, o.client.resumed), (1, 1));
    assert_eq!(redelivered(&o.record), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_acks_make_a_zombie_that_is_resumed() {
    let o = recovers_from(Fault::StopAcks { millis: 2_000 }).await;
    assert_eq!(counts(&o), (1, 1, 0));
    assert_eq!((o.client.ready, o.client.resumed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_is_resumed() {
    let o = recovers_from(Fault::Reconnect).await;
    assert_eq!(counts(&o), (1, 1, 0));
    assert_eq!((o.client.ready, o.client.resumed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumable_invalid_session_is_resumed() {
    let o = recovers_from(Fault::InvalidSession { resumable: true }).await;
    assert_eq!(counts(&o), (1, 1, 0));
    assert_eq!((o.client.ready, o.client.resumed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_session_identifies_again_and_redelivers() {
    let o = recovers_from(Fault::InvalidSession { resumable: false }).await;
    assert_eq!(counts(&o), (2, 0, 0));
    assert_eq!((o.client.ready, o.client.resumed), (2, 0));
    let sessions: BTreeSet<&str> = o.record.iter().map(|d| d.session.as_str()).collect();
    assert_eq!(sessions.len(), 2);
    // Redeliveries come after the new session's READY and GUILD_CREATEs, before its script.
    assert!(
        o.record
            .iter()
            .filter(|d| d.redelivery)
            .all(|d| !d.replay && d.seq > 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_4000_is_resumed() {
    let o = recovers_from(Fault::Close { code: 4000 }).await;
    assert_eq!(counts(&o), (1, 1, 0));
    assert!(
        o.client.closes.contains(&Some(4000)),
        "{}",
        o.client.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_4009_refuses_the_resume_then_identifies() {
    let o = recovers_from(Fault::Close { code: 4009 }).await;
    assert_eq!(counts(&o), (2, 0, 1));
    assert!(
        o.client.closes.contains(&Some(4009)),
        "{}",
        o.client.summary()
    );
    assert_eq!((o.client.ready, o.client.shards), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_close_ends_the_client_and_a_new_one_identifies() {
    let o = recovers_from(Fault::Close { code: 4004 }).await;
    assert_eq!(counts(&o), (2, 0, 0));
    assert_eq!(o.client.shards, 2, "{}", o.client.summary());
    assert!(o.client.closes.contains(&Some(4004)));
    assert_eq!(o.status.connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_is_an_error_and_the_stream_goes_on() {
    let o = recovers_from(Fault::Malformed).await;
    assert_eq!(counts(&o), (1, 0, 0));
    assert_eq!(o.client.errors, 1);
    assert_eq!(o.status.connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_window_is_refused_and_redelivered() {
    let sim = Simulator::start(SimConfig {
        guilds: 20,
        shards: 1,
        messages: 1_000,
        rate: Some(5_000),
        resume_window: Some(Duration::from_millis(200)),
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let want = shard_messages(&sim, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut first = new_shard(&sim, 1, 0);
    let mut seen = Seen::default();
    drive(&mut first, deadline, &mut seen, |s| s.messages.len() >= 100).await;
    let session = first.session().cloned().expect("session");
    drop(first);
    disconnected(&sim, deadline).await;
    // Let the resume window pass (the point of this test, not a synchronisation).
    tokio::time::sleep(Duration::from_millis(300)).await;

    const BEHIND: u64 = 20;
    let resume_at = session.sequence() - BEHIND;
    let mut client = Client::spawn(resuming_shard(&sim, &session, resume_at));
    let mut got: BTreeSet<u64> = seen.messages.iter().copied().collect();
    assert!(
        client
            .until(deadline, |c| got.len()
                + c.distinct.difference(&got).count()
                >= want.len())
            .await
    );
    got.extend(client.distinct.iter().copied());
    assert_eq!(got, want, "nothing lost");
    assert_eq!((client.ready, client.resumed), (1, 0), "identified again");
    let status = sim.status().shards[0].clone();
    assert_eq!(
        (status.identifies, status.resumes, status.resumes_refused),
        (2, 0, 1)
    );

    let record = sim.record();
    assert_fresh_at_most_once(&sim, &record);
    // Everything of the old session after the refused RESUME's seq was re-sent in the new one.
    let old: Vec<&SentDispatch> = record
        .iter()
        .filter(|d| d.session == session.id() && d.seq > resume_at && d.message_id.is_some())
        .collect();
    assert!(old.len() >= BEHIND as usize / 2, "{}", old.len());
    let again: BTreeSet<u64> = record
        .iter()
        .filter(|d| d.redelivery && d.session != session.id())
        .filter_map(|d| d.message_id)
        .collect();
    assert!(
        old.iter()
            .all(|d| again.contains(&d.message_id.unwrap_or(0)))
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_too_many_events_to_replay_is_refused() {
    let sim = Simulator::start(SimConfig {
        guilds: 20,
        shards: 1,
        messages: 1_000,
        rate: Some(5_000),
        resume_window_events: Some(200),
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let want = shard_messages(&sim, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = BTreeSet::new();

    let mut first = new_shard(&sim, 1, 0);
    let mut seen = Seen::default();
    drive(&mut first, deadline, &mut seen, |s| s.messages.len() >= 300).await;
    let session = first.session().cloned().expect("session");
    got.extend(seen.messages.iter().copied());
    drop(first);
    disconnected(&sim, deadline).await;

    // A few events behind: replayed.
    let mut second = resuming_shard(&sim, &session, session.sequence() - 5);
    let mut seen = Seen::default();
    drive(&mut second, deadline, &mut seen, |s| {
        s.messages.len() >= 300
    })
    .await;
    assert!(seen.resumed_after.is_some() && seen.ready == 0);
    let session = second.session().cloned().expect("session");
    got.extend(seen.messages.iter().copied());
    drop(second);
    disconnected(&sim, deadline).await;

    // 400 behind with at most 200 replayable: refused, identify, redelivery.
    let mut client = Client::spawn(resuming_shard(&sim, &session, session.sequence() - 400));
    assert!(
        client
            .until(deadline, |c| got.len()
                + c.distinct.difference(&got).count()
                >= want.len())
            .await
    );
    got.extend(client.distinct.iter().copied());
    assert_eq!(got, want);
    let status = sim.status().shards[0].clone();
    assert_eq!(
        (status.identifies, status.resumes, status.resumes_refused),
        (2, 1, 1)
    );
    // identify, resume, refused resume, identify.
    assert_eq!(status.connections, 4);
    let record = sim.record();
    assert_fresh_at_most_once(&sim, &record);
    assert!(redelivered(&record) > 300, "{}", redelivered(&record));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closing_with_1000_cannot_resume() {
    let sim = Simulator::start(SimConfig {
        guilds: 10,
        shards: 1,
        messages: 500,
        rate: Some(5_000),
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let want = shard_messages(&sim, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut first = new_shard(&sim, 1, 0);
    let mut seen = Seen::default();
    drive(&mut first, deadline, &mut seen, |s| s.messages.len() >= 50).await;
    let session = first.session().cloned().expect("session");
    first.close(CloseFrame::NORMAL);
    loop {
        let item = timeout_at(deadline, first.next())
            .await
            .expect("deadline")
            .expect("stream");
        if let Ok(Message::Close(_)) = item {
            break;
        }
    }
    drop(first);
    disconnected(&sim, deadline).await;
    let mut client = Client::spawn(resuming_shard(&sim, &session, session.sequence()));
    let got: BTreeSet<u64> = seen.messages.iter().copied().collect();
    assert!(
        client
            .until(deadline, |c| got.len()
                + c.distinct.difference(&got).count()
                >= want.len())
            .await
    );
    let status = sim.status().shards[0].clone();
    assert_eq!(
        (status.identifies, status.resumes, status.resumes_refused),
        (2, 0, 1)
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_resend_lost_events_are_not_redelivered() {
    let sim = Simulator::start(SimConfig {
        guilds: 10,
        shards: 1,
        messages: 800,
        rate: Some(5_000),
        resend_unacknowledged_on_identify: false,
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = Client::spawn(new_shard(&sim, 1, 0));
    assert!(client.until(deadline, |c| c.messages.len() >= 200).await);
    sim.inject(0, Fault::InvalidSession { resumable: false })
        .await
        .expect("inject");
    assert!(client.until(deadline, |c| c.ready >= 2).await);
    sim.wait_all_sent(Duration::from_secs(8))
        .await
        .expect("the script still completes");
    let record = sim.record();
    assert_eq!(record.iter().filter(|d| d.redelivery).count(), 0);
    assert_no_fresh_duplicates(&record);
    assert_eq!(sim.status().shards[0].identifies, 2);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_control_endpoint() {
    let sim = Simulator::start(SimConfig {
        guilds: 8,
        shards: 2,
        messages: 400,
        rate: Some(100),
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = Client::spawn(new_shard(&sim, 2, 0));
    assert!(client.until(deadline, |c| c.ready == 1).await);

    let http = reqwest::Client::new();
    let post = |shard: &str, body: &str| {
        http.post(format!("{}/sim/shards/{shard}/faults", sim.api_url()))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    let response = post("0", r#"{"kind":"malformed"}"#).await.expect("post");
    assert_eq!(response.status(), 204);
    assert!(client.until(deadline, |c| c.errors == 1).await);

    for (shard, body, status, word) in [
        ("1", r#"{"kind":"malformed"}"#, 404, "no connection"),
        ("2", r#"{"kind":"malformed"}"#, 404, "unknown shard"),
        ("x", r#"{"kind":"malformed"}"#, 404, "unknown shard"),
        ("0", "not json", 400, "invalid fault"),
        ("0", r#"{"kind":"explode"}"#, 400, "invalid fault"),
        ("0", r#"{"kind":"stop_acks"}"#, 400, "invalid fault"),
        ("0", r#"{"kind":"close","code":1006}"#, 400, "invalid fault"),
    ] {
        let response = post(shard, body).await.expect("post");
        assert_eq!(response.status(), status, "{shard} {body}");
        let error: serde_json::Value = response.json().await.expect("json");
        let text = error["error"].as_str().expect("error text");
        assert!(text.contains(word), "{shard} {body}: {text}");
    }
    assert!(matches!(
        sim.inject(1, Fault::Reconnect).await,
        Err(SimError::NoConnection { shard: 1 })
    ));
    assert!(matches!(
        sim.inject(7, Fault::Reconnect).await,
        Err(SimError::UnknownShard { shard: 7 })
    ));

    let bot: serde_json::Value = http
        .get(format!("{}/v10/gateway/bot", sim.api_url()))
        .header("Authorization", format!("Bot {TOKEN}"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(bot["session_start_limit"]["remaining"], 999);
    let status: SimStatus = http
        .get(format!("{}/sim/status", sim.api_url()))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(status.session_start_remaining, 999);
    assert!(status.shards[0].connected && !status.shards[1].connected);
    assert_eq!(
        serde_json::to_value(Fault::InvalidSession { resumable: false }).expect("json"),
        serde_json::json!({"kind": "invalid_session", "resumable": false})
    );
    drop(client);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_without_session_starts_left_is_closed_with_4004() {
    let sim = Simulator::start(SimConfig {
        guilds: 4,
        shards: 1,
        messages: 20,
        session_start_remaining: 1,
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = Client::spawn(new_shard(&sim, 1, 0));
    assert!(client.until(deadline, |c| c.ready == 1).await);
    assert_eq!(sim.status().session_start_remaining, 0);
    assert_eq!(close_code(&sim, TOKEN, ShardId::new(0, 1)).await, 4004);
    let status = sim.status().shards[0].clone();
    assert_eq!((status.identifies, status.connections), (1, 2));
    drop(client);
    sim.shutdown().await;
}
