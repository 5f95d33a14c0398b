//! The router's retry policy toward an owner pod: which waits separate the attempts, and the
//! bound on them all. Only outcomes that show the request was not handled are retried (a refused
//! or timed-out connection, a 503 from the owner); the router never turns to another pod, since
//! only the owner holds a guild's partition (DESIGN §8).

use std::time::Duration;

use tokio::time::Instant;

/// Attempts at one owner for one request, the first included.
pub const ATTEMPTS: u32 = 3;

/// Wait before the second attempt; each later wait is [`BACKOFF_FACTOR`] times the previous one
/// (100 ms, then 400 ms).
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Growth of the wait between attempts.
pub const BACKOFF_FACTOR: u32 = 4;

/// Bound on the time the attempts and their waits may take together, from the first attempt:
/// no retry starts past it. With [`CONNECT_TIMEOUT`] it bounds an unreachable owner's answer to
/// about 2 s (3 × 500 ms connecting + 100 ms + 400 ms waiting).
pub const RETRY_BUDGET: Duration = Duration::from_secs(2);

/// Longest time one attempt may spend connecting to the owner. A pod that is down refuses at
/// once; this covers a pod whose address no longer answers at all.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Longest wait for the owner's response headers once connected. Not retried: the pod may have
/// handled the request. The body then streams without a bound (the pod bounds its reads).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// `Retry-After` (seconds) of the router's own 503 when the owner stays unreachable: long enough
/// for a restarting pod to bind its socket again, short for a client.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The wait before attempt `attempt` (0-based); `Duration::ZERO` for the first.
pub fn backoff(attempt: u32) -> Duration {
    match attempt {
        0 => Duration::ZERO,
        n => BACKOFF_INITIAL * BACKOFF_FACTOR.saturating_pow(n - 1),
    }
}

/// The attempts of one request at one owner: counts them and keeps the deadline.
#[derive(Debug)]
pub struct Attempts {
    started: Instant,
    made: u32,
}

impl Attempts {
    /// The first attempt starts now.
    pub fn start() -> Attempts {
        Attempts {
            started: Instant::now(),
            made: 1,
        }
    }

    /// The wait before the next attempt, or `None` when the attempts are used up or the next one
    /// would start past [`RETRY_BUDGET`]. Counts the next attempt as made.
    pub fn next_wait(&mut self) -> Option<Duration> {
        if self.made >= ATTEMPTS {
            return None;
        }
        let wait = backoff(self.made);
        if self.started.elapsed() + wait >= RETRY_BUDGET {
            return None;
        }
        self.made += 1;
        Some(wait)
    }

    /// Attempts made so far, the first included.
    pub fn made(&self) -> u32 {
        self.made
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_the_factor() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(400));
    }

    #[test]
    fn worst_case_fits_the_budget() {
        let waits: Duration = (0..ATTEMPTS).map(backoff).sum();
        assert!(waits + CONNECT_TIMEOUT * ATTEMPTS <= RETRY_BUDGET);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded_by_count_and_time() {
        let mut a = Attempts::start();
        assert_eq!(a.next_wait(), Some(Duration::from_millis(100)));
        assert_eq!(a.next_wait(), Some(Duration::from_millis(400)));
        assert_eq!(a.next_wait(), None);
        assert_eq!(a.made(), ATTEMPTS);

        let mut slow = Attempts::start();
        tokio::time::advance(RETRY_BUDGET - Duration::from_millis(50)).await;
        assert_eq!(
            slow.next_wait(),
            None,
            "a retry would start past the budget"
        );
    }
}
