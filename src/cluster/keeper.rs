//! Holds this pod's partition leases for the life of a run (DESIGN §7): acquires all of them
//! before anything is restored or opened (waiting for those another process holds), renews them
//! in the background, reports the first one it cannot keep, and releases them on a graceful
//! stop with the position each partition reached.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{Mutex, oneshot, watch};
use tokio::time::Instant;

use super::lease::{Acquire, HeldLease, LeaseError, Leases, ReleasedPosition};
use crate::ownership::PartitionId;

/// Lease releases in flight at once.
const CONCURRENCY: usize = 8;
/// Consecutive failed requests for one lease at start before the start fails (a store that
/// answers nothing useful for this long is not a passing hiccup).
const MAX_FAILURES: u32 = 10;
/// Pause after a failed request before the next attempt.
const RETRY: Duration = Duration::from_secs(1);

/// A lease this process waits for: who holds it now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeaseWait {
    /// The current holder (pod ordinal, host and process).
    pub holder: String,
    /// The holder's epoch.
    pub epoch: u64,
    /// Longest the lease can still be valid without another renewal, seconds, when last looked
    /// at.
    pub free_within_secs: u64,
    /// The holder renewed the lease while this process watched: it is alive (a crashed
    /// holder's lease just runs out).
    pub live: bool,
}

/// The partitions whose lease [`LeaseKeeper::acquire`] is still waiting for, updated as it goes
/// (empty once it holds them all); `/readyz` shows it while the pod starts.
pub type LeaseWaits = watch::Receiver<BTreeMap<PartitionId, LeaseWait>>;

/// The leases of one run. Dropping it stops the renewals (the leases then expire).
pub struct LeaseKeeper {
    leases: Arc<Leases>,
    held: Arc<Mutex<Vec<HeldLease>>>,
    lost: oneshot::Receiver<LeaseError>,
    renewer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("leases", &self.leases)
            .finish_non_exhaustive()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl LeaseKeeper {
    /// Acquires the lease of every partition in `partitions`, waiting (and logging whom it
    /// waits for) while another process holds one, then starts renewing them. `waits` is kept
    /// up to date with the leases still waited for (see [`LeaseWaits`]).
    ///
    /// # Errors
    /// [`LeaseError::PartitionsChanged`] or [`LeaseError::Malformed`]; a request error when the
    /// store refused the credentials or has no such bucket, or after 10 failures in a row
    /// (other failures are retried every second).
    pub async fn acquire(
        leases: Arc<Leases>,
        partitions: &[PartitionId],
        ttl: Duration,
        waits: &watch::Sender<BTreeMap<PartitionId, LeaseWait>>,
    ) -> Result<Self, LeaseError> {
        let started = Instant::now();
        // Renewed from the first one on: a pod may wait long for the others (a rolling update
        // releases them one pod at a time), and a lease not renewed for TTL × 2/3 must not be
        // written at all.
        let held = Arc::new(Mutex::new(Vec::with_capacity(partitions.len())));
        let (lost_tx, lost) = oneshot::channel();
        let renewer = tokio::spawn(renew_forever(leases.clone(), held.clone(), lost_tx, ttl));
        let keeper = LeaseKeeper {
            leases,
            held,
            lost,
            renewer,
        };
        // All at once: an expired lease is taken only after a full TTL of watching it, and
        // every partition's TTL must run in parallel, not in turns.
        let (leases, held) = (&keeper.leases, &keeper.held);
        futures_util::future::join_all(partitions.iter().map(|&p| async move {
            let lease = acquire_one(leases, p, ttl, waits).await?;
            held.lock().await.push(lease);
            Ok::<_, LeaseError>(())
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
        let epochs: Vec<String> = keeper
            .held
            .lock()
            .await
            .iter()
            .map(|l| format!("{}@{}", l.partition, l.epoch))
            .collect();
        tracing::info!(
            leases = epochs.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            epochs = %epochs.join(" "),
            "partition leases acquired"
        );
        Ok(keeper)
    }

    /// The epoch of each held lease (the fencing token), by partition.
    pub async fn epochs(&self) -> HashMap<PartitionId, u64> {
        self.held
            .lock()
            .await
            .iter()
            .map(|l| (l.partition, l.epoch))
            .collect()
    }

    /// The positions the previous holders recorded when they released these leases (DESIGN §7
    /// handoff), by partition; partitions whose lease was taken over after a crash, or never
    /// held before, have none.
    pub async fn released_before(&self) -> HashMap<PartitionId, ReleasedPosition> {
        self.held
            .lock()
            .await
            .iter()
            .filter_map(|l| {
                let position = l.previous.as_ref()?.position.clone()?;
                Some((l.partition, position))
            })
            .collect()
    }

    /// Resolves once a lease was taken by another process or could not be renewed before its
    /// write deadline: from then on this process must not write that partition or its replica.
    /// Pending forever while every lease is kept.
    pub async fn lost(&mut self) -> LeaseError {
        match (&mut self.lost).await {
            Ok(e) => e,
            // The renewer ended without a loss: only a release does that.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops renewing and releases every lease, recording each partition's final position
    /// (DESIGN §7 handoff). Failures are logged: an unreleased lease just expires after its TTL.
    pub async fn release(self, mut positions: HashMap<PartitionId, ReleasedPosition>) {
        // The renewer holds this lock across its requests: once it is ours, no renewal is in
        // flight, and the renewer is asleep or waiting for the lock, where stopping it is safe.
        // Aborted mid-request instead, a renewal could still land in the store after the abort
        // and change the ETag the release is conditioned on: the release would then be refused
        // (412) as if another process had taken the lease, and the next owner would wait a TTL.
        let mut guard = self.held.lock().await;
        self.renewer.abort();
        let held = std::mem::take(&mut *guard);
        drop(guard);
        let count = held.len();
        let leases = &self.leases;
        let failed = futures_util::stream::iter(held)
            .map(|lease| {
                let position = positions.remove(&lease.partition);
                async move {
                    let partition = lease.partition;
                    leases
                        .release(lease, position)
                        .await
                        .map_err(|e| (partition, e))
                }
            })
            .buffer_unordered(CONCURRENCY)
            .filter_map(async |r| r.err())
            .collect::<Vec<_>>()
            .await;
        for (partition, error) in &failed {
            tracing::warn!(partition = %partition, error = %crate::error_chain(error),
                "lease not released; it expires after its TTL");
        }
        tracing::info!(
            released = count - failed.len(),
            of = count,
            "partition leases released"
        );
    }
}

async fn acquire_one(
    leases: &Leases,
    partition: PartitionId,
    ttl: Duration,
    waits: &watch::Sender<BTreeMap<PartitionId, LeaseWait>>,
) -> Result<HeldLease, LeaseError> {
    let mut waiting_for: Option<(String, u64)> = None;
    let mut failures = 0;
    loop {
        match leases.acquire(partition).await {
            Ok(Acquire::Acquired(lease)) => {
                waits.send_modify(|w| {
                    w.remove(&partition);
                });
                return Ok(lease);
            }
            Ok(Acquire::Held {
                holder,
                epoch,
                expires_in,
                live,
            }) => {
                failures = 0;
                waits.send_modify(|w| {
                    w.insert(
                        partition,
                        LeaseWait {
                            holder: holder.clone(),
                            epoch,
                            free_within_secs: expires_in.as_secs(),
                            live,
                        },
                    );
                });
                if waiting_for.as_ref() != Some(&(holder.clone(), epoch)) {
                    tracing::warn!(partition = %partition, %holder, epoch,
                        free_within_secs = expires_in.as_secs(),
                        "waiting for lease: another process holds this partition");
                    waiting_for = Some((holder, epoch));
                }
                // A release frees it at once; look again every sixth of a TTL, sooner if it
                // expires before.
                tokio::time::sleep(expires_in.min(ttl / 6).max(RETRY)).await;
            }
            Err(e @ (LeaseError::Request { .. } | LeaseError::Timeout { .. })) => {
                failures += 1;
                if failures >= MAX_FAILURES || e.is_deployment_error() {
                    return Err(e);
                }
                tracing::warn!(partition = %partition, error = %crate::error_chain(&e),
                    "lease request failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Renews every lease when due; sends the first loss and ends. Leases join `held` while the
/// keeper acquires them; while it holds none, it looks again every sixth of a TTL.
async fn renew_forever(
    leases: Arc<Leases>,
    held: Arc<Mutex<Vec<HeldLease>>>,
    lost: oneshot::Sender<LeaseError>,
    ttl: Duration,
) {
    loop {
        let next = held.lock().await.iter().map(HeldLease::renew_at).min();
        // A lease acquired meanwhile is due TTL / 3 after its acquisition at the earliest.
        let next = next.map_or(Instant::now() + ttl / 6, |n| {
            n.min(Instant::now() + ttl / 6)
        });
        tokio::time::sleep_until(next).await;
        let mut guard = held.lock().await;
        let now = Instant::now();
        let due: Vec<&mut HeldLease> = guard.iter_mut().filter(|l| l.renew_at() <= now).collect();
        let results =
            futures_util::future::join_all(due.into_iter().map(|l| renew_one(&leases, l))).await;
        if let Some(loss) = results.into_iter().flatten().next() {
            // The receiver is gone only if the run already ended.
            let _ = lost.send(loss);
            return;
        }
        let failed_due = guard.iter().any(|l| l.renew_at() <= Instant::now());
        drop(guard);
        if failed_due {
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// One renewal, bounded by the lease's write deadline: `Some` when the lease is lost or the
/// deadline passed before the store confirmed the renewal.
async fn renew_one(leases: &Leases, lease: &mut HeldLease) -> Option<LeaseError> {
    let (partition, epoch, deadline) = (lease.partition, lease.epoch, lease.write_deadline());
    let expired = || {
        tracing::error!(partition = %partition, epoch,
            "lease could not be renewed before its write deadline");
        Some(LeaseError::Expired { partition, epoch })
    };
    match tokio::time::timeout_at(deadline, leases.renew(lease)).await {
        Err(_) => expired(),
        Ok(Ok(())) => None,
        Ok(Err(e @ LeaseError::Lost { .. })) => Some(e),
        Ok(Err(_)) if Instant::now() >= deadline => expired(),
        Ok(Err(e)) => {
            tracing::warn!(partition = %partition, error = %crate::error_chain(&e),
                "lease renewal failed; retrying before its write deadline");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use object_store::ObjectStore;
    use object_store::memory::InMemory;

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    /// A pod that holds one lease and waits several TTLs for another (a rolling update) keeps
    /// renewing the first all along, so it is still its own when the second arrives: nothing
    /// expires under it, and nobody else could have taken it.
    #[tokio::test(start_paused = true)]
    async fn leases_already_held_are_renewed_while_the_others_are_awaited() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let ours = Arc::new(Leases::new(store.clone(), "t", "ours".into(), TTL, 64));
        let other = Leases::new(store.clone(), "t", "other".into(), TTL, 64);
        let contender = Leases::new(store, "t", "contender".into(), TTL, 64);
        let (free, busy) = (PartitionId(1), PartitionId(2));
        let Acquire::Acquired(mut theirs) = other.acquire(busy).await.unwrap() else {
            panic!("the other process holds p0002");
        };
        let (waits_tx, waits) = watch::channel(BTreeMap::new());
        let keeper = tokio::spawn({
            let ours = ours.clone();
            async move { LeaseKeeper::acquire(ours, &[free, busy], TTL, &waits_tx).await }
        });
        // The other holder stays alive for three TTLs, then releases p0002.
        for _ in 0..9 {
            tokio::time::sleep_until(theirs.renew_at()).await;
            other.renew(&mut theirs).await.unwrap();
            // Meanwhile p0001 stays ours: a contender watching it never sees it run out.
            assert!(matches!(
                contender.acquire(free).await.unwrap(),
                Acquire::Held { .. }
            ));
        }
        assert_eq!(waits.borrow().keys().copied().collect::<Vec<_>>(), [busy]);
        assert!(waits.borrow()[&busy].live, "{:?}", waits.borrow());
        other.release(theirs, None).await.unwrap();
        let mut keeper = keeper.await.unwrap().unwrap();
        assert!(waits.borrow().is_empty());
        let epochs = keeper.epochs().await;
        assert_eq!(epochs[&free], 1);
        assert_eq!(epochs[&busy], 2);
        // And both are renewed from here on: no loss within a few TTLs.
        tokio::select! {
            lost = keeper.lost() => panic!("lost {lost}"),
            () = tokio::time::sleep(TTL * 3) => {}
        }
    }
}
