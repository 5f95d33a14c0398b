//! Restart-to-resumed: how long a 4-shard node takes from process start to every shard resumed
//! and receiving (its ready file), after a graceful stop and after `kill -9`, with and without
//! Litestream replication. Every restart must resume (the simulator counts identifies).
//!
//! `cargo bench --bench restart` (replication runs need scripts/install-tools).

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../tests/it/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::time::{Duration, Instant};

use harness::{NodeProcess, NodeSpec};
use shardlite::simulator::{SimConfig, Simulator};

const RESTARTS: usize = 7;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn campaign(name: &str, extra_toml: String, kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: 2_000,
        shards: 4,
        messages: 50_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 4,
        partitions: 64,
        extra_toml,
        ..NodeSpec::default()
    };
    let first = NodeProcess::start(dir.path(), &sim, &spec).await;
    sim.wait_all_sent(Duration::from_secs(120)).await.unwrap();
    first.wait_caught_up(&sim, Duration::from_secs(60)).await;
    assert!(first.stop().await.success());
    let mut times = Vec::new();
    for _ in 0..RESTARTS {
        let t = Instant::now();
        let node = NodeProcess::start(dir.path(), &sim, &spec).await;
        times.push(t.elapsed().as_secs_f64());
        if kill {
            // Dropping a NodeProcess sends SIGKILL and reaps the child.
            drop(node);
        } else {
            assert!(node.stop().await.success());
        }
    }
    let identifies: u32 = sim.status().shards.iter().map(|s| s.identifies).sum();
    let (min, max) = (
        times.iter().copied().fold(f64::MAX, f64::min),
        times.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "{name:44} restart → all 4 shards resumed: median {:.3}s (min {min:.3}, max {max:.3}, {RESTARTS} restarts); identifies in total {identifies} (4 = none spent on restarts)",
        median(&mut times)
    );
    sim.shutdown().await;
}

#[tokio::main]
async fn main() {
    campaign("graceful stop, no replication", String::new(), false).await;
    campaign("kill -9, no replication", String::new(), true).await;
    let bucket = s3::bucket("restart-bench").await;
    campaign(
        "graceful stop, Litestream child",
        s3::replication_toml(&bucket, s3::endpoint(), 60),
        false,
    )
    .await;
    let bucket = s3::bucket("restart-bench-kill").await;
    campaign(
        "kill -9, Litestream child",
        s3::replication_toml(&bucket, s3::endpoint(), 60),
        true,
    )
    .await;
}
