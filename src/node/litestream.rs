//! The supervised `litestream replicate` child actor (`replication.mode = "child"`): runs
//! Litestream, restarts it with backoff when it exits, and stops it last on shutdown so its final
//! sync completes.
//!
//! Two Litestream processes replicating one replica path corrupt it without a warning (measured),
//! so the child must never outlive us: it gets SIGTERM when shardlite dies (Linux parent-death
//! signal), its pid is kept in `data_dir/litestream.pid`, and a new start first stops a previous
//! run's child still found there ([`stop_leftover`](crate::replication::process::stop_leftover)).

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;

use crate::config::Config;
use crate::ownership::PartitionId;
use crate::replication::Epochs;
use crate::replication::litestream_config::{SHUTDOWN_SYNC_TIMEOUT_SECS, absolute_data_dir};
use crate::replication::process::{ReplicaSync, signal};
use crate::replication::restore::{Outcome, restore_before_open};
use crate::replication::{ReplicationError, litestream_command};
use crate::store::PartitionStore;
use crate::supervision::{Decision, RestartPolicy, RestartTracker};

/// How long a stopped child may take beyond Litestream's own shutdown-sync-timeout before it is
/// killed.
const STOP_SLACK: Duration = Duration::from_secs(5);
/// Bound on one `litestream unregister` of a fenced partition (its own `-timeout` is 2 s).
const UNREGISTER_BOUND: Duration = Duration::from_secs(3);

/// Messages of [`LitestreamActor`].
pub enum LitestreamMsg {
    /// The child of generation `.0` exited.
    Exited(u64, Option<ExitStatus>),
    /// Start the child again (after the backoff), if `.0` is still the current generation.
    Restart(u64),
    /// Force a sync of every partition, SIGTERM the child and wait for it (bounded), then reply
    /// with an error if any partition could not be confirmed on the replica.
    Stop(RpcReplyPort<Result<(), ReplicationError>>),
    /// The current child's pid and restart count.
    Status(RpcReplyPort<LitestreamStatus>),
    /// Replicate these partitions too (a shard group whose leases arrived after the node
    /// started, DESIGN §7), each to the generation of its epoch: the rendered file is written
    /// again with every partition, and the child restarted on it — after a forced sync of what it
    /// replicated so far, as at a stop — or started, if it had nothing to replicate yet. The
    /// files must exist (restored or created) before. Replies once the child runs on the new
    /// file.
    Add(Epochs, RpcReplyPort<Result<(), ReplicationError>>),
    /// Stop replicating these partitions at once, without a final sync (their leases were
    /// lost, DESIGN §7): each is unregistered over the control socket (`litestream
    /// unregister`), and the rendered file written again without them. If the socket does not
    /// confirm every one in time, the child is killed (SIGKILL, no upload) and started again on
    /// the new file: it resumes the others from its local state. Replies once nothing uploads
    /// them any more.
    Remove(Vec<PartitionId>, RpcReplyPort<Result<(), ReplicationError>>),
    /// Restore these partitions from their replicas while the node runs (a shard group found
    /// their files missing or corrupt at a restart, DESIGN §3): sync every other partition and
    /// stop the child, so no Litestream holds the old file or its metadata; restore as at start
    /// ([`restore_before_open`]: bad files moved aside, never deleted); start the child again.
    /// Replies with the outcomes, or the restore error.
    Restore(
        Vec<PartitionId>,
        RpcReplyPort<Result<Vec<Outcome>, ReplicationError>>,
    ),
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
    /// Where the rendered `litestream.yml` is written (rendered again for every [`LitestreamMsg::Add`]).
    pub config_file: PathBuf,
    /// Where the child's pid is recorded.
    pub pid_file: PathBuf,
    /// Litestream's control socket (from the rendered file).
    pub socket: PathBuf,
    /// Restart policy.
    pub policy: RestartPolicy,
    /// The node's config: replica settings for a restore while running.
    pub config: Config,
    /// The partitions it replicates, each with its lease epoch (the generation it writes; a
    /// restore while running reads the newest generation up to it). May be empty: the child is
    /// started with the first [`LitestreamMsg::Add`]. Each gets a forced sync before the child
    /// is stopped.
    pub epochs: Epochs,
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
        // Litestream 0.5 runs without databases but logs an error for it: the child starts
        // with its first partitions.
        if !state.args.epochs.is_empty() {
            state.write_config()?;
            state.spawn(&myself)?;
        }
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
            LitestreamMsg::Add(epochs, reply) => {
                if state.stopping {
                    let _ = reply.send(Err(ReplicationError::Stopping));
                    return Ok(());
                }
                let result = state.add(epochs).await;
                // A child that cannot start fails this actor, as at start.
                if result.is_ok() {
                    state.spawn(&myself)?;
                }
                let _ = reply.send(result);
            }
            LitestreamMsg::Remove(partitions, reply) => {
                let result = state.remove(&myself, &partitions).await;
                let _ = reply.send(result);
            }
            LitestreamMsg::Restore(partitions, reply) => {
                if state.stopping {
                    // The node is shutting down: no file changes and no new child now.
                    let _ = reply.send(Err(ReplicationError::Stopping));
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
    fn spawn(&mut self, myself: &ActorRef<LitestreamMsg>) -> Result<(), ReplicationError> {
        self.generation += 1;
        let generation = self.generation;
        let mut cmd = litestream_command(&self.args.bin);
        cmd.arg("replicate")
            // The file is ours, rendered from the config: a '$' in it is text, as in a restore.
            .arg("-no-expand-env")
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
            .map_err(|source| ReplicationError::SpawnReplicate {
                bin: self.args.bin.clone(),
                source,
            })?;
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
    async fn stop(&mut self) -> Result<(), ReplicationError> {
        self.stop_syncing(self.dbs(), "before stop").await
    }

    /// The partition files replicated, as the rendered file names them.
    fn dbs(&self) -> Vec<PathBuf> {
        let data_dir = absolute_data_dir(&self.args.config);
        self.args
            .epochs
            .keys()
            .map(|p| PartitionStore::path_in(&data_dir, *p))
            .collect()
    }

    /// Renders `litestream.yml` for every partition of `args.epochs`.
    fn write_config(&self) -> Result<(), ReplicationError> {
        let written = crate::replication::write_config(&self.args.config, &self.args.epochs)?;
        debug_assert_eq!(written, self.args.config_file);
        Ok(())
    }

    /// See [`LitestreamMsg::Remove`].
    async fn remove(
        &mut self,
        myself: &ActorRef<LitestreamMsg>,
        partitions: &[PartitionId],
    ) -> Result<(), ReplicationError> {
        let data_dir = absolute_data_dir(&self.args.config);
        for p in partitions {
            self.args.epochs.remove(p);
        }
        self.write_config()?;
        let Some(pid) = self.pid else {
            return Ok(()); // no child runs: the next one starts from the new file
        };
        if self.args.epochs.is_empty() {
            // Nothing left to replicate: the child goes, without an upload.
            self.kill_child(pid).await;
            return Ok(());
        }
        let unregistered = futures_util::future::join_all(partitions.iter().map(|p| {
            let db = PartitionStore::path_in(&data_dir, *p);
            let mut cmd = litestream_command(&self.args.bin);
            cmd.args(["unregister", "-timeout", "2", "-socket"])
                .arg(&self.args.socket)
                .arg(db)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            async move {
                tokio::time::timeout(UNREGISTER_BOUND, cmd.status())
                    .await
                    .is_ok_and(|s| s.is_ok_and(|s| s.success()))
            }
        }))
        .await;
        if unregistered.iter().all(|ok| *ok) {
            tracing::info!(partitions = ?partitions, "litestream stopped replicating fenced partitions");
            return Ok(());
        }
        tracing::warn!(pid, partitions = ?partitions,
            "litestream did not confirm unregistering fenced partitions; killing it and starting it again without them");
        self.kill_child(pid).await;
        self.spawn(myself)?;
        Ok(())
    }

    /// SIGKILLs the child (no final upload) and waits for it to be gone; its exit is not a
    /// failure.
    async fn kill_child(&mut self, pid: u32) {
        self.pid = None;
        self.guard.0 = None;
        // The `Exited` of this generation must not count as a failure.
        self.generation += 1;
        // A child that already exited (its `Exited` still queued) may have had its pid reused.
        if !*self.exited.borrow() {
            signal(pid, Signal::SIGKILL);
        }
        if tokio::time::timeout(STOP_SLACK, self.exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            tracing::error!(pid, "litestream still running after SIGKILL");
        }
        let _ = std::fs::remove_file(&self.args.pid_file);
    }

    /// See [`LitestreamMsg::Add`]: stops the running child (if any) after a forced sync and
    /// renders the file with the new partitions; the caller starts the child again.
    async fn add(&mut self, epochs: Epochs) -> Result<(), ReplicationError> {
        if let Err(e) = self
            .stop_syncing(self.dbs(), "before taking on more partitions")
            .await
        {
            // Not fatal: the files are intact locally and the next child uploads them.
            tracing::warn!(error = %e, "taking on partitions with some not confirmed on the replica");
        }
        self.args.epochs.extend(epochs);
        self.write_config()
    }

    /// [`Self::stop`], forcing a sync of `dbs` only.
    async fn stop_syncing(
        &mut self,
        dbs: Vec<PathBuf>,
        purpose: &'static str,
    ) -> Result<(), ReplicationError> {
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
    async fn restore(
        &mut self,
        partitions: &[PartitionId],
    ) -> Result<Vec<Outcome>, ReplicationError> {
        let data_dir = absolute_data_dir(&self.args.config);
        let restoring: Vec<PathBuf> = partitions
            .iter()
            .map(|p| PartitionStore::path_in(&data_dir, *p))
            .collect();
        let others: Vec<PathBuf> = self
            .dbs()
            .into_iter()
            .filter(|db| !restoring.contains(db))
            .collect();
        if let Err(e) = self.stop_syncing(others, "before a restore").await {
            // Not fatal: the other files are intact locally and the next child uploads them.
            tracing::warn!(error = %e, "restoring with some partitions not confirmed on the replica");
        }
        let epochs: Epochs = partitions
            .iter()
            .map(|p| (*p, self.args.epochs.get(p).copied().unwrap_or_default()))
            .collect();
        restore_before_open(&self.args.config, &epochs).await
    }
}
