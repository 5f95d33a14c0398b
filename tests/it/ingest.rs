//! `shardlite run` against the simulator: every message stored exactly once, every guild's
//! entities as the simulator's world has them.

use std::time::Duration;

use shardlite::ownership::Topology;
use shardlite::simulator::{SimConfig, Simulator};
use shardlite::verify::verify;

use crate::harness::{NodeProcess, NodeSpec, script_sent, script_total};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stores_every_message_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 2_000,
        shards: 4,
        messages: 100_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 4,
        partitions: 64,
        ..NodeSpec::default()
    };
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    sim.wait_all_sent(Duration::from_secs(300)).await.unwrap();
    node.wait_caught_up(&sim, Duration::from_secs(120)).await;
    let status = sim.status();
    assert!(
        status.shards.iter().all(|s| s.identifies == 1),
        "one identify per shard: {status:?}"
    );
    let data_dir = node.data_dir.clone();
    let exit = node.stop().await;
    assert!(exit.success(), "graceful stop exits 0, got {exit}");

    let expected = sim.expected();
    assert_eq!(expected.message_ids.len(), 100_000);
    let topology = Topology::new(4, 64, 1).unwrap();
    let v = verify(&data_dir, topology, &expected).unwrap();
    assert_eq!(v.stored_messages, 100_000);
    assert_eq!((v.missing, v.duplicates, v.unexpected), (0, 0, 0), "{v:?}");
    assert_eq!(v.misplaced_guilds, 0);
    assert!(
        v.guild_mismatches.is_empty(),
        "first mismatches: {:?}",
        &v.guild_mismatches[..v.guild_mismatches.len().min(3)]
    );
    assert_eq!(v.totals.guilds, 2_000);
    assert_eq!(v.totals.message_stats_total, 100_000);
    for p in 0..64 {
        let path = data_dir.join(format!("partitions/p{p:04}.sqlite3"));
        assert!(path.exists(), "{} exists", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_dispatches_are_kept_as_dead_letters_and_everything_else_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 100,
        shards: 2,
        messages: 4_000,
        inject_malformed: true,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let node = NodeProcess::start(
        dir.path(),
        &sim,
        &NodeSpec {
            shards: 2,
            partitions: 8,
            ..NodeSpec::default()
        },
    )
    .await;
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    node.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let malformed = sim.record().iter().filter(|d| d.malformed).count();
    assert_eq!(
        malformed,
        2 * 2,
        "two malformed dispatches with a seq per shard were sent"
    );
    let metrics = node.metrics().await;
    for shard in 0..2 {
        for line in [
            format!("shardlite_identifies_total{{shard=\"{shard}\"}} 1"),
            format!("shardlite_malformed_frames_total{{shard=\"{shard}\"}} 2"),
            // The unknown event type and the undecodable GUILD_MEMBER_ADD; the broken JSON has no
            // sequence to keep it by.
            format!("shardlite_dead_letters_total{{shard=\"{shard}\"}} 2"),
            format!("shardlite_shard_up{{shard=\"{shard}\"}} 1"),
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
    }
    // Caught up: every partition's applied sequence equals its shard's last sequence.
    let lags: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("shardlite_partition_applied_seq_lag{"))
        .collect();
    assert_eq!(lags.len(), 8, "{metrics}");
    assert!(lags.iter().all(|l| l.ends_with(" 0")), "{lags:?}");
    let data_dir = node.data_dir.clone();
    let stderr_before_stop = node.stderr_text();
    let exit = node.stop().await;
    assert!(exit.success(), "exit {exit}");

    let v = verify(&data_dir, Topology::new(2, 8, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, 4_000);
    // Nothing delivered with a sequence was lost: both bad dispatches of each shard are kept as
    // received, with why they were not applied.
    assert_eq!(v.totals.dead_letters, 2 * 2, "{v:?}");
    let mut letters = Vec::new();
    for p in 0..8 {
        let conn = rusqlite::Connection::open(data_dir.join(format!("partitions/p{p:04}.sqlite3")))
            .unwrap();
        let mut st = conn
            .prepare("SELECT kind, error, payload FROM dead_letters")
            .unwrap();
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .unwrap();
        letters.extend(rows.map(Result::unwrap));
    }
    letters.sort();
    let kinds: Vec<&str> = letters.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "GUILD_MEMBER_ADD",
            "GUILD_MEMBER_ADD",
            "SHARDLITE_UNKNOWN_EVENT",
            "SHARDLITE_UNKNOWN_EVENT"
        ]
    );
    assert!(letters[0].1.contains("guild_id"), "{letters:?}");
    assert!(letters[3].2.starts_with(r#"{"op":0"#), "{letters:?}");
    // Each kind of bad input was noticed and named in the log, once per shard.
    assert_eq!(
        stderr_before_stop
            .matches("malformed gateway frame skipped")
            .count(),
        2,
        "{stderr_before_stop}"
    );
    assert_eq!(
        stderr_before_stop
            .matches("malformed dispatch kept as a dead letter")
            .count(),
        2,
        "{stderr_before_stop}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_process_resumes_its_sessions_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 200,
        shards: 2,
        messages: 30_000,
        rate: Some(15_000),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 2,
        partitions: 16,
        ..NodeSpec::default()
    };
    // The first process stops mid-stream however long its stop takes: the stream holds at half
    // the script, and the stop starts once a third was sent.
    let total = script_total(&sim);
    sim.hold_script_at(Some(total / 2));
    let first = NodeProcess::start(dir.path(), &sim, &spec).await;
    crate::harness::wait_for(
        "a third of the script",
        Duration::from_secs(60),
        async || (script_sent(&sim) >= total / 3).then_some(()),
    )
    .await;
    assert!(first.stop().await.success());
    assert!(sim.status().messages_sent < 30_000, "stopped mid-stream");

    sim.hold_script_at(None);
    let second = NodeProcess::start(dir.path(), &sim, &spec).await;
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    second.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let data_dir = second.data_dir.clone();
    assert!(second.stop().await.success());

    for s in sim.status().shards {
        assert_eq!(
            s.identifies, 1,
            "shard {} resumed instead of identifying again",
            s.shard
        );
        assert!(s.resumes >= 1, "shard {} resumed: {s:?}", s.shard);
    }
    let v = verify(&data_dir, Topology::new(2, 16, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, 30_000);
}
