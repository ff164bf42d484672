//! One endpoint of a service and what the balancer knows about it: its load
//! (requests in flight and a PeakEWMA latency estimate), and its health from real
//! traffic (failure accrual, with ejection, exponential backoff and a single probe)
//! and from active checks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::policy::AccrualSettings;

/// The latency a new endpoint is assumed to have until it has answered.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// A probe whose outcome never came back (its request was cancelled) stops blocking
/// the endpoint after this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

const ACTIVE: u8 = 0;
const EJECTED: u8 = 1;
/// Ejection is over and one request is testing the endpoint.
const PROBING: u8 = 2;

pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) authority: http::uri::Authority,
    pub(crate) weight: u32,
    pending: AtomicUsize,
    state: AtomicU8,
    /// While ejected: until when, in µs since `epoch`.
    ejected_until_us: AtomicU64,
    ejections_in_a_row: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Set by active health checks.
    unhealthy: AtomicBool,
    stats: Mutex<Stats>,
    epoch: Instant,
}

/// Figures updated together once per response.
struct Stats {
    rtt_ns: f64,
    updated: Instant,
    window_start: Instant,
    successes: u32,
    failures: u32,
}

/// What became of one request, for the endpoint's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Success,
    Failure,
}

/// A change in the endpoint's state that the caller should count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    Ejected,
    Readmitted,
}

impl Endpoint {
    pub(crate) fn new(addr: SocketAddr, weight: u32) -> Self {
        let now = Instant::now();
        Self {
            addr,
            authority: http::uri::Authority::try_from(addr.to_string().as_str())
                .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1")),
            weight: weight.max(1),
            pending: AtomicUsize::new(0),
            state: AtomicU8::new(ACTIVE),
            ejected_until_us: AtomicU64::new(0),
            ejections_in_a_row: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            unhealthy: AtomicBool::new(false),
            stats: Mutex::new(Stats {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                updated: now,
                window_start: now,
                successes: 0,
                failures: 0,
            }),
            epoch: now,
        }
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// PeakEWMA cost: the latency estimate, decayed to now, times the load.
    pub(crate) fn cost(&self, decay: Duration) -> f64 {
        let rtt = {
            let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            decayed(stats.rtt_ns, stats.updated.elapsed(), decay)
        };
        rtt * (self.pending() as f64 + 1.0) / f64::from(self.weight)
    }

    /// Whether the balancer may choose this endpoint now (without claiming a probe).
    pub(crate) fn eligible(&self) -> bool {
        if self.unhealthy.load(Ordering::Relaxed) {
            return false;
        }
        match self.state.load(Ordering::Acquire) {
            ACTIVE => true,
            _ => self.now_us() >= self.ejected_until_us.load(Ordering::Acquire),
        }
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.state.load(Ordering::Acquire) != ACTIVE
    }

    pub(crate) fn is_unhealthy(&self) -> bool {
        self.unhealthy.load(Ordering::Relaxed)
    }

    /// Claims the endpoint for one request: always for an active one; for one whose
    /// ejection (or unanswered probe) is over, only the first caller gets it (the probe).
    pub(crate) fn claim(&self) -> bool {
        if self.state.load(Ordering::Acquire) == ACTIVE {
            return true;
        }
        let now = self.now_us();
        let until = self.ejected_until_us.load(Ordering::Acquire);
        if now < until {
            return false;
        }
        // Whoever moves the deadline first is the probe.
        let won = self
            .ejected_until_us
            .compare_exchange(
                until,
                now + PROBE_TIMEOUT.as_micros() as u64,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if won {
            self.state.store(PROBING, Ordering::Release);
        }
        won
    }

    /// Marks a request as dispatched; the guard ends it.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: Instant::now(),
            done: false,
        }
    }

    /// Sets the health reported by active checks.
    pub(crate) fn set_unhealthy(&self, unhealthy: bool) -> bool {
        self.unhealthy.swap(unhealthy, Ordering::Relaxed) != unhealthy
    }

    /// Records a response (or failure) and applies failure accrual. `may_eject` says
    /// whether the service's cap on ejected endpoints leaves room for one more.
    pub(crate) fn record(
        &self,
        verdict: Verdict,
        rtt: Duration,
        decay: Duration,
        accrual: &AccrualSettings,
        may_eject: impl FnOnce() -> bool,
    ) -> Transition {
        let now = Instant::now();
        let (window_failed, window_total) = {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            // Only answers are latency samples: a refused connection fails fast and
            // must not make its endpoint look like the quickest (accrual handles it).
            if verdict == Verdict::Success {
                let sample = rtt.as_nanos() as f64;
                let elapsed = now.saturating_duration_since(stats.updated);
                let current = decayed(stats.rtt_ns, elapsed, decay);
                // Peak-sensitive: a slower sample takes over at once, faster ones blend in.
                stats.rtt_ns = if sample > current {
                    sample
                } else {
                    let w = (-elapsed.as_secs_f64() / decay.as_secs_f64().max(1e-3)).exp();
                    current * w + sample * (1.0 - w)
                };
                stats.updated = now;
            }
            if now.saturating_duration_since(stats.window_start) > accrual.window {
                stats.window_start = now;
                stats.successes = 0;
                stats.failures = 0;
            }
            match verdict {
                Verdict::Success => stats.successes += 1,
                Verdict::Failure => stats.failures += 1,
            }
            (stats.failures, stats.successes + stats.failures)
        };

        match verdict {
            Verdict::Success => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                if self
                    .state
                    .compare_exchange(PROBING, ACTIVE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.ejections_in_a_row.store(0, Ordering::Relaxed);
                    return Transition::Readmitted;
                }
                Transition::None
            }
            Verdict::Failure => {
                let in_a_row = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let state = self.state.load(Ordering::Acquire);
                if state == PROBING {
                    // The probe failed: back out for longer.
                    self.eject(accrual);
                    return Transition::None;
                }
                let too_many =
                    accrual.consecutive_failures > 0 && in_a_row >= accrual.consecutive_failures;
                let low_rate = accrual.min_success_rate > 0.0
                    && window_total >= accrual.min_requests
                    && f64::from(window_total - window_failed) / f64::from(window_total)
                        < accrual.min_success_rate;
                let ejected = state == ACTIVE
                    && (too_many || low_rate)
                    && may_eject()
                    && self
                        .state
                        .compare_exchange(ACTIVE, EJECTED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                if !ejected {
                    return Transition::None;
                }
                self.set_ejection_deadline(accrual);
                let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                stats.window_start = Instant::now();
                stats.successes = 0;
                stats.failures = 0;
                Transition::Ejected
            }
        }
    }

    fn eject(&self, accrual: &AccrualSettings) {
        self.set_ejection_deadline(accrual);
        self.state.store(EJECTED, Ordering::Release);
    }

    fn set_ejection_deadline(&self, accrual: &AccrualSettings) {
        let n = self
            .ejections_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .min(16);
        let backoff = accrual
            .base_ejection
            .saturating_mul(1 << n)
            .min(accrual.max_ejection);
        self.ejected_until_us.store(
            self.now_us() + backoff.as_micros() as u64,
            Ordering::Release,
        );
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

fn decayed(rtt_ns: f64, elapsed: Duration, decay: Duration) -> f64 {
    // With no news the estimate drifts back towards the default, so an endpoint that
    // was slow once is tried again eventually.
    let w = (-(elapsed.as_secs_f64()) / decay.as_secs_f64().max(1e-3)).exp();
    rtt_ns * w + DEFAULT_RTT.as_nanos() as f64 * (1.0 - w)
}

/// A request in flight to an endpoint; counts as pending until dropped.
pub(crate) struct InFlight {
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) started: Instant,
    done: bool,
}

impl InFlight {
    pub(crate) fn finish(mut self) -> Duration {
        self.done = true;
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
        self.started.elapsed()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accrual() -> AccrualSettings {
        AccrualSettings {
            consecutive_failures: 3,
            min_success_rate: 0.0,
            min_requests: 10,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_millis(50),
            max_ejection: Duration::from_secs(1),
            max_ejection_percent: 50,
        }
    }

    fn endpoint() -> Endpoint {
        Endpoint::new("127.0.0.1:1".parse().unwrap(), 1)
    }

    // Tokio's clock, paused: sleeps advance it exactly, whatever the machine's load.
    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_then_one_probe_readmits() {
        let e = endpoint();
        let decay = Duration::from_secs(10);
        let fail = |e: &Endpoint| {
            e.record(
                Verdict::Failure,
                Duration::from_millis(1),
                decay,
                &accrual(),
                || true,
            )
        };
        assert_eq!(fail(&e), Transition::None);
        assert_eq!(fail(&e), Transition::None);
        assert_eq!(fail(&e), Transition::Ejected);
        assert!(!e.eligible() && !e.claim());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(e.eligible());
        assert!(e.claim(), "the first caller probes");
        assert!(!e.claim(), "only one probe at a time");
        let ok = e.record(
            Verdict::Success,
            Duration::from_millis(1),
            decay,
            &accrual(),
            || true,
        );
        assert_eq!(ok, Transition::Readmitted);
        assert!(e.claim() && e.claim());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_backs_off_longer() {
        let e = endpoint();
        let decay = Duration::from_secs(10);
        for _ in 0..3 {
            e.record(Verdict::Failure, Duration::ZERO, decay, &accrual(), || true);
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(e.claim());
        e.record(Verdict::Failure, Duration::ZERO, decay, &accrual(), || true);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!e.eligible(), "the second ejection lasts 100ms");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(e.eligible());
    }

    #[test]
    fn the_cap_can_forbid_ejection() {
        let e = endpoint();
        for _ in 0..5 {
            e.record(
                Verdict::Failure,
                Duration::ZERO,
                Duration::from_secs(1),
                &accrual(),
                || false,
            );
        }
        assert!(e.eligible());
    }

    #[test]
    fn a_slow_sample_raises_the_cost_at_once() {
        let e = endpoint();
        let decay = Duration::from_secs(10);
        let fast = e.cost(decay);
        e.record(
            Verdict::Success,
            Duration::from_millis(50),
            decay,
            &accrual(),
            || true,
        );
        assert!(e.cost(decay) > 40.0 * fast);
        let _busy = Arc::new(endpoint()).start();
    }
}
