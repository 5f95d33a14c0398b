//! Reads for the API that never slow ingest (DESIGN §8): each query opens its partition file
//! read-only (a WAL reader never blocks the writer, nor the writer it), runs on tokio's blocking
//! pool rather than an async worker, is bounded in number across the pod, and is interrupted
//! when it runs past its deadline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::error::ApiError;
use crate::ownership::PartitionId;
use crate::store::{PartitionStore, StoreError};

/// Queries running at once, over every partition: with 2 cores, more would only queue on the
/// CPU while taking memory; the writer threads keep theirs.
pub const MAX_CONCURRENT_READS: usize = 8;
/// Longest a query may run before it is interrupted (`SQLITE_INTERRUPT`) and the request gets 503.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a request waits for one of the [`MAX_CONCURRENT_READS`] slots before 503.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs read-only queries against the partition files of one data dir.
#[derive(Clone)]
pub struct Reader {
    data_dir: PathBuf,
    slots: Arc<Semaphore>,
}

impl Reader {
    /// A reader of `data_dir/partitions/`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
        }
    }

    /// Runs `query` on a fresh read-only connection to `partition`'s file, off the async
    /// threads, within [`QUERY_TIMEOUT`].
    ///
    /// # Errors
    /// 503 `busy` when every slot stays taken for 2 s, 503 `query_timeout` when the query ran
    /// past its deadline (it is interrupted), 503 `partition_unreadable` when the file cannot be
    /// opened or SQLite fails.
    pub async fn read<T: Send + 'static>(
        &self,
        partition: PartitionId,
        query: impl FnOnce(&PartitionStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _slot = tokio::time::timeout(QUEUE_TIMEOUT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::unavailable("busy", "too many API reads in flight", 1))?
            .map_err(|_| ApiError::unavailable("busy", "the reader is shutting down", 1))?;
        let path = PartitionStore::path_in(&self.data_dir, partition);
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let task = tokio::task::spawn_blocking(move || {
            let store = PartitionStore::open_read_only(&path, partition)?;
            // If the caller already gave up, nobody interrupts: the query just runs once.
            let _ = handle_tx.send(store.interrupt_handle());
            query(&store)
        });
        let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
        let timed_out = || {
            ApiError::unavailable(
                "query_timeout",
                format!("the query on partition {partition} ran past {QUERY_TIMEOUT:?}"),
                1,
            )
        };
        // Opening counts against the deadline too (a file locked by a restore, a slow disk).
        let interrupt = tokio::time::timeout_at(deadline, handle_rx)
            .await
            .map_err(|_| timed_out())?
            .ok();
        let unreadable = |e: StoreError| {
            tracing::warn!(%partition, error = %crate::error_chain(&e), "API read failed");
            ApiError::unavailable(
                "partition_unreadable",
                format!("partition {partition} cannot be read right now"),
                1,
            )
        };
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err(unreadable(e)),
            Ok(Err(join)) => {
                tracing::error!(%partition, error = %join, "API read task panicked");
                Err(ApiError::unavailable(
                    "partition_unreadable",
                    format!("partition {partition} cannot be read right now"),
                    1,
                ))
            }
            Err(_) => {
                if let Some(interrupt) = interrupt {
                    interrupt.interrupt();
                }
                Err(timed_out())
            }
        }
    }
}
