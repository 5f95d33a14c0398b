//! `shardlite demo`: the simulator and a node in one process, then an exactly-once check.
//!
//! The node is started exactly as `run` starts it, with its config pointed at the simulator's
//! URLs. The demo waits until the simulator has sent its whole script and every partition has
//! committed up to its shard's last sequence (readiness with a deadline, no fixed sleeps), stops
//! the node gracefully, and compares the files with the simulator's record.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{DemoArgs, DemoReplica};
use crate::config::{Config, ConfigError, ReplicationMode, Secret};
use crate::node::{Node, NodeError, NodeStatus};
use crate::ownership::{PartitionId, Topology};
use crate::replication::Epochs;
use crate::replication::restore::{Decision, restore_before_open};
use crate::simulator::{Expected, SimConfig, SimError, SimStatus, Simulator};
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
    /// The demo's config did not validate.
    Config(#[from] ConfigError),
    #[error("simulator failed")]
    /// The simulator could not start or send.
    Simulator(#[from] SimError),
    #[error(transparent)]
    /// The node failed.
    Node(#[from] NodeError),
    #[error("cannot read the partition files")]
    /// A partition file could not be read for verification.
    Store(#[from] StoreError),
    #[error("cannot create data dir {path}")]
    /// The data directory could not be created or moved.
    DataDir {
        /// The file or directory involved.
        path: PathBuf,
        #[source]
        /// The underlying error.
        source: std::io::Error,
    },
    #[error("the node did not commit the last dispatches within {0:?}")]
    /// The deadline for committing the last dispatches passed.
    CatchUp(Duration),
    #[error("local replica: {0}")]
    /// The local S3 server or Litestream could not be set up.
    LocalS3(String),
    #[error(transparent)]
    /// Restoring from the replica failed.
    Replication(#[from] crate::replication::ReplicationError),
}

/// What the demo measured and found.
#[derive(Debug)]
pub struct DemoReport {
    /// Where the partition files are.
    pub data_dir: PathBuf,
    /// Node start: `/gateway/bot`, restore decisions (with a replica), opening the partitions.
    pub startup: Duration,
    /// From the node's start returning until every dispatch was committed.
    pub elapsed: Duration,
    /// Dispatches the simulator sent (READY, GUILD_CREATE, the script).
    pub dispatches: u64,
    /// MESSAGE_CREATEs among them.
    pub messages: u64,
    /// The exactly-once check.
    pub verification: Verification,
    /// The lost-disk check, with a local replica: the data dir was removed and restored.
    pub restore: Option<RestoreCheck>,
}

/// The data dir was removed after the run and every partition restored from its replica.
#[derive(Debug)]
pub struct RestoreCheck {
    /// Partitions restored from a replica (all of them, when replication worked).
    pub restored: usize,
    /// Partitions in total.
    pub partitions: usize,
    /// Time to restore them all (Litestream, `replication.restore_parallelism` at a time).
    pub elapsed: Duration,
    /// The exactly-once check on the restored files.
    pub verification: Verification,
}

impl DemoReport {
    /// True when every check passed: exactly once after ingest, and after restore if one ran.
    pub fn passed(&self) -> bool {
        self.verification.is_exact()
            && self
                .restore
                .as_ref()
                .is_none_or(|r| r.restored == r.partitions && r.verification.is_exact())
    }
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
            "startup             {:.2}s (gateway info, restore decisions, opening partitions)",
            self.startup.as_secs_f64()
        )?;
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
        if let Some(r) = &self.restore {
            writeln!(
                f,
                "lost disk           data dir removed; {} of {} partitions restored from the replica in {:.2}s; \
                 stored {} · missing {} · duplicate {} · guild mismatches {}",
                r.restored,
                r.partitions,
                r.elapsed.as_secs_f64(),
                r.verification.stored_messages,
                r.verification.missing,
                r.verification.duplicates,
                r.verification.guild_mismatches.len()
            )?;
        }
        write!(
            f,
            "result              {}",
            match (self.passed(), self.restore.is_some()) {
                (true, true) =>
                    "OK: every message stored exactly once, and restored from the replica",
                (true, false) => "OK: every message stored exactly once",
                (false, _) => "FAILED",
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
    let local_s3 = match args.replica {
        DemoReplica::Local => {
            let s3 = LocalS3::start(&args.tools).await?;
            let r = &mut config.replication;
            r.mode = ReplicationMode::Child;
            r.endpoint = Some(s3.endpoint.clone());
            r.bucket = Some(LocalS3::BUCKET.into());
            r.prefix = format!("demo-{}", std::process::id());
            r.litestream_bin = args.tools.join("litestream");
            Some(s3)
        }
        DemoReplica::None => None,
    };
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

    let starting = Instant::now();
    // One process on a prefix of its own: no other writer to fence, so no leases, and the
    // replica is generation 0 (the prefix without an epoch).
    let node = Node::start(config.clone(), crate::node::Leased::default()).await?;
    // Ingest is timed from here: restore decisions and file opening are reported apart.
    let startup = starting.elapsed();
    let started = Instant::now();
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
    let expected = Arc::new(sim.expected());
    sim.shutdown().await;
    let verification = verify_blocking(&data_dir, topology, &expected).await?;
    let restore = match local_s3 {
        Some(s3) => {
            let check = lost_disk(&config, &expected).await;
            s3.stop().await;
            Some(check?)
        }
        None => None,
    };
    Ok(DemoReport {
        data_dir,
        startup,
        elapsed,
        dispatches,
        messages,
        verification,
        restore,
    })
}

async fn verify_blocking(
    data_dir: &Path,
    topology: Topology,
    expected: &Arc<Expected>,
) -> Result<Verification, StoreError> {
    let dir = data_dir.to_owned();
    let expected = expected.clone();
    tokio::task::spawn_blocking(move || verify(&dir, topology, &expected))
        .await
        .expect("verification does not panic")
}

/// Moves the data dir away (kept beside it as `….lost`), restores every partition from its
/// replica exactly as a starting node would, and checks the restored files.
async fn lost_disk(config: &Config, expected: &Arc<Expected>) -> Result<RestoreCheck, DemoError> {
    let data_dir = &config.storage.data_dir;
    let lost = data_dir.with_extension("lost");
    std::fs::rename(data_dir, &lost).map_err(|source| DemoError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let topology = config.topology();
    let partitions: Vec<PartitionId> = (0..topology.partitions()).map(PartitionId).collect();
    let started = Instant::now();
    let epochs: Epochs = partitions.iter().map(|p| (*p, 0)).collect();
    let outcomes = restore_before_open(config, &epochs).await?;
    let elapsed = started.elapsed();
    let restored = outcomes
        .iter()
        .filter(|o| o.decision == Decision::Restored)
        .count();
    let verification = verify_blocking(data_dir, topology, expected).await?;
    Ok(RestoreCheck {
        restored,
        partitions: partitions.len(),
        elapsed,
        verification,
    })
}

/// A local S3-compatible server (moto) for the demo's replica, stopped when dropped.
struct LocalS3 {
    child: tokio::process::Child,
    endpoint: String,
}

impl LocalS3 {
    const BUCKET: &'static str = "shardlite-demo";
    const START_DEADLINE: Duration = Duration::from_secs(60);

    async fn start(tools: &Path) -> Result<Self, DemoError> {
        let bin = tools.join("moto_server");
        for needed in [&bin, &tools.join("litestream")] {
            if !needed.exists() {
                return Err(DemoError::LocalS3(format!(
                    "{} not found: run scripts/install-tools, or pass --replica none",
                    needed.display()
                )));
            }
        }
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            return Err(DemoError::LocalS3(
                "Litestream needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (any values work \
                 for the local server; scripts/demo sets them)"
                    .into(),
            ));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| DemoError::LocalS3(format!("no free port: {e}")))?
            .port();
        let mut cmd = tokio::process::Command::new(&bin);
        for key in crate::config::SECRET_ENV {
            cmd.env_remove(key);
        }
        let child = cmd
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| DemoError::LocalS3(format!("cannot start {}: {e}", bin.display())))?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Self::START_DEADLINE;
        // moto accepts unsigned requests: creating the bucket is also the readiness probe.
        loop {
            match client
                .put(format!("{endpoint}/{}", Self::BUCKET))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() > deadline => {
                    return Err(DemoError::LocalS3(format!(
                        "{} did not answer within {:?}",
                        bin.display(),
                        Self::START_DEADLINE
                    )));
                }
                _ => tokio::time::sleep(TICK / 4).await,
            }
        }
        tracing::info!(%endpoint, bucket = Self::BUCKET, "local S3 server for the demo's replica");
        Ok(Self { child, endpoint })
    }

    async fn stop(mut self) {
        // Already gone is as good as stopped.
        let _ = self.child.kill().await;
    }
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
