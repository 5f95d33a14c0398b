//! Supervision with a real failure: a partition whose file can no longer be written fails, its
//! shard group restarts (one-for-all) with backoff until the file is writable again, and the
//! shard resumes from what the partitions committed — nothing lost, nothing applied twice. A file
//! lost meanwhile is restored from its replica before the group reopens it.

use std::time::Duration;

use shardlite::ownership::Topology;
use shardlite::simulator::{SimConfig, Simulator};
use shardlite::verify::verify;

use crate::harness::{NodeProcess, NodeSpec, hold_stream_after, script_total, wait_for};
use crate::s3;

fn chattr(flag: &str, path: &std::path::Path) {
    let status = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chattr {flag} {}", path.display());
}

/// Loses p0001 (shard 1 of 2) while the node runs, where the group's restart will find it
/// missing: an immutable WAL fails p0001's next commit and so its group; once that failure is
/// logged (the restart is a backoff of seconds away), the flag is lifted and the file, WAL and
/// shm are deleted.
async fn lose_p0001_inside_a_group_failure(node: &NodeProcess, sim: &Simulator) {
    let partitions = node.data_dir.join("partitions");
    let wal = partitions.join("p0001.sqlite3-wal");
    chattr("+i", &wal);
    // The failure needs a commit to p0001, so the stream must move (an eighth of the script is
    // plenty), but not run out before the test checks that the loss came during ingest.
    hold_stream_after(sim, script_total(sim) / 8);
    wait_for(
        "the failure of shard group 1",
        Duration::from_secs(30),
        async || {
            node.stderr_text()
                .contains("shard group child failed; restarting the group shard=1")
                .then_some(())
        },
    )
    .await;
    // The database file goes first, while the immutable WAL still fails any reopen: a group
    // restart that came early cannot open (and keep) the file the test is about to lose.
    for suffix in ["", "-shm"] {
        remove_if_exists(&partitions.join(format!("p0001.sqlite3{suffix}")));
    }
    chattr("-i", &wal);
    remove_if_exists(&wal);
}

fn remove_if_exists(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", path.display()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_partition_restarts_its_group_which_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 100,
        shards: 2,
        messages: 20_000,
        rate: Some(5_000),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 2,
        partitions: 8,
        extra_toml: "[supervision]\nmax_restarts = 50\n".into(),
        ..NodeSpec::default()
    };
    // The failure must come during ingest: the stream never passes three quarters before it.
    sim.hold_script_at(Some(script_total(&sim) * 3 / 4));
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_for("some progress", Duration::from_secs(30), async || {
        (sim.status().messages_sent > 2_000).then_some(())
    })
    .await;
    // p0001 lies on shard 1. An immutable WAL refuses writes even to root (EPERM): the next
    // commit fails, and so does every reopen until the flag is removed.
    let wal = node.data_dir.join("partitions/p0001.sqlite3-wal");
    chattr("+i", &wal);
    // The failure needs a commit to p0001: an eighth of the script more, and no more.
    hold_stream_after(&sim, script_total(&sim) / 8);
    let restarts = wait_for(
        "shard group 1 to restart",
        Duration::from_secs(30),
        async || {
            let status = node.status().await?;
            let g = status.groups.iter().find(|g| g.shard == 1)?;
            (g.restarts >= 1).then_some(g.restarts)
        },
    )
    .await;
    chattr("-i", &wal);
    assert!(
        sim.status().messages_sent < 20_000,
        "the failure happened during ingest"
    );
    sim.hold_script_at(None);
    sim.wait_all_sent(Duration::from_secs(60)).await.unwrap();
    node.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let status = node.status().await.unwrap();
    assert!(status.ready, "{status:?}");
    let shard0 = status.groups.iter().find(|g| g.shard == 0).unwrap();
    assert_eq!(shard0.restarts, 0, "the other group was not touched");
    let stderr = node.stderr_text();
    let data_dir = node.data_dir.clone();
    assert!(node.stop().await.success());

    assert!(
        stderr.contains("shard group child failed; restarting the group"),
        "{stderr}"
    );
    let shards = sim.status().shards;
    assert_eq!(
        shards[1].identifies, 1,
        "the restarted shard resumed: {:?}",
        shards[1]
    );
    assert!(shards[1].resumes >= 1, "{:?}", shards[1]);
    let v = verify(&data_dir, Topology::new(2, 8, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, 20_000);
    println!("group 1 restarted {restarts}+ times; exactly once held");
}

/// DESIGN §3: a partition file lost while the node runs is restored from its replica when the
/// group restarts, and the shard resumes from what the restored file says it applied. The loss is
/// staged inside a failure: an immutable WAL fails p0001's next commit and so the group; once that
/// failure is logged (the restart is a backoff of seconds away), the flag is lifted and the files
/// are deleted, so the restart finds the file missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_file_lost_while_running_is_restored_at_the_group_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = s3::bucket("group-restore").await;
    let sim = Simulator::start(SimConfig {
        guilds: 100,
        shards: 2,
        messages: 20_000,
        rate: Some(2_500),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 2,
        partitions: 8,
        extra_toml: format!(
            "{}[supervision]\nmax_restarts = 50\nbackoff_initial_ms = 3000\nbackoff_max_ms = 6000\n",
            s3::replication_toml(&bucket, s3::endpoint(), 60)
        ),
        ..NodeSpec::default()
    };
    // The loss must happen during ingest however slow the uploads are: the stream never passes
    // three quarters of the script before it.
    let total = script_total(&sim);
    sim.hold_script_at(Some(total * 3 / 4));
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_for(
        "p0001 uploaded to its replica",
        Duration::from_secs(60),
        async || {
            let uploaded = s3::replica_keys(&bucket, 1).await?.len() >= 2;
            (uploaded && sim.status().messages_sent > 2_000).then_some(())
        },
    )
    .await;
    lose_p0001_inside_a_group_failure(&node, &sim).await;
    assert!(
        sim.status().messages_sent < 20_000,
        "the loss happened during ingest"
    );
    sim.hold_script_at(None);
    sim.wait_all_sent(Duration::from_secs(60)).await.unwrap();
    node.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let status = node.status().await.unwrap();
    assert!(status.ready, "{status:?}");
    let stderr = node.stderr_text();
    let data_dir = node.data_dir.clone();
    assert!(node.stop().await.success());

    let restored = stderr
        .lines()
        .find(|l| l.contains("partition restored at group restart"))
        .unwrap_or_else(|| panic!("no restore at the group restart:\n{stderr}"));
    assert!(
        restored.contains("p0001") && restored.contains("decision=Restored"),
        "{restored}"
    );
    for line in stderr.lines().filter(|l| {
        l.contains("shardlite::node::shard_group") || l.contains("resumed") || l.contains("sync")
    }) {
        println!("{line}");
    }
    let shards = sim.status().shards;
    assert_eq!(
        shards[1].identifies, 1,
        "the restarted shard resumed from the restored file: {:?}",
        shards[1]
    );
    let v = verify(&data_dir, Topology::new(2, 8, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_restarts_a_silent_shard_that_twilight_still_trusts() {
    use shardlite::simulator::Fault;
    let dir = tempfile::tempdir().unwrap();
    // A 60 s heartbeat interval: twilight would not notice a silent connection for a minute.
    let sim = Simulator::start(SimConfig {
        guilds: 50,
        shards: 1,
        messages: 6_000,
        rate: Some(2_000),
        heartbeat_interval_ms: 60_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 1,
        partitions: 4,
        // Once the script is over the shard is silent too (no heartbeat ACK for 60 s), and
        // the watchdog keeps restarting it until the test stops the node: room for those.
        extra_toml: "[supervision]\nshard_silence_timeout_secs = 1\nmax_restarts = 100\n".into(),
        ..NodeSpec::default()
    };
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_for("some progress", Duration::from_secs(30), async || {
        (sim.status().messages_sent > 1_000).then_some(())
    })
    .await;
    sim.inject(0, Fault::StopAcks { millis: 30_000 })
        .await
        .unwrap();
    wait_for(
        "the watchdog to restart the group",
        Duration::from_secs(20),
        async || {
            let status = node.status().await?;
            (status.groups[0].restarts >= 1).then_some(())
        },
    )
    .await;
    sim.wait_all_sent(Duration::from_secs(60)).await.unwrap();
    node.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let stderr = node.stderr_text();
    let data_dir = node.data_dir.clone();
    assert!(node.stop().await.success());
    assert!(
        stderr.contains("silent for"),
        "the watchdog said why: {stderr}"
    );
    let shard = &sim.status().shards[0];
    assert_eq!(
        shard.identifies, 1,
        "the restarted shard resumed: {shard:?}"
    );
    let v = verify(&data_dir, Topology::new(1, 4, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
}

/// A shard held back by a slow partition is not a silent shard: another connection holds p0000's
/// write lock for longer than `shard_silence_timeout_secs`, the pump stops reading once
/// `storage.max_in_flight` dispatches wait, and the watchdog leaves the group alone; when the
/// lock goes, ingest goes on, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backpressured_shard_is_not_taken_for_a_silent_one() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 20,
        shards: 1,
        messages: 20_000,
        rate: Some(4_000),
        // Heartbeat ACKs every 300 ms keep a live shard from looking silent when the script is
        // over (the watchdog's silence timeout is 1 s here).
        heartbeat_interval_ms: 300,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 1,
        partitions: 2,
        storage_toml: "batch_max = 100\nmax_in_flight = 200\n".into(),
        extra_toml: "[supervision]\nshard_silence_timeout_secs = 1\n".into(),
        ..NodeSpec::default()
    };
    // A quarter of the stream is kept for the lock to hold back, however slow the start was:
    // the stream holds at three quarters until the lock is taken.
    sim.hold_script_at(Some(script_total(&sim) * 3 / 4));
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_for("some progress", Duration::from_secs(30), async || {
        (sim.status().messages_sent > 2_000).then_some(())
    })
    .await;
    let db = node.data_dir.join("partitions/p0000.sqlite3");
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.busy_timeout(Duration::from_secs(5)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    sim.hold_script_at(None);
    // The fault itself: the write lock is held for 3 s from BEGIN, past the 1 s silence timeout
    // and the 1 s watchdog period, and inside the node's 5 s busy timeout (a longer hold would
    // fail the commit, a different test). Meanwhile /readyz must show the shard backpressured;
    // each poll takes about 1 s (the blocked partition answers only as busy).
    let release_at = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut backpressured = false;
    while !backpressured && tokio::time::Instant::now() < release_at {
        let poll = tokio::time::timeout_at(release_at, node.status()).await;
        backpressured = matches!(poll, Ok(Some(status)) if status
            .groups
            .first()
            .and_then(|g| g.shard_status.as_ref())
            .is_some_and(|s| s.backpressured));
    }
    tokio::time::sleep_until(release_at).await;
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    assert!(
        backpressured,
        "shard 0 was reported backpressured while p0000 was locked"
    );
    sim.wait_all_sent(Duration::from_secs(60)).await.unwrap();
    node.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let status = node.status().await.unwrap();
    let stderr = node.stderr_text();
    assert_eq!(status.groups[0].restarts, 0, "{stderr}");
    let data_dir = node.data_dir.clone();
    assert!(node.stop().await.success());
    assert!(!stderr.contains("silent for"), "{stderr}");
    let v = verify(&data_dir, Topology::new(1, 2, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, 20_000);
}

/// Without a replica (`replication.mode = "off"`) a partition file lost while the node runs is
/// not silently recreated empty (its session and rows would be gone without a word): every
/// restart of the group fails naming the file, and past the restart intensity the node exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_replica_a_lost_partition_file_stops_the_node_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 100,
        shards: 2,
        messages: 20_000,
        rate: Some(2_500),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 2,
        partitions: 8,
        extra_toml:
            "[supervision]\nmax_restarts = 2\nbackoff_initial_ms = 2000\nbackoff_max_ms = 2000\n"
                .into(),
        ..NodeSpec::default()
    };
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    wait_for("some progress", Duration::from_secs(30), async || {
        (sim.status().messages_sent > 2_000).then_some(())
    })
    .await;
    let partitions = node.data_dir.join("partitions");
    lose_p0001_inside_a_group_failure(&node, &sim).await;
    let stderr_path = node.dir.join("stderr.log");
    let exit = node.wait_exit(Duration::from_secs(60)).await;
    let stderr = std::fs::read_to_string(stderr_path).unwrap();
    assert_eq!(exit.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("partition files unusable: p0001 (Missing)"),
        "{stderr}"
    );
    assert!(
        !partitions.join("p0001.sqlite3").exists(),
        "the lost file was not recreated empty"
    );
}
