//! Litestream as a process: forced syncs over its control socket, signals, a previous run's
//! leftover child.
//!
//! Nothing here knows of actors: the node's Litestream actor (`node::litestream`) supervises the
//! `litestream replicate` child and uses these pieces to stop it and to sync through it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::ReplicationError;
use super::litestream_config::SHUTDOWN_SYNC_TIMEOUT_SECS;

/// Pause between attempts to reach a control socket that is not listening yet.
const SOCKET_RETRY: Duration = Duration::from_millis(100);
/// How long a previous run's leftover child gets to exit after SIGTERM.
const LEFTOVER_GRACE: Duration = Duration::from_secs(SHUTDOWN_SYNC_TIMEOUT_SECS + 5);
/// Longest a stop can take: the forced syncs (each bounded by Litestream's `-timeout`), then
/// Litestream's own shutdown-sync-timeout, plus slack.
pub const STOP_BOUND: Duration = Duration::from_secs(2 * SHUTDOWN_SYNC_TIMEOUT_SECS + 10);

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
    /// began, or [`ReplicationError::SyncUnconfirmed`] naming how many could not be confirmed.
    ///
    /// Each file's sync is bounded by `timeout` (Litestream's `-timeout`, whole seconds, at least
    /// 1), including retries while the socket does not answer yet: Litestream opens it a few
    /// hundred milliseconds after it starts or restarts. `purpose` only labels the log lines.
    pub async fn sync_wait(
        &self,
        dbs: Vec<PathBuf>,
        timeout: Duration,
        purpose: &'static str,
    ) -> Result<(), ReplicationError> {
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
            Err(ReplicationError::SyncUnconfirmed {
                failed,
                total,
                purpose,
            })
        }
    }
}

/// Sends `sig` to `pid`; a process already gone is not an error (logged at debug).
pub(crate) fn signal(pid: u32, sig: Signal) {
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
