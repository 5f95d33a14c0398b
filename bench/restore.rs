//! Restore benchmark: cold restore of 64 partitions (≥ 1 GiB) from the local S3 server to a ready
//! node, beside `litestream restore` of the same partitions run one after another; and
//! replication lag (commit → restorable).
//!
//! `cargo bench --bench restore` (needs scripts/install-tools). Sizes: `RESTORE_MIB_PER_PARTITION`
//! (default 16 → 1 GiB over 64 partitions), `RESTORE_PARALLELISM` (default: the config default).

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../tests/it/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{NodeProcess, NodeSpec};
use rusqlite::params;
use shardlite::config::{Config, ReplicationMode};
use shardlite::ownership::PartitionId;
use shardlite::replication::litestream_config::{render, replica_url};
use shardlite::simulator::{SimConfig, Simulator};
use shardlite::store::{Checkpointer, PartitionStore};

const PARTITIONS: u32 = 64;
const ROW_BYTES: usize = 4096;
const LAG_SAMPLES: usize = 12;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fills a partition file with `mib` MiB of incompressible message rows (LTX compression would
/// otherwise shrink the replica and flatter the restore).
fn fill(path: &Path, partition: PartitionId, mib: usize, seed: u64) {
    drop(PartitionStore::open(path, partition, Checkpointer::Sqlite).unwrap());
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let rows = mib * 1024 * 1024 / ROW_BYTES;
    let tx = conn.transaction().unwrap();
    {
        let mut st = tx
            .prepare("INSERT INTO messages (id, guild_id, channel_id, author_id, content, created_at) VALUES (?1, 1, 1, 1, ?2, 0)")
            .unwrap();
        for i in 0..rows {
            let content: String = (0..ROW_BYTES).map(|_| rng.alphanumeric()).collect();
            st.execute(params![i as i64 + 1, content]).unwrap();
        }
    }
    tx.commit().unwrap();
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE").ok();
}

fn litestream(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(s3::litestream());
    cmd.args(args)
        .env_remove("AWS_CA_BUNDLE")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test");
    cmd
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let mib: usize = env_or("RESTORE_MIB_PER_PARTITION", 16);
    let work = tempfile::tempdir().unwrap();
    let bucket = s3::bucket("restore-bench").await;
    let mut config = Config::default();
    config.cluster.partitions = PARTITIONS;
    config.discord.shards = 4;
    config.storage.data_dir = work.path().join("source");
    let r = &mut config.replication;
    r.mode = ReplicationMode::Child;
    r.endpoint = Some(s3::endpoint().to_owned());
    r.bucket = Some(bucket.clone());
    r.prefix = "bench".into();
    r.litestream_bin = s3::litestream();
    r.restore_parallelism = env_or("RESTORE_PARALLELISM", r.restore_parallelism);
    let partitions: Vec<PartitionId> = (0..PARTITIONS).map(PartitionId).collect();

    // 1. Source files, replicated once.
    let t = Instant::now();
    let source = config.storage.data_dir.join("partitions");
    std::fs::create_dir_all(&source).unwrap();
    std::thread::scope(|s| {
        for chunk in partitions.chunks(PARTITIONS as usize / 2) {
            let source = source.clone();
            s.spawn(move || {
                for p in chunk {
                    fill(&source.join(p.file_name()), *p, mib, u64::from(p.0));
                }
            });
        }
    });
    let bytes = dir_bytes(&source);
    println!(
        "generated {PARTITIONS} partitions, {:.2} GiB, in {:.1}s",
        bytes as f64 / f64::from(1 << 30),
        t.elapsed().as_secs_f64()
    );
    let yml = work.path().join("litestream.yml");
    // Generation 0 (the prefix without an epoch): one process, no leases.
    let epochs = partitions.iter().map(|p| (*p, 0)).collect();
    std::fs::write(&yml, render(&config, &epochs)).unwrap();
    let t = Instant::now();
    let mut replicate = litestream(&["replicate", "-config", yml.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = config.storage.data_dir.join("litestream.sock");
    harness::wait_for(
        "litestream's control socket",
        Duration::from_secs(30),
        async || socket.exists().then_some(()),
    )
    .await;
    for p in &partitions {
        let db = source.join(p.file_name());
        let out = litestream(&[
            "sync",
            "-wait",
            "-timeout",
            "600",
            "-socket",
            socket.to_str().unwrap(),
            db.to_str().unwrap(),
        ])
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "sync {p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "initial upload to the local S3 server: {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // 2. Replication lag: commit a marker, poll `litestream restore` until the marker is there.
    let lag_db = source.join(partitions[0].file_name());
    let lag_url = replica_url(&config, partitions[0], 0);
    let mut lags = Vec::new();
    let conn = rusqlite::Connection::open(&lag_db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    for i in 0..LAG_SAMPLES {
        let marker = 1_000_000_000 + i as i64;
        conn.execute("INSERT INTO messages (id, guild_id, channel_id, author_id, content, created_at) VALUES (?1, 1, 1, 1, 'marker', 0)", [marker]).unwrap();
        let committed = Instant::now();
        let probe = work.path().join("probe.sqlite3");
        loop {
            let _ = std::fs::remove_file(&probe);
            let out = litestream(&["restore", "-o", probe.to_str().unwrap(), &lag_url])
                .output()
                .unwrap();
            if out.status.success() {
                let found: i64 = rusqlite::Connection::open(&probe)
                    .unwrap()
                    .query_row(
                        "SELECT count(*) FROM messages WHERE id = ?1",
                        [marker],
                        |r| r.get(0),
                    )
                    .unwrap();
                if found == 1 {
                    break;
                }
            }
        }
        lags.push(committed.elapsed().as_secs_f64());
    }
    drop(conn);
    let max = lags.iter().copied().fold(0.0, f64::max);
    println!(
        "replication lag (commit → restorable, {LAG_SAMPLES} samples, sync-interval {} ms, each includes one restore poll of one {mib} MiB partition): median {:.2}s, max {:.2}s",
        config.replication.sync_interval_ms,
        median(&mut lags),
        max
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(replicate.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    replicate.wait().unwrap();

    // 3. A: `shardlite run` on an empty data dir until ready (restore before open, open, connect).
    let sim = Simulator::start(SimConfig {
        guilds: 64,
        shards: 4,
        messages: 1,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let node_dir = work.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let spec = NodeSpec {
        shards: 4,
        partitions: PARTITIONS,
        extra_toml: format!(
            "[replication]\nmode = \"child\"\nendpoint = \"{}\"\nbucket = \"{bucket}\"\nprefix = \"bench\"\n\
             litestream_bin = \"{}\"\nrestore_parallelism = {}\nrestore_timeout_secs = 600\n",
            s3::endpoint(),
            s3::litestream().display(),
            config.replication.restore_parallelism
        ),
        ..NodeSpec::default()
    };
    let t = Instant::now();
    let node = NodeProcess::start(&node_dir, &sim, &spec).await;
    let to_ready = t.elapsed().as_secs_f64();
    let restored_bytes = dir_bytes(&node.data_dir.join("partitions"));
    assert!(node.stop().await.success());
    println!(
        "A  shardlite run, empty data dir → ready (restore_parallelism {}): {to_ready:.2}s, {:.2} GiB restored",
        config.replication.restore_parallelism,
        restored_bytes as f64 / f64::from(1 << 30)
    );

    // 4. B: `litestream restore` of each partition, one after another.
    let seq_dir = work.path().join("sequential");
    std::fs::create_dir_all(&seq_dir).unwrap();
    let t = Instant::now();
    for p in &partitions {
        let out_path = seq_dir.join(p.file_name());
        let out = litestream(&[
            "restore",
            "-o",
            out_path.to_str().unwrap(),
            &replica_url(&config, *p, 0),
        ])
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sequential = t.elapsed().as_secs_f64();
    println!("B  litestream restore ×{PARTITIONS}, one after another: {sequential:.2}s");
    println!("A/B = {:.2}", to_ready / sequential);
}
