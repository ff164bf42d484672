//! Retry decisions: what is worth another try, and the budget that bounds how much
//! extra load retries may add. (The pause between tries is `backoff`'s.)

use std::sync::atomic::{AtomicU64, Ordering};

use http::Method;
use tokio::time::Instant;

use crate::config::policy::{BudgetSettings, RetrySettings};

/// Why a try failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection: nothing was sent, so any request may go again.
    Connect,
    /// The connection broke after the request was (perhaps) sent.
    Reset,
    /// The try ran out of its per-try timeout.
    TryTimeout,
    Status(u16),
    Grpc(u32),
}

/// Whether `failure` is one the policy retries, for a request with this method.
pub(crate) fn retryable(policy: &RetrySettings, method: &Method, failure: Failure) -> bool {
    let idempotent = policy.non_idempotent
        || matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
    match failure {
        Failure::Connect => policy.on_connect_failure,
        // A gRPC status the policy names was chosen as safe to retry.
        Failure::Grpc(code) => policy.grpc_codes.contains(&code),
        Failure::Reset => policy.on_reset && idempotent,
        Failure::TryTimeout => (policy.on_gateway_error || policy.on_5xx) && idempotent,
        Failure::Status(s) => {
            let gateway = matches!(s, 502..=504);
            idempotent && ((policy.on_5xx && s >= 500) || (policy.on_gateway_error && gateway))
        }
    }
}

const SLOTS: usize = 10;

/// Retries allowed over a sliding window: `ratio` of the requests seen plus
/// `min_per_second`. Lock-free: counts live in time slots that are reset as the
/// window moves on (a race may lose a count, never grant unbounded retries).
pub(crate) struct RetryBudget {
    settings: BudgetSettings,
    slot_width_us: u64,
    slots: [Slot; SLOTS],
    epoch: Instant,
}

#[derive(Default)]
struct Slot {
    tick: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    pub(crate) fn new(settings: BudgetSettings) -> Self {
        Self {
            settings,
            slot_width_us: (settings.window.as_micros() as u64 / SLOTS as u64).max(1),
            slots: Default::default(),
            epoch: Instant::now(),
        }
    }

    /// Counts a request (the first try).
    pub(crate) fn deposit(&self) {
        self.current().requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, if there is one left.
    pub(crate) fn withdraw(&self) -> bool {
        let now = self.tick();
        let (mut requests, mut retries) = (0u64, 0u64);
        for slot in &self.slots {
            if now.saturating_sub(slot.tick.load(Ordering::Relaxed)) < SLOTS as u64 {
                requests += slot.requests.load(Ordering::Relaxed);
                retries += slot.retries.load(Ordering::Relaxed);
            }
        }
        let reserve = f64::from(self.settings.min_per_second) * self.settings.window.as_secs_f64();
        let allowed = reserve + self.settings.ratio * requests as f64;
        if (retries as f64) < allowed.floor() {
            self.current().retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    fn tick(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64 / self.slot_width_us + SLOTS as u64
    }

    fn current(&self) -> &Slot {
        let tick = self.tick();
        let slot = &self.slots[tick as usize % SLOTS];
        let seen = slot.tick.load(Ordering::Relaxed);
        if seen != tick
            && slot
                .tick
                .compare_exchange(seen, tick, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy() -> RetrySettings {
        crate::config::Settings::from_config(
            crate::config::parse(
                r#"{"listeners": [{"address": "127.0.0.1:0"}], "services": [{"name": "a"}]}"#,
            )
            .unwrap(),
        )
        .unwrap()
        .services[0]
            .policy
            .retries
            .clone()
    }

    #[test]
    fn defaults_retry_safe_failures_only() {
        let p = policy();
        assert!(retryable(&p, &Method::POST, Failure::Connect));
        assert!(retryable(&p, &Method::GET, Failure::Status(503)));
        assert!(!retryable(&p, &Method::POST, Failure::Status(503)));
        assert!(!retryable(&p, &Method::GET, Failure::Status(500)));
        assert!(retryable(&p, &Method::POST, Failure::Grpc(14)));
        assert!(!retryable(&p, &Method::POST, Failure::Grpc(13)));
        assert!(retryable(&p, &Method::GET, Failure::Reset));
        assert!(!retryable(&p, &Method::POST, Failure::Reset));
    }

    #[test]
    fn budget_allows_the_ratio_plus_the_reserve() {
        let budget = RetryBudget::new(BudgetSettings {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        });
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..1000).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 30, "20% of 100 plus 1/s over 10s");
    }
}
