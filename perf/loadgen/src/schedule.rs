//! The run's clock: when each request is due and which ones are measured.

use std::time::{Duration, Instant};

/// The phases of a run: warm-up `[start, window_start)`, measured `[window_start, stop)`,
/// then a drain until `hard_stop` in which outstanding responses are awaited (and requests
/// due before `stop` that a lagging connection still owes are sent, late).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start: Instant,
    /// Requests per second over all connections; `0.0` for a closed loop (no schedule).
    rate: f64,
    window_start: Instant,
    stop: Instant,
    hard_stop: Instant,
}

impl Schedule {
    pub fn new(
        start: Instant,
        rate: f64,
        warmup: Duration,
        duration: Duration,
        drain: Duration,
    ) -> Self {
        let window_start = start + warmup;
        let stop = window_start + duration;
        Self {
            start,
            rate,
            window_start,
            stop,
            hard_stop: stop + drain,
        }
    }

    /// When request `index` (0-based, over all connections) is due; `None` in a closed loop.
    pub fn due(&self, index: u64) -> Option<Instant> {
        (self.rate > 0.0).then(|| self.start + Duration::from_secs_f64(index as f64 / self.rate))
    }

    /// Whether a request intended at `at` is measured.
    pub fn measures(&self, at: Instant) -> bool {
        at >= self.window_start && at < self.stop
    }

    /// No request due at or after this instant is sent. One due before it may still be sent
    /// after it, late, by a connection that fell behind.
    pub fn stop(&self) -> Instant {
        self.stop
    }

    /// Outstanding responses are given up on (counted as timeouts) at this instant.
    pub fn hard_stop(&self) -> Instant {
        self.hard_stop
    }
}

/// The share of the schedule one connection sends: indices `first, first + step, …`.
#[derive(Clone, Copy, Debug)]
pub struct Lane {
    pub first: u64,
    pub step: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_spaced_by_the_rate() {
        let start = Instant::now();
        let s = Schedule::new(
            start,
            1000.0,
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::ZERO,
        );
        assert_eq!(s.due(0), Some(start));
        assert_eq!(s.due(1500), Some(start + Duration::from_millis(1500)));
        assert!(!s.measures(start + Duration::from_millis(999)));
        assert!(s.measures(start + Duration::from_millis(1000)));
        assert!(!s.measures(start + Duration::from_millis(3000)));
    }

    #[test]
    fn closed_loop_has_no_due_times() {
        let s = Schedule::new(
            Instant::now(),
            0.0,
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::ZERO,
        );
        assert_eq!(s.due(7), None);
    }
}
