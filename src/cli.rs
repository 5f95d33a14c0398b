//! Command-line definitions (clap). Parsing only: `main.rs` maps each command to the module that
//! does the work.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// shardlite: Discord gateway shards → guild partitions → one SQLite file per partition.
#[derive(Debug, Parser)]
#[command(name = "shardlite", version, about)]
pub struct Cli {
    /// Log filter in `tracing` syntax (overridden by RUST_LOG), e.g. `info` or `shardlite=debug`.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: connect the owned shards, store every dispatch in its partition (or the
    /// router, with `cluster.mode = "router"`).
    Run(RunArgs),
    /// Run the stateless router: forward `/v1/guilds/{id}/…` to the pod that owns the guild.
    Router(RouterArgs),
    /// Run the simulator and a node in one process, then check every message was stored once.
    Demo(DemoArgs),
    /// Run the Discord gateway simulator alone (for `run` against it, benchmarks, manual tests).
    Simulate(SimulateArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Litestream integration.
    #[command(subcommand)]
    Litestream(LitestreamCommand),
    /// Print which partition, shard and pod own a guild.
    Owner(OwnerArgs),
    /// Print which shards and partitions move when the pod count changes.
    Plan(PlanArgs),
}

/// `shardlite run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (TOML), merged over the built-in defaults and under the environment.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Once ready, write `{"pid": N, "http": "127.0.0.1:PORT"}` here (atomically).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// `shardlite router`.
#[derive(Debug, Args)]
pub struct RouterArgs {
    /// Config file (TOML), merged over the built-in defaults and under the environment;
    /// `cluster.mode` is taken as `router` whatever it says. Read again when a pod answers 421.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Once listening, write `{"pid": N, "http": "127.0.0.1:PORT", "mode": "router"}` here
    /// (atomically).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// `shardlite demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guilds in the simulated world.
    #[arg(long, default_value_t = 2_000)]
    pub guilds: u32,
    /// Discord shard total.
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// Guild partitions (SQLite files).
    #[arg(long, default_value_t = 64)]
    pub partitions: u32,
    /// MESSAGE_CREATE dispatches in total.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Dispatches per second over all shards (default: as fast as the node reads).
    #[arg(long)]
    pub rate: Option<u32>,
    /// World seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Data directory (default: a new directory under the system temp dir, kept afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Never draw a progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    /// Where the partitions replicate: `local` starts a local S3 server (moto) and a supervised
    /// Litestream child, then proves a lost data dir comes back from the replica; `none` skips it.
    #[arg(long, value_enum, default_value = "local")]
    pub replica: DemoReplica,
    /// Directory holding `litestream` and `moto_server` (installed by scripts/install-tools).
    #[arg(long, default_value = ".tools/bin")]
    pub tools: PathBuf,
}

/// The demo's replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoReplica {
    /// A local S3 server and Litestream.
    Local,
    /// No replication.
    None,
}

/// `shardlite simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Gateway (ws://) listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub gateway_listen: SocketAddr,
    /// REST (`/api/v10/gateway/bot`, `/api/sim/status`) listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub api_listen: SocketAddr,
    /// Guilds in the simulated world.
    #[arg(long, default_value_t = 2_000)]
    pub guilds: u32,
    /// Discord shard total the simulator expects.
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// MESSAGE_CREATE dispatches in total.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Dispatches per second over all shards (default: unlimited).
    #[arg(long)]
    pub rate: Option<u32>,
    /// World seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Insert malformed frames (broken JSON, unknown event, missing guild) into each shard's stream.
    #[arg(long)]
    pub inject_malformed: bool,
    /// Once listening, write `{"pid", "gateway_url", "api_url"}` here (atomically).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// `shardlite config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective config (secrets redacted), or the error and exit 2.
    Check {
        /// Config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// `shardlite litestream …`.
#[derive(Debug, Subcommand)]
pub enum LitestreamCommand {
    /// Print the `litestream.yml` this pod renders for its partitions (no secrets in it).
    Config {
        /// Config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// `shardlite owner`.
#[derive(Debug, Args)]
pub struct OwnerArgs {
    /// Discord guild id (snowflake).
    pub guild_id: u64,
    /// Config file giving shards, partitions and pods.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Also print the seed deployments' md5 pod (migration aid; not the ownership function).
    #[arg(long)]
    pub md5: bool,
}

/// `shardlite plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Pod count now.
    #[arg(long)]
    pub pods: u32,
    /// Pod count after rescaling.
    #[arg(long)]
    pub to: u32,
    /// Config file giving shards and partitions.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}
