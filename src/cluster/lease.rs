//! Partition leases (DESIGN §7): the right to write one partition — its file and its replica —
//! held by one process at a time, kept as a small JSON object beside the replicas and changed
//! only by S3 conditional writes.
//!
//! # Protocol
//! - **Key**: `{replication.prefix}/leases/p0007`, beside `{prefix}/partitions/p0007`.
//! - **Acquire**: no object → create it with `If-None-Match: *` at epoch 1. An object that was
//!   released, or that nobody renewed for a whole TTL, is taken over with `If-Match: <etag>` at
//!   its epoch + 1. Every acquisition therefore has an epoch no other acquisition had, and the
//!   epoch is the fencing token the replica path and the outbox carry.
//! - **Expiry without clocks**: a contender never compares timestamps written by another
//!   machine. It remembers the ETag it saw and when (on its own monotonic clock); the lease is
//!   expired once the same ETag was still there a full TTL later. The holder renews every
//!   TTL / 3 and stops writing once TTL × 2/3 has passed since the last renewal it *sent* that
//!   succeeded, so it has stopped well before any contender can take over, as long as the two
//!   clocks run at about the same rate (no synchronised wall clocks needed).
//! - **Renew**: `If-Match` with the ETag of the holder's last write; a refusal means another
//!   process took the lease: [`LeaseError::Lost`], stop writing now.
//! - **Release**: on a planned handoff the holder writes `released_at` and the final position
//!   (session id, resume URL, applied sequence) with `If-Match`; the next owner may take the
//!   lease at once and resume the same Discord session from there.
//!
//! The unit is the partition, not the shard group: a partition keeps its lease whatever shard
//! carries it, so resharding (S → 2S) cannot put two writers on one file. Renewals cost
//! partitions × 3 / TTL requests per second (64 partitions, TTL 60 s: 3.2/s), which config
//! validation keeps within 5 % of `replication.request_budget_per_sec`.
//! The record also carries `partitions`, so a pod configured with another partition count is
//! refused before it writes ([`LeaseError::PartitionsChanged`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::bucket::{REQUEST_TIMEOUT, unquoted};
use crate::ownership::PartitionId;

/// The JSON object at a partition's lease key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds (or last held) it: pod ordinal, host and process, unique per process start.
    pub holder: String,
    /// Generation of the lease, +1 at every acquisition; the fencing token.
    pub epoch: u64,
    /// The holder's TTL in milliseconds; a contender waits at least this long.
    pub ttl_ms: u64,
    /// Holder's wall clock at the last write, ms since the Unix epoch. For people and logs only:
    /// expiry is judged by observation, never by comparing clocks.
    pub renewed_at_ms: u64,
    /// Set when the holder released the lease on purpose (a handoff), ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at_ms: Option<u64>,
    /// What the releasing holder had applied: the next owner resumes from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<ReleasedPosition>,
    /// `cluster.partitions` of the holder: the partition count the data was written with.
    pub partitions: u32,
}

/// A partition's final position recorded at release (DESIGN §7 handoff).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedPosition {
    /// Discord shard total of the session.
    pub shard_total: u32,
    /// Discord's `session_id`.
    pub session_id: String,
    /// Discord's `resume_gateway_url`.
    pub resume_url: String,
    /// The partition's applied sequence when it was released.
    pub applied_seq: u64,
}

/// A lease this process holds.
#[derive(Clone, Debug)]
pub struct HeldLease {
    /// The partition it covers.
    pub partition: PartitionId,
    /// Its epoch (fencing token).
    pub epoch: u64,
    /// The record before this acquisition (a released position to resume from), if any.
    pub previous: Option<LeaseRecord>,
    etag: String,
    renewed: Instant,
    ttl: Duration,
}

impl HeldLease {
    /// The instant after which the holder must no longer write the partition: TTL × 2/3 after
    /// the last renewal it sent that succeeded (a contender waits a full TTL after it last saw
    /// the lease change).
    #[must_use]
    pub fn write_deadline(&self) -> Instant {
        self.renewed + self.ttl * 2 / 3
    }

    /// When the next renewal is due (TTL / 3 after the last one).
    #[must_use]
    pub fn renew_at(&self) -> Instant {
        self.renewed + self.ttl / 3
    }
}

/// What [`Leases::acquire`] found.
#[derive(Debug)]
pub enum Acquire {
    /// This process holds the lease now.
    Acquired(HeldLease),
    /// Another process holds it and renewed it within a TTL; try again later.
    Held {
        /// The current holder.
        holder: String,
        /// Its epoch.
        epoch: u64,
        /// Longest the lease can still be valid without another renewal, from now.
        expires_in: Duration,
        /// The lease changed while this process watched it (the holder renewed it, or another
        /// contender took it over): a live process holds it, not one that crashed.
        live: bool,
    },
}

/// Errors of the lease protocol.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another process replaced the lease: this one no longer holds it and must stop writing.
    #[error("lease of {partition} lost (held at epoch {epoch}): another process took it over")]
    Lost {
        /// The partition.
        partition: PartitionId,
        /// The epoch this process held.
        epoch: u64,
    },
    /// Renewals failed (store unreachable) until the holder's write deadline passed: as good
    /// as lost, since a contender may take it over once a TTL has passed.
    #[error("lease of {partition} (epoch {epoch}) could not be renewed before its write deadline")]
    Expired {
        /// The partition.
        partition: PartitionId,
        /// The epoch this process held.
        epoch: u64,
    },
    /// The lease was written by a pod with another `cluster.partitions`.
    #[error(
        "cluster.partitions = {configured}, but the data in the bucket was written with \
         {recorded} partitions (lease of {partition}); changing the partition count is a data \
         migration, not supported online"
    )]
    PartitionsChanged {
        /// The partition whose lease says so.
        partition: PartitionId,
        /// What the lease records.
        recorded: u32,
        /// This pod's config.
        configured: u32,
    },
    /// The lease object is not a lease record.
    #[error("lease object {key} is not a lease record")]
    Malformed {
        /// Its key.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A request failed; the caller retries until its write deadline.
    #[error("lease request for {partition} failed")]
    Request {
        /// The partition.
        partition: PartitionId,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// A request did not finish within its bound.
    #[error("lease request for {partition} took longer than {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// The partition.
        partition: PartitionId,
    },
}

/// An ETag seen on another holder's lease, and when it was first seen.
#[derive(Clone, Debug)]
struct Sighting {
    etag: String,
    since: Instant,
    /// The ETag changed at least once while watched.
    changed: bool,
}

impl LeaseError {
    /// True for a failure no retry can fix and the operator must fix in the deployment: the
    /// store refused the credentials, or has no such bucket (exit code 2, like a missing key).
    #[must_use]
    pub fn is_deployment_error(&self) -> bool {
        matches!(
            self,
            LeaseError::Request {
                source: object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::NotFound { .. },
                ..
            }
        )
    }
}

/// This process's side of the lease protocol over one bucket.
pub struct Leases {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    holder: String,
    ttl: Duration,
    partitions: u32,
    sightings: Mutex<HashMap<PartitionId, Sighting>>,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("prefix", &self.prefix)
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The holder name of this process: `pod-{ordinal}@{host}/{pid}/{start}`, unique per start.
#[must_use]
pub fn holder_name(ordinal: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("pod-{ordinal}@{host}/{}/{}", std::process::id(), now_ms())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Leases {
    /// Leases under `{prefix}/leases/` in `store`, held as `holder` with `ttl`, for a pod
    /// configured with `partitions` partitions.
    #[must_use]
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        holder: String,
        ttl: Duration,
        partitions: u32,
    ) -> Self {
        Leases {
            store,
            prefix: prefix.to_owned(),
            holder,
            ttl,
            partitions,
            sightings: Mutex::new(HashMap::new()),
        }
    }

    /// The object key of `partition`'s lease: `{prefix}/leases/p0007`.
    #[must_use]
    pub fn key(&self, partition: PartitionId) -> ObjectPath {
        ObjectPath::from(format!("{}/leases/p{:04}", self.prefix, partition.0))
    }

    /// The current record and its (unquoted) ETag, if the lease object exists.
    ///
    /// # Errors
    /// [`LeaseError::Request`], [`LeaseError::Timeout`], [`LeaseError::Malformed`].
    pub async fn read(
        &self,
        partition: PartitionId,
    ) -> Result<Option<(LeaseRecord, String)>, LeaseError> {
        let key = self.key(partition);
        let got = match bounded(partition, self.store.get(&key)).await? {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => return Err(LeaseError::Request { partition, source }),
        };
        let etag = got.meta.e_tag.as_deref().map(unquoted).unwrap_or_default();
        let bytes = bounded(partition, got.bytes())
            .await?
            .map_err(|source| LeaseError::Request { partition, source })?;
        let record = serde_json::from_slice(&bytes).map_err(|source| LeaseError::Malformed {
            key: key.to_string(),
            source,
        })?;
        Ok(Some((record, etag)))
    }

    /// Tries once to take `partition`'s lease (see the module docs for when a held lease may be
    /// taken over). Call it again after [`Acquire::Held`]: each call is one read and at most
    /// one conditional write.
    ///
    /// # Errors
    /// [`LeaseError::PartitionsChanged`] when the lease was written with another partition
    /// count; request errors.
    pub async fn acquire(&self, partition: PartitionId) -> Result<Acquire, LeaseError> {
        let Some((record, etag)) = self.read(partition).await? else {
            let sent = Instant::now();
            let fresh = self.record(1, None, None);
            return match self.write(partition, PutMode::Create, &fresh).await {
                Ok(etag) => Ok(Acquire::Acquired(self.held(partition, 1, etag, sent, None))),
                Err(WriteError::Refused) => match self.adopt(partition, 1, sent, None).await? {
                    Some(lease) => Ok(Acquire::Acquired(lease)),
                    // Someone created it between our read and write: theirs now.
                    None => Ok(Acquire::Held {
                        holder: "(just created by another process)".to_owned(),
                        epoch: 1,
                        expires_in: self.ttl,
                        live: true,
                    }),
                },
                Err(WriteError::Failed(e)) => Err(e),
            };
        };
        // Taken after the read returned: the ETag existed by then, so a full TTL from here is
        // a full TTL after the holder's write at the latest.
        let seen_at = Instant::now();
        if record.partitions != self.partitions {
            return Err(LeaseError::PartitionsChanged {
                partition,
                recorded: record.partitions,
                configured: self.partitions,
            });
        }
        let ttl = self.ttl.max(Duration::from_millis(record.ttl_ms));
        let (unchanged_for, live) = {
            let mut sightings = self
                .sightings
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let seen = sightings.entry(partition).or_insert_with(|| Sighting {
                etag: etag.clone(),
                since: seen_at,
                changed: false,
            });
            if seen.etag != etag {
                *seen = Sighting {
                    etag: etag.clone(),
                    since: seen_at,
                    changed: true,
                };
            }
            (seen_at.duration_since(seen.since), seen.changed)
        };
        let released = record.released_at_ms.is_some();
        if !released && unchanged_for < ttl {
            return Ok(Acquire::Held {
                holder: record.holder,
                epoch: record.epoch,
                expires_in: ttl - unchanged_for,
                live,
            });
        }
        let epoch = record.epoch + 1;
        let next = self.record(epoch, None, None);
        let mode = PutMode::Update(UpdateVersion {
            e_tag: Some(etag),
            version: None,
        });
        let sent = Instant::now();
        let lease = match self.write(partition, mode, &next).await {
            Ok(etag) => Some(self.held(partition, epoch, etag, sent, Some(record.clone()))),
            Err(WriteError::Refused) => {
                self.adopt(partition, epoch, sent, Some(record.clone()))
                    .await?
            }
            Err(WriteError::Failed(e)) => return Err(e),
        };
        let Some(lease) = lease else {
            return Ok(Acquire::Held {
                holder: "(taken over by another process)".to_owned(),
                epoch,
                expires_in: self.ttl,
                live: true,
            });
        };
        self.forget(partition);
        tracing::info!(partition = %partition, epoch, previous = %record.holder, released,
            "lease acquired");
        Ok(Acquire::Acquired(lease))
    }

    /// After a refused conditional write: a write of ours may have been applied after all (the
    /// client retried a request whose first attempt the store had applied, or a timed-out
    /// request landed), which changed the ETag under us. Re-reads the lease: if it names this
    /// process at `epoch` and is not released, it is ours, with the ETag read back. The holder
    /// name is unique per process start, so no other process can look like us.
    async fn adopt(
        &self,
        partition: PartitionId,
        epoch: u64,
        sent: Instant,
        previous: Option<LeaseRecord>,
    ) -> Result<Option<HeldLease>, LeaseError> {
        Ok(match self.read(partition).await? {
            Some((r, etag))
                if r.holder == self.holder && r.epoch == epoch && r.released_at_ms.is_none() =>
            {
                tracing::debug!(partition = %partition, epoch, "a retried lease write had landed");
                Some(self.held(partition, epoch, etag, sent, previous))
            }
            _ => None,
        })
    }

    /// Renews `lease` (same epoch, `If-Match` with its last ETag). On success its write
    /// deadline moves to TTL × 2/3 after this call started.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when another process replaced the lease: stop writing now. Request
    /// errors leave the lease as it was; retry until [`HeldLease::write_deadline`].
    pub async fn renew(&self, lease: &mut HeldLease) -> Result<(), LeaseError> {
        let sent = Instant::now();
        let record = self.record(lease.epoch, None, None);
        let etag = match self.replace(lease, &record).await {
            Ok(etag) => etag,
            Err(lost @ LeaseError::Lost { .. }) => {
                match self.adopt(lease.partition, lease.epoch, sent, None).await? {
                    Some(adopted) => adopted.etag,
                    None => return Err(lost),
                }
            }
            Err(e) => return Err(e),
        };
        lease.etag = etag;
        lease.renewed = sent;
        Ok(())
    }

    /// Releases `lease` for the next owner, recording `position` (DESIGN §7 handoff). The
    /// caller has stopped writing the partition and its replica holds everything first.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when another process took the lease meanwhile; request errors (the
    /// lease then simply expires).
    pub async fn release(
        &self,
        lease: HeldLease,
        position: Option<ReleasedPosition>,
    ) -> Result<(), LeaseError> {
        let record = self.record(lease.epoch, Some(now_ms()), position);
        self.replace(&lease, &record).await?;
        tracing::info!(partition = %lease.partition, epoch = lease.epoch, "lease released");
        Ok(())
    }

    async fn replace(&self, lease: &HeldLease, record: &LeaseRecord) -> Result<String, LeaseError> {
        let mode = PutMode::Update(UpdateVersion {
            e_tag: Some(lease.etag.clone()),
            version: None,
        });
        match self.write(lease.partition, mode, record).await {
            Ok(etag) => Ok(etag),
            Err(WriteError::Refused) => Err(LeaseError::Lost {
                partition: lease.partition,
                epoch: lease.epoch,
            }),
            Err(WriteError::Failed(e)) => Err(e),
        }
    }

    fn record(
        &self,
        epoch: u64,
        released_at_ms: Option<u64>,
        position: Option<ReleasedPosition>,
    ) -> LeaseRecord {
        LeaseRecord {
            holder: self.holder.clone(),
            epoch,
            ttl_ms: self.ttl.as_millis() as u64,
            renewed_at_ms: now_ms(),
            released_at_ms,
            position,
            partitions: self.partitions,
        }
    }

    fn held(
        &self,
        partition: PartitionId,
        epoch: u64,
        etag: String,
        sent: Instant,
        previous: Option<LeaseRecord>,
    ) -> HeldLease {
        HeldLease {
            partition,
            epoch,
            previous,
            etag,
            renewed: sent,
            ttl: self.ttl,
        }
    }

    fn forget(&self, partition: PartitionId) {
        self.sightings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&partition);
    }

    /// One conditional write; returns the new (unquoted) ETag.
    async fn write(
        &self,
        partition: PartitionId,
        mode: PutMode,
        record: &LeaseRecord,
    ) -> Result<String, WriteError> {
        // Serializing a struct of strings and integers cannot fail.
        let body = serde_json::to_vec(record).unwrap_or_default();
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        let key = self.key(partition);
        let put = self.store.put_opts(&key, PutPayload::from(body), opts);
        match bounded(partition, put).await.map_err(WriteError::Failed)? {
            Ok(result) => Ok(result.e_tag.as_deref().map(unquoted).unwrap_or_default()),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(WriteError::Refused),
            Err(source) => Err(WriteError::Failed(LeaseError::Request {
                partition,
                source,
            })),
        }
    }
}

/// A conditional write's outcome other than success.
enum WriteError {
    /// The precondition failed: someone else wrote the lease.
    Refused,
    /// Anything else.
    Failed(LeaseError),
}

async fn bounded<T>(partition: PartitionId, f: impl Future<Output = T>) -> Result<T, LeaseError> {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .map_err(|_| LeaseError::Timeout { partition })
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn pair() -> (Leases, Leases) {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        (
            Leases::new(store.clone(), "t", "a".into(), TTL, 64),
            Leases::new(store, "t", "b".into(), TTL, 64),
        )
    }

    fn acquired(a: Acquire) -> HeldLease {
        match a {
            Acquire::Acquired(held) => held,
            Acquire::Held { holder, .. } => panic!("held by {holder}"),
        }
    }

    fn held_by(a: Acquire) -> (String, u64) {
        match a {
            Acquire::Held { holder, epoch, .. } => (holder, epoch),
            Acquire::Acquired(l) => panic!("acquired at epoch {}", l.epoch),
        }
    }

    const P: PartitionId = PartitionId(7);

    #[tokio::test(start_paused = true)]
    async fn the_first_acquirer_gets_epoch_1_and_a_second_waits() {
        let (a, b) = pair();
        let lease = acquired(a.acquire(P).await.unwrap());
        assert_eq!(lease.epoch, 1);
        assert!(lease.previous.is_none());
        assert_eq!(held_by(b.acquire(P).await.unwrap()), ("a".into(), 1));
        let (record, _) = a.read(P).await.unwrap().unwrap();
        assert_eq!(record.holder, "a");
        assert_eq!(record.partitions, 64);
        assert_eq!(a.key(P).as_ref(), "t/leases/p0007");
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_lease_is_never_taken_over() {
        let (a, b) = pair();
        let mut lease = acquired(a.acquire(P).await.unwrap());
        for _ in 0..12 {
            tokio::time::sleep_until(lease.renew_at()).await;
            a.renew(&mut lease).await.unwrap();
            held_by(b.acquire(P).await.unwrap());
        }
        assert_eq!(lease.epoch, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unrenewed_lease_is_taken_over_after_a_full_ttl_and_the_old_holder_learns_it() {
        let (a, b) = pair();
        let mut old = acquired(a.acquire(P).await.unwrap());
        held_by(b.acquire(P).await.unwrap());
        tokio::time::sleep(TTL - Duration::from_millis(1)).await;
        held_by(b.acquire(P).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1)).await;
        let new = acquired(b.acquire(P).await.unwrap());
        assert_eq!(new.epoch, 2);
        assert_eq!(new.previous.as_ref().unwrap().holder, "a");
        assert!(matches!(
            a.renew(&mut old).await,
            Err(LeaseError::Lost { epoch: 1, .. })
        ));
        assert!(matches!(
            a.release(old, None).await,
            Err(LeaseError::Lost { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_landed_before_its_answer_was_lost_is_adopted_not_taken_for_a_loss() {
        let (a, b) = pair();
        let mut lease = acquired(a.acquire(P).await.unwrap());
        let stale = lease.clone();
        a.renew(&mut lease).await.unwrap();
        // As if the answer to that renewal never arrived: the holder still has the old ETag.
        let mut retried = stale;
        a.renew(&mut retried).await.unwrap();
        assert_eq!(retried.epoch, 1);
        held_by(b.acquire(P).await.unwrap());
        // A real takeover is still a loss.
        tokio::time::sleep(TTL).await;
        assert_eq!(acquired(b.acquire(P).await.unwrap()).epoch, 2);
        assert!(matches!(
            a.renew(&mut retried).await,
            Err(LeaseError::Lost { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_passes_at_once_with_its_position() {
        let (a, b) = pair();
        let lease = acquired(a.acquire(P).await.unwrap());
        let position = ReleasedPosition {
            shard_total: 4,
            session_id: "s1".into(),
            resume_url: "wss://resume".into(),
            applied_seq: 1234,
        };
        a.release(lease, Some(position.clone())).await.unwrap();
        let next = acquired(b.acquire(P).await.unwrap());
        assert_eq!(next.epoch, 2);
        assert_eq!(next.previous.unwrap().position, Some(position));
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_partition_count_is_refused_naming_both() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let old = Leases::new(store.clone(), "t", "a".into(), TTL, 64);
        let new = Leases::new(store, "t", "b".into(), TTL, 128);
        acquired(old.acquire(P).await.unwrap());
        let err = new.acquire(P).await.unwrap_err();
        assert!(
            matches!(
                err,
                LeaseError::PartitionsChanged {
                    recorded: 64,
                    configured: 128,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_garbled_lease_object_is_an_error_not_a_free_lease() {
        let (a, _) = pair();
        a.store
            .put(&a.key(P), PutPayload::from_static(b"not json"))
            .await
            .unwrap();
        assert!(matches!(
            a.acquire(P).await,
            Err(LeaseError::Malformed { .. })
        ));
    }
}
