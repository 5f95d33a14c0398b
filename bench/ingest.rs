//! Ingest benchmark: simulator → `shardlite run` (a separate process) → stored rows.
//!
//! For each scenario the simulator runs in this process and the real binary as a child, so the
//! child's peak RSS (`VmHWM` from /proc) is the node's alone. Reports dispatches/s and
//! MESSAGE_CREATE/s from spawn to "every partition committed its shard's last sequence", peak RSS,
//! and the exactly-once check. Run with `cargo bench --bench ingest`; results go to bench/README.md.
//!
//! Scenarios are chosen with `INGEST_SCENARIOS=small,large` (default both).

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::time::{Duration, Instant};

use harness::{NodeProcess, NodeSpec};
use shardlite::ownership::Topology;
use shardlite::simulator::{SimConfig, Simulator};
use shardlite::verify::verify;

struct Scenario {
    name: &'static str,
    guilds: u32,
    messages: u64,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "small",
        guilds: 2_000,
        messages: 200_000,
    },
    Scenario {
        name: "large",
        guilds: 20_000,
        messages: 200_000,
    },
];

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

async fn run(s: &Scenario) {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig {
        guilds: s.guilds,
        shards: 4,
        messages: s.messages,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let spec = NodeSpec {
        shards: 4,
        partitions: 64,
        ..NodeSpec::default()
    };
    let started = Instant::now();
    let node = NodeProcess::start(dir.path(), &sim, &spec).await;
    sim.wait_all_sent(Duration::from_secs(600)).await.unwrap();
    node.wait_caught_up(&sim, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    let rss = peak_rss_mib(node.pid());
    let data_dir = node.data_dir.clone();
    assert!(node.stop().await.success());
    let dispatches = sim
        .record()
        .iter()
        .filter(|d| !d.replay && !d.redelivery)
        .count() as f64;
    let v = verify(&data_dir, Topology::new(4, 64, 1).unwrap(), &sim.expected()).unwrap();
    println!(
        "{:6} guilds {:>6} messages {:>7}: {:6.2} s, {:>7.0} dispatches/s, {:>7.0} MESSAGE_CREATE/s, node peak RSS {:6.1} MiB, exactly once: {} (missing {}, duplicate {})",
        s.name,
        s.guilds,
        s.messages,
        elapsed.as_secs_f64(),
        dispatches / elapsed.as_secs_f64(),
        s.messages as f64 / elapsed.as_secs_f64(),
        rss,
        v.is_exact(),
        v.missing,
        v.duplicates
    );
    sim.shutdown().await;
}

fn main() {
    let wanted = std::env::var("INGEST_SCENARIOS").unwrap_or_else(|_| "small,large".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for s in SCENARIOS
        .iter()
        .filter(|s| wanted.split(',').any(|w| w == s.name))
    {
        rt.block_on(run(s));
    }
}
