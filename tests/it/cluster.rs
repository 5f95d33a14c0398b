//! One writer per partition (DESIGN §7): one process per data directory, the partition count
//! fixed for the life of the data, an object store that really enforces the conditional writes
//! leases are built on, and partition leases that make a second copy of a pod wait — then take
//! over the data and the Discord session when the first one hands them off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use shardlite::ownership::Topology;
use shardlite::simulator::{SimConfig, Simulator};
use shardlite::verify::verify;

use crate::harness::{
    NodeProcess, NodeSpec, process_exited, run_expecting_exit, script_sent, script_total, wait_for,
    write_config,
};
use crate::s3;

async fn small_sim(messages: u64) -> Simulator {
    Simulator::start(SimConfig {
        guilds: 50,
        shards: 2,
        messages,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// The second `shardlite run` on a data directory exits 1 naming the first one's pid, before it
/// touches anything: the first one ingests on, and every message is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_data_dir_exits_1_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let sim = small_sim(5_000).await;
    sim.hold_script_at(Some(0));
    let spec = NodeSpec {
        shards: 2,
        partitions: 4,
        ..NodeSpec::default()
    };
    let first = NodeProcess::start(dir.path(), &sim, &spec).await;
    let config = write_config(dir.path(), &sim, &spec);
    let (status, stderr) = run_expecting_exit(&config, Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "is in use by another shardlite process (pid {}",
            first.pid()
        )),
        "{stderr}"
    );
    sim.hold_script_at(None);
    sim.wait_all_sent(Duration::from_secs(60)).await.unwrap();
    first.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let data_dir = first.data_dir.clone();
    assert!(first.stop().await.success());
    let v = verify(&data_dir, Topology::new(2, 4, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, 5_000);
}

/// A data directory written with 4 partitions refuses a start with 8: exit 2 naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_partition_count_exits_2_naming_both_values() {
    let dir = tempfile::tempdir().unwrap();
    let sim = small_sim(1_000).await;
    let mut spec = NodeSpec {
        shards: 2,
        partitions: 4,
        ..NodeSpec::default()
    };
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    assert!(node.stop().await.success());
    spec.partitions = 8;
    let config = write_config(dir.path(), &sim, &spec);
    let (status, stderr) = run_expecting_exit(&config, Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cluster.partitions = 8, but ")
            && stderr.contains("was written with 4 partitions"),
        "{stderr}"
    );
}

/// A stand-in S3 server that honours `If-None-Match: *` but accepts any `If-Match` (what one
/// public report says of a DigitalOcean Spaces region).
async fn start_store_ignoring_if_match() -> String {
    let objects: Arc<Mutex<HashMap<String, Bytes>>> = Arc::default();
    let app = axum::Router::new().fallback(
        async move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let key = uri.path().to_owned();
            let mut objects = objects.lock().unwrap();
            match method {
                Method::PUT => {
                    if headers.contains_key("if-none-match") && objects.contains_key(&key) {
                        return StatusCode::PRECONDITION_FAILED.into_response();
                    }
                    let etag = format!("\"{:032x}\"", fxhash(&body));
                    objects.insert(key, body);
                    (StatusCode::OK, [("ETag", etag)]).into_response()
                }
                Method::DELETE => {
                    objects.remove(&key);
                    StatusCode::NO_CONTENT.into_response()
                }
                _ => StatusCode::NOT_FOUND.into_response(),
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn fxhash(bytes: &[u8]) -> u128 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u128, |h, b| {
        (h ^ u128::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// With `cluster.pods = 2` the start checks the object store's conditional writes: one that
/// ignores `If-Match` is refused with exit 2 naming the endpoint and the header; moto, which
/// enforces both, passes and the pod runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_pods_a_store_that_ignores_if_match_is_refused_and_moto_passes() {
    let sim = small_sim(2_000).await;
    let spec_for = |endpoint: &str, bucket: &str| NodeSpec {
        shards: 2,
        partitions: 4,
        cluster_toml: "pods = 2\nordinal = 0\n".into(),
        extra_toml: s3::replication_toml(bucket, endpoint, 60),
        ..NodeSpec::default()
    };

    let liar = start_store_ignoring_if_match().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sim, &spec_for(&liar, "lying-bucket"));
    let (status, stderr) = run_expecting_exit(&config, Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("object store {liar} does not enforce If-Match"))
            && stderr.contains("an update carrying a stale ETag succeeded"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data/partitions").exists(),
        "nothing was written before the check"
    );

    let bucket = s3::bucket("capability").await;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &sim, &spec_for(s3::endpoint(), &bucket)).await;
    let stderr = node.stderr_text();
    assert!(
        stderr.contains("object store enforces If-None-Match and If-Match"),
        "{stderr}"
    );
    assert!(node.stop().await.success());
}

/// Messages in the handoff tests' stream.
const MESSAGES: u64 = 10_000;

/// The handoff tests' simulator: 100 guilds on 2 shards, 10,000 messages at 4,000/s, its stream
/// held at a third so every handoff comes mid-stream however slow the machine. Returns it with
/// its script length.
async fn handoff_sim() -> (Simulator, u64) {
    let sim = Simulator::start(SimConfig {
        guilds: 100,
        shards: 2,
        messages: MESSAGES,
        rate: Some(4_000),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let total = script_total(&sim);
    sim.hold_script_at(Some(total / 3));
    (sim, total)
}

/// Pod `ordinal` of `pods` over the handoff simulator's 2 shards and 4 partitions, replicating
/// to `bucket`.
fn handoff_spec(bucket: &str, pods: u32, ordinal: u32) -> NodeSpec {
    NodeSpec {
        shards: 2,
        partitions: 4,
        cluster_toml: format!("pods = {pods}\nordinal = {ordinal}\n"),
        extra_toml: s3::replication_toml(bucket, s3::endpoint(), 60),
        ..NodeSpec::default()
    }
}

/// Two copies of pod 0 (its own disk each, one bucket): the second waits for the leases and
/// writes nothing while the first holds them. When the first stops (final sync, leases released
/// with their positions), the second takes the leases, restores every partition from the
/// replica and resumes the same Discord sessions: no identify, every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_copy_of_a_pod_waits_for_the_leases_then_resumes_the_same_sessions() {
    let bucket = s3::bucket("same-ordinal").await;
    let (sim, total) = handoff_sim().await;
    let spec = handoff_spec(&bucket, 1, 0);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = NodeProcess::start(dir_a.path(), &sim, &spec).await;
    wait_for(
        "a quarter of the script",
        Duration::from_secs(60),
        async || (script_sent(&sim) >= total / 4).then_some(()),
    )
    .await;

    // Its start blocks until it is ready, so it runs on a thread (and runtime) of its own.
    let second = std::thread::spawn({
        let (dir, sim, spec) = (dir_b.path().to_owned(), sim.clone(), spec.clone());
        move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(NodeProcess::start(&dir, &sim, &spec))
        }
    });
    let stderr_b = dir_b.path().join("stderr.log");
    wait_for(
        "the second copy to wait for the leases",
        Duration::from_secs(60),
        async || {
            let text = std::fs::read_to_string(&stderr_b).unwrap_or_default();
            (text.matches("waiting for lease").count() == 4).then_some(())
        },
    )
    .await;
    assert!(
        !dir_b.path().join("data/partitions").exists(),
        "the waiting copy created no partition file"
    );
    assert!(
        !second.is_finished(),
        "the waiting copy has not started its node"
    );
    // It serves HTTP while it waits: ready (for what it holds: nothing yet), naming what it
    // waits for, so a rolling update is not stuck on it.
    let http = std::fs::read_to_string(&stderr_b)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.contains("serving /healthz")
                .then(|| l.rsplit("http=").next().unwrap().trim().to_owned())
        })
        .expect("the waiting copy logged its HTTP address");
    // Ready once it has seen the first copy renew (a crashed holder's lease would just run
    // out): within a renewal period, TTL / 3.
    let body: serde_json::Value = wait_for(
        "the waiting copy to be ready while it waits",
        Duration::from_secs(30),
        async || {
            let resp = reqwest::get(format!("http://{http}/readyz")).await.ok()?;
            (resp.status().as_u16() == 200).then_some(())?;
            resp.json().await.ok()
        },
    )
    .await;
    assert_eq!(body["phase"], "waiting_for_leases", "{body}");
    let waits = body["waiting_for_leases"].as_object().unwrap();
    assert_eq!(
        waits.keys().collect::<Vec<_>>(),
        ["p0000", "p0001", "p0002", "p0003"],
        "{body}"
    );
    assert!(
        waits
            .values()
            .all(|w| w["holder"].as_str().unwrap().starts_with("pod-0@") && w["live"] == true),
        "{body}"
    );
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("shardlite_leases_waiting 4"), "{metrics}");

    assert!(first.stop().await.success());
    let second = tokio::task::spawn_blocking(move || second.join().unwrap())
        .await
        .unwrap();
    sim.hold_script_at(None);
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    second.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let stderr = second.stderr_text();
    let data_dir = second.data_dir.clone();
    assert!(second.stop().await.success());

    assert_eq!(
        stderr.matches("decision=Restored").count(),
        4,
        "every partition came from the replica:\n{stderr}"
    );
    for s in sim.status().shards {
        assert_eq!(s.identifies, 1, "the session moved with the data: {s:?}");
        assert!(s.resumes >= 1, "{s:?}");
    }
    let v = verify(&data_dir, Topology::new(2, 4, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, MESSAGES);
}

/// Scaling 1 → 2 → 1 pods by restarting every pod with the new count. 1 → 2: pod 0 stops (final
/// sync, leases released with their positions); pods 0 and 1 start with `pods = 2`. Pod 0 keeps
/// shard 0 on its own disk; pod 1 takes shard 1's leases, restores its partitions from the
/// replica and resumes shard 1's session. 2 → 1: pod 0 finds its old copies of shard 1's files
/// behind what pod 1 released, moves them aside and restores. One identify per shard in total,
/// every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_one_to_two_pods_and_back_moves_a_shard_with_its_data_and_its_session() {
    let bucket = s3::bucket("scale-1-2").await;
    let (sim, total) = handoff_sim().await;
    let spec = |pods: u32, ordinal: u32| handoff_spec(&bucket, pods, ordinal);
    let (dir0, dir1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let single = NodeProcess::start(dir0.path(), &sim, &spec(1, 0)).await;
    wait_for(
        "a quarter of the script",
        Duration::from_secs(60),
        async || (script_sent(&sim) >= total / 4).then_some(()),
    )
    .await;
    let step = std::time::Instant::now();
    assert!(single.stop().await.success());
    let pod0 = NodeProcess::start(dir0.path(), &sim, &spec(2, 0)).await;
    let pod1 = NodeProcess::start(dir1.path(), &sim, &spec(2, 1)).await;
    println!(
        "1 → 2 pods: every shard resumed {:.1?} after the stop began",
        step.elapsed()
    );
    sim.hold_script_at(None);
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    pod0.wait_caught_up_on(&sim, &[0], Duration::from_secs(60))
        .await;
    pod1.wait_caught_up_on(&sim, &[1], Duration::from_secs(60))
        .await;
    let stderr1 = pod1.stderr_text();
    assert!(pod0.stop().await.success());
    assert!(pod1.stop().await.success());

    assert_eq!(
        stderr1.matches("decision=Restored").count(),
        2,
        "pod 1 restored shard 1's two partitions:\n{stderr1}"
    );
    for s in sim.status().shards {
        assert_eq!(s.identifies, 1, "every shard resumed its session: {s:?}");
    }
    // The cluster's partitions — p0000 and p0002 from pod 0, p0001 and p0003 from pod 1 —
    // hold every message exactly once.
    let merged = tempfile::tempdir().unwrap();
    let parts = merged.path().join("partitions");
    std::fs::create_dir_all(&parts).unwrap();
    for (p, dir) in [(0, &dir0), (1, &dir1), (2, &dir0), (3, &dir1)] {
        for suffix in ["", "-wal"] {
            let name = format!("p{p:04}.sqlite3{suffix}");
            let from = dir.path().join("data/partitions").join(&name);
            if from.exists() {
                std::fs::copy(&from, parts.join(&name)).unwrap();
            }
        }
    }
    let v = verify(
        merged.path(),
        Topology::new(2, 4, 1).unwrap(),
        &sim.expected(),
    )
    .unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, MESSAGES);

    // And back to 1 pod: pod 0's disk still holds p0001 and p0003 as they were before the move,
    // healthy but stale. They are moved aside (kept, not deleted) and restored from what pod 1
    // released.
    let single = NodeProcess::start(dir0.path(), &sim, &spec(1, 0)).await;
    single.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let stderr0 = single.stderr_text();
    assert!(single.stop().await.success());
    assert_eq!(
        stderr0
            .matches("is behind what its last owner released; moving it aside")
            .count(),
        2,
        "{stderr0}"
    );
    let kept_aside = std::fs::read_dir(dir0.path().join("data/partitions"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("p0001.sqlite3.stale-") || name.starts_with("p0003.sqlite3.stale-")
        })
        .count();
    assert_eq!(
        kept_aside, 2,
        "the stale files were kept aside, not deleted"
    );
    assert_eq!(
        stderr0.matches("decision=Restored").count(),
        2,
        "p0001 and p0003 came from the replica:\n{stderr0}"
    );
    for s in sim.status().shards {
        assert_eq!(s.identifies, 1, "{s:?}");
    }
    let v = verify(
        &dir0.path().join("data"),
        Topology::new(2, 4, 1).unwrap(),
        &sim.expected(),
    )
    .unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, MESSAGES);
}

/// The lease epochs a run logged when it took its leases (`epochs=p0000@3 p0001@3 …`), by
/// partition number.
fn logged_epochs(stderr: &str) -> HashMap<u32, u64> {
    // One line per shard group; a later run's line for a partition replaces an earlier one's.
    let epochs: HashMap<u32, u64> = stderr
        .lines()
        .filter(|l| l.contains("partition leases acquired"))
        .flat_map(|line| {
            line.split_whitespace().filter_map(|word| {
                let (p, e) = word.trim_start_matches("epochs=").split_once('@')?;
                Some((p.strip_prefix('p')?.parse().ok()?, e.parse().ok()?))
            })
        })
        .collect();
    assert!(!epochs.is_empty(), "the run logged its leases");
    epochs
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The fence (DESIGN §7): the old owner is paused (SIGSTOP) past its lease's expiry with
/// writes its Litestream never uploaded; a new owner takes the leases at the next epoch,
/// restores, resumes the sessions and ingests into its own replica generation. Then the old
/// owner's Litestream wakes and uploads what it buffered — into the old epoch's generation —
/// and the old owner itself wakes, finds its leases gone, and exits 1. A third pod restoring
/// from the bucket gets the new owner's state: every message exactly once, one identify per
/// shard, and the new owner deleted the superseded generation once its own had data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_owner_cannot_roll_back_the_new_owners_replica() {
    let bucket = s3::bucket("sigstop").await;
    let (sim, _) = handoff_sim().await;
    let spec = handoff_spec(&bucket, 1, 0);
    let new_owner_spec = NodeSpec {
        cluster_toml: format!("{}superseded_retention_secs = 1\n", spec.cluster_toml),
        ..spec.clone()
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let old = NodeProcess::start(dirs[0].path(), &sim, &spec).await;
    old.wait_sessions_applied(&sim, Duration::from_secs(60))
        .await;
    old.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let old_epochs = logged_epochs(&old.stderr_text());
    assert_eq!(old_epochs.len(), 4, "{old_epochs:?}");

    // Its Litestream stops first: what the old owner applies from here is on its disk only.
    let litestream = old
        .litestream_pid()
        .await
        .expect("the old owner's litestream");
    signal(litestream, "STOP");
    let claimed = sim.status().script_claimed;
    sim.hold_script_at(Some(claimed + 500));
    old.wait_caught_up(&sim, Duration::from_secs(60)).await;
    signal(old.pid(), "STOP");
    let old_keys: Vec<_> = {
        let mut keys = Vec::new();
        for p in 0..4 {
            keys.push(s3::replica_keys(&bucket, p).await.unwrap());
        }
        keys
    };

    // The new owner waits out the TTL, takes the leases at the next epoch, restores what the
    // old one uploaded, and resumes from there (the simulator replays the rest).
    let new = NodeProcess::start(dirs[1].path(), &sim, &new_owner_spec).await;
    let new_epochs = logged_epochs(&new.stderr_text());
    for (p, e) in &old_epochs {
        assert_eq!(new_epochs[p], e + 1, "partition {p}");
    }
    let claimed = sim.status().script_claimed;
    sim.hold_script_at(Some(claimed + 500));
    new.wait_caught_up(&sim, Duration::from_secs(60)).await;
    wait_for(
        "the new owner to retire the superseded generations",
        Duration::from_secs(60),
        async || {
            let text = new.stderr_text();
            (text
                .matches("superseded replica generations deleted")
                .count()
                == 4)
                .then_some(())
        },
    )
    .await;

    // The old owner's Litestream wakes and uploads what it buffered, into its own generation.
    signal(litestream, "CONT");
    wait_for(
        "the old owner's late upload",
        Duration::from_secs(30),
        async || {
            for p in 0..4u32 {
                let prefix = format!("test/partitions/p{p:04}/e{:08}/", old_epochs[&p]);
                let keys = s3::replica_keys(&bucket, p).await?;
                if keys
                    .iter()
                    .any(|k| k.starts_with(&prefix) && !old_keys[p as usize].contains(k))
                {
                    return Some(());
                }
            }
            None
        },
    )
    .await;
    // The old owner wakes, finds its leases gone, and stops writing at once: both shard groups
    // fenced (killed, no drain), its Litestream gone with nothing left to replicate. It stays up,
    // waiting for the leases the new owner holds.
    signal(old.pid(), "CONT");
    let old_stderr = wait_for(
        "the old owner to fence both shard groups",
        Duration::from_secs(60),
        async || {
            let text = old.stderr_text();
            (text
                .matches("partition lease lost: fencing its shard group")
                .count()
                == 2)
                .then_some(text)
        },
    )
    .await;
    assert!(
        old_stderr.contains("shard=0") && old_stderr.contains("shard=1"),
        "{old_stderr}"
    );
    wait_for(
        "the old owner's litestream to be gone",
        Duration::from_secs(30),
        async || process_exited(litestream).then_some(()),
    )
    .await;
    let (_, status) = old
        .readyz()
        .await
        .expect("the fenced old owner answers /readyz");
    assert_eq!(status.pending_shards, [0, 1], "{status:?}");
    assert!(
        old.metrics()
            .await
            .contains("shardlite_lease_losses_total{shard=\"0\"}"),
        "the loss is counted"
    );
    assert!(old.stop().await.success(), "a fenced pod stops cleanly");

    sim.hold_script_at(None);
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    new.wait_caught_up(&sim, Duration::from_secs(60)).await;
    assert!(new.stop().await.success());

    // A third process restores from the bucket: the newest generation, the new owner's.
    let third = NodeProcess::start(dirs[2].path(), &sim, &spec).await;
    third.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let stderr = third.stderr_text();
    let data_dir = third.data_dir.clone();
    assert!(third.stop().await.success());
    for (p, e) in &new_epochs {
        assert!(
            stderr.contains(&format!(
                "partition=p{p:04} decision=Restored generation={e}"
            )),
            "p{p:04} restored from generation {e}:\n{stderr}"
        );
    }
    for s in sim.status().shards {
        assert_eq!(s.identifies, 1, "every move resumed: {s:?}");
    }
    let v = verify(&data_dir, Topology::new(2, 4, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, MESSAGES);
}

/// Another process's lease record for `partition`, written over the current one without a
/// condition (moto accepts unsigned requests): `holder`, the current epoch + `bump`, renewed now,
/// released if `released`. Returns the epoch written.
async fn overwrite_lease(
    bucket: &str,
    partition: u32,
    holder: &str,
    bump: u64,
    released: bool,
) -> u64 {
    use object_store::ObjectStore as _;
    let store = s3::client(bucket);
    let key = object_store::path::Path::from(format!("test/leases/p{partition:04}"));
    let bytes = store.get(&key).await.unwrap().bytes().await.unwrap();
    let mut record: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let epoch = record["epoch"].as_u64().unwrap() + bump;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    record["holder"] = holder.into();
    record["epoch"] = epoch.into();
    record["renewed_at_ms"] = now_ms.into();
    if released {
        record["released_at_ms"] = now_ms.into();
    }
    store
        .put(&key, record.to_string().into_bytes().into())
        .await
        .unwrap();
    epoch
}

/// A lease lost while the pod runs (another process took p0001 over): only its shard group
/// (shard 1) is fenced — killed at once, no drain, its partitions no longer replicated — while
/// shard 0 goes on ingesting, and the loss shows in `/readyz` (shard 1 pending, the lease
/// waited for) and `shardlite_lease_losses_total`. When the taker releases the lease, the pod
/// takes it back, starts the group again from its files and resumes shard 1's Discord session:
/// every message exactly once, one identify per shard, no other group touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_fences_only_its_shard_group_until_the_lease_comes_back() {
    let bucket = s3::bucket("fence-group").await;
    let (sim, _) = handoff_sim().await;
    let spec = NodeSpec {
        lease_ttl_secs: Some(6),
        ..handoff_spec(&bucket, 1, 0)
    };
    let dir = tempfile::tempdir().unwrap();
    let pod = NodeProcess::start(dir.path(), &sim, &spec).await;
    pod.wait_sessions_applied(&sim, Duration::from_secs(60))
        .await;

    // The taker renews its lease every second (a live holder) until told to release it.
    let (release, mut released) = tokio::sync::oneshot::channel::<()>();
    let taker = tokio::spawn({
        let bucket = bucket.clone();
        async move {
            overwrite_lease(&bucket, 1, "taker", 1, false).await;
            loop {
                tokio::select! {
                    _ = &mut released => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        overwrite_lease(&bucket, 1, "taker", 0, false).await;
                    }
                }
            }
            overwrite_lease(&bucket, 1, "taker", 0, true).await
        }
    });
    let status = wait_for(
        "the pod to fence shard 1 and wait for p0001",
        Duration::from_secs(60),
        async || {
            let (_, status) = pod.readyz().await?;
            (status.pending_shards == [1] && status.groups.len() == 1).then_some(status)
        },
    )
    .await;
    assert_eq!(status.groups[0].shard, 0, "{status:?}");
    let stderr = pod.stderr_text();
    assert_eq!(
        stderr.matches("shard group fenced").count(),
        1,
        "only shard 1's group:\n{stderr}"
    );
    assert!(
        pod.metrics()
            .await
            .contains("shardlite_lease_losses_total{shard=\"1\"} 1"),
        "the loss is counted"
    );
    // Shard 0 goes on ingesting while shard 1 waits.
    sim.hold_script_at(None);
    let applied_before = status.groups[0].partitions[0]
        .session
        .as_ref()
        .map_or(0, |s| s.applied_seq);
    wait_for(
        "shard 0 to go on applying",
        Duration::from_secs(60),
        async || {
            let (_, status) = pod.readyz().await?;
            let g = status.groups.iter().find(|g| g.shard == 0)?;
            let applied = g.partitions[0].session.as_ref()?.applied_seq;
            (applied > applied_before).then_some(())
        },
    )
    .await;

    release.send(()).unwrap();
    let taker_epoch = taker.await.unwrap();
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    pod.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let stderr = pod.stderr_text();
    assert!(
        stderr.contains(&format!(
            "lease acquired partition=p0001 epoch={}",
            taker_epoch + 1
        )),
        "the pod took p0001 back after the taker's release:\n{stderr}"
    );
    let data_dir = pod.data_dir.clone();
    assert!(pod.stop().await.success());
    for s in sim.status().shards {
        assert_eq!(s.identifies, 1, "shard 1 resumed its session: {s:?}");
    }
    let v = verify(&data_dir, Topology::new(2, 4, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, MESSAGES);
}

/// `kill -9` in the middle of a handoff (DESIGN §7): the old owner got SIGTERM, closed its
/// shards with the resume code and drained, and dies before its final upload and its lease
/// release (its Litestream was stopped, so the final sync could not finish). The waiting second
/// copy takes the leases over after the TTL, restores what the replica has — short of the old
/// owner's last writes — and resumes the same sessions from there: the simulator replays the
/// rest. Every message exactly once, one identify per shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_handoff_loses_nothing() {
    let bucket = s3::bucket("kill-handoff").await;
    let (sim, _) = handoff_sim().await;
    let spec = handoff_spec(&bucket, 1, 0);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let old = NodeProcess::start(dir_a.path(), &sim, &spec).await;
    old.wait_sessions_applied(&sim, Duration::from_secs(60))
        .await;
    old.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let next = std::thread::spawn({
        let (dir, sim, spec) = (dir_b.path().to_owned(), sim.clone(), spec.clone());
        move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(NodeProcess::start(&dir, &sim, &spec))
        }
    });
    let stderr_b = dir_b.path().join("stderr.log");
    wait_for(
        "the second copy to wait for the leases",
        Duration::from_secs(60),
        async || {
            let text = std::fs::read_to_string(&stderr_b).unwrap_or_default();
            (text.matches("waiting for lease").count() == 4).then_some(())
        },
    )
    .await;

    // Writes the replica never gets: Litestream is stopped, the old owner applies 500 more.
    let litestream = old
        .litestream_pid()
        .await
        .expect("the old owner's litestream");
    signal(litestream, "STOP");
    let claimed = sim.status().script_claimed;
    sim.hold_script_at(Some(claimed + 500));
    old.wait_caught_up(&sim, Duration::from_secs(60)).await;
    // The handoff begins; the final sync cannot finish; the old owner dies mid-way (with its
    // Litestream, as a whole pod would).
    signal(old.pid(), "TERM");
    wait_for(
        "the old owner to close its shards and drain",
        Duration::from_secs(30),
        async || {
            let text = old.stderr_text();
            (text.matches("shard closed with resume code").count() == 2).then_some(())
        },
    )
    .await;
    assert!(
        !old.stderr_text().contains("lease released"),
        "the kill comes before the release"
    );
    old.kill9().await;
    signal(litestream, "KILL");

    let next = tokio::task::spawn_blocking(move || next.join().unwrap())
        .await
        .unwrap();
    sim.hold_script_at(None);
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    next.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let stderr = next.stderr_text();
    let data_dir = next.data_dir.clone();
    assert!(next.stop().await.success());
    assert!(
        stderr.contains("released=false"),
        "taken over after expiry, not released:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("decision=Restored").count(),
        4,
        "every partition came from the replica:\n{stderr}"
    );
    for s in sim.status().shards {
        assert_eq!(s.identifies, 1, "the session survived the crash: {s:?}");
    }
    let v = verify(&data_dir, Topology::new(2, 4, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, MESSAGES);
}

/// Starts a node on a thread (and runtime) of its own: [`NodeProcess::start`] returns only once
/// the node is ready, and a pod waiting for leases is not, until another pod releases them.
fn start_in_background(
    dir: &std::path::Path,
    sim: &Simulator,
    spec: &NodeSpec,
) -> std::thread::JoinHandle<NodeProcess> {
    let (dir, sim, spec) = (dir.to_owned(), sim.clone(), spec.clone());
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(NodeProcess::start(&dir, &sim, &spec))
    })
}

/// Waits for a node started by [`start_in_background`] to be ready.
async fn joined(handle: std::thread::JoinHandle<NodeProcess>) -> NodeProcess {
    tokio::task::spawn_blocking(move || handle.join().unwrap())
        .await
        .unwrap()
}

/// Rescaling 1 → 2 → 3 → 1 pods — by rolling restarts, as a StatefulSet does them (new pods
/// first, then the old ones from the highest ordinal down), then by SIGHUP for 3 → 1 (pod 0
/// reloads, the highest ordinals are removed) — under continuous ingest of 100,000 messages
/// over 8 shards. New owners wait for leases the old owners still hold, take them when those
/// stop, restore the partitions and resume the same sessions. Each step's duration is printed. In the end pod 0 holds every
/// partition: every message exactly once, one identify per shard in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_rescale_1_2_3_1_under_ingest_moves_every_shard_with_its_session() {
    const MESSAGES: u64 = 100_000;
    let bucket = s3::bucket("rescale-1-2-3-1").await;
    let sim = Simulator::start(SimConfig {
        guilds: 200,
        shards: 8,
        messages: MESSAGES,
        rate: Some(20_000),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let total = script_total(&sim);
    sim.hold_script_at(Some(total / 5));
    let spec = |pods: u32, ordinal: u32| NodeSpec {
        shards: 8,
        partitions: 16,
        cluster_toml: format!("pods = {pods}\nordinal = {ordinal}\n"),
        extra_toml: s3::replication_toml(&bucket, s3::endpoint(), 60),
        ..NodeSpec::default()
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut pods = vec![NodeProcess::start(dirs[0].path(), &sim, &spec(1, 0)).await];
    pods[0]
        .wait_sessions_applied(&sim, Duration::from_secs(60))
        .await;
    // Each step happens while the stream flows: it moves another fifth of the script.
    let flow = |step: u64| sim.hold_script_at(Some(total * step / 5));

    // 1 → 2: pod 1 starts (and waits); pod 0 restarts with the new count.
    flow(2);
    let started = std::time::Instant::now();
    let pod1 = start_in_background(dirs[1].path(), &sim, &spec(2, 1));
    assert!(pods.pop().unwrap().stop().await.success());
    let pod0 = NodeProcess::start(dirs[0].path(), &sim, &spec(2, 0)).await;
    pods = vec![pod0, joined(pod1).await];
    println!("1 → 2 pods: {:.1?}", started.elapsed());

    // 2 → 3: pod 2 starts (and waits); pods 1 then 0 restart with the new count.
    flow(3);
    let started = std::time::Instant::now();
    let pod2 = start_in_background(dirs[2].path(), &sim, &spec(3, 2));
    let old1 = pods.pop().unwrap();
    assert!(old1.stop().await.success());
    let pod1 = start_in_background(dirs[1].path(), &sim, &spec(3, 1));
    let old0 = pods.pop().unwrap();
    assert!(old0.stop().await.success());
    let pod0 = NodeProcess::start(dirs[0].path(), &sim, &spec(3, 0)).await;
    pods = vec![pod0, joined(pod1).await, joined(pod2).await];
    println!("2 → 3 pods: {:.1?}", started.elapsed());

    // 3 → 1 by SIGHUP (systemd's way): pod 0 gets the new file and SIGHUP — it hands its own
    // shards over to itself and waits for the others — then pods 2 and 1 are removed.
    flow(4);
    let started = std::time::Instant::now();
    let pod0 = pods.remove(0);
    sighup(&pod0, &sim, &spec(1, 0), "running the new config").await;
    for pod in pods.drain(..).rev() {
        assert!(pod.stop().await.success());
    }
    ready_again(&pod0).await;
    println!("3 → 1 pods by SIGHUP: {:.1?}", started.elapsed());

    sim.hold_script_at(None);
    sim.wait_all_sent(Duration::from_secs(180)).await.unwrap();
    pod0.wait_caught_up(&sim, Duration::from_secs(120)).await;
    let data_dir = pod0.data_dir.clone();
    assert!(pod0.stop().await.success());
    let identifies: u32 = sim.status().shards.iter().map(|s| s.identifies).sum();
    assert_eq!(
        identifies,
        8,
        "every move resumed: {:?}",
        sim.status().shards
    );
    let v = verify(&data_dir, Topology::new(8, 16, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, MESSAGES);
}

/// Rewrites `node`'s config file for `spec`, sends SIGHUP and waits until `log` appears in its
/// stderr one more time than before (with a deadline).
async fn sighup(node: &NodeProcess, sim: &Simulator, spec: &NodeSpec, log: &str) {
    let before = node.stderr_text().matches(log).count();
    write_config(&node.dir, sim, spec);
    signal(node.pid(), "HUP");
    wait_for(log, Duration::from_secs(60), async || {
        (node.stderr_text().matches(log).count() > before).then_some(())
    })
    .await;
}

/// Waits until `node` is ready again after a reload (its `/readyz` answers 200).
async fn ready_again(node: &NodeProcess) {
    wait_for(
        "the pod to be ready again",
        Duration::from_secs(120),
        async || {
            node.readyz()
                .await
                .and_then(|(code, _)| (code == 200).then_some(()))
        },
    )
    .await;
}

/// Rescaling by SIGHUP (systemd: the config file changes, then `systemctl reload`). A SIGHUP with
/// the same file does nothing and one that changes `cluster.partitions` is refused, the pod
/// running on. 1 → 2: pod 1 starts with `pods = 2` and waits for shard 1's leases; pod 0 gets the
/// new file and SIGHUP, drains, releases every lease with its position and runs the new config:
/// it takes shard 0's partitions back, pod 1 restores shard 1's. 2 → 1: pod 0 gets SIGHUP first
/// and waits for shard 1's leases until pod 1 stops. Every move resumes: one identify per
/// shard in all, every message exactly once on pod 0 at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescaling_by_sighup_1_2_1_hands_shards_over_inside_the_running_process() {
    let bucket = s3::bucket("sighup").await;
    let (sim, total) = handoff_sim().await;
    let spec = |pods: u32, ordinal: u32| handoff_spec(&bucket, pods, ordinal);
    let (dir0, dir1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pod0 = NodeProcess::start(dir0.path(), &sim, &spec(1, 0)).await;
    pod0.wait_sessions_applied(&sim, Duration::from_secs(60))
        .await;

    sighup(
        &pod0,
        &sim,
        &spec(1, 0),
        "the config did not change; nothing to do",
    )
    .await;
    let mut more_partitions = spec(1, 0);
    more_partitions.partitions = 8;
    sighup(
        &pod0,
        &sim,
        &more_partitions,
        "cluster.partitions cannot change by SIGHUP (4 → 8)",
    )
    .await;
    assert_eq!(pod0.readyz().await.map(|(code, _)| code), Some(200));
    assert_eq!(
        pod0.stderr_text()
            .matches("partition leases released")
            .count(),
        0,
        "refused reloads hand nothing over"
    );

    // 1 → 2, mid-stream.
    sim.hold_script_at(Some(total * 2 / 3));
    let started = std::time::Instant::now();
    let pod1 = start_in_background(dir1.path(), &sim, &spec(2, 1));
    wait_for(
        "pod 1 to wait for shard 1's leases",
        Duration::from_secs(60),
        async || {
            let text = std::fs::read_to_string(dir1.path().join("stderr.log")).ok()?;
            text.contains("waiting for lease: another process holds")
                .then_some(())
        },
    )
    .await;
    sighup(&pod0, &sim, &spec(2, 0), "running the new config").await;
    ready_again(&pod0).await;
    let pod1 = joined(pod1).await;
    println!("1 → 2 pods by SIGHUP: {:.1?}", started.elapsed());
    let stderr1 = pod1.stderr_text();
    assert_eq!(
        stderr1.matches("decision=Restored").count(),
        2,
        "pod 1 restored shard 1's two partitions:\n{stderr1}"
    );

    // 2 → 1: pod 0 first (it waits for shard 1), then pod 1 is stopped, releasing it.
    sim.hold_script_at(None);
    let started = std::time::Instant::now();
    sighup(&pod0, &sim, &spec(1, 0), "running the new config").await;
    assert!(pod1.stop().await.success());
    ready_again(&pod0).await;
    println!("2 → 1 pods by SIGHUP: {:.1?}", started.elapsed());

    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    pod0.wait_caught_up(&sim, Duration::from_secs(60)).await;
    let stderr0 = pod0.stderr_text();
    assert_eq!(
        stderr0.matches("partition leases released").count(),
        2,
        "one drained handoff per accepted SIGHUP:\n{stderr0}"
    );
    let data_dir = pod0.data_dir.clone();
    assert!(pod0.stop().await.success());
    for s in sim.status().shards {
        assert_eq!(s.identifies, 1, "every move resumed its session: {s:?}");
    }
    let v = verify(&data_dir, Topology::new(2, 4, 1).unwrap(), &sim.expected()).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, MESSAGES);
}

/// Resharding S → 2S (DESIGN §7; Discord asks for more shards as a bot grows): 4 shards, then 8,
/// over the same 8 partitions. A reshard is a new shard total, so Discord sessions start anew
/// (one identify per shard of each total) — simulated here by a second simulator world with 8
/// shards. Every partition keeps its rows and only changes the shard that carries it: after
/// both streams, the files — and a copy restored from the replica into an empty data dir — hold
/// every message of both worlds exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_4_to_8_keeps_every_message_exactly_once() {
    let bucket = s3::bucket("reshard").await;
    // Distinct snowflake process ids: the two worlds share no id.
    let world = |shards: u32, id_process: u8| SimConfig {
        guilds: 100,
        shards,
        messages: 5_000,
        seed: u64::from(id_process),
        id_process,
        ..SimConfig::default()
    };
    let spec = |shards: u32| NodeSpec {
        shards,
        partitions: 8,
        extra_toml: s3::replication_toml(&bucket, s3::endpoint(), 60),
        ..NodeSpec::default()
    };
    let (dir, restored) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let four = Simulator::start(world(4, 1)).await.unwrap();
    let node = NodeProcess::start(dir.path(), &four, &spec(4)).await;
    four.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    node.wait_caught_up(&four, Duration::from_secs(60)).await;
    assert!(node.stop().await.success());

    let eight = Simulator::start(world(8, 2)).await.unwrap();
    let node = NodeProcess::start(dir.path(), &eight, &spec(8)).await;
    eight.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    node.wait_caught_up(&eight, Duration::from_secs(60)).await;
    // The log is appended to by both runs: this run's part starts at its last HTTP line.
    let text = node.stderr_text();
    let stderr = &text[text.rfind("serving /healthz").unwrap()..];
    assert!(node.stop().await.success());
    assert_eq!(
        stderr.matches("decision=").count(),
        0,
        "every file was kept (no restore decided):\n{stderr}"
    );

    // Both worlds' guilds and messages, each in the partition the ownership function says.
    let (a, b) = (four.expected(), eight.expected());
    assert!(
        a.guilds.keys().all(|g| !b.guilds.contains_key(g)),
        "the two worlds have distinct guilds"
    );
    let mut both = a.clone();
    both.guilds.extend(b.guilds.clone());
    both.message_ids.extend(&b.message_ids);
    both.message_ids.sort_unstable();
    let topology = Topology::new(8, 8, 1).unwrap();
    let v = verify(&dir.path().join("data"), topology, &both).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, 10_000);

    // The replica has it all too: a new pod restores every partition and resumes the 8-shard
    // sessions.
    let node = NodeProcess::start(restored.path(), &eight, &spec(8)).await;
    node.wait_caught_up(&eight, Duration::from_secs(60)).await;
    let data_dir = node.data_dir.clone();
    assert!(node.stop().await.success());
    let v = verify(&data_dir, topology, &both).unwrap();
    assert!(v.is_exact(), "{v:?}");
    assert_eq!(v.stored_messages, 10_000);
    for (sim, shards) in [(&four, 4), (&eight, 8)] {
        let identifies: u32 = sim.status().shards.iter().map(|s| s.identifies).sum();
        assert_eq!(identifies, shards, "one identify per shard of each total");
    }
}
