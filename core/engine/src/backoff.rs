//! Exponential backoff with jitter, for everything that waits before trying again:
//! request retries, control-plane reconnects and certificate renewals.

use std::time::Duration;

/// A ceiling that doubles with each try, from `base` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The pause after `failures` failures in a row (1 for the first): jittered between
    /// half and the whole of the ceiling, so that many callers don't move in step and
    /// none waits much less than the ceiling says.
    pub(crate) fn pause(&self, failures: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(self.max);
        ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_ceiling_with_jitter() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..100 {
            let first = backoff.pause(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff.pause(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            assert!(backoff.pause(40) <= Duration::from_secs(1));
            assert!(backoff.pause(40) >= Duration::from_millis(500));
        }
        assert!(backoff.pause(0) <= Duration::from_millis(100));
    }
}
