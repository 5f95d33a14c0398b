//! Replica generations (DESIGN §7 fence): each lease epoch of a partition replicates to a key
//! prefix of its own, `{prefix}/partitions/p0007/e00000012`, so an old owner that wakes up after
//! losing its lease (a paused VM, SIGSTOP, a network partition) and lets its Litestream upload
//! what it buffered writes only into its own, superseded generation. It can never roll back or
//! corrupt the new owner's replica: "the epoch in the key is the fence".
//!
//! - **Restore** takes the newest generation that has data, up to the restorer's own epoch
//!   ([`newest_with_data`]; two listings per partition). A generation that has no LTX file yet
//!   (its holder crashed before its first upload) is skipped: the one before it is complete.
//! - **Start**: every acquisition is a new epoch, so a process start always replicates to an
//!   empty prefix. Litestream's local state (`.p0007.sqlite3-litestream/`) describes what was
//!   uploaded to the *previous* prefix, and resuming from it would try to upload LTX files
//!   Litestream has already pruned locally; it is removed, and Litestream's first sync takes a
//!   full snapshot of the file into the new generation (`replica.go` starts from TXID 1 against an
//!   empty replica; `db.go` snapshots when it has no position).
//! - **Retirement**: once the current generation has data and
//!   `cluster.superseded_retention_secs` has passed, older generations are deleted
//!   ([`retire_superseded`]), so the bucket does not grow with every move or restart.
//! - Generation 0 is the prefix without an epoch, `{prefix}/partitions/p0007`: where replicas
//!   written before epochs live, and what `replication.mode = "external"` keeps using (its
//!   sidecar reads the rendered file once and cannot follow a new epoch at every start; external
//!   mode is single-pod only, so there is no second writer to fence).

use std::collections::BTreeMap;

use futures_util::{StreamExt as _, TryStreamExt as _};
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;

use crate::config::Config;
use crate::ownership::PartitionId;

/// The replica generation each owned partition writes: its lease epoch, or 0 for the prefix
/// without an epoch (see the module docs).
pub type Epochs = BTreeMap<PartitionId, u64>;

/// Errors of listing and deleting generations.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// The object store could not be used (not configured, no credentials).
    #[error(transparent)]
    Bucket(#[from] crate::cluster::BucketError),
    /// A listing or deletion failed.
    #[error("object store: {what} under {prefix} failed")]
    Request {
        /// `list` or `delete`.
        what: &'static str,
        /// The key prefix involved.
        prefix: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// A request did not answer within the bucket client's bound.
    #[error(
        "object store: {what} under {prefix} took longer than {:?}",
        crate::cluster::bucket::REQUEST_TIMEOUT
    )]
    Timeout {
        /// `list` or `delete`.
        what: &'static str,
        /// The key prefix involved.
        prefix: String,
    },
}

/// The key prefix of all generations of `partition`: `{prefix}/partitions/p0007`.
pub fn partition_prefix(config: &Config, partition: PartitionId) -> String {
    format!("{}/partitions/{partition}", config.replication.prefix)
}

/// The key prefix generation `epoch` of `partition` replicates to:
/// `{prefix}/partitions/p0007/e00000012`, or [`partition_prefix`] itself for generation 0.
pub fn replica_path(config: &Config, partition: PartitionId, epoch: u64) -> String {
    let base = partition_prefix(config, partition);
    if epoch == 0 {
        base
    } else {
        format!("{base}/{}", segment(epoch))
    }
}

/// The path segment of generation `epoch` (> 0): `e` and 8 digits, so listings sort by epoch.
fn segment(epoch: u64) -> String {
    format!("e{epoch:08}")
}

/// Parses a path segment written by [`segment`].
fn parse_segment(segment: &str) -> Option<u64> {
    let digits = segment.strip_prefix('e')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&e| e > 0)
}

/// True for a directory of Litestream's S3 layout that holds LTX files of one compaction level:
/// `{replica path}/{level:04x}/{min txid}-{max txid}.ltx` (Litestream 0.5 `s3/replica_client.go`).
fn is_level_dir(segment: &str) -> bool {
    segment.len() == 4 && segment.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The last segment of each directory directly under `prefix`. One listing.
async fn directories(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<String>, GenerationError> {
    let listing = bounded(
        "list",
        prefix,
        store.list_with_delimiter(Some(&prefix.into())),
    )
    .await?;
    Ok(listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.parts().last().map(|s| s.as_ref().to_owned()))
        .collect())
}

/// The generations of `partition` present in the store, oldest first: every `e{epoch}`
/// directory, and 0 when level directories sit directly under the partition's prefix.
async fn generations(
    store: &dyn ObjectStore,
    config: &Config,
    partition: PartitionId,
) -> Result<Vec<u64>, GenerationError> {
    let dirs = directories(store, &partition_prefix(config, partition)).await?;
    let mut found: Vec<u64> = dirs
        .iter()
        .filter_map(|d| {
            if is_level_dir(d) {
                Some(0)
            } else {
                parse_segment(d)
            }
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

/// True when generation `epoch` of `partition` holds LTX files (has a level directory).
async fn has_data(
    store: &dyn ObjectStore,
    config: &Config,
    partition: PartitionId,
    epoch: u64,
) -> Result<bool, GenerationError> {
    let dirs = directories(store, &replica_path(config, partition, epoch)).await?;
    Ok(dirs.iter().any(|d| is_level_dir(d)))
}

/// The newest generation of `partition` at or below `up_to` that has data: what a restore by
/// the holder of epoch `up_to` reads. `None` when no generation has data (a new partition).
///
/// # Errors
/// [`GenerationError`] when a listing fails.
pub async fn newest_with_data(
    store: &dyn ObjectStore,
    config: &Config,
    partition: PartitionId,
    up_to: u64,
) -> Result<Option<u64>, GenerationError> {
    for epoch in generations(store, config, partition)
        .await?
        .into_iter()
        .rev()
        .filter(|&e| e <= up_to)
    {
        if has_data(store, config, partition, epoch).await? {
            return Ok(Some(epoch));
        }
    }
    Ok(None)
}

/// Deletes every generation of `partition` older than `current`, if `current` has data (a
/// complete snapshot of the file: Litestream's first upload into a generation is one). Returns
/// the number of objects deleted, or `None` when `current` has no data yet (nothing is deleted
/// then). Generations above `current` are never touched: they belong to a later holder.
///
/// # Errors
/// [`GenerationError`] when a listing or a deletion fails; what was deleted stays deleted, and
/// the next call deletes the rest.
pub async fn retire_superseded(
    store: &dyn ObjectStore,
    config: &Config,
    partition: PartitionId,
    current: u64,
) -> Result<Option<usize>, GenerationError> {
    // Generation 0 has nothing older, and its level directories are what the loop below
    // would take for an older generation's.
    if current == 0 {
        return Ok(Some(0));
    }
    if !has_data(store, config, partition, current).await? {
        return Ok(None);
    }
    let base = partition_prefix(config, partition);
    let mut prefixes = Vec::new();
    for dir in directories(store, &base).await? {
        // Generation 0's level directories sit directly under the partition's prefix, beside
        // the epoch directories.
        let older = is_level_dir(&dir) || parse_segment(&dir).is_some_and(|e| e < current);
        if older {
            prefixes.push(format!("{base}/{dir}"));
        }
    }
    let mut deleted = 0;
    for prefix in prefixes {
        let location: ObjectPath = prefix.as_str().into();
        let keys = store
            .list(Some(&location))
            .map_ok(|meta| meta.location)
            .boxed();
        let removed: Vec<ObjectPath> =
            bounded("delete", &prefix, store.delete_stream(keys).try_collect()).await?;
        deleted += removed.len();
    }
    Ok(Some(deleted))
}

/// Removes Litestream's local state of `partition` (`data_dir/partitions/.p0007.sqlite3-litestream/`)
/// before a process replicates it to a new generation: that state describes the previous
/// generation's uploads, and against an empty prefix Litestream would try to upload, from TXID 1,
/// LTX files it has since pruned. Without it, Litestream's first sync snapshots the whole file.
/// The directory holds copies of WAL frames the file itself has, so nothing stored is lost.
///
/// # Errors
/// [`ReplicationError::Io`](super::ReplicationError::Io) naming the directory.
pub fn forget_local_state(
    data_dir: &std::path::Path,
    partition: PartitionId,
) -> Result<(), super::ReplicationError> {
    let db = crate::store::PartitionStore::path_in(data_dir, partition);
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = db.with_file_name(format!(".{name}-litestream"));
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(super::ReplicationError::Io {
            path: dir,
            source: e,
        }),
        _ => Ok(()),
    }
}

/// One request (or one listing-and-deletion pass) under the bucket client's bound.
async fn bounded<T>(
    what: &'static str,
    prefix: &str,
    request: impl std::future::Future<Output = object_store::Result<T>>,
) -> Result<T, GenerationError> {
    // A deletion pass is a listing plus batches of up to 1000 keys: a few requests.
    match tokio::time::timeout(crate::cluster::bucket::REQUEST_TIMEOUT * 3, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(GenerationError::Request {
            what,
            prefix: prefix.to_owned(),
            source,
        }),
        Err(_) => Err(GenerationError::Timeout {
            what,
            prefix: prefix.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use object_store::PutPayload;
    use object_store::memory::InMemory;

    use super::*;

    fn config() -> Config {
        let mut c = Config::default();
        c.replication.prefix = "test".into();
        c
    }

    async fn put(store: &InMemory, key: &str) {
        store
            .put(&key.into(), PutPayload::from_static(b"x"))
            .await
            .unwrap();
    }

    #[test]
    fn paths_sort_by_epoch_and_generation_zero_has_no_segment() {
        let c = config();
        assert_eq!(replica_path(&c, PartitionId(7), 0), "test/partitions/p0007");
        assert_eq!(
            replica_path(&c, PartitionId(7), 12),
            "test/partitions/p0007/e00000012"
        );
        assert_eq!(parse_segment("e00000012"), Some(12));
        assert_eq!(parse_segment("e0"), None);
        assert_eq!(parse_segment("0000"), None);
        assert!(is_level_dir("0000") && is_level_dir("0009") && !is_level_dir("e0000001"));
        assert_eq!(parse_segment("e12x"), None);
    }

    #[tokio::test]
    async fn restore_reads_the_newest_generation_with_data_up_to_its_own_epoch() {
        let c = config();
        let store = InMemory::new();
        let p = PartitionId(7);
        assert_eq!(newest_with_data(&store, &c, p, 9).await.unwrap(), None);
        put(
            &store,
            "test/partitions/p0007/0000/0000000000000001-0000000000000001.ltx",
        )
        .await;
        assert_eq!(newest_with_data(&store, &c, p, 9).await.unwrap(), Some(0));
        put(
            &store,
            "test/partitions/p0007/e00000003/0000/0000000000000001-0000000000000001.ltx",
        )
        .await;
        put(
            &store,
            "test/partitions/p0007/e00000005/0000/0000000000000001-0000000000000004.ltx",
        )
        .await;
        // Epoch 6 holds no LTX file yet (its holder crashed before its first upload).
        put(&store, "test/partitions/p0007/e00000006/other").await;
        assert_eq!(newest_with_data(&store, &c, p, 9).await.unwrap(), Some(5));
        // A restorer at epoch 4 never reads a later holder's generation.
        assert_eq!(newest_with_data(&store, &c, p, 4).await.unwrap(), Some(3));
        // Other partitions' generations do not count.
        assert_eq!(
            newest_with_data(&store, &c, PartitionId(70), 9)
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn retirement_deletes_older_generations_only_once_the_current_has_data() {
        let c = config();
        let store = InMemory::new();
        let p = PartitionId(7);
        put(
            &store,
            "test/partitions/p0007/0001/0000000000000001-0000000000000009.ltx",
        )
        .await;
        put(
            &store,
            "test/partitions/p0007/e00000003/0000/0000000000000001-0000000000000001.ltx",
        )
        .await;
        put(
            &store,
            "test/partitions/p0007/e00000003/0000/0000000000000002-0000000000000002.ltx",
        )
        .await;
        put(
            &store,
            "test/partitions/p0007/e00000009/0000/0000000000000001-0000000000000001.ltx",
        )
        .await;
        put(
            &store,
            "test/partitions/p0008/e00000001/0000/0000000000000001-0000000000000001.ltx",
        )
        .await;
        // Epoch 5 has nothing yet: nothing is deleted.
        assert_eq!(retire_superseded(&store, &c, p, 5).await.unwrap(), None);
        put(
            &store,
            "test/partitions/p0007/e00000005/0000/0000000000000001-0000000000000001.ltx",
        )
        .await;
        assert_eq!(retire_superseded(&store, &c, p, 5).await.unwrap(), Some(3));
        let left: Vec<String> = store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            left,
            [
                "test/partitions/p0007/e00000005/0000/0000000000000001-0000000000000001.ltx",
                "test/partitions/p0007/e00000009/0000/0000000000000001-0000000000000001.ltx",
                "test/partitions/p0008/e00000001/0000/0000000000000001-0000000000000001.ltx",
            ]
        );
    }
}
