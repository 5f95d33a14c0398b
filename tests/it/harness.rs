//! Test harness: the real `shardlite` binary as a child process, driven against the in-process
//! simulator. A directory per test, inherited `SHARDLITE_*` variables stripped, readiness read
//! from the ready file with a deadline, output kept in files and printed when a test fails, and
//! the child killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use shardlite::node::NodeStatus;
use shardlite::simulator::Simulator;

/// The token the simulator accepts by default.
pub const TOKEN: &str = "simulated-token";

/// The API bearer token every node under test gets (`SHARDLITE_API_TOKEN`).
pub const API_TOKEN: &str = "test-api-token";

/// GET `http://{addr}{path}` with the API token.
pub async fn get_authorized(addr: &str, path: &str) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
}

/// Path of the binary under test, built by cargo for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shardlite")
}

/// A `Command` for the binary with a clean environment: no inherited `SHARDLITE_*`, `POD_ORDINAL`,
/// `NUM_GATEWAY_PODS`, `SERVICE_MODE` or `DISCORD_TOKEN` can change what the test means.
pub fn command() -> Command {
    let mut cmd = Command::new(bin());
    for (key, _) in std::env::vars() {
        if key.starts_with("SHARDLITE_")
            || key == "POD_ORDINAL"
            || key == "NUM_GATEWAY_PODS"
            || key == "SERVICE_MODE"
            || key == "DISCORD_TOKEN"
            || key == "RUST_LOG"
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `deadline`.
pub async fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Script events the simulator sent so far, over all shards.
pub fn script_sent(sim: &Simulator) -> u64 {
    sim.status().shards.iter().map(|s| s.script_sent).sum()
}

/// Holds the simulator's script stream where it stands (what was claimed so far), e.g. while a
/// node starts, so how far the stream moves is the test's choice and not the machine's speed.
pub fn hold_stream(sim: &Simulator) {
    sim.hold_script_at(Some(sim.status().script_claimed));
}

/// Moves the simulator's script hold to `events` past what was claimed so far: writes keep
/// coming for a while (a fault that needs a commit gets one), but the stream cannot run out.
pub fn hold_stream_after(sim: &Simulator, events: u64) {
    sim.hold_script_at(Some(sim.status().script_claimed + events));
}

/// Lets the held stream move `step` more script events, plus `slack` beyond them, and waits
/// until those `step` were sent. A crash right after lands while the stream still flows (the
/// slack is about half a second of it), and a campaign can never run out of stream early: each
/// step moves it by at most `step + slack`, on a slow machine or a fast one.
pub async fn stream_past(sim: &Simulator, step: u64, slack: u64) {
    let base = sim.status().script_claimed;
    sim.hold_script_at(Some(base + step + slack));
    wait_for(
        &format!("{step} more script events sent (from {base})"),
        Duration::from_secs(120),
        async || (script_sent(sim) >= base + step).then_some(()),
    )
    .await;
}

/// Script events in the simulator's whole stream, over all shards.
pub fn script_total(sim: &Simulator) -> u64 {
    sim.status().shards.iter().map(|s| s.script_total).sum()
}

/// The seed of a randomized test: `SHARDLITE_TEST_SEED` (decimal or `0x` hex) when set, to
/// replay or vary a run, else the test's own `default`. Printed, so a failure names it.
pub fn seed(default: u64) -> u64 {
    let seed = match std::env::var("SHARDLITE_TEST_SEED") {
        Ok(text) => {
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("SHARDLITE_TEST_SEED={text:?}: {e}"))
        }
        Err(_) => default,
    };
    println!("seed {seed:#x} (replay with SHARDLITE_TEST_SEED={seed:#x})");
    seed
}

/// True when every partition of `shard`'s group in `status` has committed the simulator's
/// current session of that shard up to `min_seq` or beyond.
pub fn shard_applied(
    status: &NodeStatus,
    shard: &shardlite::simulator::ShardStatus,
    min_seq: u64,
) -> bool {
    status.groups.iter().any(|g| {
        g.shard == shard.shard
            && !g.partitions.is_empty()
            && g.partitions.iter().all(|p| {
                p.session.as_ref().is_some_and(|a| {
                    Some(&a.session_id) == shard.session.as_ref() && a.applied_seq >= min_seq
                })
            })
    })
}

/// Shape of the node under test.
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    pub shards: u32,
    pub partitions: u32,
    /// More TOML sections appended to the config (e.g. `[replication]`).
    pub extra_toml: String,
    /// More keys of the `[storage]` table, which the harness writes itself (`data_dir`).
    pub storage_toml: String,
    /// More keys of the `[cluster]` table, which the harness writes itself (`partitions`,
    /// `lease_ttl_secs`).
    pub cluster_toml: String,
    /// `cluster.lease_ttl_secs`; `None` = 10 s, so a restart after `kill -9` (whose leases were
    /// never released) waits seconds, not the default minute, and a renewal still has 6 s to
    /// succeed on a loaded machine.
    pub lease_ttl_secs: Option<u64>,
    /// `http.listen`; `None` = `127.0.0.1:0` (an ephemeral port).
    pub http_listen: Option<String>,
}

/// Writes `dir/shardlite.toml` for a node of `spec` against `sim`, with its data in `dir/data`
/// and HTTP on an ephemeral port; returns the file's path.
pub fn write_config(dir: &Path, sim: &Simulator, spec: &NodeSpec) -> PathBuf {
    let config = dir.join("shardlite.toml");
    std::fs::write(
        &config,
        format!(
            "[discord]\ngateway_url = \"{}\"\napi_url = \"{}\"\nshards = {}\n\
             [cluster]\npartitions = {}\nlease_ttl_secs = {}\n{}[storage]\ndata_dir = \"{}\"\n{}[http]\nlisten = \"{}\"\n{}",
            sim.gateway_url(),
            sim.api_url(),
            spec.shards,
            spec.partitions,
            spec.lease_ttl_secs.unwrap_or(10),
            spec.cluster_toml,
            dir.join("data").display(),
            spec.storage_toml,
            spec.http_listen.as_deref().unwrap_or("127.0.0.1:0"),
            spec.extra_toml
        ),
    )
    .unwrap();
    config
}

/// Runs `shardlite run --config CONFIG` to its exit (within `deadline`) for a start that must
/// fail; returns the exit status and stderr.
pub async fn run_expecting_exit(config: &Path, deadline: Duration) -> (ExitStatus, String) {
    // A file, not a pipe: a child whose stderr outgrew a pipe's buffer would block forever.
    let log = config.with_extension("exit.log");
    let mut child = command()
        .args(["run", "--config"])
        .arg(config)
        .env("DISCORD_TOKEN", TOKEN)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn shardlite run");
    let status = wait_for("shardlite run to exit", deadline, async || {
        child.try_wait().unwrap()
    })
    .await;
    (status, std::fs::read_to_string(&log).unwrap())
}

/// A running `shardlite run`.
pub struct NodeProcess {
    child: Option<Child>,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub http: String,
    stderr: PathBuf,
}

impl NodeProcess {
    /// Writes a config for `sim` into `dir`, starts `shardlite run` and waits for its ready file.
    pub async fn start(dir: &Path, sim: &Simulator, spec: &NodeSpec) -> NodeProcess {
        let data_dir = dir.join("data");
        let config = write_config(dir, sim, spec);
        let ready = dir.join("ready.json");
        // A previous run's ready file in the same directory must not count as this run's.
        let _ = std::fs::remove_file(&ready);
        let stderr = dir.join("stderr.log");
        let child = command()
            .args(["run", "--config"])
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .env("DISCORD_TOKEN", TOKEN)
            .env("SHARDLITE_API_TOKEN", API_TOKEN)
            .env("RUST_LOG", "info")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn shardlite run");
        let mut node = NodeProcess {
            child: Some(child),
            dir: dir.to_owned(),
            data_dir,
            http: String::new(),
            stderr,
        };
        let info: serde_json::Value =
            // Restores before open may take up to a test's `restore_timeout_secs` (60 s).
            wait_for("the ready file", Duration::from_secs(120), async || {
                if let Some(status) = node.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "shardlite run exited early with {status}:\n{}",
                        node.stderr_text()
                    );
                }
                let text = std::fs::read_to_string(&ready).ok()?;
                serde_json::from_str(&text).ok()
            })
            .await;
        node.http = info["http"].as_str().unwrap().to_owned();
        node
    }

    /// GET /readyz, parsed (ready or not).
    pub async fn status(&self) -> Option<NodeStatus> {
        let resp = get_authorized(&self.http, "/readyz").await.ok()?;
        resp.json().await.ok()
    }

    /// The Litestream child's pid from `/readyz`, once one runs.
    pub async fn litestream_pid(&self) -> Option<u32> {
        self.status().await?.litestream?.pid
    }

    /// GET /metrics (Prometheus text).
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until every partition committed the simulator's current session up to its last seq.
    pub async fn wait_caught_up(&self, sim: &Simulator, deadline: Duration) {
        wait_for("the node to commit every dispatch", deadline, async || {
            let status = self.status().await?;
            shardlite::demo::caught_up(&sim.status(), &status).then_some(())
        })
        .await;
    }

    /// Waits until every partition applied something of its shard's current simulator
    /// session (`applied_seq ≥ 1`). A new session's first dispatch applies only after the
    /// session start is durable (committed, and synced to the replica when Litestream runs as
    /// the node's child): from here on a lost disk can resume the session.
    pub async fn wait_sessions_applied(&self, sim: &Simulator, deadline: Duration) {
        wait_for(
            "every partition to apply its shard's current session",
            deadline,
            async || {
                let status = self.status().await?;
                let sim = sim.status();
                sim.shards
                    .iter()
                    .all(|s| shard_applied(&status, s, 1))
                    .then_some(())
            },
        )
        .await;
    }

    /// Waits until the partitions of `shards` (the ones this pod owns) committed the
    /// simulator's current session of their shard up to its last seq.
    pub async fn wait_caught_up_on(&self, sim: &Simulator, shards: &[u32], deadline: Duration) {
        wait_for(
            "the pod to commit its shards' dispatches",
            deadline,
            async || {
                let status = self.status().await?;
                let sim = sim.status();
                shards
                    .iter()
                    .all(|&shard| {
                        let s = &sim.shards[shard as usize];
                        shard_applied(&status, s, s.last_seq)
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn stop(mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let mut child = self.child.take().unwrap();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success(), "kill -TERM {pid}");
        // The node's own bound on a graceful stop is `replication::process::STOP_BOUND` (70 s).
        wait_for(
            "shardlite run to exit",
            Duration::from_secs(90),
            async || child.try_wait().unwrap(),
        )
        .await
    }

    /// GET /readyz: the HTTP status code and the parsed body (200 ready, 503 not ready).
    pub async fn readyz(&self) -> Option<(u16, NodeStatus)> {
        let resp = get_authorized(&self.http, "/readyz").await.ok()?;
        let code = resp.status().as_u16();
        Some((code, resp.json().await.ok()?))
    }

    /// Waits for the process to exit on its own, within `deadline`.
    pub async fn wait_exit(mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        wait_for("shardlite run to exit by itself", deadline, async || {
            child.try_wait().unwrap()
        })
        .await
    }

    /// Sends SIGKILL (a crash: no close frame, no drain, no final sync by the node itself) and
    /// waits for the exit status.
    pub async fn kill9(mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let mut child = self.child.take().unwrap();
        let killed = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        assert!(killed.success(), "kill -KILL {pid}");
        wait_for(
            "shardlite run to die",
            Duration::from_secs(30),
            async || child.try_wait().unwrap(),
        )
        .await
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Best effort: the test is already failing or finished.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- shardlite stderr ({}) ---\n{}",
                self.dir.display(),
                self.stderr_text()
            );
        }
    }
}

/// True once process `pid` is gone: no `/proc/PID`, or a zombie (exited, waiting to be reaped by
/// whoever inherited it).
pub fn process_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // Format: `pid (comm) state …`; comm may contain spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}
