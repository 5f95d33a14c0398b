//! The `shardlite` binary: parse the CLI, load config, run one command, map errors to exit codes
//! (DESIGN §12: 0 clean stop, 2 bad config or usage, 1 anything else; one clear line on stderr).

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use shardlite::cli::{Cli, Command, ConfigCommand, LitestreamCommand};
use shardlite::config::{Config, ServiceMode};
use shardlite::node::NodeError;
use shardlite::replication::litestream_config;
use shardlite::{demo, error_chain as chain, ownership, router, run};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; journald, files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    #[cfg(feature = "tls")]
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the tokio runtime: {e}")),
    };
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run(args) => {
            let config = match Config::load(args.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(2, &e.to_string()),
            };
            // Before the token check: a router needs no Discord token.
            if config.cluster.mode == ServiceMode::Router {
                return run_router(config, args.config, args.ready_file).await;
            }
            if config.discord.token.is_none() {
                return fail(2, &NodeError::MissingToken.to_string());
            }
            // Registered before anything else runs: a SIGTERM while the pod waits for leases
            // stops it gracefully instead of killing it.
            let (reload_tx, reloads) = tokio::sync::mpsc::channel(4);
            let shutdown = signals(Some((args.config.clone(), reload_tx)));
            match run::run(config, args.ready_file, shutdown, reloads).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.exit_code(), &chain(&e)),
            }
        }
        Command::Router(args) => match router::load_config(args.config.as_deref()) {
            Ok(config) => run_router(config, args.config, args.ready_file).await,
            Err(e) => fail(2, &e.to_string()),
        },
        Command::Demo(args) => match demo::run(&args).await {
            Ok(report) => {
                println!("{report}");
                if report.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => fail(1, &chain(&e)),
        },
        Command::Simulate(args) => match run::run_simulator(&args, stop_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, &chain(e.as_ref())),
        },
        Command::Config(ConfigCommand::Check { config }) => match Config::load(config.as_deref()) {
            Ok(c) => {
                print!("{}", c.to_toml_redacted());
                ExitCode::SUCCESS
            }
            Err(e) => fail(2, &e.to_string()),
        },
        Command::Litestream(LitestreamCommand::Config { config }) => {
            match Config::load(config.as_deref()) {
                Ok(c) => {
                    // For a sidecar (external mode): generation 0, the prefix without an epoch.
                    let owned = c.topology().partitions_of_pod(c.cluster.ordinal);
                    let epochs = owned.iter().map(|p| (*p, 0)).collect();
                    print!("{}", litestream_config::render(&c, &epochs));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(2, &e.to_string()),
            }
        }
        Command::Owner(args) => {
            let config = match Config::load(args.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(2, &e.to_string()),
            };
            let t = config.topology();
            let g = args.guild_id;
            println!(
                "guild {g}: key {} → partition {} → shard {} → pod {}   (shards {}, partitions {}, pods {})",
                ownership::guild_key(g),
                t.partition_of_guild(g),
                t.shard_of_guild(g),
                t.pod_of_guild(g),
                t.shards(),
                t.partitions(),
                t.pods()
            );
            if args.md5 {
                println!(
                    "legacy md5 pod {} (seed deployments' mapping; not the ownership function)",
                    ownership::legacy_md5_pod(g, t.pods())
                );
            }
            ExitCode::SUCCESS
        }
        Command::Plan(args) => {
            let config = match Config::load(args.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(2, &e.to_string()),
            };
            let t = config.topology();
            match ownership::plan(t.shards(), t.partitions(), args.pods, args.to) {
                Ok(plan) => {
                    println!("{plan}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(2, &e.to_string()),
            }
        }
    }
}

/// Runs the router until ctrl-c or SIGTERM. SIGHUP is ignored: the router reads its config again
/// by itself when a pod answers 421.
async fn run_router(
    config: Config,
    path: Option<std::path::PathBuf>,
    ready_file: Option<std::path::PathBuf>,
) -> ExitCode {
    match router::run(config, path, ready_file, stop_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &chain(&e)),
    }
}

/// Where SIGHUP sends the config it reads again: the `--config` path and `run`'s reload channel.
type Reload = (
    Option<std::path::PathBuf>,
    tokio::sync::mpsc::Sender<Config>,
);

/// Resolves on ctrl-c or SIGTERM (what systemd and Kubernetes send to stop a process). With
/// `reload`, SIGHUP reads the config again from its path (and the environment) and sends it on,
/// for `run` to apply by a drained handoff (DESIGN §12); a file that does not load is reported
/// and the running config stays. Without, SIGHUP is logged and ignored. The handlers are
/// registered when this is called, not when the returned future is first polled.
fn signals(reload: Option<Reload>) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let hangup = signal(SignalKind::hangup());
        // Registered now, watched from the first poll on: a ctrl-c in between is not lost.
        let ctrl_c = tokio::spawn(tokio::signal::ctrl_c());
        async move {
            let mut term = match term {
                Ok(term) => term,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only ctrl-c stops the process");
                    // If ctrl-c cannot be watched either, nothing can stop us gracefully; run on.
                    let _ = ctrl_c.await;
                    return;
                }
            };
            let mut hangup = hangup
                .inspect_err(|e| tracing::warn!(error = %e, "cannot watch SIGHUP; a config change needs a restart"))
                .ok();
            tokio::pin!(ctrl_c);
            loop {
                tokio::select! {
                    _ = &mut ctrl_c => break,
                    _ = term.recv() => break,
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => match &reload {
                        None => tracing::warn!("SIGHUP ignored: this command has no config to read again"),
                        Some((path, reloads)) => match Config::load(path.as_deref()) {
                            Ok(config) => {
                                tracing::info!("SIGHUP: config read again");
                                if reloads.try_send(config).is_err() {
                                    tracing::warn!("SIGHUP: too many reloads pending; this one is dropped");
                                }
                            }
                            Err(e) => tracing::error!(error = %e,
                                "SIGHUP: the config does not load; the running config stays"),
                        },
                    },
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        drop(reload);
        // Without a signal source, run until ctrl-c or killed.
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves on ctrl-c or SIGTERM; for `simulate` and `router`, which read no config on SIGHUP.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    signals(None)
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}
