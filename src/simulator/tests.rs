//! Simulator tests: payloads parse with twilight, and real twilight shards run against the
//! running simulator (identify, full stream, resume with replay, close codes).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::{Instant, timeout_at};
use twilight_gateway::queue::InMemoryQueue;
use twilight_gateway::{
    ConfigBuilder, Event, EventTypeFlags, Intents, Session, Shard, ShardId, StreamExt as _,
};
use twilight_model::gateway::event::{DispatchEvent, GatewayEvent};
use twilight_model::gateway::payload::incoming::GuildCreate;

use super::payload::{self, RenderCtx};
use super::session::LogEntry;
use super::world::{ScriptEvent, World};
use super::*;

pub(super) const TOKEN: &str = "simulated-token";

fn parse(
    json: String,
) -> Result<Option<GatewayEvent>, twilight_gateway::error::ReceiveMessageError> {
    twilight_gateway::parse(json, EventTypeFlags::all())
}

fn dispatch(json: String) -> (u64, DispatchEvent) {
    match parse(json.clone()) {
        Ok(Some(GatewayEvent::Dispatch(seq, event))) => (seq, event),
        other => panic!("not a dispatch: {other:?}\n{json}"),
    }
}

fn small_config() -> SimConfig {
    SimConfig {
        guilds: 40,
        shards: 2,
        messages: 1_000,
        inject_malformed: true,
        ..SimConfig::default()
    }
}

#[test]
fn every_payload_kind_parses_with_twilight() {
    let world = World::generate(&small_config());
    for shard in 0..world.shards {
        let ctx = RenderCtx {
            world: &world,
            shard,
            session: "abc123",
            gateway_url: "ws://127.0.0.1:1",
        };

        let (seq, event) = dispatch(payload::dispatch(&ctx, 1, LogEntry::Ready));
        let DispatchEvent::Ready(ready) = event else {
            panic!("{event:?}")
        };
        assert_eq!(seq, 1);
        assert_eq!(ready.session_id, "abc123");
        assert_eq!(ready.resume_gateway_url, "ws://127.0.0.1:1");
        assert_eq!(ready.guilds.len(), world.shard_guilds[shard as usize].len());
        assert_eq!(ready.shard, Some(ShardId::new(shard, 2)));
        assert_eq!(ready.version, 10);

        let script = &world.scripts[shard as usize];
        let end = script.len() as u32;
        for &g in &world.shard_guilds[shard as usize] {
            let rec = &world.guilds[g as usize];
            for at in [0, end] {
                let (_, event) = dispatch(payload::dispatch(
                    &ctx,
                    2,
                    LogEntry::GuildCreate { guild: g, at },
                ));
                let DispatchEvent::GuildCreate(create) = event else {
                    panic!("{event:?}")
                };
                let GuildCreate::Available(guild) = *create else {
                    panic!("unavailable guild")
                };
                assert_eq!(guild.id.get(), rec.id);
                assert_eq!(guild.roles.len(), rec.roles.len());
                assert!(
                    guild.roles.iter().any(|r| r.id.get() == rec.id),
                    "@everyone"
                );
                assert!(
                    guild.members.iter().any(|m| m.user.id == guild.owner_id),
                    "owner listed"
                );
                assert_eq!(guild.member_count, Some(guild.members.len() as u64));
                let visible = rec
                    .channels
                    .iter()
                    .filter(|c| world.channel_visible(**c, at))
                    .count();
                assert_eq!(guild.channels.len(), visible);
                if at == end {
                    let exp = &world.expected.guilds[&rec.id];
                    assert_eq!(guild.members.len() as u32, exp.members);
                    assert_eq!(guild.channels.len() as u32, exp.channels);
                }
            }
        }

        let mut seen = HashSet::new();
        for (index, event) in script.iter().enumerate() {
            let json = payload::dispatch(
                &ctx,
                100 + index as u64,
                LogEntry::Script {
                    index: index as u32,
                    redelivery: index % 2 == 0,
                },
            );
            match *event {
                ScriptEvent::BrokenJson => {
                    assert!(parse(payload::BROKEN_FRAME.to_owned()).is_err());
                    assert!(
                        serde_json::from_str::<serde_json::Value>(payload::BROKEN_FRAME).is_err()
                    );
                    continue;
                }
                ScriptEvent::UnknownEvent => {
                    assert!(json.contains(payload::UNKNOWN_EVENT_TYPE));
                    assert!(matches!(parse(json), Ok(None)));
                    continue;
                }
                ScriptEvent::MemberAddNoGuild { .. } => {
                    assert!(!json.contains("guild_id"));
                    assert!(
                        parse(json).is_err(),
                        "member add without guild_id must not parse"
                    );
                    continue;
                }
                _ => {}
            }
            let (seq, parsed) = dispatch(json.clone());
            assert_eq!(seq, 100 + index as u64);
            match (*event, parsed) {
                (ScriptEvent::MessageCreate { message }, DispatchEvent::MessageCreate(m)) => {
                    let rec = &world.messages[message as usize];
                    assert_eq!(m.id.get(), rec.id);
                    assert_eq!(
                        m.guild_id.map(|g| g.get()),
                        Some(world.guilds[rec.guild as usize].id)
                    );
                    assert!((20..=200).contains(&m.content.len()), "{}", m.content);
                    assert!(m.member.is_some());
                    let snowflake_unix_ms = (rec.id >> 22) + super::world::DISCORD_EPOCH_MS;
                    assert_eq!(
                        m.timestamp.as_micros() / 1000,
                        snowflake_unix_ms as i64,
                        "timestamp = snowflake time"
                    );
                    assert!(
                        (600..=1000).contains(&json.len()),
                        "MESSAGE_CREATE is {} bytes",
                        json.len()
                    );
                    seen.insert("create");
                }
                (ScriptEvent::MessageUpdate { message, .. }, DispatchEvent::MessageUpdate(m)) => {
                    assert_eq!(m.id.get(), world.messages[message as usize].id);
                    assert!(m.edited_timestamp.is_some());
                    seen.insert("update");
                }
                (ScriptEvent::MessageDelete { message }, DispatchEvent::MessageDelete(m)) => {
                    assert_eq!(m.id.get(), world.messages[message as usize].id);
                    assert!(m.guild_id.is_some());
                    seen.insert("delete");
                }
                (ScriptEvent::MemberAdd { member }, DispatchEvent::MemberAdd(m)) => {
                    assert_eq!(m.user.id.get(), world.members[member as usize].user_id);
                    seen.insert("member_add");
                }
                (ScriptEvent::MemberRemove { member }, DispatchEvent::MemberRemove(m)) => {
                    assert_eq!(m.user.id.get(), world.members[member as usize].user_id);
                    seen.insert("member_remove");
                }
                (ScriptEvent::ChannelCreate { channel }, DispatchEvent::ChannelCreate(c)) => {
                    assert_eq!(c.id.get(), world.channels[channel as usize].id);
                    assert!(c.guild_id.is_some());
                    seen.insert("channel_create");
                }
                (event, parsed) => panic!("{event:?} parsed as {parsed:?}"),
            }
        }
        assert!(seen.contains("create"), "shard {shard}: {seen:?}");

        let (seq, event) = dispatch(payload::dispatch(&ctx, 7, LogEntry::Resumed));
        assert_eq!(seq, 7);
        assert!(matches!(event, DispatchEvent::Resumed));
    }
    let hello = parse(payload::hello(41_250));
    assert!(matches!(hello, Ok(Some(GatewayEvent::Hello(h))) if h.heartbeat_interval == 41_250));
    assert!(matches!(
        parse(payload::HEARTBEAT_ACK.to_owned()),
        Ok(Some(GatewayEvent::HeartbeatAck))
    ));
    assert!(matches!(
        parse(payload::INVALID_SESSION.to_owned()),
        Ok(Some(GatewayEvent::InvalidateSession(false)))
    ));
}

#[test]
fn invalid_configs_are_rejected() {
    for (config, word) in [
        (
            SimConfig {
                shards: 0,
                ..SimConfig::default()
            },
            "shards",
        ),
        (
            SimConfig {
                guilds: 0,
                ..SimConfig::default()
            },
            "guild",
        ),
        (
            SimConfig {
                rate: Some(0),
                ..SimConfig::default()
            },
            "rate",
        ),
        (
            SimConfig {
                messages: u64::from(u32::MAX) + 1,
                ..SimConfig::default()
            },
            "messages",
        ),
    ] {
        let err = config.validate().expect_err("invalid");
        assert!(err.to_string().contains(word), "{err}");
    }
    assert!(format!("{:?}", SimConfig::default()).contains("<redacted>"));
}

fn intents() -> Intents {
    Intents::GUILDS | Intents::GUILD_MEMBERS | Intents::GUILD_MESSAGES | Intents::MESSAGE_CONTENT
}

pub(super) fn builder(sim: &Simulator, token: &str) -> ConfigBuilder {
    ConfigBuilder::new(token.to_owned(), intents())
        .proxy_url(sim.gateway_url())
        .queue(InMemoryQueue::new(0, 0, Duration::ZERO, 0))
}

/// What one twilight shard saw.
#[derive(Default, Debug)]
pub(super) struct Seen {
    pub ready: u32,
    pub guild_creates: BTreeSet<u64>,
    pub messages: Vec<u64>,
    pub resumed_after: Option<usize>,
    pub dispatches: usize,
    pub errors: u32,
}

/// Poll `shard` until `done(&seen)` or the deadline.
pub(super) async fn drive(
    shard: &mut Shard,
    deadline: Instant,
    seen: &mut Seen,
    done: impl Fn(&Seen) -> bool,
) {
    while !done(seen) {
        let item = timeout_at(deadline, shard.next_event(EventTypeFlags::all()))
            .await
            .unwrap_or_else(|_| panic!("deadline passed; seen so far: {seen:?}"))
            .expect("shard stream ended");
        match item {
            Ok(Event::Ready(_)) => {
                seen.ready += 1;
                seen.dispatches += 1;
            }
            Ok(Event::GuildCreate(g)) => {
                seen.guild_creates.insert(g.id().get());
                seen.dispatches += 1;
            }
            Ok(Event::MessageCreate(m)) => {
                seen.messages.push(m.id.get());
                seen.dispatches += 1;
            }
            Ok(Event::Resumed) => seen.resumed_after = Some(seen.dispatches),
            Ok(Event::GatewayClose(frame)) => panic!("unexpected close {frame:?}"),
            Ok(_) => seen.dispatches += 1,
            Err(_) => seen.errors += 1,
        }
    }
}

/// Expected MESSAGE_CREATE ids of one shard, from the record-independent world.
pub(super) fn shard_messages(sim: &Simulator, shard: u32) -> BTreeSet<u64> {
    let world = &sim.rt.world;
    world.scripts[shard as usize]
        .iter()
        .filter_map(|e| match e {
            ScriptEvent::MessageCreate { message } => Some(world.messages[*message as usize].id),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilight_shards_receive_the_whole_world() {
    let sim = Simulator::start(SimConfig {
        guilds: 50,
        shards: 2,
        messages: 2_000,
        inject_malformed: true,
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let expected = sim.expected();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tasks = Vec::new();
    for id in 0..2 {
        let config = builder(&sim, TOKEN).build();
        let want_messages = shard_messages(&sim, id);
        let want_guilds: BTreeSet<u64> = expected
            .guilds
            .iter()
            .filter(|(_, g)| g.shard == id)
            .map(|(id, _)| *id)
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut shard = Shard::with_config(ShardId::new(id, 2), config);
            let mut seen = Seen::default();
            let n = want_messages.len();
            drive(&mut shard, deadline, &mut seen, |s| s.messages.len() >= n).await;
            assert_eq!(seen.ready, 1);
            assert_eq!(
                seen.guild_creates, want_guilds,
                "a GUILD_CREATE per guild of shard {id}"
            );
            let got: BTreeSet<u64> = seen.messages.iter().copied().collect();
            assert_eq!(got.len(), seen.messages.len(), "no duplicates");
            assert_eq!(got, want_messages);
            // Broken JSON and the guild-less member add surface as errors; the stream goes on.
            assert_eq!(seen.errors, 2, "shard {id}");
            got
        }));
    }
    let mut all = BTreeSet::new();
    for task in tasks {
        all.extend(task.await.expect("shard task"));
    }
    assert_eq!(all.into_iter().collect::<Vec<_>>(), expected.message_ids);
    sim.wait_all_sent(Duration::from_secs(5))
        .await
        .expect("all sent");

    let record = sim.record();
    let mut recorded: Vec<u64> = record
        .iter()
        .filter(|d| d.kind == DispatchKind::MessageCreate && !d.replay)
        .filter_map(|d| d.message_id)
        .collect();
    recorded.sort_unstable();
    assert_eq!(recorded, expected.message_ids);
    assert_eq!(
        record.iter().filter(|d| d.malformed).count(),
        4,
        "2 recorded faults per shard"
    );
    for shard in 0..2 {
        let seqs: Vec<u64> = record
            .iter()
            .filter(|d| d.shard == shard)
            .map(|d| d.seq)
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "gapless seqs on {shard}"
        );
    }
    let status = sim.status();
    assert!(status.all_sent);
    assert_eq!(status.messages_sent, 2_000);
    assert!(status.shards.iter().all(|s| s.identifies == 1));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_missed_dispatches_then_resumed() {
    let sim = Simulator::start(SimConfig {
        guilds: 20,
        shards: 1,
        messages: 1_000,
        rate: Some(5_000),
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let want = shard_messages(&sim, 0);
    let deadline = Instant::now() + Duration::from_secs(20);

    let mut first = Shard::with_config(ShardId::new(0, 1), builder(&sim, TOKEN).build());
    let mut seen1 = Seen::default();
    drive(&mut first, deadline, &mut seen1, |s| {
        s.messages.len() >= 100
    })
    .await;
    let session = first.session().cloned().expect("session after READY");
    assert!(session.sequence() > 100);
    drop(first); // no close frame: the socket just goes away

    // Resume a little behind the last seen sequence, so the replay is never empty.
    const BEHIND: u64 = 20;
    let resume_from = session.sequence() - BEHIND;
    let config = builder(&sim, TOKEN)
        .session(Session::new(resume_from, session.id().to_owned()))
        .resume_url(sim.gateway_url())
        .build();
    let mut second = Shard::with_config(ShardId::new(0, 1), config);
    let mut seen2 = Seen::default();
    let mut got: BTreeSet<u64> = seen1.messages.iter().copied().collect();
    drive(&mut second, deadline, &mut seen2, |s| {
        got.len()
            + s.messages
                .iter()
                .filter(|m| !seen1.messages.contains(m))
                .count()
            >= want.len()
    })
    .await;
    got.extend(seen2.messages.iter().copied());
    assert_eq!(got, want, "nothing lost");
    assert_eq!(seen2.ready, 0, "resumed, not identified");
    let replayed = seen2.resumed_after.expect("RESUMED received");
    assert!(
        replayed >= BEHIND as usize,
        "replayed {replayed} dispatches before RESUMED"
    );
    assert_eq!(second.session().map(Session::id), Some(session.id()));

    let record = sim.record();
    let replays: Vec<&SentDispatch> = record.iter().filter(|d| d.replay).collect();
    assert!(replays.len() >= BEHIND as usize);
    assert!(
        replays
            .iter()
            .all(|d| d.seq > resume_from && d.session == session.id())
    );
    let resumed: Vec<&SentDispatch> = record
        .iter()
        .filter(|d| d.kind == DispatchKind::Resumed)
        .collect();
    assert_eq!(resumed.len(), 1);
    assert!(resumed[0].seq > replays.iter().map(|d| d.seq).max().unwrap_or(0));
    let mut fresh: Vec<u64> = record
        .iter()
        .filter(|d| d.kind == DispatchKind::MessageCreate && !d.replay)
        .filter_map(|d| d.message_id)
        .collect();
    let n = fresh.len();
    fresh.sort_unstable();
    fresh.dedup();
    assert_eq!(n, fresh.len(), "no script event sent twice as a non-replay");
    sim.wait_all_sent(Duration::from_secs(5))
        .await
        .expect("all sent");
    let status = sim.status();
    assert_eq!(
        (status.shards[0].identifies, status.shards[0].resumes),
        (1, 1)
    );
    sim.shutdown().await;
}

/// Run a shard until the gateway closes it; return the close code.
pub(super) async fn close_code(sim: &Simulator, token: &str, id: ShardId) -> u16 {
    let mut shard = Shard::with_config(id, builder(sim, token).build());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let item = timeout_at(deadline, shard.next_event(EventTypeFlags::all()))
            .await
            .expect("closed before the deadline")
            .expect("stream open until the close");
        if let Ok(Event::GatewayClose(frame)) = item {
            let code = frame.expect("close frame").code;
            // Fatal codes end the stream.
            let next = timeout_at(deadline, shard.next_event(EventTypeFlags::all())).await;
            assert!(
                matches!(next, Ok(None)),
                "stream ended after fatal close {code}"
            );
            return code;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_and_bad_shard_are_closed_with_discord_codes() {
    let sim = Simulator::start(SimConfig {
        guilds: 8,
        messages: 20,
        ..SimConfig::default()
    })
    .await
    .expect("start");
    assert_eq!(
        close_code(&sim, "wrong-token", ShardId::new(0, 4)).await,
        4004
    );
    assert_eq!(close_code(&sim, TOKEN, ShardId::new(0, 8)).await, 4010);
    assert_eq!(close_code(&sim, TOKEN, ShardId::new(0, 2)).await, 4011);
    assert!(sim.status().shards.iter().all(|s| s.identifies == 0));
    sim.shutdown().await;
}

type RawWs =
    tokio_websockets::WebSocketStream<tokio_websockets::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw_connect(sim: &Simulator) -> RawWs {
    let uri = format!("{}/?v=10&encoding=json", sim.gateway_url());
    let (ws, _) = tokio_websockets::ClientBuilder::new()
        .uri(&uri)
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    ws
}

async fn raw_next(ws: &mut RawWs, deadline: Instant) -> tokio_websockets::Message {
    timeout_at(deadline, ws.next())
        .await
        .expect("deadline")
        .expect("open")
        .expect("frame")
}

async fn raw_send(ws: &mut RawWs, json: serde_json::Value) {
    ws.send(tokio_websockets::Message::text(json.to_string()))
        .await
        .expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_connection_supersedes_older_and_script_never_repeats() {
    let sim = Simulator::start(SimConfig {
        guilds: 10,
        shards: 1,
        messages: 3_000,
        rate: Some(20_000),
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    let identify = serde_json::json!({"op": 2, "d": {"token": format!("Bot {TOKEN}"), "intents": 0,
        "properties": {"os": "linux", "browser": "test", "device": "test"}, "shard": [0, 1]}});

    let mut old = raw_connect(&sim).await;
    let hello: serde_json::Value =
        serde_json::from_str(raw_next(&mut old, deadline).await.as_text().expect("text"))
            .expect("json");
    assert_eq!(hello["op"], 10);
    raw_send(&mut old, serde_json::json!({"op": 1, "d": null})).await;
    let ack: serde_json::Value =
        serde_json::from_str(raw_next(&mut old, deadline).await.as_text().expect("text"))
            .expect("json");
    assert_eq!(ack["op"], 11);
    raw_send(&mut old, identify.clone()).await;
    let mut old_messages = 0;
    while old_messages < 50 {
        let frame = raw_next(&mut old, deadline).await;
        if frame
            .as_text()
            .is_some_and(|t| t.contains(r#""t":"MESSAGE_CREATE""#))
        {
            old_messages += 1;
        }
    }

    let mut new = raw_connect(&sim).await;
    raw_next(&mut new, deadline).await; // HELLO
    raw_send(&mut new, identify).await;
    // The old connection drains what was in flight, then gets close code 4000.
    let code = loop {
        let frame = raw_next(&mut old, deadline).await;
        if let Some((code, _reason)) = frame.as_close() {
            break u16::from(code);
        }
    };
    assert_eq!(code, 4000);
    // Answering the close (polling on) lets the server finish its side.
    while let Ok(Some(Ok(_))) = timeout_at(deadline, old.next()).await {}
    sim.wait_all_sent(Duration::from_secs(10))
        .await
        .expect("all sent on the new connection");
    let record = sim.record();
    let mut script: Vec<u64> = record
        .iter()
        .filter(|d| d.kind == DispatchKind::MessageCreate && !d.replay)
        .filter_map(|d| d.message_id)
        .collect();
    script.sort_unstable();
    assert_eq!(
        script,
        sim.expected().message_ids,
        "every message exactly once over both sessions"
    );
    let sessions: BTreeSet<&str> = record.iter().map(|d| d.session.as_str()).collect();
    assert_eq!(sessions.len(), 2);
    let status = sim.status();
    assert_eq!(status.shards[0].identifies, 2);
    assert!(status.shards[0].connected);

    // An unknown session cannot be resumed: op 9 with d = false.
    let mut third = raw_connect(&sim).await;
    raw_next(&mut third, deadline).await; // HELLO
    raw_send(
        &mut third,
        serde_json::json!({"op": 6, "d": {"token": TOKEN, "session_id": "nope", "seq": 3}}),
    )
    .await;
    let invalid: serde_json::Value = serde_json::from_str(
        raw_next(&mut third, deadline)
            .await
            .as_text()
            .expect("text"),
    )
    .expect("json");
    assert_eq!(
        invalid,
        serde_json::json!({"op": 9, "s": null, "t": null, "d": false})
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_paces_the_script() {
    let sim = Simulator::start(SimConfig {
        guilds: 10,
        shards: 1,
        messages: 300,
        rate: Some(2_000),
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let total = sim.status().shards[0].script_total;
    let started = Instant::now();
    let mut shard = Shard::with_config(ShardId::new(0, 1), builder(&sim, TOKEN).build());
    let mut seen = Seen::default();
    drive(
        &mut shard,
        started + Duration::from_secs(10),
        &mut seen,
        |s| s.messages.len() >= 300,
    )
    .await;
    // At most a burst of 64 tokens runs ahead of 2 000/s.
    let min = Duration::from_millis((total - 64) * 1000 / 2_000);
    assert!(
        started.elapsed() >= min,
        "{total} events in {:?} (< {min:?})",
        started.elapsed()
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_hold_stops_the_stream_exactly_and_moves_on_when_raised() {
    let sim = Simulator::start(SimConfig {
        guilds: 10,
        shards: 1,
        messages: 600,
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let total = sim.status().shards[0].script_total;
    sim.hold_script_at(Some(100));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut shard = Shard::with_config(ShardId::new(0, 1), builder(&sim, TOKEN).build());
    let reader = tokio::spawn(async move {
        let mut seen = Seen::default();
        drive(&mut shard, deadline, &mut seen, |s| s.messages.len() >= 600).await;
        seen
    });
    let at_hold = async |hold: u64| {
        sim.hold_script_at(Some(hold));
        loop {
            let status = sim.status();
            if status.shards[0].script_sent >= hold {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{hold} script events sent: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for hold in [100, 250] {
        let status = at_hold(hold).await;
        // Claimed is counted before a batch is written: at the hold, nothing beyond it.
        assert_eq!(status.script_claimed, hold, "{status:?}");
        assert_eq!(status.shards[0].script_sent, hold, "{status:?}");
        assert!(!status.all_sent);
    }
    sim.hold_script_at(None);
    let seen = reader.await.expect("reader");
    let done = sim.status();
    assert!(done.all_sent, "{done:?}");
    assert_eq!(done.script_claimed, total);
    assert_eq!(seen.messages.len(), 600, "no script event sent twice");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_gateway_bot_and_status() {
    let sim = Simulator::start(SimConfig {
        guilds: 8,
        messages: 10,
        max_concurrency: 4,
        ..SimConfig::default()
    })
    .await
    .expect("start");
    let client = reqwest::Client::new();
    let url = format!("{}/v10/gateway/bot", sim.api_url());
    let ok: serde_json::Value = client
        .get(&url)
        .header("Authorization", format!("Bot {TOKEN}"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(ok["url"], sim.gateway_url());
    assert_eq!(ok["shards"], 4);
    assert_eq!(ok["session_start_limit"]["max_concurrency"], 4);
    assert_eq!(ok["session_start_limit"]["remaining"], 1000);
    for auth in [None, Some("Bot nope"), Some(TOKEN)] {
        let mut request = client.get(&url);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), 401);
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(
            body,
            serde_json::json!({"message": "401: Unauthorized", "code": 0})
        );
    }
    let status: SimStatus = client
        .get(format!("{}/sim/status", sim.api_url()))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(status, sim.status());
    assert_eq!(status.messages_total, 10);
    assert!(!status.all_sent);
    let err = sim
        .wait_all_sent(Duration::from_millis(10))
        .await
        .expect_err("nobody connected");
    assert!(
        matches!(err, SimError::WaitAllSent { sent: 0, .. }),
        "{err}"
    );
    let api = sim.api_url();
    sim.shutdown().await;
    assert!(
        client
            .get(format!("{api}/sim/status"))
            .send()
            .await
            .is_err(),
        "stopped"
    );
}

#[tokio::test]
async fn start_reports_a_taken_address() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = Simulator::start(SimConfig {
        guilds: 4,
        messages: 4,
        gateway_listen: addr,
        ..SimConfig::default()
    })
    .await
    .expect_err("address in use");
    assert!(
        matches!(err, SimError::Bind { addr: a, .. } if a == addr),
        "{err}"
    );
    assert_eq!(err.to_string(), format!("failed to bind {addr}"));
}
