//! The identify queue: when each shard may send IDENTIFY (Discord's identify rate limits).
//!
//! Discord's rules (Gateway docs, "Session Start Limit" and "Sharding for Large Bots"): shards are
//! grouped into `max_concurrency` buckets by `shard_id % max_concurrency`; each bucket may start one
//! session every 5 seconds, independently of the others; and the bot may start `total` sessions per
//! day, of which `remaining` are left, the count resetting `reset_after` ms from now. The limits
//! belong to the bot, not to a connection or a process: every pod spends from the same buckets.
//!
//! twilight's `InMemoryQueue` runs one global 5 s timer for all buckets, so a shard that asks just
//! after another bucket's identify waits 5 s for nothing; this queue times each bucket on its own.
//! It also holds back a reserve of the daily budget (`discord.identify_reserve`): once only the
//! reserve is left, identifies wait for the daily reset instead of spending it.
//!
//! # Identify across pods (DESIGN §7)
//!
//! The 5 s spacing above is kept per process, so pods starting together would each identify a
//! shard of bucket 0 at the same instant. Instead of a coordinator (one more service to run and
//! to lose), the pods divide time between themselves: every pod computes the same schedule from
//! the topology (DESIGN §2) and the wall clock, which NTP keeps within milliseconds across nodes.
//!
//! - Unix time (ms) is cut into **identify windows** of `W = 5 s + guard + SLOT_LATENESS`
//!   (guard = `discord.identify_clock_skew_ms`, default 1000 ms, so W = 6.1 s); window `w` covers
//!   `[w·W, (w+1)·W)`.
//! - The pods sharing a bucket `b` are those running at least one of its shards, `L_b` (ascending;
//!   `n_b` of them). Window `w` of bucket `b` belongs to pod `L_b[(w + b) % n_b]`: the pods take
//!   turns, and the `+ b` staggers the buckets so that each window's identifies (and the READY and
//!   GUILD_CREATE bursts after them) are spread over the pods rather than all on one.
//! - A pod identifies a shard of a shared bucket only at the start of one of its own windows of
//!   that bucket, at most `SLOT_LATENESS` late, and at most once per window. A grant that wakes
//!   later than that (the process stalled, or NTP stepped the clock) is not used: the shard waits
//!   for the pod's next window of the bucket. A clock stepped back is waited out.
//! - Why that suffices: two pods' identifies of one bucket lie in different windows, so on their
//!   own clocks they are at least `W − SLOT_LATENESS = 5 s + guard` apart; clocks that differ by
//!   less than the guard leave more than 5 s of real time between them. The guard has to cover the
//!   skew plus the difference in the pods' latency to Discord; both are normally milliseconds.
//! - A bucket with shards on one pod only (always, with `cluster.pods = 1`; also e.g. 16 shards
//!   over 4 pods with `max_concurrency = 16`) is not slotted at all: timing is exactly the
//!   single-process one.
//!
//! Cost: a pod gets one window in `n_b` of each bucket it shares, so the bucket's shards over all
//! pods identify once per W instead of once per 5 s: a cold start of S shards takes about
//! `S / max_concurrency × W` (6.1 s instead of 5 s per round), plus up to `n_b` windows for a
//! pod's first turn.
//!
//! The schedule holds while every pod computes it from the same `(discord.shards, cluster.pods)`;
//! during a change of `cluster.pods` pods with old and new counts disagree (moved shards resume
//! their sessions, so few identify then). If two identifies of a bucket do land within 5 s (clocks
//! further apart than the guard, disagreeing topologies), Discord answers the later one with an
//! Invalid Session (opcode 9, not resumable; Gateway docs, "Identifying"); twilight-gateway 0.18
//! then closes with code 1000, drops the session, reconnects at once and, at the new HELLO, asks
//! this queue again ([`Queue::enqueue`]), which gives the shard the pod's next window. A collision
//! costs that shard a wait for its pod's next turn (and perhaps one session start of the daily
//! budget), not a failure.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio::time::Instant;
use twilight_gateway::queue::Queue;
use twilight_model::gateway::SessionStartLimit;

use crate::ownership::Topology;

/// Discord: one identify per bucket per 5 seconds.
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(5);
/// Discord: the daily session start budget resets every 24 hours.
pub const BUDGET_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);
/// How late after the start of its identify window a slotted identify may still go out. A timer
/// never fires exactly on time; this room is part of the window, so lateness up to it does not eat
/// into the clock skew guard. A grant later than this waits for the pod's next window.
pub const SLOT_LATENESS: Duration = Duration::from_millis(100);

/// Wall-clock time as this pod reads it: Unix time in milliseconds. The pods' identify windows
/// are cut from it, so all pods must read (NTP-)synchronised clocks. A trait so that tests can
/// give each simulated pod its own skewed clock.
pub trait WallClock: fmt::Debug + Send + Sync {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn unix_ms(&self) -> u64;
}

/// The system's real-time clock ([`SystemTime`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn unix_ms(&self) -> u64 {
        // A clock before 1970 is broken beyond what the skew guard can cover; 0 keeps it total.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Which identify windows of each bucket belong to this pod (see the module docs): window `w` of
/// bucket `b` belongs to `L_b[(w + b) % L_b.len()]`, `L_b` being the pods that run a shard of `b`.
#[derive(Clone, Debug)]
pub struct IdentifySlots {
    ordinal: u32,
    /// W in milliseconds.
    window_ms: u64,
    /// Per bucket, the pods running at least one of its shards, ascending.
    sharing: Vec<Vec<u32>>,
    clock: Arc<dyn WallClock>,
}

impl IdentifySlots {
    /// The windows of pod `ordinal` under `topology`, for `max_concurrency` buckets (0 counts as
    /// 1), with windows of `5 s + clock_skew_guard + SLOT_LATENESS` read from `clock`. Cost O(S).
    pub fn new(
        topology: &Topology,
        ordinal: u32,
        max_concurrency: u16,
        clock_skew_guard: Duration,
        clock: Arc<dyn WallClock>,
    ) -> Self {
        let buckets = u32::from(max_concurrency.max(1));
        let mut sharing = vec![Vec::new(); buckets as usize];
        for shard in 0..topology.shards() {
            sharing[(shard % buckets) as usize].push(topology.pod_of_shard(shard));
        }
        for pods in &mut sharing {
            pods.sort_unstable();
            pods.dedup();
        }
        let window = IDENTIFY_INTERVAL + clock_skew_guard + SLOT_LATENESS;
        Self {
            ordinal,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            sharing,
            clock,
        }
    }

    /// The length W of one identify window.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// The number of buckets (`max_concurrency`).
    pub fn buckets(&self) -> usize {
        self.sharing.len()
    }

    /// The pod whose turn window `window` (the one starting at Unix ms `window × W`) of `bucket`
    /// is; `None` if no pod runs a shard of `bucket` or `bucket` is out of range.
    pub fn owner(&self, bucket: usize, window: u64) -> Option<u32> {
        let pods = self.sharing.get(bucket)?;
        let turn = (window + bucket as u64) % (pods.len().max(1) as u64);
        pods.get(turn as usize).copied()
    }

    /// This pod's turn in `bucket`'s rotation: `(index in L_b, n_b)`, or `None` if the bucket is
    /// not slotted (its shards are all on one pod). A bucket this pod runs no shard of is not
    /// slotted either: only a caller bug sends one here (`Node::start` builds the slots from the
    /// topology that picks the pod's shards), and the worst it can cost is the Invalid Session
    /// and retry described in the module docs.
    fn turn(&self, bucket: usize) -> Option<(u64, u64)> {
        let pods = self.sharing.get(bucket).filter(|pods| pods.len() > 1)?;
        let Some(mine) = pods.iter().position(|&p| p == self.ordinal) else {
            tracing::warn!(
                bucket,
                ordinal = self.ordinal,
                "identify for a bucket this pod runs no shard of; not slotted"
            );
            return None;
        };
        Some((mine as u64, pods.len() as u64))
    }

    /// The first window `≥ from` of `bucket` whose turn is `mine` out of `n`.
    fn next_turn(bucket: usize, (mine, n): (u64, u64), from: u64) -> u64 {
        from + (mine + n - (from + bucket as u64) % n) % n
    }
}

/// A per-bucket identify queue over Discord's `session_start_limit`, optionally slotted across
/// pods ([`IdentifySlots`]). Clones share one state.
#[derive(Clone, Debug)]
pub struct IdentifyQueue {
    state: Arc<Mutex<State>>,
    /// `None` for a queue built with [`IdentifyQueue::new`]: every bucket is timed in this process
    /// only.
    slots: Option<Arc<IdentifySlots>>,
}

#[derive(Debug)]
struct State {
    /// Earliest next identify per bucket (`shard % buckets.len()`).
    buckets: Vec<Instant>,
    /// Per bucket, the first identify window not yet handed out by this pod (slotted buckets only):
    /// one identify per window, so that it starts at the window's start.
    next_window: Vec<u64>,
    /// Identifies that may still be spent before `reset_at` (reserve already deducted).
    spendable: u32,
    /// When Discord refills the budget to `total`.
    reset_at: Instant,
    /// No identify before this instant: the start of the budget period `spendable` belongs to.
    /// Once the current day's budget is spent down to the reserve, `spendable` already counts
    /// the next day's budget, which no bucket may touch before that day begins.
    not_before: Instant,
    total: u32,
    reserve: u32,
}

impl State {
    /// Discord refilled the daily budget: everything but the reserve may be spent. A reserve as
    /// large as the whole budget still lets one identify through per period.
    fn refill(&mut self) {
        self.spendable = self.total.saturating_sub(self.reserve).max(1);
    }
}

/// One reserved identify: when the shard may go, and for a slotted bucket the wall-clock start
/// (Unix ms) of the pod's window it belongs to — what the grant is checked against when it fires.
#[derive(Clone, Copy, Debug)]
struct Reservation {
    at: Instant,
    window_start_ms: Option<u64>,
}

impl IdentifyQueue {
    /// A queue for `limit` (from `GET /gateway/bot`) that never spends the last `reserve`
    /// identifies of a day, timing each bucket in this process only (one pod).
    pub fn new(limit: &SessionStartLimit, reserve: u32) -> Self {
        let now = Instant::now();
        let buckets = usize::from(limit.max_concurrency.max(1));
        Self {
            state: Arc::new(Mutex::new(State {
                buckets: vec![now; buckets],
                next_window: vec![0; buckets],
                spendable: limit.remaining.saturating_sub(reserve),
                reset_at: now + Duration::from_millis(limit.reset_after),
                not_before: now,
                total: limit.total,
                reserve,
            })),
            slots: None,
        }
    }

    /// Like [`IdentifyQueue::new`], and identifies of buckets shared with other pods go out only
    /// in this pod's windows (module docs, "Identify across pods").
    ///
    /// # Panics
    /// If `slots` was built for another `max_concurrency` than `limit`'s.
    pub fn with_slots(limit: &SessionStartLimit, reserve: u32, slots: IdentifySlots) -> Self {
        assert_eq!(
            slots.buckets(),
            usize::from(limit.max_concurrency.max(1)),
            "identify slots and session_start_limit disagree on max_concurrency"
        );
        Self {
            slots: Some(Arc::new(slots)),
            ..Self::new(limit, reserve)
        }
    }

    /// When the identify [`IdentifyQueue::reserve`] reserves for `shard` may go.
    #[cfg(test)]
    fn reserve_slot(&self, shard: u32) -> Instant {
        self.reserve(shard).at
    }

    /// Reserves the next identify of `shard`'s bucket: at least 5 s after the bucket's last one,
    /// after the daily reset if the budget is spent, and, if the bucket is shared with other
    /// pods, at the start of this pod's next unused window of it.
    fn reserve(&self, shard: u32) -> Reservation {
        let mut guard = self
            .state
            .lock()
            .expect("identify queue lock is never poisoned");
        let st = &mut *guard;
        let now = Instant::now();
        if now >= st.reset_at {
            st.refill();
            st.reset_at = now + BUDGET_PERIOD;
        }
        let bucket = shard as usize % st.buckets.len();
        let mut at = st.buckets[bucket].max(now).max(st.not_before);
        if st.spendable == 0 {
            tracing::warn!(
                shard,
                reserve = st.reserve,
                wait_secs = st.reset_at.saturating_duration_since(now).as_secs(),
                "daily identify budget spent down to the reserve; waiting for Discord's reset"
            );
            at = at.max(st.reset_at);
            st.not_before = st.reset_at;
            st.refill();
            st.reset_at += BUDGET_PERIOD;
        }
        st.spendable -= 1;
        let reservation = self.place_in_window(st, bucket, now, at);
        st.buckets[bucket] = reservation.at + IDENTIFY_INTERVAL;
        reservation
    }

    /// After a reservation's window passed unused (the grant woke too late): the pod's next
    /// window of the bucket from now on, without spending the daily budget again.
    fn reslot(&self, shard: u32) -> Reservation {
        let mut guard = self
            .state
            .lock()
            .expect("identify queue lock is never poisoned");
        let st = &mut *guard;
        let now = Instant::now();
        let bucket = shard as usize % st.buckets.len();
        let reservation = self.place_in_window(st, bucket, now, now);
        st.buckets[bucket] = st.buckets[bucket].max(reservation.at + IDENTIFY_INTERVAL);
        reservation
    }

    /// The identify of `bucket` that may go at `at` (by this process's spacing and budget), moved
    /// to the start of the first window at or after `at` that is this pod's and not yet used —
    /// unchanged if the bucket is not slotted.
    fn place_in_window(
        &self,
        st: &mut State,
        bucket: usize,
        now: Instant,
        at: Instant,
    ) -> Reservation {
        let unslotted = Reservation {
            at,
            window_start_ms: None,
        };
        let Some(slots) = &self.slots else {
            return unslotted;
        };
        let Some(turn) = slots.turn(bucket) else {
            return unslotted;
        };
        let wall_now = slots.clock.unix_ms();
        let earliest = wall_now.saturating_add(ceil_ms(at - now));
        let from = earliest
            .div_ceil(slots.window_ms)
            .max(st.next_window[bucket]);
        let window = IdentifySlots::next_turn(bucket, turn, from);
        st.next_window[bucket] = window + 1;
        let start = window * slots.window_ms;
        Reservation {
            at: now + Duration::from_millis(start - wall_now),
            window_start_ms: Some(start),
        }
    }

    /// Waits until `reservation` may be used. For a slotted one that is when the wall clock, not
    /// only the monotonic clock the timer runs on, reaches the window's start: NTP may have
    /// stepped the wall clock since the reservation. A wake more than [`SLOT_LATENESS`] past the
    /// start is not used; the shard waits for the pod's next window instead.
    async fn wait(&self, shard: u32, mut reservation: Reservation) {
        loop {
            tokio::time::sleep_until(reservation.at).await;
            let (Some(slots), Some(start)) = (&self.slots, reservation.window_start_ms) else {
                return;
            };
            let late_ms = loop {
                let wall = slots.clock.unix_ms();
                if wall >= start {
                    break wall - start;
                }
                tokio::time::sleep(Duration::from_millis(start - wall)).await;
            };
            if Duration::from_millis(late_ms) <= SLOT_LATENESS {
                return;
            }
            tracing::warn!(
                shard,
                late_ms,
                "identify window missed (the process stalled or the clock jumped); waiting for \
                 this pod's next window"
            );
            reservation = self.reslot(shard);
        }
    }
}

/// `d` in whole milliseconds, rounded up (a window must not start before `d` has passed).
fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl Queue for IdentifyQueue {
    fn enqueue(&self, shard: u32) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let reservation = self.reserve(shard);
        let queue = self.clone();
        tokio::spawn(async move {
            queue.wait(shard, reservation).await;
            // The shard may have gone away meanwhile; then nobody needs the slot.
            let _ = tx.send(());
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    fn limit(max_concurrency: u16, remaining: u32) -> SessionStartLimit {
        SessionStartLimit {
            max_concurrency,
            remaining,
            reset_after: 3_600_000,
            total: 1000,
        }
    }

    async fn granted_after(q: &IdentifyQueue, shard: u32, start: Instant) -> Duration {
        q.enqueue(shard).await.unwrap();
        Instant::now() - start
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_are_timed_independently() {
        let q = IdentifyQueue::new(&limit(4, 1000), 0);
        let start = Instant::now();
        // Shards 0..4 are four buckets: all at once. Shard 4 shares bucket 0: 5 s later.
        for shard in 0..4 {
            assert_eq!(granted_after(&q, shard, start).await, Duration::ZERO);
        }
        assert_eq!(granted_after(&q, 4, start).await, IDENTIFY_INTERVAL);
        assert_eq!(granted_after(&q, 8, start).await, 2 * IDENTIFY_INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_is_never_spent_before_the_reset() {
        let q = IdentifyQueue::new(&limit(16, 12), 10);
        let start = Instant::now();
        assert_eq!(granted_after(&q, 0, start).await, Duration::ZERO);
        assert_eq!(granted_after(&q, 1, start).await, Duration::ZERO);
        // Only the reserve of 10 is left: the third identify waits for the reset (1 h).
        let waited = granted_after(&q, 2, start).await;
        assert_eq!(waited, Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn once_one_bucket_waits_for_the_reset_every_bucket_does() {
        let q = IdentifyQueue::new(&limit(16, 12), 10);
        let start = Instant::now();
        let reset = start + Duration::from_secs(3600);
        assert_eq!(q.reserve_slot(0), start);
        assert_eq!(q.reserve_slot(1), start);
        // The budget is down to the reserve: bucket 2 waits for the reset, and so do buckets
        // 3 and 4, although their own 5 s slots are free now.
        assert_eq!(q.reserve_slot(2), reset);
        assert_eq!(q.reserve_slot(3), reset);
        assert_eq!(q.reserve_slot(4), reset);
        // Bucket 2 again: after the reset and its own 5 s.
        assert_eq!(q.reserve_slot(18), reset + IDENTIFY_INTERVAL);
    }

    const GUARD: Duration = Duration::from_millis(1000);
    /// W with the default guard: 5 s + 1 s + 100 ms.
    const W_MS: u64 = 6100;

    /// A pod's wall clock in a simulation: the paused tokio clock, read as `at_origin_ms` at
    /// `origin` (which carries the pod's skew), plus a step a test may apply later (NTP).
    #[derive(Debug)]
    struct FakeClock {
        origin: Instant,
        at_origin_ms: u64,
        step_ms: AtomicI64,
    }

    impl FakeClock {
        fn new(origin: Instant, at_origin_ms: u64) -> Arc<Self> {
            Arc::new(FakeClock {
                origin,
                at_origin_ms,
                step_ms: AtomicI64::new(0),
            })
        }

        fn step(&self, ms: i64) {
            self.step_ms.fetch_add(ms, Ordering::SeqCst);
        }

        /// What this clock reads at `at`.
        fn reading_at(&self, at: Instant) -> u64 {
            let elapsed = i64::try_from((at - self.origin).as_millis()).unwrap();
            u64::try_from(
                i64::try_from(self.at_origin_ms).unwrap()
                    + elapsed
                    + self.step_ms.load(Ordering::SeqCst),
            )
            .unwrap()
        }
    }

    impl WallClock for FakeClock {
        fn unix_ms(&self) -> u64 {
            self.reading_at(Instant::now())
        }
    }

    /// A Unix time in November 2023 at the start of an identify window of `W_MS`.
    fn window_aligned_epoch() -> u64 {
        1_700_000_000_000 / W_MS * W_MS
    }

    #[derive(Clone, Copy, Debug)]
    struct Grant {
        pod: u32,
        shard: u32,
        at: Instant,
    }

    /// Enqueues every shard of `topology` at once, each on the queue of the pod that runs it
    /// (`queues[pod]`), and returns the grants in time order.
    async fn grants(queues: &[IdentifyQueue], topology: &Topology) -> Vec<Grant> {
        let mut waits = Vec::new();
        for (pod, q) in (0u32..).zip(queues) {
            for shard in topology.shards_of_pod(pod) {
                let rx = q.enqueue(shard);
                waits.push(tokio::spawn(async move {
                    rx.await.expect("the queue grants every identify");
                    Grant {
                        pod,
                        shard,
                        at: Instant::now(),
                    }
                }));
            }
        }
        let mut out = Vec::new();
        for wait in waits {
            out.push(wait.await.unwrap());
        }
        out.sort_by_key(|g| (g.at, g.pod, g.shard));
        out
    }

    /// The smallest time between two grants of one bucket from different pods.
    fn closest_cross_pod(grants: &[Grant], buckets: u32) -> Option<Duration> {
        let mut closest = None::<Duration>;
        for (i, a) in grants.iter().enumerate() {
            for b in &grants[i + 1..] {
                if a.pod != b.pod && a.shard % buckets == b.shard % buckets {
                    let gap = b.at - a.at;
                    closest = Some(closest.map_or(gap, |c| c.min(gap)));
                }
            }
        }
        closest
    }

    /// The spec of window ownership, written from the topology independently of `IdentifySlots`:
    /// per bucket, the pods running one of its shards, ascending.
    fn sharing_pods(topology: &Topology, buckets: u32) -> Vec<Vec<u32>> {
        (0..buckets)
            .map(|b| {
                (0..topology.pods())
                    .filter(|&pod| topology.shards_of_pod(pod).iter().any(|s| s % buckets == b))
                    .collect()
            })
            .collect()
    }

    /// Three pods start together with `max_concurrency = 2` over 16 shards (each bucket has shards
    /// on all three pods), their clocks up to guard − 1 ms apart, at several points of a window.
    #[tokio::test(start_paused = true)]
    async fn pods_starting_together_keep_each_bucket_5_s_apart() {
        let topology = Topology::new(16, 64, 3).unwrap();
        let buckets = 2;
        let limit = limit(2, 1000);
        let sharing = sharing_pods(&topology, buckets);
        assert!(sharing.iter().all(|pods| pods.len() == 3), "{sharing:?}");

        // Without slots every pod identifies a shard of each bucket at the start: what this
        // test's check must catch.
        let unslotted: Vec<_> = (0..3).map(|_| IdentifyQueue::new(&limit, 0)).collect();
        let g = grants(&unslotted, &topology).await;
        assert_eq!(closest_cross_pod(&g, buckets), Some(Duration::ZERO));

        let epoch = window_aligned_epoch();
        let skews = [0, 1, 500, GUARD.as_millis() as u64 - 1];
        for into_window in [0, 1, W_MS / 2, W_MS - 1] {
            let triples = skews
                .iter()
                .flat_map(|&a| skews.iter().flat_map(move |&b| skews.map(|c| [a, b, c])));
            for skew in triples {
                let origin = Instant::now();
                let clocks: Vec<_> = skew
                    .iter()
                    .map(|s| FakeClock::new(origin, epoch + into_window + s))
                    .collect();
                let queues: Vec<_> = (0u32..)
                    .zip(&clocks)
                    .map(|(pod, clock)| {
                        let slots = IdentifySlots::new(&topology, pod, 2, GUARD, clock.clone());
                        assert_eq!(slots.window(), Duration::from_millis(W_MS));
                        IdentifyQueue::with_slots(&limit, 0, slots)
                    })
                    .collect();
                let g = grants(&queues, &topology).await;
                let case = format!("skews {skew:?} ms, start {into_window} ms into a window");

                let mut shards: Vec<_> = g.iter().map(|g| g.shard).collect();
                shards.sort_unstable();
                assert_eq!(shards, (0..16).collect::<Vec<_>>(), "{case}");
                let closest = closest_cross_pod(&g, buckets).unwrap();
                assert!(closest >= IDENTIFY_INTERVAL, "{case}: {closest:?}");

                for grant in &g {
                    let bucket = grant.shard % buckets;
                    let pods = &sharing[bucket as usize];
                    // On the pod's own clock: at the start of one of its own windows.
                    let own = clocks[grant.pod as usize].reading_at(grant.at);
                    let window = own / W_MS;
                    assert!(
                        own % W_MS <= SLOT_LATENESS.as_millis() as u64,
                        "{case}: {grant:?}"
                    );
                    assert_eq!(
                        pods[((window + u64::from(bucket)) % 3) as usize],
                        grant.pod,
                        "{case}: {grant:?} in window {window}"
                    );
                }
                // Each pod uses every turn it gets: its grants of a bucket are one rotation
                // (3 windows) apart, the first within the first rotation.
                for pod in 0..3 {
                    for bucket in 0..buckets {
                        let mine: Vec<_> = g
                            .iter()
                            .filter(|g| g.pod == pod && g.shard % buckets == bucket)
                            .map(|g| g.at - origin)
                            .collect();
                        assert!(mine[0] < Duration::from_millis(3 * W_MS), "{case}");
                        for pair in mine.windows(2) {
                            assert_eq!(
                                pair[1] - pair[0],
                                Duration::from_millis(3 * W_MS),
                                "{case}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One pod: the slotted queue grants at exactly the times of the per-process queue, wherever
    /// in a window it starts, the daily budget and its reserve included.
    #[tokio::test(start_paused = true)]
    async fn with_one_pod_grants_are_those_of_the_single_process_queue() {
        let topology = Topology::new(16, 64, 1).unwrap();
        // 12 left with a reserve of 4: eight identifies now, the rest after the reset (1 h).
        let limit = limit(4, 12);
        let offsets = |g: Vec<Grant>, origin: Instant| -> Vec<(u32, Duration)> {
            let mut v: Vec<_> = g.iter().map(|g| (g.shard, g.at - origin)).collect();
            v.sort_unstable();
            v
        };
        let origin = Instant::now();
        let today = offsets(
            grants(&[IdentifyQueue::new(&limit, 4)], &topology).await,
            origin,
        );
        let hour = Duration::from_secs(3600);
        let expected: Vec<_> = (0..16)
            .map(|shard| {
                let round = [Duration::ZERO, IDENTIFY_INTERVAL][(shard / 4 % 2) as usize];
                (shard, if shard < 8 { round } else { hour + round })
            })
            .collect();
        assert_eq!(today, expected);

        for into_window in [0, 1, W_MS / 2, W_MS - 1] {
            let origin = Instant::now();
            let clock = FakeClock::new(origin, window_aligned_epoch() + into_window);
            let slots = IdentifySlots::new(&topology, 0, 4, GUARD, clock);
            let q = IdentifyQueue::with_slots(&limit, 4, slots);
            let slotted = offsets(grants(&[q], &topology).await, origin);
            assert_eq!(slotted, today, "{into_window} ms into a window");
        }
    }

    /// A bucket whose shards all live on one pod is not slotted, even with several pods:
    /// 16 shards over 4 pods with `max_concurrency = 16` start at once.
    #[tokio::test(start_paused = true)]
    async fn buckets_on_one_pod_are_not_slotted() {
        let topology = Topology::new(16, 64, 4).unwrap();
        let origin = Instant::now();
        let queues: Vec<_> = (0..4)
            .map(|pod| {
                let clock = FakeClock::new(origin, window_aligned_epoch() + 1234);
                let slots = IdentifySlots::new(&topology, pod, 16, GUARD, clock);
                IdentifyQueue::with_slots(&limit(16, 1000), 0, slots)
            })
            .collect();
        let g = grants(&queues, &topology).await;
        assert_eq!(g.len(), 16);
        assert!(g.iter().all(|g| g.at == origin), "{g:?}");
    }

    /// The grant is checked against the wall clock when it fires: a clock stepped back is waited
    /// out; one stepped forward past `SLOT_LATENESS` makes the shard wait for the pod's next
    /// window of the bucket rather than identify outside its own.
    #[tokio::test(start_paused = true)]
    async fn a_clock_step_never_moves_a_grant_out_of_the_pods_window() {
        // Two pods share the only bucket; pod 0 runs shard `shard`.
        let topology = Topology::new(4, 4, 2).unwrap();
        let shard = topology.shards_of_pod(0)[0];
        let w = Duration::from_millis(W_MS);
        for (step_ms, expected_window) in [(-3000, 1), (100, 1), (101, 3), (3000, 3)] {
            let origin = Instant::now();
            let probe = IdentifySlots::new(&topology, 0, 1, GUARD, Arc::new(SystemClock));
            // Start in one of pod 1's windows, so pod 0's first turn is the next window.
            let mut epoch = window_aligned_epoch();
            if probe.owner(0, epoch / W_MS) != Some(1) {
                epoch += W_MS;
            }
            let clock = FakeClock::new(origin, epoch);
            let slots = IdentifySlots::new(&topology, 0, 1, GUARD, clock.clone());
            let q = IdentifyQueue::with_slots(&limit(1, 1000), 0, slots);
            let rx = q.enqueue(shard);
            tokio::time::sleep(Duration::from_secs(1)).await;
            clock.step(step_ms);
            rx.await.unwrap();
            let own = clock.unix_ms();
            let case = format!("clock stepped {step_ms} ms");
            let window_start = epoch + expected_window * W_MS;
            assert_eq!(
                own,
                window_start + if step_ms == 100 { 100 } else { 0 },
                "{case}"
            );
            assert_eq!(probe.owner(0, own / W_MS), Some(0), "{case}");
            // In real time: the window's start shifted by the step.
            let real = origin + expected_window as u32 * w;
            let expected_at = if step_ms < 0 {
                real + Duration::from_millis(step_ms.unsigned_abs())
            } else if step_ms == 100 {
                real
            } else {
                real - Duration::from_millis(step_ms.unsigned_abs())
            };
            assert_eq!(Instant::now(), expected_at, "{case}");
        }
    }
}
