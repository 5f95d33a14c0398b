//! Exactly-once ingest across restarts, crashes and lost disks (DESIGN §5, §6): the real binary
//! killed with SIGKILL at random moments, restarted on the same or on an emptied data dir, hit by
//! every gateway fault the simulator can inject, restarted after its session expired, and closed
//! with a fatal code. Every test ends by comparing the partition files with what the simulator
//! sent: every message stored exactly once, every guild as the simulator's world has it.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use shardlite::node::NodeStatus;
use shardlite::node::shard::ShardPhase;
use shardlite::ownership::{PartitionId, Topology};
use shardlite::simulator::{DispatchKind, Expected, Fault, SimConfig, SimError, Simulator};
use shardlite::store::PartitionStore;
use shardlite::verify::{Verification, verify};

use crate::harness::{
    NodeProcess, NodeSpec, hold_stream, process_exited, script_sent, script_total, seed,
    shard_applied, stream_past, wait_for,
};
use crate::s3;

/// Verifies the files under `data_dir` off the async threads.
async fn verify_files(data_dir: &Path, topology: Topology, expected: Expected) -> Verification {
    let data_dir = data_dir.to_owned();
    tokio::task::spawn_blocking(move || verify(&data_dir, topology, &expected))
        .await
        .unwrap()
        .unwrap()
}

/// Asserts an exact verification with `messages` stored, showing the first discrepancies.
fn assert_exact(v: &Verification, messages: u64) {
    assert_eq!(
        (v.missing, v.duplicates, v.unexpected, v.misplaced_guilds),
        (0, 0, 0, 0),
        "missing/duplicates/unexpected/misplaced; missing examples {:?}; {v:?}",
        v.missing_examples
    );
    assert!(
        v.guild_mismatches.is_empty(),
        "{} guild mismatches, first: {:?}",
        v.guild_mismatches.len(),
        &v.guild_mismatches[..v.guild_mismatches.len().min(3)]
    );
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, messages, "{v:?}");
    assert_eq!(v.totals.message_stats_total, messages, "{v:?}");
}

/// The stderr a node wrote since `from` bytes (the log file is appended to by every run).
fn stderr_since(dir: &Path, from: usize) -> String {
    let text = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    text.get(from..).unwrap_or_default().to_owned()
}

fn stderr_len(dir: &Path) -> usize {
    std::fs::metadata(dir.join("stderr.log")).map_or(0, |m| m.len() as usize)
}

/// Waits until the simulator sent every script event. Fails when the scripts stop advancing for
/// 15 s (or after 120 s in all), with both sides' status: which shard stalled, what its
/// partitions committed, and `context` (what the test already knows went wrong).
async fn wait_all_sent(sim: &Simulator, node: &NodeProcess, context: &str) {
    let sent = |s: &shardlite::simulator::SimStatus| -> u64 {
        s.shards.iter().map(|s| s.script_sent).sum()
    };
    let mut last = (sent(&sim.status()), Instant::now());
    wait_for(
        "the simulator to send every script event",
        Duration::from_secs(120),
        async || {
            let status = sim.status();
            if status.all_sent {
                return Some(());
            }
            let now = sent(&status);
            if now != last.0 {
                last = (now, Instant::now());
            }
            if last.1.elapsed() > Duration::from_secs(15) {
                let node_status = node.readyz().await;
                panic!(
                    "the scripts stopped advancing at {now} events sent; {context}\n\
                     simulator: {status:#?}\nnode /readyz: {node_status:#?}"
                );
            }
            None
        },
    )
    .await;
}

/// Applies `fault` to `shard` once the node runs it `active` and the simulator sees it connected
/// (a shard still reconnecting from an earlier fault has no connection to inject into).
async fn inject_when_active(sim: &Simulator, node: &NodeProcess, shard: u32, fault: Fault) {
    wait_for(
        &format!("shard {shard} to be active before {fault:?}"),
        Duration::from_secs(30),
        async || {
            let status = node.status().await?;
            let active = shard_phase(&status, shard) == Some(ShardPhase::Active);
            (active && sim.status().shards[shard as usize].connected).then_some(())
        },
    )
    .await;
    wait_for(
        &format!("{fault:?} to be injected on shard {shard}"),
        Duration::from_secs(30),
        async || match sim.inject(shard, fault.clone()).await {
            Ok(()) => Some(()),
            // The connection ended between the check and the injection: try the next one.
            Err(SimError::NoConnection { .. }) => None,
            Err(e) => panic!("inject {fault:?} on shard {shard}: {e}"),
        },
    )
    .await;
}

fn shard_phase(status: &NodeStatus, shard: u32) -> Option<ShardPhase> {
    status
        .groups
        .iter()
        .find(|g| g.shard == shard)?
        .shard_status
        .as_ref()
        .map(|s| s.phase)
}

/// (a) Twenty crashes at random moments during ingest; every restart resumes the sessions from
/// what the files committed, and nothing is lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_campaign_loses_nothing_and_identifies_once() {
    const KILLS: usize = 20;
    const MESSAGES: u64 = 200_000;
    const RATE: u32 = 8_000;
    // Script events streamed before each kill: 200–800 ms of the paced stream, so the crash
    // lands anywhere in the apply path; the slack (250 ms) keeps the stream flowing at the kill.
    const STEP: std::ops::RangeInclusive<u64> = RATE as u64 / 5..=RATE as u64 * 4 / 5;
    const SLACK: u64 = RATE as u64 / 4;
    // The precondition "every kill lands during ingest" holds by construction.
    const _: () = assert!(KILLS as u64 * (*STEP.end() + SLACK) < MESSAGES);
    let mut rng = fastrand::Rng::with_seed(seed(0x5eed_0007));
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 500,
        shards: 4,
        messages: MESSAGES,
        rate: Some(RATE),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 4,
        partitions: 16,
        ..NodeSpec::default()
    };
    let started = Instant::now();
    for kill in 1..=KILLS {
        hold_stream(&sim);
        let node = NodeProcess::start(dir.path(), &sim, &spec).await;
        let step = rng.u64(STEP);
        stream_past(&sim, step, SLACK).await;
        let sent = sim.status().messages_sent;
        let exit = node.kill9().await;
        assert_eq!(exit.signal(), Some(9), "kill {kill}: died of SIGKILL");
        println!("kill {kill:2}: after {step:4} script events, {sent:6} messages sent");
    }
    let sent_during_campaign = sim.status().messages_sent;
    assert!(
        sent_during_campaign < MESSAGES,
        "the stream outlasted the campaign ({sent_during_campaign} of {MESSAGES} sent)"
    );
    assert!(
        sent_during_campaign > MESSAGES / 4,
        "the campaign ingested a fair part of the stream ({sent_during_campaign})"
    );
    println!(
        "campaign: {KILLS} kills in {:.1?}, {sent_during_campaign} messages sent",
        started.elapsed()
    );

    sim.hold_script_at(None);
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_all_sent(&sim, &node, "").await;
    node.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let data_dir = node.data_dir.clone();
    let exit = node.stop().await;
    assert!(exit.success(), "graceful stop exits 0, got {exit}");

    let shards = sim.status().shards;
    println!("simulator shards: {shards:#?}");
    for s in &shards {
        assert_eq!(
            s.identifies, 1,
            "shard {} identified once, every restart resumed: {s:?}",
            s.shard
        );
        assert!(
            s.resumes >= KILLS as u32,
            "shard {} resumed after each of the {KILLS} kills: {s:?}",
            s.shard
        );
        assert_eq!(s.resumes_refused, 0, "{s:?}");
    }
    let v = verify_files(&data_dir, Topology::new(4, 16, 1).unwrap(), sim.expected()).await;
    assert_exact(&v, MESSAGES);
    assert_eq!(v.totals.guilds, 500);
}

/// (b) Crashes with replication, and every other restart on a new machine (empty data dir): the
/// files come back from the replica and the session resumes from the restored sequence. The
/// crash lands after 200–1000 ms worth of stream past the moment the node is ready, whether or
/// not Litestream uploaded anything.
/// Measured with Litestream 0.5.17: its first upload comes about 1 s after it starts (every
/// restart starts it anew), and the orphan of a killed node logs "shutdown sync skipped,
/// interrupted by signal" — so the node itself makes each new session durable on the replica
/// before applying it (`node::shard::SessionSync`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_lost_data_dir_restores_from_the_replica() {
    lost_disk_campaign("kill9-lost-disk", 0x5eed_00b7, false, 20, 200_000, 4_000).await;
}

/// (b') As (b), but each crash comes only after the replica moved past the moment the node was
/// ready (a new object for every partition), so a lost disk always finds a replica, usually one
/// older than the local files: the shard resumes from the restored, older sequence and the
/// replay fills the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_an_upload_with_lost_data_dir_resumes_from_the_restored_sequence() {
    // Slower: the waits for uploads lengthen the campaign, which must still end mid-stream.
    lost_disk_campaign("kill9-lost-disk-up", 0x5eed_00b8, true, 6, 60_000, 3_000).await;
}

/// Per shard, the `(session, applied_seq)` a restart would resume from: the minimum over the
/// shard's partition files (None if any partition has no session).
fn local_resume_points(data_dir: &Path, topology: Topology) -> Vec<Option<(String, u64)>> {
    (0..topology.shards())
        .map(|shard| {
            let mut point: Option<(String, u64)> = None;
            for p in topology.partitions_of_shard(shard) {
                let path = PartitionStore::path_in(data_dir, p);
                let store = PartitionStore::open_read_only(&path, p).ok()?;
                let s = store.applied_session(shard, topology.shards()).ok()??;
                point = Some(match point {
                    Some((id, seq)) if id == s.session_id => (id, seq.min(s.applied_seq)),
                    Some(_) => return None,
                    None => (s.session_id, s.applied_seq),
                });
            }
            point
        })
        .collect()
}

/// `shard=N … seq=K` of each "resuming session" line in `log`, by shard.
fn resumed_at(log: &str) -> Vec<(u32, u64)> {
    let field = |line: &str, key: &str| -> Option<u64> {
        let rest = line.split(&format!(" {key}=")).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    log.lines()
        .filter(|l| l.contains("resuming session"))
        .filter_map(|l| Some((field(l, "shard")? as u32, field(l, "seq")?)))
        .collect()
}

async fn lost_disk_campaign(
    name: &str,
    default_seed: u64,
    wait_for_upload: bool,
    kills: usize,
    messages: u64,
    rate: u32,
) {
    const SHARDS: u32 = 4;
    const PARTITIONS: u32 = 8;
    let rate_per_sec = u64::from(rate);
    // Script events streamed before each kill: 200–1000 ms of the paced stream, so the crash
    // lands anywhere in the apply path; the slack keeps the stream flowing at the kill.
    let steps = rate_per_sec / 5..=rate_per_sec;
    let slack = rate_per_sec / 2;
    // Before an upload is awaited, half a second of stream gives every partition new writes.
    let feed = if wait_for_upload { rate_per_sec / 2 } else { 0 };
    // The precondition "every kill lands during ingest" holds by construction.
    assert!(
        kills as u64 * (feed + steps.end() + slack) < messages,
        "test sizes: {kills} kills must not be able to use up {messages} messages"
    );
    let mut rng = fastrand::Rng::with_seed(seed(default_seed));
    let dir = tempfile::tempdir().unwrap();
    let bucket = s3::bucket(name).await;
    let topology = Topology::new(SHARDS, PARTITIONS, 1).unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 500,
        shards: SHARDS,
        messages,
        rate: Some(rate),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: SHARDS,
        partitions: PARTITIONS,
        extra_toml: s3::replication_toml(&bucket, s3::endpoint(), 60),
        ..NodeSpec::default()
    };
    let data_dir = dir.path().join("data");
    // Per lost disk: what the local files would have resumed from (for the report).
    let mut lost_local: Option<Vec<Option<(String, u64)>>> = None;
    // Lost-disk restarts whose partitions were not all restored, with the log that says why.
    let mut restore_problems: Vec<String> = Vec::new();
    for start in 1..=kills + 1 {
        hold_stream(&sim);
        let log_from = stderr_len(dir.path());
        let node = NodeProcess::start(dir.path(), &sim, &spec).await;
        let log = stderr_since(dir.path(), log_from);
        if let Some(local) = lost_local.take() {
            let restored = log.matches("decision=Restored").count();
            println!(
                "start {start} on an empty data dir: {restored} of {PARTITIONS} partitions \
                 restored; local files had {local:?}, resumed at (shard, seq) {:?}",
                resumed_at(&log)
            );
            if restored != PARTITIONS as usize {
                let decisions: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("decision=") || l.contains("identifying"))
                    .collect();
                restore_problems.push(format!(
                    "start {start}: {restored} of {PARTITIONS} partitions restored:\n{}",
                    decisions.join("\n")
                ));
            }
        }
        if start > kills {
            // The last start: run to the end.
            let context = format!("lost disks not restored: {restore_problems:#?}");
            sim.hold_script_at(None);
            wait_all_sent(&sim, &node, &context).await;
            node.wait_caught_up(&sim, Duration::from_secs(60)).await;
            let exit = node.stop().await;
            assert!(exit.success(), "graceful stop exits 0, got {exit}");
            break;
        }
        let litestream_pid = wait_for(
            "the litestream child's pid in /readyz",
            Duration::from_secs(30),
            async || node.litestream_pid().await,
        )
        .await;
        if wait_for_upload {
            let mut at_ready = Vec::new();
            for p in 0..PARTITIONS {
                at_ready.push(
                    s3::replica_keys(&bucket, p)
                        .await
                        .expect("list the replica"),
                );
            }
            sim.hold_script_at(Some(sim.status().script_claimed + feed));
            wait_for(
                "a new replica object of every partition",
                Duration::from_secs(30),
                async || {
                    for (p, before) in at_ready.iter().enumerate() {
                        if s3::replica_keys(&bucket, p as u32)
                            .await
                            .expect("list the replica")
                            .is_subset(before)
                        {
                            return None;
                        }
                    }
                    Some(())
                },
            )
            .await;
        }
        // A session is durable on the replica only once its start was synced (before any of
        // its dispatches apply); a crash before that would lose it with the disk, by design.
        node.wait_sessions_applied(&sim, Duration::from_secs(60))
            .await;
        let step = rng.u64(steps.clone());
        stream_past(&sim, step, slack).await;
        let sent = sim.status().messages_sent;
        let exit = node.kill9().await;
        assert_eq!(exit.signal(), Some(9), "kill {start}: died of SIGKILL");
        assert!(sent < messages, "kill {start} landed during ingest");
        // The orphaned Litestream gets SIGTERM (parent-death signal) and makes its final sync.
        // Only once it is gone is the old machine gone: before that it may still upload.
        wait_for(
            &format!("the old litestream (pid {litestream_pid}) to exit"),
            Duration::from_secs(40),
            async || process_exited(litestream_pid).then_some(()),
        )
        .await;
        let lose_disk = start % 2 == 1;
        println!(
            "kill {start}: after {step:4} script events, {sent:6} messages sent; data dir {}",
            if lose_disk { "deleted" } else { "kept" }
        );
        if lose_disk {
            lost_local = Some(local_resume_points(&data_dir, topology));
            std::fs::remove_dir_all(&data_dir).unwrap();
        }
    }

    let shards = sim.status().shards;
    for s in &shards {
        println!(
            "shard {}: identifies {}, resumes {}, refused {}",
            s.shard, s.identifies, s.resumes, s.resumes_refused
        );
    }
    let v = verify_files(&data_dir, topology, sim.expected()).await;
    assert!(
        v.is_exact() && restore_problems.is_empty(),
        "{} missing, {} duplicates, {} unexpected, {} guild mismatches (of {messages} \
         messages, {} stored); lost disks not restored: {restore_problems:#?}",
        v.missing,
        v.duplicates,
        v.unexpected,
        v.guild_mismatches.len(),
        v.stored_messages
    );
    assert_exact(&v, messages);
    assert_eq!(v.totals.guilds, 500);
    for s in &shards {
        // Every restored replica held the session (synced before its dispatches applied):
        // every restart resumed it.
        assert_eq!(s.identifies, 1, "{s:?}");
        assert!(s.resumes >= kills as u32, "{s:?}");
    }
}

/// (c) Every fault kind once during ingest; the node recovers from each, and the counts of
/// identifies and resumes per shard are the ones the faults call for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_injected_fault_is_recovered_exactly_once() {
    const MESSAGES: u64 = 60_000;
    const SHARDS: u32 = 4;
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 200,
        shards: SHARDS,
        messages: MESSAGES,
        rate: Some(5_000),
        // twilight notices a zombie connection only when nothing arrives between two heartbeats.
        heartbeat_interval_ms: 500,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: SHARDS,
        partitions: 16,
        ..NodeSpec::default()
    };
    // Every fault must land during ingest, however long recovering from the previous one
    // takes: the stream holds at 70 % (the last fault comes at 45 %) until all were injected.
    sim.hold_script_at(Some(script_total(&sim) * 7 / 10));
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    // Fault i goes to shard i % 4, after (10 + 5 i) % of the messages were sent.
    let faults = [
        Fault::DropConnection,
        // Stalled until twilight notices the zombie and resumes on a new connection (which
        // supersedes this one): a short stall could end before a backpressured shard even
        // sends the heartbeat that finds it out.
        Fault::StopAcks { millis: 60_000 },
        Fault::Reconnect,
        Fault::InvalidSession { resumable: true },
        Fault::InvalidSession { resumable: false },
        Fault::Close { code: 4000 },
        Fault::Close { code: 4009 },
        Fault::Malformed,
    ];
    for (i, fault) in faults.iter().enumerate() {
        let shard = i as u32 % SHARDS;
        let target = MESSAGES * (10 + 5 * i as u64) / 100;
        wait_for(
            &format!("{target} messages sent before {fault:?}"),
            Duration::from_secs(60),
            async || (sim.status().messages_sent >= target).then_some(()),
        )
        .await;
        let resumes_before = sim.status().shards[shard as usize].resumes;
        inject_when_active(&sim, &node, shard, fault.clone()).await;
        println!(
            "injected {fault:?} on shard {shard} at {} messages sent",
            sim.status().messages_sent
        );
        if matches!(fault, Fault::StopAcks { .. }) {
            wait_for(
                &format!("shard {shard} to resume after {fault:?}"),
                Duration::from_secs(90),
                async || {
                    (sim.status().shards[shard as usize].resumes > resumes_before).then_some(())
                },
            )
            .await;
        }
    }
    assert!(
        sim.status().messages_sent < MESSAGES,
        "every fault landed during ingest"
    );
    sim.hold_script_at(None);
    wait_all_sent(&sim, &node, "").await;
    let status = wait_for(
        "every shard active again (/readyz 200)",
        Duration::from_secs(60),
        async || {
            let (code, status) = node.readyz().await?;
            let all_active =
                (0..SHARDS).all(|s| shard_phase(&status, s) == Some(ShardPhase::Active));
            (code == 200 && status.ready && all_active).then_some(status)
        },
    )
    .await;
    node.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let stderr = node.stderr_text();
    let data_dir = node.data_dir.clone();
    let exit = node.stop().await;
    assert!(exit.success(), "graceful stop exits 0, got {exit}");

    let shards = sim.status().shards;
    println!("simulator shards: {shards:#?}");
    // (identifies, minimum resumes, minimum refused resumes) the faults call for, per shard:
    // 0: DropConnection → resume; InvalidSession(false) → identify.
    // 1: StopAcks → resume; Close 4000 → resume.
    // 2: Reconnect → resume; Close 4009 → session discarded, RESUME refused, identify.
    // 3: InvalidSession(true) → resume; Malformed → nothing (skipped frame).
    let want = [(2, 1, 0), (1, 2, 0), (2, 1, 1), (1, 1, 0)];
    for (s, (identifies, resumes, refused)) in shards.iter().zip(want) {
        assert_eq!(s.identifies, identifies, "shard {}: {s:?}", s.shard);
        assert!(s.resumes >= resumes, "shard {}: {s:?}", s.shard);
        assert!(s.resumes_refused >= refused, "shard {}: {s:?}", s.shard);
        assert!(
            s.connections >= 1 + resumes + refused,
            "shard {}: a connection per recovery: {s:?}",
            s.shard
        );
    }
    // The node counted the same identifies (READY) in each group that never restarted.
    for g in &status.groups {
        let sim_shard = &shards[g.shard as usize];
        let node_shard = g.shard_status.as_ref().unwrap();
        println!(
            "node shard {}: identifies {}, resumes {}, group restarts {}",
            g.shard, node_shard.identifies, node_shard.resumes, g.restarts
        );
        if g.restarts == 0 {
            assert_eq!(node_shard.identifies, sim_shard.identifies, "{g:?}");
        }
    }
    assert!(
        stderr.contains("malformed gateway frame skipped"),
        "the malformed frame was noticed: {stderr}"
    );
    let redelivered = sim.record().iter().filter(|d| d.redelivery).count();
    println!("redelivered dispatches after the identifies: {redelivered}");
    let v = verify_files(
        &data_dir,
        Topology::new(SHARDS, 16, 1).unwrap(),
        sim.expected(),
    )
    .await;
    assert_exact(&v, MESSAGES);
}

/// (d) A session that expired while the node was down (graceful stop): the RESUME is refused,
/// the shard identifies again, GUILD_CREATE refreshes the cached guilds, and redelivered messages
/// (if any) are not stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_outside_the_window_identifies_again_and_refreshes_state() {
    expired_session_scenario(false).await;
}

/// (d') As (d) after a SIGKILL: the partitions' applied sequences lag what the simulator sent,
/// so the identify after the refused RESUME redelivers messages of which some are already stored
/// (under the old session): each is stored and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_outside_the_window_redelivers_and_stores_each_message_once() {
    expired_session_scenario(true).await;
}

async fn expired_session_scenario(crash: bool) {
    const MESSAGES: u64 = 20_000;
    const SHARDS: u32 = 2;
    const PARTITIONS: u32 = 8;
    const WINDOW: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 200,
        shards: SHARDS,
        messages: MESSAGES,
        rate: Some(5_000),
        resume_window: Some(WINDOW),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: SHARDS,
        partitions: PARTITIONS,
        ..NodeSpec::default()
    };
    // The stream stops at a third of the script, so the first process always ends mid-stream,
    // however long stopping it takes; after a quarter it is still flowing when it ends.
    let total = script_total(&sim);
    sim.hold_script_at(Some(total / 3));
    let first = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_for(
        "a quarter of the script",
        Duration::from_secs(60),
        async || (script_sent(&sim) >= total / 4).then_some(()),
    )
    .await;
    if crash {
        let exit = first.kill9().await;
        assert_eq!(exit.signal(), Some(9), "died of SIGKILL");
    } else {
        let exit = first.stop().await;
        assert!(exit.success(), "graceful stop exits 0, got {exit}");
    }
    // The simulator sees the connections end (a crash: the kernel closes the sockets).
    let stopped = wait_for(
        "the simulator to see every shard disconnected",
        Duration::from_secs(10),
        async || {
            let s = sim.status();
            s.shards.iter().all(|s| !s.connected).then_some(s)
        },
    )
    .await;
    assert!(stopped.messages_sent < MESSAGES, "stopped mid-stream");
    // The simulator has no "session expired" status to poll: expiry is a function of time since
    // the last connection ended (which happened before the process exited). Waiting out the
    // window plus a margin is the condition itself, not a guess at how long something takes.
    tokio::time::sleep(WINDOW + Duration::from_millis(500)).await;

    sim.hold_script_at(None);
    let second = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_all_sent(&sim, &second, "").await;
    second.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let data_dir = second.data_dir.clone();
    let exit = second.stop().await;
    assert!(exit.success(), "graceful stop exits 0, got {exit}");

    let shards = sim.status().shards;
    println!("simulator shards: {shards:#?}");
    for s in &shards {
        assert_eq!(s.resumes_refused, 1, "the expired session's RESUME: {s:?}");
        assert_eq!(s.identifies, 2, "identified again after the refusal: {s:?}");
        assert_eq!(s.resumes, 0, "{s:?}");
    }
    let redelivered = sim.record().iter().filter(|d| d.redelivery).count();
    println!("redelivered dispatches of the expired sessions: {redelivered}");
    if crash {
        assert!(
            redelivered > 0,
            "the crash left sent but uncommitted dispatches to redeliver"
        );
    }

    let mut guilds = 0;
    let mut stale: Vec<u64> = Vec::new();
    let mut unavailable: Vec<u64> = Vec::new();
    for p in 0..PARTITIONS {
        let path = PartitionStore::path_in(&data_dir, PartitionId(p));
        let store = PartitionStore::open_read_only(&path, PartitionId(p)).unwrap();
        for g in store.guild_counts().unwrap() {
            guilds += 1;
            if g.stale {
                stale.push(g.guild_id);
            }
            if g.unavailable {
                unavailable.push(g.guild_id);
            }
        }
    }
    assert_eq!(guilds, 200);
    assert!(
        stale.is_empty(),
        "GUILD_CREATE of the new session refreshed every guild; still stale: {} (first {:?})",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    assert!(
        unavailable.is_empty(),
        "every guild was in the new session; unavailable: {} (first {:?})",
        unavailable.len(),
        &unavailable[..unavailable.len().min(5)]
    );
    let v = verify_files(
        &data_dir,
        Topology::new(SHARDS, PARTITIONS, 1).unwrap(),
        sim.expected(),
    )
    .await;
    assert_exact(&v, MESSAGES);
}

/// (e) A fatal close code (4004, authentication failed) stops that shard for good and shows in
/// /readyz; the other shards keep ingesting exactly once, and the node still stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_close_code_stops_the_shard_and_shows_in_readyz() {
    const MESSAGES: u64 = 40_000;
    const SHARDS: u32 = 4;
    const PARTITIONS: u32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 200,
        shards: SHARDS,
        messages: MESSAGES,
        rate: Some(5_000),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: SHARDS,
        partitions: PARTITIONS,
        ..NodeSpec::default()
    };
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_for(
        "a tenth of the messages",
        Duration::from_secs(60),
        async || (sim.status().messages_sent >= MESSAGES / 10).then_some(()),
    )
    .await;
    inject_when_active(&sim, &node, 0, Fault::Close { code: 4004 }).await;
    let (code, status) = wait_for(
        "/readyz to report the fatal close",
        Duration::from_secs(30),
        async || {
            let (code, status) = node.readyz().await?;
            let g0 = status.groups.iter().find(|g| g.shard == 0)?;
            (g0.fatal_close_code.is_some()).then_some((code, status))
        },
    )
    .await;
    assert_eq!(
        code, 503,
        "not ready with a fatally closed shard: {status:?}"
    );
    assert!(!status.ready, "{status:?}");
    let g0 = status.groups.iter().find(|g| g.shard == 0).unwrap();
    assert_eq!(g0.fatal_close_code, Some(4004), "{g0:?}");
    assert!(
        g0.shard_status
            .as_ref()
            .is_none_or(|s| s.phase == ShardPhase::FatallyClosed),
        "{g0:?}"
    );

    // The other shards' scripts run to the end and are committed.
    wait_for(
        "shards 1–3 to send their whole script",
        Duration::from_secs(120),
        async || {
            let s = sim.status();
            s.shards[1..]
                .iter()
                .all(|s| s.script_sent == s.script_total)
                .then_some(())
        },
    )
    .await;
    wait_for(
        "shards 1–3 to commit every dispatch",
        Duration::from_secs(60),
        async || {
            let (_, status) = node.readyz().await?;
            let sim = sim.status();
            sim.shards[1..]
                .iter()
                .all(|s| shard_applied(&status, s, s.last_seq))
                .then_some(())
        },
    )
    .await;
    let (code, status) = node.readyz().await.unwrap();
    assert_eq!(code, 503, "still not ready: {status:?}");
    assert_eq!(
        status
            .groups
            .iter()
            .find(|g| g.shard == 0)
            .unwrap()
            .fatal_close_code,
        Some(4004)
    );
    let stderr = node.stderr_text();
    let data_dir = node.data_dir.clone();
    let exit = node.stop().await;
    assert!(
        exit.success(),
        "graceful stop exits 0, got {exit}\n{stderr}"
    );

    let sim_status = sim.status();
    println!("simulator shards: {:#?}", sim_status.shards);
    let s0 = &sim_status.shards[0];
    assert!(s0.script_sent < s0.script_total, "shard 0 stopped: {s0:?}");
    assert_eq!(
        (s0.identifies, s0.resumes, s0.connections),
        (1, 0, 1),
        "no retry after a fatal close: {s0:?}"
    );

    // Exactly once for shards 1–3: their expected world, their message ids (all sent).
    let record = sim.record();
    let ids_of = |keep: &dyn Fn(u32) -> bool| -> BTreeSet<u64> {
        record
            .iter()
            .filter(|d| d.kind == DispatchKind::MessageCreate && keep(d.shard))
            .filter_map(|d| d.message_id)
            .collect()
    };
    let others = ids_of(&|s| s != 0);
    let shard0 = ids_of(&|s| s == 0);
    let full = sim.expected();
    let expected = Expected {
        guilds: full
            .guilds
            .iter()
            .filter(|(_, g)| g.shard != 0)
            .map(|(id, g)| (*id, g.clone()))
            .collect(),
        message_ids: others.iter().copied().collect(),
    };
    let shard0_total = full.message_ids.len() - others.len();
    let v = verify_files(
        &data_dir,
        Topology::new(SHARDS, PARTITIONS, 1).unwrap(),
        expected,
    )
    .await;
    println!(
        "shard 0: {} of {shard0_total} messages sent before the close; {} stored",
        shard0.len(),
        v.unexpected
    );
    assert_eq!(
        (v.missing, v.duplicates, v.misplaced_guilds),
        (0, 0, 0),
        "{v:?}"
    );
    assert!(v.guild_mismatches.is_empty(), "{:?}", v.guild_mismatches);
    // What is not expected of shards 1–3 is shard 0's messages from before the close.
    assert!(
        v.unexpected <= shard0.len() as u64,
        "only shard 0's sent messages besides: {v:?}"
    );
    assert_eq!(v.stored_messages, others.len() as u64 + v.unexpected);
}
