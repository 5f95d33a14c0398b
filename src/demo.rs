//! `shardlite demo`: the simulator and a node in one process, then an exactly-once check.
//!
//! The node is started exactly as `run` starts it, with its config pointed at the simulator's
//! URLs. The demo waits until the simulator has sent its whole script and every partition has
//! committed up to its shard's last sequence (readiness with a deadline, no fixed sleeps), stops
//! the node gracefully, and compares the files with the simulator's record.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::DemoArgs;
use crate::config::{Config, ConfigError, Secret};
use crate::node::{Node, NodeError, NodeStatus};
use crate::simulator::{SimConfig, SimError, SimStatus, Simulator};
use crate::store::StoreError;
use crate::verify::{Verification, verify};

/// How often progress is sampled.
const TICK: Duration = Duration::from_millis(200);
/// Bound on sending the whole script (generous: the default run takes seconds).
const SEND_DEADLINE: Duration = Duration::from_secs(600);
/// Bound on the node committing everything after the last dispatch was sent.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(120);

/// Errors of the demo itself (a failed exactly-once check is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo config is invalid")]
    Config(#[from] ConfigError),
    #[error("simulator failed")]
    Simulator(#[from] SimError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot read the partition files")]
    Store(#[from] StoreError),
    #[error("cannot create data dir {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node did not commit the last dispatches within {0:?}")]
    CatchUp(Duration),
}

/// What the demo measured and found.
#[derive(Debug)]
pub struct DemoReport {
    /// Where the partition files are.
    pub data_dir: PathBuf,
    /// From node start until every dispatch was committed.
    pub elapsed: Duration,
    /// Dispatches the simulator sent (READY, GUILD_CREATE, the script).
    pub dispatches: u64,
    /// MESSAGE_CREATEs among them.
    pub messages: u64,
    /// The exactly-once check.
    pub verification: Verification,
}

impl DemoReport {
    /// Dispatches stored per second, end to end.
    pub fn events_per_sec(&self) -> f64 {
        self.dispatches as f64 / self.elapsed.as_secs_f64()
    }
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = &self.verification;
        let t = &v.totals;
        writeln!(f, "data dir            {}", self.data_dir.display())?;
        writeln!(
            f,
            "ingest              {} dispatches ({} MESSAGE_CREATE) in {:.2}s = {:.0} events/s",
            self.dispatches,
            self.messages,
            self.elapsed.as_secs_f64(),
            self.events_per_sec()
        )?;
        writeln!(
            f,
            "rows                guilds {} · channels {} · roles {} · users {} · members {} · messages {} ({} deleted) · message_stats {} (sum {})",
            t.guilds,
            t.channels,
            t.roles,
            t.users,
            t.members,
            t.messages,
            t.messages_deleted,
            t.message_stats_rows,
            t.message_stats_total
        )?;
        writeln!(
            f,
            "exactly once        expected {} · stored {} · missing {} · duplicate {} · unexpected {} · misplaced guilds {} · guild mismatches {}",
            v.expected_messages,
            v.stored_messages,
            v.missing,
            v.duplicates,
            v.unexpected,
            v.misplaced_guilds,
            v.guild_mismatches.len()
        )?;
        if !v.missing_examples.is_empty() {
            writeln!(f, "missing e.g.        {:?}", v.missing_examples)?;
        }
        if let Some(m) = v.guild_mismatches.first() {
            writeln!(f, "first mismatch      {m:?}")?;
        }
        write!(
            f,
            "result              {}",
            if v.is_exact() {
                "OK: every message stored exactly once"
            } else {
                "FAILED"
            }
        )
    }
}

/// Runs the demo. `progress` draws a bar on stderr when it is a terminal.
///
/// # Errors
/// [`DemoError`] if the simulator or node cannot run or the catch-up deadline passes.
pub async fn run(args: &DemoArgs) -> Result<DemoReport, DemoError> {
    let sim = Simulator::start(SimConfig {
        seed: args.seed,
        guilds: args.guilds,
        shards: args.shards,
        messages: args.messages,
        rate: args.rate,
        ..SimConfig::default()
    })
    .await?;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "shardlite-demo-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        )),
    };
    std::fs::create_dir_all(&data_dir).map_err(|source| DemoError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let mut config = Config::default();
    config.discord.gateway_url = Some(sim.gateway_url());
    config.discord.api_url = sim.api_url();
    config.discord.shards = args.shards;
    config.discord.token = Some(Secret::new(SimConfig::default().token));
    config.cluster.partitions = args.partitions;
    config.storage.data_dir = data_dir.clone();
    config.validate()?;
    let topology = config.topology();

    let bar = if args.no_progress || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.messages)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:12} [{bar:40}] {pos}/{len} messages ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("ingesting");

    let started = Instant::now();
    let node = Node::start(config).await?;
    {
        let all_sent = sim.wait_all_sent(SEND_DEADLINE);
        tokio::pin!(all_sent);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                r = &mut all_sent => { r?; break; }
                _ = tick.tick() => bar.set_position(sim.status().messages_sent),
            }
        }
    }
    bar.set_message("committing");
    let deadline = Instant::now() + CATCH_UP_DEADLINE;
    loop {
        let node_status = node.status().await?;
        if caught_up(&sim.status(), &node_status) {
            break;
        }
        if Instant::now() > deadline {
            bar.abandon();
            return Err(DemoError::CatchUp(CATCH_UP_DEADLINE));
        }
        tokio::time::sleep(TICK / 4).await;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    node.shutdown().await?;

    let record = sim.record();
    let dispatches = record.iter().filter(|d| !d.replay && !d.redelivery).count() as u64;
    let messages = sim.status().messages_total;
    let expected = sim.expected();
    sim.shutdown().await;
    let dir = data_dir.clone();
    let verification = tokio::task::spawn_blocking(move || verify(&dir, topology, &expected))
        .await
        .expect("verification does not panic")?;
    Ok(DemoReport {
        data_dir,
        elapsed,
        dispatches,
        messages,
        verification,
    })
}

/// True when, for every shard, every partition has committed the simulator's current session up
/// to the last sequence the simulator sent on it.
pub fn caught_up(sim: &SimStatus, node: &NodeStatus) -> bool {
    sim.shards.iter().all(|s| {
        node.groups.iter().any(|g| {
            g.shard == s.shard
                && !g.partitions.is_empty()
                && g.partitions.iter().all(|p| {
                    p.session.as_ref().is_some_and(|a| {
                        Some(&a.session_id) == s.session.as_ref() && a.applied_seq >= s.last_seq
                    })
                })
        })
    })
}
