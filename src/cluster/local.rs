//! Local guards of the single-writer invariant (DESIGN §7): one process per data directory, and
//! a data directory only ever used with the partition count it was written with.
//!
//! - `data_dir/shardlite.lock` is locked exclusively (`flock`) for the life of the process and
//!   holds its pid. A second `shardlite run` on the same directory fails naming that pid instead
//!   of stopping the first one's Litestream and writing its files. The kernel drops the lock when
//!   the process dies, even by SIGKILL, so a crash never leaves a stale lock behind; the file is
//!   opened close-on-exec, so child processes (Litestream) never hold it.
//! - `data_dir/cluster.json` records `discord.shards` and `cluster.partitions`. Changing the
//!   partition count would route guilds to other files and orphan their rows: a data
//!   migration, refused here. The shard count may change (resharding keeps every partition
//!   whole) and is simply recorded.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the lock file inside `storage.data_dir`.
pub const LOCK_FILE: &str = "shardlite.lock";
/// Name of the topology record inside `storage.data_dir`.
pub const TOPOLOGY_FILE: &str = "cluster.json";

/// Errors of the local guards.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Another live process holds the data directory.
    #[error(
        "storage.data_dir {dir} is in use by another shardlite process (pid {holder}, lock file \
         {lock}); two processes must never write the same partitions"
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
        /// The holder's pid as it recorded it (`unknown` if unreadable).
        holder: String,
        /// The lock file.
        lock: PathBuf,
    },
    /// The directory was written with another partition count.
    #[error(
        "cluster.partitions = {configured}, but {dir} was written with {recorded} partitions \
         (recorded in {record}); changing the partition count is a data migration, not \
         supported online"
    )]
    PartitionsChanged {
        /// The data directory.
        dir: PathBuf,
        /// The record file.
        record: PathBuf,
        /// What it records.
        recorded: u32,
        /// This process's config.
        configured: u32,
    },
    /// The topology record is not what this module writes.
    #[error("{path} is not a shardlite topology record; move it away if it is not needed")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A file operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl LocalError {
    /// True for errors the operator fixes in the config (exit code 2).
    #[must_use]
    pub fn is_config(&self) -> bool {
        matches!(self, LocalError::PartitionsChanged { .. })
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LocalError + 'a {
    move |source| LocalError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The exclusive lock on a data directory; released when dropped or when the process ends.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Creates `data_dir` if needed and locks it for this process.
    ///
    /// # Errors
    /// [`LocalError::InUse`] naming the holder's pid; [`LocalError::Io`].
    pub fn acquire(data_dir: &Path) -> Result<Self, LocalError> {
        std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
        let path = data_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The holder wrote its pid right after locking; an empty read means it is
                // between the two.
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(LocalError::InUse {
                    dir: data_dir.to_owned(),
                    holder: if holder.is_empty() { "unknown" } else { holder }.to_owned(),
                    lock: path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io("lock", &path)(e)),
        }
        file.set_len(0).map_err(io("write", &path))?;
        file.rewind().map_err(io("write", &path))?;
        writeln!(file, "{}", std::process::id()).map_err(io("write", &path))?;
        Ok(DataDirLock { _file: file, path })
    }

    /// The lock file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What `cluster.json` records.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TopologyRecord {
    shards: u32,
    partitions: u32,
}

/// Checks `data_dir/cluster.json` against the configured counts and records them: a directory
/// first used now (or by a version before the record existed) takes the configured counts.
///
/// # Errors
/// [`LocalError::PartitionsChanged`] naming both counts; [`LocalError::BadRecord`];
/// [`LocalError::Io`].
pub fn check_topology(data_dir: &Path, shards: u32, partitions: u32) -> Result<(), LocalError> {
    let path = data_dir.join(TOPOLOGY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let recorded: TopologyRecord =
                serde_json::from_slice(&bytes).map_err(|source| LocalError::BadRecord {
                    path: path.clone(),
                    source,
                })?;
            if recorded.partitions != partitions {
                return Err(LocalError::PartitionsChanged {
                    dir: data_dir.to_owned(),
                    record: path,
                    recorded: recorded.partitions,
                    configured: partitions,
                });
            }
            if recorded.shards == shards {
                return Ok(());
            }
            tracing::info!(
                from = recorded.shards,
                to = shards,
                "discord.shards changed: every partition keeps its data and moves shard"
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", &path)(e)),
    }
    let record = TopologyRecord { shards, partitions };
    // Serializing two integers cannot fail.
    let text = serde_json::to_string(&record).unwrap_or_default();
    crate::write_atomic(&path, &(text + "\n")).map_err(io("write", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_names_the_holder_and_a_drop_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = DataDirLock::acquire(&data).unwrap();
        let err = DataDirLock::acquire(&data).unwrap_err();
        let LocalError::InUse { holder, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(holder, &std::process::id().to_string());
        assert!(
            err.to_string()
                .contains("in use by another shardlite process")
        );
        drop(first);
        DataDirLock::acquire(&data).unwrap();
    }

    #[test]
    fn the_partition_count_is_recorded_and_a_change_refused_while_shards_may_change() {
        let dir = tempfile::tempdir().unwrap();
        check_topology(dir.path(), 4, 64).unwrap();
        check_topology(dir.path(), 4, 64).unwrap();
        check_topology(dir.path(), 8, 64).unwrap();
        let err = check_topology(dir.path(), 8, 128).unwrap_err();
        assert!(err.is_config());
        assert!(
            err.to_string()
                .starts_with("cluster.partitions = 128, but "),
            "{err}"
        );
        assert!(
            err.to_string().contains("written with 64 partitions"),
            "{err}"
        );
        let text = std::fs::read_to_string(dir.path().join(TOPOLOGY_FILE)).unwrap();
        assert_eq!(text, "{\"shards\":8,\"partitions\":64}\n");
    }
}
