//! Replication and restore with Litestream (DESIGN §6): the rendered `litestream.yml`, replica
//! generations (one per lease epoch, the fence of DESIGN §7), restore before open, and the
//! Litestream process (forced syncs, signals, a previous run's leftover).
//! No actors: the node supervises the `litestream replicate` child (`node::litestream`).
//!
//! | mode | shardlite renders the file | restores before open | runs `litestream replicate` |
//! |---|---|---|---|
//! | `child` | yes | yes | yes, supervised by the node (`node::litestream::LitestreamActor`) |
//! | `external` | yes | yes | no: a sidecar runs it with the same file |
//! | `off` | no | no | no |

pub mod generations;
pub mod litestream_config;
pub mod process;
pub mod restore;

pub use generations::{Epochs, GenerationError};

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, ReplicationMode, SECRET_ENV};
use crate::ownership::PartitionId;

/// A `litestream` command with the environment Litestream may see: the S3 credentials it reads
/// itself (`AWS_*`, `LITESTREAM_*`) pass; shardlite's own secrets ([`SECRET_ENV`]) do not, nor
/// does `AWS_CA_BUNDLE`, which breaks every S3 call of Litestream's AWS SDK ("unable to add
/// custom RootCAs HTTPClient", measured with 0.5.17). Stdin is closed.
pub fn litestream_command(bin: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env_remove("AWS_CA_BUNDLE")
        .stdin(std::process::Stdio::null());
    for key in SECRET_ENV {
        cmd.env_remove(key);
    }
    cmd
}

/// Errors of replication, restore and the Litestream process. Each names the partition, path or
/// count involved, where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The object store did not answer at all.
    #[error("object store at replication.endpoint = {endpoint} is unreachable")]
    Unreachable {
        /// The configured endpoint.
        endpoint: String,
        #[source]
        /// The underlying error.
        source: reqwest::Error,
    },
    /// The Litestream executable could not be run.
    #[error("cannot run {bin} (replication.litestream_bin; run scripts/install-tools)")]
    Spawn {
        /// The executable.
        bin: PathBuf,
        #[source]
        /// The underlying error.
        source: std::io::Error,
    },
    /// `litestream restore` failed.
    #[error("restore of partition {partition} failed ({status}): {stderr}")]
    RestoreFailed {
        /// The partition involved.
        partition: PartitionId,
        /// What the process or server answered.
        status: String,
        /// The end of the tool's standard error.
        stderr: String,
    },
    /// `litestream restore` did not finish within `replication.restore_timeout_secs`.
    #[error(
        "restore of partition {partition} did not finish within {timeout:?} (replication.restore_timeout_secs)"
    )]
    RestoreTimeout {
        /// The partition involved.
        partition: PartitionId,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The restored file fails `quick_check`: the replica itself is damaged.
    #[error("restored partition {partition} fails quick_check ({reason}); its replica is damaged")]
    RestoredCorrupt {
        /// The partition involved.
        partition: PartitionId,
        /// Why, in words.
        reason: String,
    },
    /// A local file could not be checked, so it is neither kept nor replaced.
    #[error("cannot check partition file {path}: {reason}")]
    Unreadable {
        /// The file involved.
        path: PathBuf,
        /// The error SQLite gave.
        reason: String,
    },
    /// A bad local file could not be moved aside.
    #[error("cannot move {path} aside")]
    MoveAside {
        /// The file or directory involved.
        path: PathBuf,
        #[source]
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another file operation failed.
    #[error("cannot write {path}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        #[source]
        /// The underlying error.
        source: std::io::Error,
    },
    /// `litestream replicate` could not be started.
    #[error("cannot start {bin} replicate")]
    SpawnReplicate {
        /// The executable.
        bin: PathBuf,
        #[source]
        /// The underlying error.
        source: std::io::Error,
    },
    /// Forced syncs (`litestream sync -wait`) could not confirm every partition on the replica.
    #[error("{failed} of {total} partitions could not be confirmed on the replica {purpose}")]
    SyncUnconfirmed {
        /// Partitions not confirmed.
        failed: usize,
        /// Partitions asked for.
        total: usize,
        /// When the syncs were forced (`before stop`, `at session start`, …).
        purpose: &'static str,
    },
    /// Listing or deleting replica generations failed.
    #[error(transparent)]
    Generations(#[from] GenerationError),
    /// A restore was asked of the Litestream child while it stops with the node.
    #[error("litestream is stopping; no restore")]
    Stopping,
}

/// Writes `data_dir/litestream.yml` for the partitions of `epochs` (each replicating to its lease
/// epoch's generation) and returns its path. The Litestream child renders it again whenever it
/// takes on more partitions; in external mode it is written once, for every owned partition.
///
/// # Errors
/// [`ReplicationError::Io`] naming the directory or file that could not be written.
pub fn write_config(config: &Config, epochs: &Epochs) -> Result<PathBuf, ReplicationError> {
    let data_dir = litestream_config::absolute_data_dir(config);
    std::fs::create_dir_all(&data_dir).map_err(|source| ReplicationError::Io {
        path: data_dir.clone(),
        source,
    })?;
    let config_file = data_dir.join(litestream_config::FILE_NAME);
    crate::write_atomic(&config_file, &litestream_config::render(config, epochs)).map_err(
        |source| ReplicationError::Io {
            path: config_file.clone(),
            source,
        },
    )?;
    Ok(config_file)
}

/// Before the partitions of `epochs` open: forgets Litestream's local state of previous
/// generations and restores what needs restoring ([`restore::restore_before_open`]). Returns the
/// per-partition decisions; empty when `replication.mode = "off"`.
///
/// # Errors
/// [`ReplicationError`] if a file cannot be removed or a restore fails.
pub async fn prepare(
    config: &Config,
    epochs: &Epochs,
) -> Result<Vec<restore::Outcome>, ReplicationError> {
    if config.replication.mode == ReplicationMode::Off {
        return Ok(Vec::new());
    }
    let data_dir = litestream_config::absolute_data_dir(config);
    for (&partition, &epoch) in epochs {
        if epoch > 0 {
            generations::forget_local_state(&data_dir, partition)?;
        }
    }
    restore::restore_before_open(config, epochs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn litestream_never_inherits_our_secrets_or_the_ca_bundle() {
        let cmd = litestream_command(Path::new("litestream"));
        let removed: Vec<String> = cmd
            .as_std()
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(key, _)| key.to_string_lossy().into_owned())
            .collect();
        for key in ["DISCORD_TOKEN", "SHARDLITE_API_TOKEN", "AWS_CA_BUNDLE"] {
            assert!(removed.iter().any(|k| k == key), "{key} in {removed:?}");
        }
        assert!(
            !removed.iter().any(|k| k.starts_with("AWS_ACCESS")),
            "S3 credentials pass: {removed:?}"
        );
    }
}
