//! The Litestream child actor (`replication.mode = "child"`): runs `litestream replicate`, restarts
//! it with backoff when it exits, and stops it last on shutdown so its final sync completes.
//!
//! Two Litestream processes replicating one replica path corrupt it without a warning (measured),
//! so the child must never outlive us: it gets SIGTERM when shardlite dies (Linux parent-death
//! signal), its pid is kept in `data_dir/litestream.pid`, and a new start first stops a previous
//! run's child still found there.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;

use super::litestream_config::{SHUTDOWN_SYNC_TIMEOUT_SECS, absolute_data_dir};
use super::restore::{Outcome, restore_before_open};
use crate::config::Config;
use crate::node::restart::{Decision, RestartPolicy, RestartTracker};
use crate::ownership::PartitionId;
use crate::store::PartitionStore;

/// How long a stopped child may take beyond Litestream's own shutdown-sync-timeout before it is
/// killed.
const STOP_SLACK: Duration = Duration::from_secs(5);
/// Pause between attempts to reach a control socket that is not listening yet.
const SOCKET_RETRY: Duration = Duration::from_millis(100);
/// How long a previous run's leftover child gets to exit after SIGTERM.
const LEFTOVER_GRACE: Duration = Duration::from_secs(SHUTDOWN_SYNC_TIMEOUT_SECS + 5);
/// Longest a stop can take: the forced syncs (each bounded by Litestream's `-timeout`), then
/// Litestream's own shutdown-sync-timeout, plus slack.
pub const STOP_BOUND: Duration = Duration::from_secs(2 * SHUTDOWN_SYNC_TIMEOUT_SECS + 10);

/// Messages of [`LitestreamActor`].
pub enum LitestreamMsg {
    /// The child of generation `.0` exited.
    Exited(u64, Option<ExitStatus>),
    /// Start the child again (after the backoff), if `.0` is still the current generation.
    Restart(u64),
    /// Force a sync of every partition, SIGTERM the child and wait for it (bounded), then reply
    /// with an error if any partition could not be confirmed on the replica.
    Stop(RpcReplyPort<Result<(), String>>),
    /// The current child's pid and restart count.
    Status(RpcReplyPort<LitestreamStatus>),
    /// Restore these partitions from their replicas while the node runs (a shard group found
    /// their files missing or corrupt at a restart, DESIGN §3): sync every other partition and
    /// stop the child, so no Litestream holds the old file or its metadata; restore as at start
    /// ([`restore_before_open`]: bad files moved aside, never deleted); start the child again.
    /// Replies with the outcomes, or the restore error.
    Restore(Vec<PartitionId>, RpcReplyPort<Result<Vec<Outcome>, String>>),
}

/// What the actor reports.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LitestreamStatus {
    /// Pid of the running child, if one runs.
    pub pid: Option<u32>,
    /// Restarts since start.
    pub restarts: u32,
}

/// Start arguments.
pub struct LitestreamArgs {
    /// The Litestream executable.
    pub bin: PathBuf,
    /// The rendered `litestream.yml`.
    pub config_file: PathBuf,
    /// Where the child's pid is recorded.
    pub pid_file: PathBuf,
    /// Litestream's control socket (from the rendered file).
    pub socket: PathBuf,
    /// The partition files it replicates: each gets a forced sync before the child is stopped.
    pub dbs: Vec<PathBuf>,
    /// Restart policy.
    pub policy: RestartPolicy,
    /// The node's config: replica settings for a restore while running.
    pub config: Config,
}

/// SIGTERMs the child when the actor's state is dropped without a stop (the actor was killed,
/// or its parent failed): ractor skips `post_stop` then, and an unowned Litestream must not keep
/// replicating.
struct ChildGuard(Option<u32>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            signal(pid, Signal::SIGTERM);
        }
    }
}

/// State of the running actor.
pub struct LitestreamState {
    args: LitestreamArgs,
    tracker: RestartTracker,
    generation: u64,
    restarts: u32,
    pid: Option<u32>,
    exited: watch::Receiver<bool>,
    stopping: bool,
    guard: ChildGuard,
}

/// The actor; see the module docs.
pub struct LitestreamActor;

impl Actor for LitestreamActor {
    type Msg = LitestreamMsg;
    type State = LitestreamState;
    type Arguments = LitestreamArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (_, exited) = watch::channel(true);
        let mut state = LitestreamState {
            tracker: RestartTracker::new(args.policy),
            args,
            generation: 0,
            restarts: 0,
            pid: None,
            exited,
            stopping: false,
            guard: ChildGuard(None),
        };
        state.spawn(&myself)?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LitestreamMsg::Exited(generation, status) => {
                if generation != state.generation || state.stopping {
                    return Ok(());
                }
                state.pid = None;
                state.guard.0 = None;
                tracing::warn!(?status, "litestream exited; restarting it");
                match state.tracker.on_failure(Instant::now()) {
                    Decision::RestartAfter(delay) => {
                        myself.send_after(delay, move || LitestreamMsg::Restart(generation));
                    }
                    Decision::GiveUp { failures } => {
                        return Err(format!(
                            "litestream exited {failures} times within {}s (last: {status:?}); \
                             replication is down",
                            state.args.policy.window.as_secs()
                        )
                        .into());
                    }
                }
            }
            LitestreamMsg::Restart(generation) => {
                if generation == state.generation && !state.stopping {
                    state.restarts += 1;
                    state.spawn(&myself)?;
                }
            }
            LitestreamMsg::Stop(reply) => {
                state.stopping = true;
                let result = state.stop().await;
                // The asker may have timed out; the child is stopped either way.
                let _ = reply.send(result);
            }
            LitestreamMsg::Restore(partitions, reply) => {
                if state.stopping {
                    // The node is shutting down: no file changes and no new child now.
                    let _ = reply.send(Err("litestream is stopping; no restore".into()));
                    return Ok(());
                }
                if reply.is_closed() {
                    return Ok(()); // the asker gave up; its next restart asks again
                }
                let result = state.restore(&partitions).await;
                // The other partitions keep replicating whatever the restore's outcome; a child
                // that cannot start again fails this actor, as at start. The stopped child's
                // `Exited` arrives after this handler, for an old generation, and is ignored.
                state.spawn(&myself)?;
                // A timed-out asker (its group) retries at its next restart.
                let _ = reply.send(result);
            }
            LitestreamMsg::Status(reply) => {
                // A timed-out asker is not our failure.
                let _ = reply.send(LitestreamStatus {
                    pid: state.pid,
                    restarts: state.restarts,
                });
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stop().await.map_err(ActorProcessingErr::from)
    }
}

impl LitestreamState {
    fn spawn(&mut self, myself: &ActorRef<LitestreamMsg>) -> Result<(), ActorProcessingErr> {
        self.generation += 1;
        let generation = self.generation;
        let mut cmd = super::litestream_command(&self.args.bin);
        cmd.arg("replicate")
            .arg("-config")
            .arg(&self.args.config_file)
            // Litestream logs to stdout; ours is for command output, so its log joins our log.
            .stdout(std::io::stderr());
        // SAFETY: `pre_exec` runs in the forked child before exec; prctl(PR_SET_PDEATHSIG) is
        // async-signal-safe and touches no memory of the parent.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {} replicate: {e}", self.args.bin.display()))?;
        self.pid = child.id();
        self.guard.0 = self.pid;
        if let Some(pid) = self.pid
            && let Err(e) = std::fs::write(&self.args.pid_file, pid.to_string())
        {
            tracing::warn!(error = %e, path = %self.args.pid_file.display(), "cannot record litestream pid");
        }
        tracing::info!(pid = ?self.pid, config = %self.args.config_file.display(), "litestream replicate started");
        let (exited_tx, exited_rx) = watch::channel(false);
        self.exited = exited_rx;
        let actor = myself.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            // Receivers may be gone (actor stopped); the exit is over either way.
            let _ = exited_tx.send(true);
            let _ = actor.cast(LitestreamMsg::Exited(generation, status));
        });
        Ok(())
    }

    /// Forces a sync of every partition and waits until the replica has it (`litestream sync
    /// -wait` over the control socket), then SIGTERM, then waits for Litestream to exit (its
    /// shutdown-sync-timeout plus slack), then SIGKILL.
    ///
    /// The forced sync is what makes a graceful stop lose nothing: measured with Litestream
    /// 0.5.17, a SIGTERM shortly after start exits at once, before the first snapshot of a new
    /// database was uploaded.
    async fn stop(&mut self) -> Result<(), String> {
        self.stop_syncing(self.args.dbs.clone(), "before stop")
            .await
    }

    /// [`Self::stop`], forcing a sync of `dbs` only.
    async fn stop_syncing(
        &mut self,
        dbs: Vec<PathBuf>,
        purpose: &'static str,
    ) -> Result<(), String> {
        let Some(pid) = self.pid.take() else {
            return Ok(());
        };
        self.guard.0 = None;
        let synced = ReplicaSync::new(&self.args.bin, &self.args.socket)
            .sync_wait(
                dbs,
                Duration::from_secs(SHUTDOWN_SYNC_TIMEOUT_SECS),
                purpose,
            )
            .await;
        signal(pid, Signal::SIGTERM);
        let grace = Duration::from_secs(SHUTDOWN_SYNC_TIMEOUT_SECS) + STOP_SLACK;
        if tokio::time::timeout(grace, self.exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            tracing::warn!(pid, "litestream did not stop in time; killing it");
            signal(pid, Signal::SIGKILL);
            // Two Litestreams on one replica corrupt it: a restore or a new child must not
            // start before this one is gone.
            if tokio::time::timeout(STOP_SLACK, self.exited.wait_for(|e| *e))
                .await
                .is_err()
            {
                tracing::error!(pid, "litestream still running after SIGKILL");
            }
        } else {
            tracing::info!(pid, "litestream stopped after its final sync");
        }
        // Only this run's pid is recorded there; nothing else to keep.
        let _ = std::fs::remove_file(&self.args.pid_file);
        synced
    }
}

impl LitestreamState {
    /// See [`LitestreamMsg::Restore`]: stops the child and restores; the caller starts the child
    /// again.
    async fn restore(&mut self, partitions: &[PartitionId]) -> Result<Vec<Outcome>, String> {
        let data_dir = absolute_data_dir(&self.args.config);
        let restoring: Vec<PathBuf> = partitions
            .iter()
            .map(|p| PartitionStore::path_in(&data_dir, *p))
            .collect();
        let others: Vec<PathBuf> = self
            .args
            .dbs
            .iter()
            .filter(|db| !restoring.contains(db))
            .cloned()
            .collect();
        if let Err(e) = self.stop_syncing(others, "before a restore").await {
            // Not fatal: the other files are intact locally and the next child uploads them.
            tracing::warn!(error = %e, "restoring with some partitions not confirmed on the replica");
        }
        restore_before_open(&self.args.config, partitions)
            .await
            .map_err(|e| crate::error_chain(&e))
    }
}

/// Forces uploads through a running Litestream's control socket (`litestream sync -wait`), so a
/// caller can wait until the replica holds what a partition file had committed.
///
/// Works against any `litestream replicate` that serves the rendered config's socket; shardlite
/// uses it for its own child (stop, and each new gateway session: DESIGN §5).
#[derive(Clone, Debug)]
pub struct ReplicaSync {
    bin: PathBuf,
    socket: PathBuf,
}

impl ReplicaSync {
    /// A syncer that runs the Litestream executable `bin` against the control socket `socket`.
    pub fn new(bin: &Path, socket: &Path) -> Self {
        Self {
            bin: bin.to_owned(),
            socket: socket.to_owned(),
        }
    }

    /// Runs `litestream sync -wait` for each of `dbs` (partition file paths, as in the rendered
    /// config) at once: returns when the replica holds what each file had committed when the call
    /// began, or `Err` naming how many could not be confirmed.
    ///
    /// Each file's sync is bounded by `timeout` (Litestream's `-timeout`, whole seconds, at least
    /// 1), including retries while the socket does not answer yet: Litestream opens it a few
    /// hundred milliseconds after it starts or restarts. `purpose` only labels the log lines.
    pub async fn sync_wait(
        &self,
        dbs: Vec<PathBuf>,
        timeout: Duration,
        purpose: &'static str,
    ) -> Result<(), String> {
        let started = Instant::now();
        let total = dbs.len();
        let deadline = Instant::now() + timeout.max(Duration::from_secs(1));
        let mut tasks = tokio::task::JoinSet::new();
        for db in dbs {
            let (bin, socket) = (self.bin.clone(), self.socket.clone());
            tasks.spawn(async move {
                loop {
                    // Each attempt gets what is left of the bound (Litestream's -timeout is
                    // whole seconds, at least 1), so retries never stretch it.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let out = super::litestream_command(&bin)
                        .args(["sync", "-wait", "-timeout"])
                        .arg(left.as_secs().max(1).to_string())
                        .arg("-socket")
                        .arg(&socket)
                        .arg(&db)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::piped())
                        .kill_on_drop(true)
                        .output()
                        .await;
                    let retry = matches!(&out, Ok(o) if !o.status.success()
                        && String::from_utf8_lossy(&o.stderr).contains("control socket"));
                    if !retry || Instant::now() > deadline {
                        return (db, out);
                    }
                    tokio::time::sleep(SOCKET_RETRY).await;
                }
            });
        }
        let mut failed = 0;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(out))) if out.status.success() => {}
                Ok((db, Ok(out))) => {
                    failed += 1;
                    tracing::warn!(db = %db.display(), purpose,
                        stderr = %String::from_utf8_lossy(&out.stderr).trim(), "litestream sync failed");
                }
                Ok((db, Err(e))) => {
                    failed += 1;
                    tracing::warn!(db = %db.display(), purpose, error = %e, "cannot run litestream sync");
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(purpose, error = %e, "litestream sync task failed");
                }
            }
        }
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            dbs = total,
            failed,
            millis,
            purpose,
            "forced litestream sync"
        );
        if failed == 0 {
            Ok(())
        } else {
            Err(format!(
                "{failed} of {total} partitions could not be confirmed on the replica {purpose}"
            ))
        }
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && let Err(e) = kill(Pid::from_raw(pid), sig)
    {
        tracing::debug!(pid, ?sig, error = %e, "signal not delivered (process gone)");
    }
}

/// Stops a Litestream left running by a previous run of this pod (pid file present, process
/// alive and named litestream), so two never replicate the same files. Waits up to its
/// shutdown-sync-timeout plus slack for its final sync, then kills it. Must run before restore
/// touches any partition file.
pub async fn stop_leftover(pid_file: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return;
    };
    let is_litestream = || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "litestream")
    };
    if !is_litestream() {
        return;
    }
    tracing::warn!(
        pid,
        "a previous run's litestream is still running; stopping it first"
    );
    signal(pid, Signal::SIGTERM);
    let deadline = Instant::now() + LEFTOVER_GRACE;
    while is_litestream() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if is_litestream() {
        signal(pid, Signal::SIGKILL);
    }
}
