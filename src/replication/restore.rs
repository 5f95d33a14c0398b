//! Restore before open (DESIGN §6): decide, for each owned partition, whether its file can be
//! opened as it is, must be restored from its replica, or starts empty — before anything opens it.
//!
//! Litestream's restore semantics shape the order: `restore -if-db-not-exists` skips a 0-byte file
//! as "existing", so the decision is ours, made on the file itself; `restore -if-replica-exists`
//! exits 0 without writing anything when no replica exists, which is how "new partition" is told
//! apart from "restored"; against an unreachable endpoint restore retries for minutes, so every
//! restore runs under `replication.restore_timeout_secs` after a quick reachability probe. The
//! restore writes to a temporary name and is renamed into place only when complete and healthy,
//! so a crash mid-restore never leaves a half file that would later pass for the partition.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;

use super::ReplicationError;
use super::generations::{Epochs, newest_with_data};
use super::litestream_config::{absolute_data_dir, replica_url};
use crate::config::Config;
use crate::ownership::PartitionId;
use crate::store::{FileHealth, PartitionStore, file_health};

/// Bound on the endpoint reachability probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of Litestream's stderr an error quotes.
const STDERR_TAIL: usize = 600;

/// What restore-before-open did with one partition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The local file was healthy and is used as it is.
    Kept,
    /// The file was restored from its replica.
    Restored,
    /// The local file was healthy but older than the replica: it was written under an epoch
    /// before the newest generation with data (another holder wrote the partition since). It
    /// was moved aside and the file restored from the replica.
    RestoredOverStale,
    /// No replica exists: the partition starts empty (a new partition).
    NoReplica,
}

/// One partition's outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// The partition involved.
    pub partition: PartitionId,
    /// What was decided.
    pub decision: Decision,
    /// Where a bad or stale local file was moved (never deleted), if one was.
    pub moved_aside: Option<PathBuf>,
    /// The replica generation restored from (the lease epoch that wrote it; 0 is the prefix
    /// without an epoch), when one was.
    pub generation: Option<u64>,
    /// Time spent on this partition.
    pub millis: u64,
}

/// Restores every partition of `epochs` (partition → the lease epoch this process holds it
/// under) that needs it, at most `replication.restore_parallelism` at a time, drawing a progress
/// bar on a terminal. A restore reads the newest replica generation with data up to the
/// partition's epoch ([`newest_with_data`]); a healthy local file recorded under an older epoch
/// than that generation is stale and is restored over (moved aside first).
///
/// # Errors
/// [`ReplicationError`] for the first partition that could not be decided: the endpoint is
/// unreachable, a listing failed, Litestream failed or timed out, or a bad file could not be
/// moved aside. Nothing is opened or created for any partition in that case.
pub async fn restore_before_open(
    config: &Config,
    epochs: &Epochs,
) -> Result<Vec<Outcome>, ReplicationError> {
    let partitions: Vec<PartitionId> = epochs.keys().copied().collect();
    let store = crate::cluster::connect(config).map_err(super::GenerationError::from)?;
    let data_dir = absolute_data_dir(config);
    let dir = data_dir.join("partitions");
    std::fs::create_dir_all(&dir).map_err(|source| ReplicationError::Io {
        path: dir.clone(),
        source,
    })?;
    let healths = {
        let paths: Vec<PathBuf> = partitions
            .iter()
            .map(|p| PartitionStore::path_in(&data_dir, *p))
            .collect();
        tokio::task::spawn_blocking(move || {
            paths.iter().map(|p| file_health(p)).collect::<Vec<_>>()
        })
        .await
        .expect("file_health does not panic")
    };
    // Every partition's generations are listed, healthy file or not: fail fast, naming the
    // endpoint, if the store cannot be reached at all.
    probe_endpoint(config).await?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(partitions.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message("restoring partitions");
    let permits = Arc::new(Semaphore::new(
        config.replication.restore_parallelism.max(1),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for (&partition, health) in partitions.iter().zip(healths) {
        let permits = permits.clone();
        let config = config.clone();
        let data_dir = data_dir.clone();
        let store = store.clone();
        let epoch = epochs.get(&partition).copied().unwrap_or_default();
        tasks.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            restore_one(&config, store.as_ref(), &data_dir, partition, epoch, health).await
        });
    }
    let mut outcomes = Vec::with_capacity(partitions.len());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.expect("restore task does not panic")?;
        bar.inc(1);
        outcomes.push(outcome);
    }
    bar.finish_and_clear();
    outcomes.sort_by_key(|o| o.partition);
    Ok(outcomes)
}

async fn restore_one(
    config: &Config,
    store: &dyn object_store::ObjectStore,
    data_dir: &Path,
    partition: PartitionId,
    epoch: u64,
    health: FileHealth,
) -> Result<Outcome, ReplicationError> {
    let started = Instant::now();
    let path = PartitionStore::path_in(data_dir, partition);
    let mut moved_aside = None;
    let newest = newest_with_data(store, config, partition, epoch).await?;
    let mut over_stale = false;
    match &health {
        FileHealth::Healthy => {
            let local = recorded_epoch(&path, partition).await?;
            match newest {
                Some(newest) if local < newest => {
                    tracing::warn!(%partition, path = %path.display(), local_epoch = local,
                        replica_epoch = newest,
                        "local partition file was written before the replica's newest generation; moving it aside and restoring");
                    moved_aside = move_aside(&path, "stale")?;
                    over_stale = true;
                }
                _ => {
                    return Ok(Outcome {
                        partition,
                        decision: Decision::Kept,
                        moved_aside,
                        generation: None,
                        millis: 0,
                    });
                }
            }
        }
        FileHealth::Missing => {
            // A leftover -wal or -shm would be replayed onto the restored file (nothing ties a
            // WAL to its database), and Litestream's metadata describes the lost file.
            move_aside(&path, "corrupt")?;
        }
        FileHealth::Unreadable(reason) => {
            return Err(ReplicationError::Unreadable {
                path,
                reason: reason.clone(),
            });
        }
        FileHealth::Empty | FileHealth::Corrupt(_) => {
            tracing::warn!(%partition, path = %path.display(), ?health, "partition file unusable; moving it aside and restoring");
            moved_aside = move_aside(&path, "corrupt")?;
        }
    }
    let tmp = path.with_extension("sqlite3.restoring");
    // Our own leftover from an interrupted restore; it never held the partition.
    remove_if_exists(&tmp)?;
    let Some(generation) = newest else {
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(%partition, decision = ?Decision::NoReplica, millis, "restore decided");
        return Ok(Outcome {
            partition,
            decision: Decision::NoReplica,
            moved_aside,
            generation: None,
            millis,
        });
    };
    let timeout = Duration::from_secs(config.replication.restore_timeout_secs);
    let mut cmd = super::litestream_command(&config.replication.litestream_bin);
    cmd.args(["restore", "-if-replica-exists", "-o"])
        .arg(&tmp)
        .arg(replica_url(config, partition, generation))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| ReplicationError::Spawn {
        bin: config.replication.litestream_bin.clone(),
        source,
    })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => {
            return Err(ReplicationError::Spawn {
                bin: config.replication.litestream_bin.clone(),
                source,
            });
        }
        Err(_) => return Err(ReplicationError::RestoreTimeout { partition, timeout }),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail = &stderr[stderr.len().saturating_sub(STDERR_TAIL)..];
        return Err(ReplicationError::RestoreFailed {
            partition,
            status: output.status.to_string(),
            stderr: tail.trim().to_owned(),
        });
    }
    let decision = if tmp.exists() {
        let check = tmp.clone();
        let health = tokio::task::spawn_blocking(move || file_health(&check))
            .await
            .expect("file_health does not panic");
        if health != FileHealth::Healthy {
            return Err(ReplicationError::RestoredCorrupt {
                partition,
                reason: format!("{health:?}"),
            });
        }
        std::fs::rename(&tmp, &path).map_err(|source| ReplicationError::Io {
            path: path.clone(),
            source,
        })?;
        if over_stale {
            Decision::RestoredOverStale
        } else {
            Decision::Restored
        }
    } else {
        // The listing saw data a moment ago: the generation was deleted meanwhile, which only a
        // later holder's retirement does. Nothing was restored; say so rather than start empty.
        return Err(ReplicationError::RestoreFailed {
            partition,
            status: "exit 0, no file".into(),
            stderr: format!("generation {generation} disappeared during the restore"),
        });
    };
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(%partition, ?decision, generation, millis, "restore decided");
    Ok(Outcome {
        partition,
        decision,
        moved_aside,
        generation: Some(generation),
        millis,
    })
}

/// The lease epoch a healthy local file recorded (0 if none), read off the async threads.
async fn recorded_epoch(path: &Path, partition: PartitionId) -> Result<u64, ReplicationError> {
    let file = path.to_owned();
    tokio::task::spawn_blocking(move || {
        PartitionStore::open_read_only(&file, partition)
            .and_then(|store| store.recorded_epoch())
            .map_err(|e| crate::error_chain(&e))
    })
    .await
    .expect("reading the recorded epoch does not panic")
    .map_err(|reason| ReplicationError::Unreadable {
        path: path.to_owned(),
        reason,
    })
}

/// Renames a partition file that must not be used (with its `-wal`, `-shm` and Litestream's
/// `.NAME-litestream` metadata directory, which describes the old file) to
/// `NAME.{label}-UNIXSECS` (`corrupt`, `stale`), whichever of them exist; never deletes. When a
/// name of that second is taken (two moves within one second: a reload, a restart loop), the
/// suffix gets `-1`, `-2`, …: a rename onto an existing name would replace the copy kept before.
/// Returns the new name of the database file, if it existed.
///
/// # Errors
/// [`ReplicationError::MoveAside`] naming the file that could not be renamed.
pub fn move_aside(path: &Path, label: &str) -> Result<Option<PathBuf>, ReplicationError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    let companions = [
        name.clone(),
        format!("{name}-wal"),
        format!("{name}-shm"),
        format!(".{name}-litestream"),
    ];
    let suffix = (0u32..)
        .map(|n| match n {
            0 => format!("{label}-{stamp}"),
            n => format!("{label}-{stamp}-{n}"),
        })
        .find(|suffix| {
            companions
                .iter()
                .all(|c| !dir.join(format!("{c}.{suffix}")).exists())
        })
        .expect("some counter suffix is free");
    let mut moved = None;
    for companion in companions {
        let from = dir.join(&companion);
        if from.exists() {
            let to = dir.join(format!("{companion}.{suffix}"));
            std::fs::rename(&from, &to).map_err(|source| ReplicationError::MoveAside {
                path: from.clone(),
                source,
            })?;
            if companion == name {
                moved = Some(to);
            }
        }
    }
    Ok(moved)
}

fn remove_if_exists(path: &Path) -> Result<(), ReplicationError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ReplicationError::Io {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Fails fast when the object store cannot be reached at all: any HTTP answer (even 403 or 404)
/// means reachable; a refused or timed-out connection does not. Litestream itself would retry for
/// minutes before saying so.
///
/// # Errors
/// [`ReplicationError::Unreachable`] naming the endpoint.
pub async fn probe_endpoint(config: &Config) -> Result<(), ReplicationError> {
    let endpoint = config.replication.endpoint.clone().unwrap_or_default();
    let client = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .build()
        .map_err(|source| ReplicationError::Unreachable {
            endpoint: endpoint.clone(),
            source,
        })?;
    match client.head(&endpoint).send().await {
        Ok(_) => Ok(()),
        Err(source) => Err(ReplicationError::Unreachable { endpoint, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two moves of the same file within one second keep both copies: the second does not
    /// rename onto (and replace) the first.
    #[test]
    fn moves_within_one_second_never_replace_an_earlier_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p0001.sqlite3");
        let mut moved = Vec::new();
        for content in ["first", "second", "third"] {
            std::fs::write(&path, content).unwrap();
            std::fs::write(dir.path().join("p0001.sqlite3-wal"), content).unwrap();
            moved.push(move_aside(&path, "stale").unwrap().unwrap());
        }
        let kept: Vec<String> = moved
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(kept, ["first", "second", "third"], "{moved:?}");
        for m in &moved {
            let wal = PathBuf::from(m.display().to_string().replacen(
                "p0001.sqlite3.",
                "p0001.sqlite3-wal.",
                1,
            ));
            assert!(wal.exists(), "{} kept with its file", wal.display());
        }
        assert!(!path.exists());
    }
}
