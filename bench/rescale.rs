//! Rescale 3 → 4 pods under ingest (issue 13): 16 shards over 64 partitions, the real binary with
//! its Litestream child, a local S3 server (moto) and the in-tree simulator; lease TTL 10 s (the
//! harness's; `RESCALE_LEASE_TTL_SECS` overrides it) and Litestream sync interval 200 ms (the
//! tests'; `RESCALE_SYNC_INTERVAL_MS` overrides it).
//!
//! Pods 0, 1 and 2 run with `cluster.pods = 3` until every partition has caught up; then the step
//! is done as a StatefulSet rolling update does it: pod 3 starts with `pods = 4` (it waits for
//! the leases of the shards it takes over), then pods 2, 1 and 0 are stopped (SIGTERM) and
//! started again with `pods = 4` one after another, each once the previous one answers `/readyz`
//! with 200 (a pod waiting for leases held by live pods does). A pod that exits before it is
//! ready, or while it runs (it exits 1 when it cannot renew a lease in time), is started again
//! with the spec it had, as the StatefulSet would, and counted. The bench reports, from the
//! moment the step begins:
//! - when each moved shard is back on its new owner (pod 3's `/readyz` shows it active, the
//!   simulator saw its RESUME — or IDENTIFY — and every partition of it applied that session up
//!   to where the simulator stood then), also counted from its old owner's stop;
//! - identifies spent during the step (0: every move resumed its session), the restores
//!   (`restore decided … decision=Restored` lines) and the leases a stop left unreleased;
//! - the pods that exited on a lost lease (before, during and after the step) and how often each
//!   pod was started again;
//! - a timeline of each pod's log lines that bound the step;
//! - lease requests per second to the S3 server over a 30 s window after the step, counted from
//!   moto's request log, against the protocol's partitions × 3 / TTL;
//! - and, at the end, the exactly-once check over the partitions of their final owners. It fails
//!   after printing everything if a move cost a session or a pod lost a lease.
//!
//! `scripts/install-tools && cargo bench --bench rescale`; results are in bench/README.md.

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../tests/it/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[cfg(doc)]
use harness::NodeProcess;
use harness::{NodeSpec, script_sent, script_total, shard_applied, wait_for};
use shardlite::node::shard::ShardPhase;
use shardlite::ownership::Topology;
use shardlite::simulator::{SimConfig, Simulator};
use shardlite::verify::verify;

const SHARDS: u32 = 16;
const PARTITIONS: u32 = 64;
const GUILDS: u32 = 2_000;
const MESSAGES: u64 = 400_000;
/// Script dispatches per second over the whole simulator: fixed, so the stream flows through the
/// whole step and the steady-state window after it whatever the machine's speed (the stream is
/// held back before its last twentieth until both are over; the bench says if it got there).
const RATE: u32 = 2_000;
/// The harness's lease TTL (its default, stated here because every figure depends on it):
/// renewals every TTL / 3, a waiting pod looks again every TTL / 6. `RESCALE_LEASE_TTL_SECS`
/// overrides it, to see what the step does when renewals have more time (bench/README.md).
fn lease_ttl_secs() -> u64 {
    match std::env::var("RESCALE_LEASE_TTL_SECS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("RESCALE_LEASE_TTL_SECS={v:?}: {e}")),
        Err(_) => 10,
    }
}
/// `replication.sync_interval_ms`: the tests' 200 ms (`s3::replication_toml`) unless
/// `RESCALE_SYNC_INTERVAL_MS` sets another (the shipped default is 1,000 ms).
fn sync_interval_ms() -> Option<u64> {
    std::env::var("RESCALE_SYNC_INTERVAL_MS").ok().map(|v| {
        v.parse()
            .unwrap_or_else(|e| panic!("RESCALE_SYNC_INTERVAL_MS={v:?}: {e}"))
    })
}
/// The steady-state window over which lease requests are counted.
const WINDOW: Duration = Duration::from_secs(30);
/// Bound on each wait of the step (a pod ready again, every moved shard back): only there so a
/// hang fails. The step took up to 241 s on the loaded 2-core machine (bench/README.md).
const STEP_DEADLINE: Duration = Duration::from_secs(600);

/// A moto server of this bench's own, logging one line per request to `log`: the shared one of
/// `s3.rs` discards its output, and the request log is how lease requests are counted.
struct Moto {
    url: String,
    log: PathBuf,
}

fn start_moto(log: &Path) -> Moto {
    let moto = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/moto_server");
    assert!(
        moto.exists(),
        "{} is missing: run scripts/install-tools",
        moto.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let file = std::fs::File::create(log).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt as _;
        // Not reniced: it shares the 2 cores with the simulator, the pods and their Litestreams,
        // as in the restore bench and the tests.
        let mut cmd = std::process::Command::new(moto);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // Each request line reaches the file when it is logged, not when a buffer fills.
            .env("PYTHONUNBUFFERED", "1")
            .stdout(std::process::Stdio::null())
            .stderr(file);
        // SAFETY: prctl in the forked child before exec; no memory of the parent is touched.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().expect("start moto_server");
        tx.send(()).unwrap();
        // The parent-death signal is bound to this thread: it lives as long as the bench.
        let _keep = child;
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Moto {
        url: format!("http://127.0.0.1:{port}"),
        log: log.to_owned(),
    }
}

impl Moto {
    /// Bytes of request log so far: a window's requests are the lines between two offsets.
    fn offset(&self) -> usize {
        std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }

    /// Requests logged between two offsets. moto logs
    /// `"PUT /bucket/test/leases/p0007 HTTP/1.1" 200 -`, and colours the request of an error
    /// answer with ANSI escapes (removed here).
    fn requests(&self, from: usize, to: usize) -> Requests {
        let text = std::fs::read(&self.log).unwrap();
        let text = String::from_utf8_lossy(&text[from.min(text.len())..to.min(text.len())]);
        let mut r = Requests::default();
        for line in text.lines().map(strip_ansi) {
            if !line.contains(" HTTP/1.1\" ") {
                continue;
            }
            r.all += 1;
            // The partition leases only, not the start-time capability-check object.
            if line.contains("/test/leases/p") {
                if line.contains("\"PUT ") {
                    r.lease_put += 1;
                    if line.contains("\" 412 ") {
                        r.lease_put_refused += 1;
                    }
                } else if line.contains("\"GET ") {
                    r.lease_get += 1;
                } else {
                    r.lease_other += 1;
                }
            }
        }
        r
    }
}

/// S3 requests in a stretch of moto's log.
#[derive(Debug, Default)]
struct Requests {
    lease_put: u64,
    /// Lease PUTs answered 412 (an `If-Match`/`If-None-Match` that did not hold).
    lease_put_refused: u64,
    lease_get: u64,
    lease_other: u64,
    all: u64,
}

impl Requests {
    fn lease(&self) -> u64 {
        self.lease_put + self.lease_get + self.lease_other
    }
}

/// `line` without ANSI escape sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Kills, when the bench panics, the processes it started under `work`: the pods' supervisor
/// tasks do not stop them on the way out, and the pods and the Litestream children of killed
/// pods would outlive the bench (they carry no parent-death signal).
struct Orphans {
    work: PathBuf,
}

impl Drop for Orphans {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let work = self.work.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            // Only this run's pods and Litestreams: their command lines name its work dir.
            if cmdline.contains(&work)
                && (cmdline.contains("shardlite") || cmdline.contains("litestream"))
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Pod `ordinal` of `pods`, replicating to `bucket` on `endpoint`.
fn spec(bucket: &str, endpoint: &str, pods: u32, ordinal: u32) -> NodeSpec {
    NodeSpec {
        shards: SHARDS,
        partitions: PARTITIONS,
        cluster_toml: format!("pods = {pods}\nordinal = {ordinal}\n"),
        extra_toml: {
            let toml = s3::replication_toml(bucket, endpoint, 60);
            let tests = "sync_interval_ms = 200\n";
            assert!(toml.contains(tests), "{toml}");
            match sync_interval_ms() {
                None => toml,
                Some(ms) => toml.replace(tests, &format!("sync_interval_ms = {ms}\n")),
            }
        },
        lease_ttl_secs: Some(lease_ttl_secs()),
        ..NodeSpec::default()
    }
}

/// Most restarts of one pod before the bench gives up on it (a crash loop, not lease losses).
const MAX_RESTARTS: u32 = 20;

/// One pod, kept running as a StatefulSet keeps its container running: `shardlite run` started
/// in its directory (config from [`harness::write_config`], environment as
/// [`NodeProcess::start`] sets it, stderr appended to `stderr.log`) and, whenever the process
/// exits — a pod exits 1 when it cannot renew a lease in time — started again with the same spec,
/// and counted. Stopping it sends SIGTERM whatever it is doing, as Kubernetes does, also while it
/// still waits for leases. Not [`NodeProcess::start`]: that gives up after 120 s without a ready
/// file, and pod 3 legitimately waits for the whole rolling update.
struct Pod {
    /// The current run's HTTP address once its ready file appeared; `None` while (re)starting.
    ready: tokio::sync::watch::Receiver<Option<String>>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// How the last run ended, and how many times the pod was started again.
    task: tokio::task::JoinHandle<(ExitStatus, u32)>,
}

/// Spawns `shardlite run` for `spec` in `dir`, with a fresh ready file.
fn spawn_run(dir: &Path, sim: &Simulator, spec: &NodeSpec) -> Child {
    let config = harness::write_config(dir, sim, spec);
    let ready = dir.join("ready.json");
    // A previous run's ready file must not count as this run's.
    let _ = std::fs::remove_file(&ready);
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .unwrap();
    harness::command()
        .args(["run", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .env("DISCORD_TOKEN", harness::TOKEN)
        .env("SHARDLITE_API_TOKEN", harness::API_TOKEN)
        .env("RUST_LOG", "info")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn shardlite run")
}

/// SIGTERM, then the exit status (SIGKILL after the node's own stop bound, 70 s, and more).
async fn terminate(child: &mut Child) -> ExitStatus {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Pod {
    /// Starts pod `ordinal` in `dir` with `spec` under supervision; returns at once. `zero` is
    /// the run's start, for the times it prints.
    fn start(ordinal: u32, dir: &Path, sim: &Simulator, spec: NodeSpec, zero: Instant) -> Pod {
        let (ready_tx, ready) = tokio::sync::watch::channel(None);
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (dir, sim) = (dir.to_owned(), sim.clone());
        let task = tokio::spawn(async move {
            let mut restarts = 0;
            loop {
                let mut child = spawn_run(&dir, &sim, &spec);
                let status = loop {
                    tokio::select! {
                        // A stop request, or the Pod dropped: stop gracefully either way.
                        _ = &mut stop_rx => return (terminate(&mut child).await, restarts),
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    if let Some(status) = child.try_wait().unwrap() {
                        break status;
                    }
                    if ready_tx.borrow().is_none()
                        && let Ok(text) = std::fs::read_to_string(dir.join("ready.json"))
                        && let Ok(info) = serde_json::from_str::<serde_json::Value>(&text)
                    {
                        ready_tx.send_replace(info["http"].as_str().map(str::to_owned));
                    }
                };
                let was_ready = ready_tx.send_replace(None).is_some();
                println!(
                    "pod {ordinal} exited ({status}) {} it was ready, +{:.2} s of the run (see its \
                     stderr); starting it again",
                    if was_ready { "after" } else { "before" },
                    zero.elapsed().as_secs_f64()
                );
                restarts += 1;
                assert!(
                    restarts <= MAX_RESTARTS,
                    "pod {ordinal} exited {restarts} times"
                );
            }
        });
        Pod { ready, stop, task }
    }

    /// Waits until the current run is ready (its ready file appeared: every lease held, every
    /// partition open, every shard receiving).
    async fn ready(&mut self) {
        tokio::time::timeout(STEP_DEADLINE, self.ready.wait_for(Option::is_some))
            .await
            .expect("a pod to be ready")
            .unwrap();
    }

    /// GET /readyz of the current run, if it is ready.
    async fn status(&self) -> Option<shardlite::node::NodeStatus> {
        let http = self.ready.borrow().clone()?;
        // With the token: the session ids are what the bench compares.
        let resp = harness::get_authorized(&http, "/readyz").await.ok()?;
        resp.json().await.ok()
    }

    /// Stops it (SIGTERM); returns how its last run ended and how many times it was started
    /// again.
    async fn stop(self) -> (ExitStatus, u32) {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// How many times a pod exited on a lost lease, over the logs of every run in `dirs`.
fn lost_leases(dirs: &[PathBuf]) -> usize {
    dirs.iter()
        .map(|d| {
            std::fs::read_to_string(d.join("stderr.log"))
                .unwrap_or_default()
                .matches("partition lease lost")
                .count()
        })
        .sum()
}

/// The time of a log line, from tracing's `2026-12-03T12:58:58.123456Z` prefix.
fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days from 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(
        UNIX_EPOCH
            + Duration::from_secs(days * 86_400 + h * 3_600 + min * 60)
            + Duration::from_secs_f64(sec),
    )
}

/// Seconds from `zero` to the first and the last line of `text` containing `needle`, and how
/// many lines there were.
fn when(text: &str, needle: &str, zero: SystemTime) -> Option<(f64, f64, usize)> {
    let at = |t: SystemTime| match t.duration_since(zero) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    let times: Vec<f64> = text
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(log_time)
        .map(at)
        .collect();
    Some((*times.first()?, *times.last()?, times.len()))
}

/// One line of the step's timeline: the log lines of `text` that bound it, in seconds from the
/// step's start.
fn timeline(who: &str, text: &str, zero: SystemTime) {
    const EVENTS: &[(&str, &str)] = &[
        ("stop begins", "stopping: closing shards"),
        ("left unreleased", "lease not released"),
        ("leases released", "partition leases released"),
        ("waits for a lease", "waiting for lease"),
        ("lease acquired", "lease acquired"),
        ("a group's leases held", "partition leases acquired"),
        ("group started", "shard group started"),
        ("restored", "decision=Restored"),
        ("ready", " ready"),
        ("LEASE LOST, exit 1", "partition lease lost"),
    ];
    let mut parts = Vec::new();
    for (label, needle) in EVENTS {
        if let Some((first, last, n)) = when(text, needle, zero) {
            parts.push(if n == 1 {
                format!("{label} {first:+.2}")
            } else {
                format!("{label} ×{n} {first:+.2}…{last:+.2}")
            });
        }
    }
    println!("  {who:26} {}", parts.join(", "));
}

fn stderr_len(node_dir: &Path) -> usize {
    std::fs::metadata(node_dir.join("stderr.log")).map_or(0, |m| m.len() as usize)
}

/// The HTTP address a (possibly still waiting) pod logged: it serves `/readyz` before it holds
/// its leases.
fn logged_http(node_dir: &Path) -> Option<String> {
    // The last one: a pod started again serves on a new port.
    std::fs::read_to_string(node_dir.join("stderr.log"))
        .ok()?
        .lines()
        .rev()
        .find_map(|l| {
            l.contains("serving /healthz")
                .then(|| l.rsplit("http=").next().unwrap().trim().to_owned())
        })
}

/// How a moved shard came back on its new owner, and when (from the step's start).
#[derive(Clone, Copy, Debug)]
struct Back {
    at: Duration,
    /// The simulator accepted a RESUME: the session moved with the data. `false`: the new owner
    /// had to identify (a new session), which the step must not need.
    resumed: bool,
}

/// Waits until every shard in `moved` is back on the pod whose directory is `dir`: the simulator
/// saw a RESUME or an IDENTIFY of the shard since `before` (resumes, identifies; only the new
/// owner connects: the old owner just stops), the pod shows the shard active, and every
/// partition of it applied the shard's current session up to the sequence the simulator stood
/// at when that connection was first seen — the replay, and all that came before it, stored.
async fn wait_back(
    sim: Simulator,
    dir: PathBuf,
    moved: Vec<u32>,
    before: Vec<(u32, u32)>,
    zero: Instant,
) -> BTreeMap<u32, Back> {
    let mut http = None;
    let mut marks: BTreeMap<u32, u64> = BTreeMap::new();
    let mut back: BTreeMap<u32, Back> = BTreeMap::new();
    wait_for(
        "every moved shard to be back on its new owner",
        STEP_DEADLINE,
        async || {
            if http.is_none() {
                http = logged_http(&dir);
            }
            let Ok(resp) = reqwest::get(format!("http://{}/readyz", http.as_ref()?)).await else {
                // Not listening yet, or it exited and is being started again elsewhere.
                http = None;
                return None;
            };
            // A pod waiting for leases or restoring answers another shape: nothing is back yet.
            let status: shardlite::node::NodeStatus = resp.json().await.ok()?;
            let sim = sim.status();
            for &shard in &moved {
                if back.contains_key(&shard) {
                    continue;
                }
                let s = &sim.shards[shard as usize];
                let (resumes, identifies) = before[shard as usize];
                if s.resumes <= resumes && s.identifies <= identifies {
                    continue;
                }
                let mark = *marks.entry(shard).or_insert(s.last_seq);
                let active = status.groups.iter().any(|g| {
                    g.shard == shard
                        && g.shard_status
                            .as_ref()
                            .is_some_and(|st| st.phase == ShardPhase::Active)
                });
                if active && shard_applied(&status, s, mark) {
                    back.insert(
                        shard,
                        Back {
                            at: zero.elapsed(),
                            resumed: s.identifies <= identifies,
                        },
                    );
                }
            }
            (back.len() == moved.len()).then(|| back.clone())
        },
    )
    .await
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Waits until the pod in `dir` answers `/readyz` with 200, which is when Kubernetes' rolling
/// update goes on to the next pod: a pod waiting for leases does so once every holder it waits
/// for is a live process (it renewed while watched), a running one once every partition is open
/// and every shard receiving.
async fn wait_readyz_ok(ordinal: u32, dir: &Path) {
    wait_for(
        &format!("pod {ordinal}'s /readyz to answer 200"),
        STEP_DEADLINE,
        async || {
            // The last address logged; a previous run's, until this run logs its own, refuses.
            let http = logged_http(dir)?;
            let resp = reqwest::get(format!("http://{http}/readyz")).await.ok()?;
            (resp.status() == reqwest::StatusCode::OK).then_some(())
        },
    )
    .await;
}

/// Lines of a restore's outcome: `restore decided … decision=Restored…` (not the group-restart
/// line that repeats it).
fn restore_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|l| l.contains("restore decided") && l.contains("decision=Restored"))
}

#[tokio::main]
async fn main() {
    // Kept when the bench fails (a panic skips the removal at the end): the pods' stderr and
    // moto's request log are what explains a failure.
    let work = tempfile::Builder::new()
        .prefix("rescale-bench-")
        .tempdir()
        .unwrap()
        .keep();
    let _orphans = Orphans { work: work.clone() };
    let moto = start_moto(&work.join("moto.log"));
    println!(
        "work dir {} (removed on success), S3 server {}",
        work.display(),
        moto.url
    );
    let bucket = format!("rescale-bench-{}", std::process::id());
    let created = reqwest::Client::new()
        .put(format!("{}/{bucket}", moto.url))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "create bucket {bucket}");
    let spec = |pods: u32, ordinal: u32| spec(&bucket, &moto.url, pods, ordinal);
    let (before, after) = (
        Topology::new(SHARDS, PARTITIONS, 3).unwrap(),
        Topology::new(SHARDS, PARTITIONS, 4).unwrap(),
    );
    let moved: Vec<u32> = (0..SHARDS)
        .filter(|&s| before.pod_of_shard(s) != after.pod_of_shard(s))
        .collect();
    // assign(S, M + 1) only moves shards to the new pod (ownership.rs): pod 3 gets them all.
    assert!(
        moved.iter().all(|&s| after.pod_of_shard(s) == 3),
        "{moved:?}"
    );

    let sim = Simulator::start(SimConfig {
        guilds: GUILDS,
        shards: SHARDS,
        messages: MESSAGES,
        rate: Some(RATE),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let total = script_total(&sim);
    let run_zero = Instant::now();
    // Before the step: the first twentieth of the stream, all of it committed by the 3 pods.
    sim.hold_script_at(Some(total / 20));
    let dirs: Vec<PathBuf> = (0..4).map(|i| work.join(format!("pod{i}"))).collect();
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut pods = Vec::new();
    for ordinal in 0..3 {
        let mut pod = Pod::start(
            ordinal,
            &dirs[ordinal as usize],
            &sim,
            spec(3, ordinal),
            run_zero,
        );
        pod.ready().await;
        pods.push(pod);
    }
    wait_for(
        "the first twentieth of the stream sent",
        Duration::from_secs(120),
        async || (script_sent(&sim) >= total / 20).then_some(()),
    )
    .await;
    for (ordinal, pod) in (0..).zip(&pods) {
        let shards = before.shards_of_pod(ordinal);
        wait_for(
            "the pod to commit its shards' dispatches",
            Duration::from_secs(120),
            async || {
                let status = pod.status().await?;
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
    let status = sim.status();
    let identifies_before: u32 = status.shards.iter().map(|s| s.identifies).sum();
    let before_step: Vec<(u32, u32)> = status
        .shards
        .iter()
        .map(|s| (s.resumes, s.identifies))
        .collect();
    let lost_before_step = lost_leases(&dirs);

    // The step. The stream flows through it; its last twentieth is held back until the
    // steady-state window has passed, so it cannot run out before the step ends however slow the
    // step is.
    let hold = total - total / 20;
    let (zero, wall_zero) = (Instant::now(), SystemTime::now());
    println!(
        "step begins {:.2} s after the first pod's start",
        run_zero.elapsed().as_secs_f64()
    );
    let log_at_step = moto.offset();
    sim.hold_script_at(Some(hold));
    let watcher = wait_back(
        sim.clone(),
        dirs[3].clone(),
        moved.clone(),
        before_step,
        zero,
    );
    let mut old_pods = pods;
    let pod3 = Pod::start(3, &dirs[3], &sim, spec(4, 3), run_zero);
    let mut offsets = BTreeMap::new();
    let rolling = async {
        let (mut stop_began, mut restarted, mut old_restarts) =
            (BTreeMap::new(), BTreeMap::new(), 0);
        // As Kubernetes' rolling update: the next pod once the previous one answers /readyz 200
        // (pod 3 does while it waits for leases held by live pods).
        wait_readyz_ok(3, &dirs[3]).await;
        println!(
            "pod 3 started: /readyz 200 at {:+.2} s",
            zero.elapsed().as_secs_f64()
        );
        for ordinal in (0..3).rev() {
            let dir = &dirs[ordinal as usize];
            let old = old_pods.pop().unwrap();
            offsets.insert(ordinal, stderr_len(dir));
            stop_began.insert(ordinal, zero.elapsed());
            // Not asserted: a pod that lost a lease has exited 1 (its log says so, and the
            // summary counts it); the rolling update goes on, as Kubernetes' would. The new run
            // starts once the old one has exited (it holds the data dir's lock until then).
            let (status, again) = old.stop().await;
            old_restarts += again;
            let stopped = zero.elapsed();
            let pod = Pod::start(ordinal, dir, &sim, spec(4, ordinal), run_zero);
            wait_readyz_ok(ordinal, dir).await;
            println!(
                "pod {ordinal} restarted: stop {:+.2} → exited ({status}) {:+.2} → /readyz 200 {:+.2} s",
                stop_began[&ordinal].as_secs_f64(),
                stopped.as_secs_f64(),
                zero.elapsed().as_secs_f64()
            );
            restarted.insert(ordinal, pod);
        }
        (stop_began, restarted, old_restarts)
    };
    // Both in this task: the watcher polls pod 3 while the old pods restart one by one.
    let (back, (stop_began, restarted, old_restarts)) = tokio::join!(watcher, rolling);
    let mut pods: Vec<Pod> = restarted.into_values().collect();
    pods.push(pod3);
    // The step ends when the last moved shard is back; pod 0's restart may end later.
    let step = back.values().map(|b| b.at).max().unwrap();
    for pod in &mut pods {
        pod.ready().await;
    }
    let rolled = zero.elapsed();
    let log_at_step_end = moto.offset();
    let sent_at_step_end = script_sent(&sim);
    let identifies_step = sim
        .status()
        .shards
        .iter()
        .map(|s| s.identifies)
        .sum::<u32>()
        - identifies_before;
    // Each pod's log up to here is its part of the step (its later stop is not).
    let step_logs: Vec<String> = (0..4u32)
        .map(|i| {
            let bytes = std::fs::read(dirs[i as usize].join("stderr.log")).unwrap();
            let from = offsets.get(&i).copied().unwrap_or(0);
            String::from_utf8_lossy(&bytes[from.min(bytes.len())..]).into_owned()
        })
        .collect();
    let lost_in_step = lost_leases(&dirs) - lost_before_step;

    // The step's figures, printed now: a later failure must not lose them.
    println!(
        "\nrescale 3 → 4 pods: {SHARDS} shards, {PARTITIONS} partitions, {GUILDS} guilds, \
         {MESSAGES} messages at {RATE}/s, lease TTL {} s, sync interval {} ms",
        lease_ttl_secs(),
        sync_interval_ms().unwrap_or(200)
    );
    println!("moved shards: {} {moved:?} (all to pod 3)", moved.len());
    for (&shard, b) in &back {
        let from = before.pod_of_shard(shard);
        println!(
            "  shard {shard:2} (from pod {from}): {} {} after the step began, {} after pod {from}'s stop began",
            if b.resumed {
                "resumed"
            } else {
                "IDENTIFIED (session lost)"
            },
            secs(b.at),
            secs(b.at.saturating_sub(stop_began[&from]))
        );
    }
    println!(
        "every moved shard back: {} after the step began; every pod ready: {}",
        secs(step),
        secs(rolled)
    );
    println!(
        "ingest through the step: {} (script events sent by its end {sent_at_step_end}, held at {hold})",
        if sent_at_step_end < hold {
            "yes, the stream never reached its hold"
        } else {
            "NO, the stream reached its hold"
        }
    );
    println!(
        "identifies during the step: {identifies_step} ({} of {} moved shards resumed their session)",
        back.values().filter(|b| b.resumed).count(),
        moved.len()
    );
    let restores: usize = step_logs.iter().map(|t| restore_lines(t).count()).sum();
    let over_stale: usize = step_logs
        .iter()
        .map(|t| t.matches("decision=RestoredOverStale").count())
        .sum();
    println!("restores in the step: {restores} (of which over a stale file: {over_stale})");
    let restore_ms: Vec<u64> = restore_lines(&step_logs[3])
        .filter_map(|l| l.rsplit("millis=").next()?.trim().parse().ok())
        .collect();
    println!(
        "pod 3's restores: {} partitions, {}–{} ms each",
        restore_ms.len(),
        restore_ms.iter().min().unwrap_or(&0),
        restore_ms.iter().max().unwrap_or(&0),
    );
    let unreleased: usize = step_logs
        .iter()
        .map(|t| t.matches("lease not released").count())
        .sum();
    println!(
        "leases a stop of the step left unreleased (their next holder waited for a TTL): {unreleased}"
    );
    println!(
        "pods that exited on a lost lease: {lost_before_step} before the step, {lost_in_step} in it"
    );
    let r = moto.requests(log_at_step, log_at_step_end);
    println!(
        "S3 requests in the step ({:.1} s, until every pod was ready): {}, of which lease PUT {} \
         ({} refused with 412), lease GET {}",
        rolled.as_secs_f64(),
        r.all,
        r.lease_put,
        r.lease_put_refused,
        r.lease_get
    );
    println!("timeline (s from the step's start, from the pods' stderr):");
    // Pods 0-2: their old run's stop, then their new run; pod 3: its run.
    for (ordinal, text) in step_logs.iter().enumerate() {
        timeline(&format!("pod {ordinal}"), text, wall_zero);
    }

    // Steady state: every pod runs (one that exited was started again by its supervisor), every
    // lease is held and renewed, and nothing else touches them.
    for pod in &mut pods {
        pod.ready().await;
    }
    let lost_before_window = lost_leases(&dirs);
    let window_from = moto.offset();
    tokio::time::sleep(WINDOW).await;
    let window_to = moto.offset();
    let r = moto.requests(window_from, window_to);
    let w = WINDOW.as_secs_f64();
    println!(
        "steady state over {w:.0} s after the step: lease requests {:.2}/s ({} PUT of which {} \
         refused, {} GET, {} other); protocol: {PARTITIONS} × 3 / {} = {:.2}/s; all S3 requests \
         {:.1}/s; pods that exited on a lost lease during the window: {}",
        r.lease() as f64 / w,
        r.lease_put,
        r.lease_put_refused,
        r.lease_get,
        r.lease_other,
        lease_ttl_secs(),
        f64::from(PARTITIONS) * 3.0 / lease_ttl_secs() as f64,
        r.all as f64 / w,
        lost_leases(&dirs) - lost_before_window
    );
    println!(
        "load during the run (uptime): {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    sim.hold_script_at(None);
    // The rest of the stream, committed by the pods that own it after the step; a pod that exits
    // meanwhile is started again by its supervisor.
    wait_for(
        "every script event sent and committed by its pod",
        Duration::from_secs(600),
        async || {
            let sim = sim.status();
            if sim.shards.iter().any(|s| s.script_sent < s.script_total) {
                return None;
            }
            for (ordinal, pod) in (0..).zip(&pods) {
                let status = pod.status().await?;
                let done = after.shards_of_pod(ordinal).iter().all(|&shard| {
                    let s = &sim.shards[shard as usize];
                    shard_applied(&status, s, s.last_seq)
                });
                if !done {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let identifies_total: u32 = sim.status().shards.iter().map(|s| s.identifies).sum();
    let mut restarts = Vec::new();
    for (ordinal, pod) in (0..).zip(pods) {
        let (status, again) = pod.stop().await;
        restarts.push(again);
        if !status.success() {
            println!("pod {ordinal}'s final stop: {status} (see its stderr)");
        }
    }
    let lost = lost_leases(&dirs);
    println!(
        "pods that exited on a lost lease in the whole run: {lost}; pod starts repeated after an \
         exit: {old_restarts} by the 3-pod runs, {restarts:?} by the 4-pod runs of pods 0–3; \
         identifies in total: {identifies_total} for {SHARDS} shards"
    );
    for (ordinal, dir) in dirs.iter().enumerate() {
        let text = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("error: lease")) {
            println!("  pod {ordinal}: {line}");
        }
    }

    // Exactly once: each partition from the pod that owns it after the step.
    let merged = work.join("merged");
    let parts = merged.join("partitions");
    std::fs::create_dir_all(&parts).unwrap();
    for p in 0..PARTITIONS {
        let owner =
            after.pod_of_shard(after.shard_of_partition(shardlite::ownership::PartitionId(p)));
        for suffix in ["", "-wal"] {
            let name = format!("p{p:04}.sqlite3{suffix}");
            let from = dirs[owner as usize].join("data/partitions").join(&name);
            // Linked, not copied: the pods are stopped, and the files are hundreds of MB.
            if from.exists() {
                std::fs::hard_link(&from, parts.join(&name)).unwrap();
            }
        }
    }
    let v = verify(
        &merged,
        Topology::new(SHARDS, PARTITIONS, 1).unwrap(),
        &sim.expected(),
    )
    .unwrap();
    println!(
        "exactly once: {} (stored {}, missing {}, duplicate {})",
        if v.is_exact() { "yes" } else { "NO" },
        v.stored_messages,
        v.missing,
        v.duplicates
    );
    assert!(v.is_exact(), "{v:?}");
    assert_eq!((v.missing, v.duplicates), (0, 0));
    assert_eq!(v.stored_messages, MESSAGES);
    let shards = sim.status().shards;
    sim.shutdown().await;
    // Every figure is printed; the bench still fails if a move cost a session or a pod lost a
    // lease, the step's promise being that neither happens.
    assert_eq!(identifies_step, 0, "every move resumed: {shards:?}");
    assert_eq!(
        lost,
        0,
        "no pod lost a lease (see the pods' stderr under {})",
        work.display()
    );
    std::fs::remove_dir_all(&work).unwrap();
}
