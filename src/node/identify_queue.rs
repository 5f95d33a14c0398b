//! The identify queue: when each shard may send IDENTIFY (Discord's identify rate limits).
//!
//! Discord's rules (Gateway docs, "Session Start Limit" and "Sharding for Large Bots"): shards are
//! grouped into `max_concurrency` buckets by `shard_id % max_concurrency`; each bucket may start one
//! session every 5 seconds, independently of the others; and the bot may start `total` sessions per
//! day, of which `remaining` are left, the count resetting `reset_after` ms from now.
//!
//! twilight's `InMemoryQueue` runs one global 5 s timer for all buckets, so a shard that asks just
//! after another bucket's identify waits 5 s for nothing; this queue times each bucket on its own.
//! It also holds back a reserve of the daily budget (`discord.identify_reserve`): once only the
//! reserve is left, identifies wait for the daily reset instead of spending it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use twilight_gateway::queue::Queue;
use twilight_model::gateway::SessionStartLimit;

/// Discord: one identify per bucket per 5 seconds.
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(5);
/// Discord: the daily session start budget resets every 24 hours.
pub const BUDGET_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

/// A per-bucket identify queue over Discord's `session_start_limit`. Clones share one state.
#[derive(Clone, Debug)]
pub struct IdentifyQueue {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    /// Earliest next identify per bucket (`shard % buckets.len()`).
    buckets: Vec<Instant>,
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

impl IdentifyQueue {
    /// A queue for `limit` (from `GET /gateway/bot`) that never spends the last `reserve`
    /// identifies of a day.
    pub fn new(limit: &SessionStartLimit, reserve: u32) -> Self {
        let now = Instant::now();
        let buckets = usize::from(limit.max_concurrency.max(1));
        Self {
            state: Arc::new(Mutex::new(State {
                buckets: vec![now; buckets],
                spendable: limit.remaining.saturating_sub(reserve),
                reset_at: now + Duration::from_millis(limit.reset_after),
                not_before: now,
                total: limit.total,
                reserve,
            })),
        }
    }

    /// Reserves the next identify slot of `shard`'s bucket and returns when it is: no earlier than
    /// the bucket's last identify + 5 s, and after the daily reset if the budget is spent.
    fn reserve_slot(&self, shard: u32) -> Instant {
        let mut st = self
            .state
            .lock()
            .expect("identify queue lock is never poisoned");
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
        st.buckets[bucket] = at + IDENTIFY_INTERVAL;
        at
    }
}

impl Queue for IdentifyQueue {
    fn enqueue(&self, shard: u32) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let at = self.reserve_slot(shard);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            // The shard may have gone away meanwhile; then nobody needs the slot.
            let _ = tx.send(());
        });
        rx
    }
}

#[cfg(test)]
mod tests {
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
}
