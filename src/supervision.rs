//! The one restart policy every supervisor in the tree uses (DESIGN §3).
//!
//! Erlang/OTP's rule, which ractor leaves to us: a supervisor restarts a failed child after an
//! exponential backoff, but if more than `max_restarts` failures fall within `window`, restarting is
//! not helping and the supervisor gives up, escalating to its own parent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::SupervisionConfig;

/// Restart intensity and backoff, from `supervision.*` in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Failures tolerated within `window`; one more and the supervisor gives up.
    pub max_restarts: u32,
    /// The sliding window failures are counted in.
    pub window: Duration,
    /// Delay before the first restart; doubles with each failure still inside the window.
    pub backoff_initial: Duration,
    /// Upper bound of the delay.
    pub backoff_max: Duration,
}

impl From<&SupervisionConfig> for RestartPolicy {
    fn from(c: &SupervisionConfig) -> Self {
        Self {
            max_restarts: c.max_restarts,
            window: Duration::from_secs(c.window_secs),
            backoff_initial: Duration::from_millis(c.backoff_initial_ms),
            backoff_max: Duration::from_millis(c.backoff_max_ms),
        }
    }
}

/// What a supervisor should do about a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    RestartAfter(Duration),
    /// Too many failures in the window: stop and escalate.
    GiveUp {
        /// Failures counted in the window, this one included.
        failures: u32,
    },
}

/// Failure history of one supervised child (or group of children restarted together).
#[derive(Clone, Debug)]
pub struct RestartTracker {
    policy: RestartPolicy,
    failures: VecDeque<Instant>,
}

impl RestartTracker {
    /// A tracker with no failures yet.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            failures: VecDeque::new(),
        }
    }

    /// Records a failure at `now` and decides: restart after `initial · 2^(n-1)` (capped), where n
    /// counts failures within the window, or give up once n exceeds `max_restarts`.
    pub fn on_failure(&mut self, now: Instant) -> Decision {
        while let Some(first) = self.failures.front() {
            if now.duration_since(*first) >= self.policy.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        self.failures.push_back(now);
        let n = u32::try_from(self.failures.len()).unwrap_or(u32::MAX);
        if n > self.policy.max_restarts {
            return Decision::GiveUp { failures: n };
        }
        let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
        let delay = self
            .policy
            .backoff_initial
            .saturating_mul(factor)
            .min(self.policy.backoff_max);
        Decision::RestartAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(250),
        }
    }

    #[test]
    fn backoff_doubles_is_capped_and_gives_up_past_intensity() {
        let mut t = RestartTracker::new(policy());
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(t.on_failure(t0), Decision::RestartAfter(ms(100)));
        assert_eq!(t.on_failure(t0), Decision::RestartAfter(ms(200)));
        assert_eq!(t.on_failure(t0), Decision::RestartAfter(ms(250)));
        assert_eq!(t.on_failure(t0), Decision::GiveUp { failures: 4 });
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let mut t = RestartTracker::new(policy());
        let t0 = Instant::now();
        for _ in 0..3 {
            t.on_failure(t0);
        }
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            t.on_failure(later),
            Decision::RestartAfter(Duration::from_millis(100))
        );
    }
}
