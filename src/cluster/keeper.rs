//! Holds this pod's partition leases for the life of a run (DESIGN §7): acquires them a shard
//! group at a time (waiting for those another process holds), so each group starts as soon as
//! its own partitions are leased, renews every lease held in the background, reports the first
//! one it cannot keep, and releases them on a graceful stop with the position each partition
//! reached.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{Mutex, mpsc, watch};
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
    lost: mpsc::UnboundedReceiver<LostLease>,
    /// Losses of other groups received while [`Self::release_fenced`] collected a group's.
    buffered: std::collections::VecDeque<LostLease>,
    renewer: tokio::task::JoinHandle<()>,
    ttl: Duration,
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
    /// A keeper that holds no lease yet and starts renewing what [`Acquirer::acquire`] adds.
    pub fn new(leases: Arc<Leases>, ttl: Duration) -> Self {
        // Renewed from the first one on: a pod may wait long for the others (a rolling update
        // releases them one pod at a time), and a lease not renewed for TTL × 2/3 must not be
        // written at all.
        let held = Arc::new(Mutex::new(Vec::new()));
        let (lost_tx, lost) = mpsc::unbounded_channel();
        let renewer = tokio::spawn(renew_forever(leases.clone(), held.clone(), lost_tx, ttl));
        LeaseKeeper {
            leases,
            held,
            lost,
            buffered: std::collections::VecDeque::new(),
            renewer,
            ttl,
        }
    }

    /// Acquires the lease of every partition in `partitions` ([`Acquirer::acquire`]) in a new
    /// keeper.
    ///
    /// # Errors
    /// As [`Acquirer::acquire`].
    pub async fn acquire(
        leases: Arc<Leases>,
        partitions: &[PartitionId],
        ttl: Duration,
        waits: &watch::Sender<BTreeMap<PartitionId, LeaseWait>>,
    ) -> Result<Self, LeaseError> {
        let keeper = Self::new(leases, ttl);
        keeper.acquirer().acquire(partitions, waits).await?;
        Ok(keeper)
    }

    /// A handle that acquires more leases into this keeper, usable while the keeper itself is
    /// borrowed elsewhere (waiting for [`Self::lost`]).
    pub fn acquirer(&self) -> Acquirer {
        Acquirer {
            leases: self.leases.clone(),
            held: self.held.clone(),
            ttl: self.ttl,
        }
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

    /// Resolves with the next lease taken by another process or not renewed before its write
    /// deadline: from then on this process must not write that partition or its replica. The
    /// keeper goes on renewing the others. Pending forever while every lease is kept.
    pub async fn lost(&mut self) -> LostLease {
        if let Some(lost) = self.buffered.pop_front() {
            return lost;
        }
        match self.lost.recv().await {
            Some(lost) => lost,
            // The renewer ended: only a release does that.
            None => std::future::pending().await,
        }
    }

    /// After a loss, once the partitions of its shard group `group` are fenced (nothing writes
    /// them or their replica any more): releases the group's leases still held, and every lost
    /// one that expired under us without being taken (the store still names this process),
    /// without a position, so whoever takes them next — this process again, or another — need
    /// not wait for them to expire. Other losses of the same group reported meanwhile are
    /// consumed here (a pod that wakes from a pause loses them all in one renewal pass).
    /// Failures are logged: an unreleased lease expires after its TTL.
    pub async fn release_fenced(&mut self, lost: Option<LostLease>, group: &[PartitionId]) {
        let mut leases: Vec<HeldLease> = lost.and_then(|l| l.expired).into_iter().collect();
        {
            let mut held = self.held.lock().await;
            let (fenced, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *held)
                .into_iter()
                .partition(|l| group.contains(&l.partition));
            *held = kept;
            leases.extend(fenced);
            // The renewer sends every loss of a pass while it holds this lock: all of this
            // group's are queued by now (or buffered while another group's were collected).
            let buffered = std::mem::take(&mut self.buffered);
            for other in buffered {
                if group.contains(&other.partition) {
                    leases.extend(other.expired);
                } else {
                    self.buffered.push_back(other);
                }
            }
            while let Ok(other) = self.lost.try_recv() {
                if group.contains(&other.partition) {
                    leases.extend(other.expired);
                } else {
                    self.buffered.push_back(other);
                }
            }
        }
        for lease in leases {
            let partition = lease.partition;
            match self.leases.release(lease, None).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(partition = %partition, error = %crate::error_chain(&e),
                    "fenced lease not released; it expires after its TTL"),
            }
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

/// Acquires leases into a [`LeaseKeeper`] (see [`LeaseKeeper::acquirer`]). Cheap to clone.
#[derive(Clone)]
pub struct Acquirer {
    leases: Arc<Leases>,
    held: Arc<Mutex<Vec<HeldLease>>>,
    ttl: Duration,
}

/// One lease [`Acquirer::acquire`] took.
#[derive(Clone, Debug)]
pub struct Acquired {
    /// The partition.
    pub partition: PartitionId,
    /// Its new epoch: the fencing token, and the replica generation it writes.
    pub epoch: u64,
    /// The position its previous holder recorded when it released the lease (DESIGN §7
    /// handoff); `None` when the lease was taken over after a crash or never held before.
    pub released: Option<ReleasedPosition>,
}

impl Acquirer {
    /// Acquires the lease of every partition in `partitions` — one shard group's, the unit that
    /// moves between pods as a whole — waiting (and logging whom for) while another process
    /// holds one; each is renewed from the moment it is taken. `waits` is kept up to date with
    /// the leases still waited for (see [`LeaseWaits`]). Having held part of the group for a
    /// full TTL while a live process holds the rest (two contenders for one group), it releases
    /// its part and tries again after a random backoff of TTL / 6 to TTL / 2, so one of them gets
    /// the whole group.
    ///
    /// # Errors
    /// [`LeaseError::PartitionsChanged`] or [`LeaseError::Malformed`]; a request error when the
    /// store refused the credentials or has no such bucket, or after 10 failures in a row
    /// (other failures are retried every second). Leases of `partitions` taken before the error
    /// stay held (and renewed) by the keeper.
    pub async fn acquire(
        &self,
        partitions: &[PartitionId],
        waits: &watch::Sender<BTreeMap<PartitionId, LeaseWait>>,
    ) -> Result<Vec<Acquired>, LeaseError> {
        let started = Instant::now();
        let acquired = loop {
            tokio::select! {
                acquired = self.attempt(partitions, waits) => break acquired?,
                () = self.split(partitions, waits) => {
                    // Two processes contending for one group at once (a fence's re-acquisition,
                    // two copies of one pod) can each end up with part of it, each waiting for a
                    // live holder — the other — for good. One of them backs off, at random.
                    let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
                    let backoff = self.ttl / 6 + Duration::from_millis(fastrand::u64(0..=ttl_ms / 3));
                    tracing::warn!(partitions = ?partitions, backoff_ms = backoff.as_millis() as u64,
                        "another live process holds part of this shard group while this one holds the rest: releasing ours and trying again");
                    self.release_partial(partitions, waits).await;
                    tokio::time::sleep(backoff).await;
                }
            }
        };
        let epochs: Vec<String> = acquired
            .iter()
            .map(|l| format!("{}@{}", l.partition, l.epoch))
            .collect();
        tracing::info!(
            leases = epochs.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            epochs = %epochs.join(" "),
            "partition leases acquired"
        );
        Ok(acquired)
    }

    /// One attempt at every lease of `partitions`, all at once: an expired lease is taken only
    /// after a full TTL of watching it, and every partition's TTL must run in parallel.
    async fn attempt(
        &self,
        partitions: &[PartitionId],
        waits: &watch::Sender<BTreeMap<PartitionId, LeaseWait>>,
    ) -> Result<Vec<Acquired>, LeaseError> {
        let (leases, held, ttl) = (&self.leases, &self.held, self.ttl);
        let group = GroupPoll::default();
        let group = &group;
        futures_util::future::join_all(partitions.iter().enumerate().map(|(i, &p)| async move {
            let lease = acquire_one(leases, p, ttl, waits, group, i == 0).await?;
            let acquired = Acquired {
                partition: lease.partition,
                epoch: lease.epoch,
                released: lease.previous.as_ref().and_then(|r| r.position.clone()),
            };
            held.lock().await.push(lease);
            Ok::<_, LeaseError>(acquired)
        }))
        .await
        .into_iter()
        .collect()
    }

    /// Resolves once this process has held some leases of `partitions` while a live process
    /// held others, for a full TTL.
    async fn split(
        &self,
        partitions: &[PartitionId],
        waits: &watch::Sender<BTreeMap<PartitionId, LeaseWait>>,
    ) {
        let mut since: Option<Instant> = None;
        loop {
            tokio::time::sleep(RELEASE_POLL).await;
            let holding = self
                .held
                .lock()
                .await
                .iter()
                .any(|l| partitions.contains(&l.partition));
            let blocked = waits
                .borrow()
                .iter()
                .any(|(p, w)| partitions.contains(p) && w.live);
            if holding && blocked {
                if since.get_or_insert_with(Instant::now).elapsed() >= self.ttl {
                    return;
                }
            } else {
                since = None;
            }
        }
    }

    /// Releases (without a position: nothing was written under them) the leases of
    /// `partitions` this process holds, and forgets the waits for the others.
    async fn release_partial(
        &self,
        partitions: &[PartitionId],
        waits: &watch::Sender<BTreeMap<PartitionId, LeaseWait>>,
    ) {
        let ours: Vec<HeldLease> = {
            let mut held = self.held.lock().await;
            let (ours, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *held)
                .into_iter()
                .partition(|l| partitions.contains(&l.partition));
            *held = kept;
            ours
        };
        for lease in ours {
            let partition = lease.partition;
            if let Err(e) = self.leases.release(lease, None).await {
                tracing::warn!(partition = %partition, error = %crate::error_chain(&e),
                    "lease not released; it expires after its TTL");
            }
        }
        waits.send_modify(|w| w.retain(|p, _| !partitions.contains(p)));
    }
}

/// What the partitions of one [`Acquirer::acquire`] call share while they wait: a live holder
/// hands a shard group over by releasing all its leases within moments of each other, so one
/// partition seeing its lease released means the others are about to be.
#[derive(Default)]
struct GroupPoll {
    /// Wakes the other partitions' waits at once.
    released: tokio::sync::Notify,
    /// Set once one partition of the group was released to us: the others look again every
    /// [`RELEASE_POLL`] from then on.
    releasing: std::sync::atomic::AtomicBool,
}

/// How often a group's first partition looks at a lease held by a live holder, and every
/// partition of a group once one of them was released: a graceful handoff is noticed within
/// this (rather than a sixth of a TTL), for one request per second per waiting group.
const RELEASE_POLL: Duration = Duration::from_secs(1);

async fn acquire_one(
    leases: &Leases,
    partition: PartitionId,
    ttl: Duration,
    waits: &watch::Sender<BTreeMap<PartitionId, LeaseWait>>,
    group: &GroupPoll,
    first: bool,
) -> Result<HeldLease, LeaseError> {
    use std::sync::atomic::Ordering;
    let mut waiting_for: Option<(String, u64)> = None;
    let mut failures = 0;
    loop {
        // Registered before the request, so a release seen by another partition meanwhile
        // is not missed.
        let released = group.released.notified();
        match leases.acquire(partition).await {
            Ok(Acquire::Acquired(lease)) => {
                waits.send_modify(|w| {
                    w.remove(&partition);
                });
                if waiting_for.is_some() {
                    group.releasing.store(true, Ordering::Relaxed);
                    group.released.notify_waiters();
                }
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
                // expires before, and every RELEASE_POLL while a live holder may be handing the
                // group over (see `GroupPoll`).
                let mut pause = expires_in.min(ttl / 6).max(RETRY);
                if live && (first || group.releasing.load(Ordering::Relaxed)) {
                    pause = pause.min(RELEASE_POLL);
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = released => {}
                }
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

/// A lease this process lost ([`LeaseKeeper::lost`]).
#[derive(Debug)]
pub struct LostLease {
    /// The partition.
    pub partition: PartitionId,
    /// How: [`LeaseError::Lost`] (another process took it) or [`LeaseError::Expired`] (no
    /// renewal confirmed before the write deadline).
    pub error: LeaseError,
    /// The lease itself when it expired without a renewal being refused: the store may still
    /// name this process, and [`LeaseKeeper::release_fenced`] then frees it.
    expired: Option<HeldLease>,
}

/// Renews every lease when due, sending each one lost (and dropping it from `held`). Leases
/// join `held` while the keeper acquires them; while it holds none, it looks again every sixth
/// of a TTL.
async fn renew_forever(
    leases: Arc<Leases>,
    held: Arc<Mutex<Vec<HeldLease>>>,
    lost: mpsc::UnboundedSender<LostLease>,
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
        let results = futures_util::future::join_all(due.into_iter().map(async |l| {
            let partition = l.partition;
            renew_one(&leases, l).await.map(|e| (partition, e))
        }))
        .await;
        for (partition, error) in results.into_iter().flatten() {
            let Some(i) = guard.iter().position(|l| l.partition == partition) else {
                continue;
            };
            let lease = guard.swap_remove(i);
            let expired = matches!(error, LeaseError::Expired { .. }).then_some(lease);
            // The receiver is gone only if the run already ended.
            let _ = lost.send(LostLease {
                partition,
                error,
                expired,
            });
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

    /// A pod that holds one shard group's lease and waits several TTLs for another group's (a
    /// rolling update) keeps renewing the first all along, so it is still its own when the
    /// second arrives: nothing expires under it, and nobody else could have taken it.
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
            async move {
                let keeper = LeaseKeeper::acquire(ours, &[free], TTL, &waits_tx).await?;
                keeper.acquirer().acquire(&[busy], &waits_tx).await?;
                Ok::<_, LeaseError>(keeper)
            }
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
            lost = keeper.lost() => panic!("lost {}", lost.error),
            () = tokio::time::sleep(TTL * 3) => {}
        }
    }

    /// A live holder hands a shard group over (releases its four leases one after another): the
    /// waiting pod holds all four within about a second of the last release, not a sixth of a
    /// TTL later (10 s at the shipped TTL), since its first partition looks every RELEASE_POLL
    /// and the others look again as soon as one was released.
    #[tokio::test(start_paused = true)]
    async fn a_group_released_by_a_live_holder_is_taken_within_the_release_poll() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let ours = Arc::new(Leases::new(store.clone(), "t", "ours".into(), TTL, 64));
        let other = Leases::new(store, "t", "other".into(), TTL, 64);
        let group: Vec<PartitionId> = (0..4).map(PartitionId).collect();
        let mut theirs = Vec::new();
        for &p in &group {
            let Acquire::Acquired(lease) = other.acquire(p).await.unwrap() else {
                panic!("the other process takes {p}");
            };
            theirs.push(lease);
        }
        let (waits_tx, waits) = watch::channel(BTreeMap::new());
        let keeper = tokio::spawn({
            let (ours, group) = (ours.clone(), group.clone());
            async move { LeaseKeeper::acquire(ours, &group, TTL, &waits_tx).await }
        });
        // Alive for two TTLs (renewing), so the waiter sees a live holder.
        let until = Instant::now() + TTL * 2;
        while Instant::now() < until {
            let due = theirs.iter().map(HeldLease::renew_at).min().unwrap();
            tokio::time::sleep_until(due).await;
            for lease in &mut theirs {
                other.renew(lease).await.unwrap();
            }
        }
        assert!(
            waits.borrow().values().all(|w| w.live),
            "{:?}",
            waits.borrow()
        );
        // Released the way a stop releases them: one after another, moments apart.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for lease in theirs {
            other.release(lease, None).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let last_release = Instant::now() - Duration::from_millis(300);
        let keeper = keeper.await.unwrap().unwrap();
        let waited = Instant::now() - last_release;
        assert!(
            waited <= RELEASE_POLL + Duration::from_millis(100),
            "all four held {waited:?} after the last release"
        );
        assert_eq!(keeper.epochs().await.len(), 4);
    }

    /// Two processes each holding half of one shard group and waiting for the other half (each
    /// other's, live) would wait for good: one backs off after a TTL and the other gets the whole
    /// group.
    #[tokio::test(start_paused = true)]
    async fn two_processes_each_holding_part_of_a_group_do_not_wait_on_each_other_for_good() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let a = LeaseKeeper::new(
            Arc::new(Leases::new(store.clone(), "t", "a".into(), TTL, 64)),
            TTL,
        );
        let b = LeaseKeeper::new(
            Arc::new(Leases::new(store.clone(), "t", "b".into(), TTL, 64)),
            TTL,
        );
        let c = Leases::new(store, "t", "c".into(), TTL, 64);
        let group: Vec<PartitionId> = (0..4).map(PartitionId).collect();
        // A third process holds the second half while `a` takes the first half and waits.
        let mut cs = Vec::new();
        for &p in &group[2..] {
            let Acquire::Acquired(lease) = c.acquire(p).await.unwrap() else {
                panic!("c takes {p}");
            };
            cs.push(lease);
        }
        let (waits_a, _) = watch::channel(BTreeMap::new());
        let (waits_b, _) = watch::channel(BTreeMap::new());
        let a_acq = tokio::spawn({
            let (acquirer, group) = (a.acquirer(), group.clone());
            async move {
                acquirer
                    .acquire(&group, &waits_a)
                    .await
                    .map(|l| ("a", l.len()))
            }
        });
        // `c` renews for a while (live), then hands its half to `b` (which also wants the whole
        // group): `a` holds p0, p1 and `b` p2, p3, each waiting for the other.
        for _ in 0..4 {
            let due = cs.iter().map(HeldLease::renew_at).min().unwrap();
            tokio::time::sleep_until(due).await;
            for lease in &mut cs {
                c.renew(lease).await.unwrap();
            }
        }
        // Released between two of `a`'s looks (every TTL / 6 from its start), and `b` asks
        // before `a` looks again (no time passes in between).
        tokio::time::sleep(Duration::from_secs(3)).await;
        for lease in cs {
            c.release(lease, None).await.unwrap();
        }
        let b_acq = tokio::spawn({
            let (acquirer, group) = (b.acquirer(), group.clone());
            async move {
                acquirer
                    .acquire(&group, &waits_b)
                    .await
                    .map(|l| ("b", l.len()))
            }
        });
        let first = tokio::time::timeout(TTL * 6, async {
            tokio::select! {
                r = a_acq => r.unwrap().unwrap(),
                r = b_acq => r.unwrap().unwrap(),
            }
        })
        .await
        .expect("one of the two holds the whole group within six TTLs");
        assert_eq!(first.1, 4, "{first:?}");
    }
}
