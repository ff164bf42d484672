//! Choosing an endpoint for each request or connection.
//!
//! The default is power of two choices over PeakEWMA (pending requests times a
//! decaying latency estimate), so slow or busy endpoints get less traffic; round-robin,
//! least-request and consistent hashing are options. Ejected or unhealthy endpoints
//! are skipped; if every endpoint is out, all of them are used again ("panic mode"),
//! since failing everything is never better.

pub mod endpoint;
mod ring;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub use endpoint::{Endpoint, InFlight, Transition, Verdict};

use crate::config::policy::{AccrualSettings, BalancerKind, BalancerSettings};
use ring::Ring;

/// The most slots a round-robin schedule may have; larger weights are scaled down.
const MAX_SLOTS: u64 = 4096;

pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    settings: BalancerSettings,
    accrual: AccrualSettings,
    schedule: Vec<u32>,
    next: AtomicUsize,
    ring: Option<Ring>,
}

impl Balancer {
    pub fn new(
        endpoints: Vec<Arc<Endpoint>>,
        settings: BalancerSettings,
        accrual: AccrualSettings,
    ) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let ring = (settings.kind == BalancerKind::RingHash).then(|| {
            let members: Vec<(std::net::SocketAddr, u32)> =
                endpoints.iter().map(|e| (e.addr, e.weight)).collect();
            Ring::new(&members)
        });
        Self {
            schedule: smooth_schedule(&weights),
            endpoints,
            settings,
            accrual,
            next: AtomicUsize::new(0),
            ring,
        }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn settings(&self) -> &BalancerSettings {
        &self.settings
    }

    /// The endpoint for the next request; `hash_key` is the value of the ring-hash
    /// header, when the request has one.
    pub fn pick(&self, hash_key: Option<&[u8]>) -> Option<Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let chosen = match (&self.ring, hash_key) {
            (Some(ring), Some(key)) => ring
                .walk(key)
                .take(self.endpoints.len() * 4)
                .find(|i| self.endpoints[*i].eligible() && self.endpoints[*i].claim()),
            _ => match self.settings.kind {
                BalancerKind::RoundRobin => self.round_robin(),
                BalancerKind::LeastRequest => {
                    self.p2c(|e| (e.pending() as f64 + 1.0) / f64::from(e.weight))
                }
                BalancerKind::PeakEwma | BalancerKind::RingHash => {
                    self.p2c(|e| e.cost(self.settings.decay))
                }
            },
        };
        let index = chosen.unwrap_or_else(|| self.panic_pick());
        Some(self.endpoints[index].clone())
    }

    /// Whether one more endpoint may be ejected under `max_ejection_percent`.
    pub fn may_eject(&self) -> bool {
        let n = self.endpoints.len();
        if n < 2 {
            return false;
        }
        let allowed = (n * self.accrual.max_ejection_percent as usize / 100).max(1);
        self.ejected() < allowed
    }

    pub fn ejected(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_ejected()).count()
    }

    pub fn unhealthy(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_unhealthy()).count()
    }

    fn round_robin(&self) -> Option<usize> {
        let len = self.schedule.len();
        (0..len).find_map(|_| {
            let slot = self.next.fetch_add(1, Ordering::Relaxed) % len;
            let i = self.schedule[slot] as usize;
            (self.endpoints[i].eligible() && self.endpoints[i].claim()).then_some(i)
        })
    }

    /// Power of two choices: of two random eligible endpoints, the cheaper one.
    fn p2c(&self, cost: impl Fn(&Endpoint) -> f64) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 1 {
            let e = &self.endpoints[0];
            return (e.eligible() && e.claim()).then_some(0);
        }
        let a = fastrand::usize(..n);
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        let best = match (self.endpoints[a].eligible(), self.endpoints[b].eligible()) {
            (true, true) if cost(&self.endpoints[b]) < cost(&self.endpoints[a]) => Some(b),
            (true, _) => Some(a),
            (false, true) => Some(b),
            (false, false) => None,
        };
        if let Some(i) = best.filter(|i| self.endpoints[*i].claim()) {
            return Some(i);
        }
        // Both draws were out: take the cheapest endpoint that is in.
        let mut order: Vec<usize> = (0..n).filter(|i| self.endpoints[*i].eligible()).collect();
        order.sort_by(|x, y| cost(&self.endpoints[*x]).total_cmp(&cost(&self.endpoints[*y])));
        order.into_iter().find(|i| self.endpoints[*i].claim())
    }

    /// Every endpoint is out: spread over all of them by load.
    fn panic_pick(&self) -> usize {
        let n = self.endpoints.len();
        let a = fastrand::usize(..n);
        let b = fastrand::usize(..n);
        if self.endpoints[b].pending() < self.endpoints[a].pending() {
            b
        } else {
            a
        }
    }
}

fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let total: u64 = weights.iter().map(|w| u64::from((*w).max(1))).sum();
    let scale = total.div_ceil(MAX_SLOTS).max(1);
    let weights: Vec<i64> = weights
        .iter()
        .map(|w| (u64::from((*w).max(1)) / scale).max(1) as i64)
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(kind: BalancerKind) -> BalancerSettings {
        BalancerSettings {
            kind,
            hash_header: None,
            decay: Duration::from_secs(10),
        }
    }

    fn accrual() -> AccrualSettings {
        AccrualSettings {
            consecutive_failures: 1,
            min_success_rate: 0.0,
            min_requests: 10,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
        }
    }

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let addr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Arc::new(Endpoint::new(
                    addr,
                    1,
                    Duration::from_secs(1),
                    10,
                    None,
                    None,
                ))
            })
            .collect()
    }

    #[test]
    fn weights_are_honoured_and_interleaved() {
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert!(smooth_schedule(&[]).is_empty());
        assert!(smooth_schedule(&[u32::MAX, 1]).len() as u64 <= MAX_SLOTS + 1);
    }

    #[test]
    fn round_robin_cycles_and_skips_ejected() {
        let b = Balancer::new(endpoints(3), settings(BalancerKind::RoundRobin), accrual());
        let picks: Vec<u16> = (0..6).map(|_| b.pick(None).unwrap().addr.port()).collect();
        assert_eq!(picks, vec![1000, 1001, 1002, 1000, 1001, 1002]);
        let bad = b.endpoints()[1].clone();
        bad.record(
            Verdict::Failure,
            Duration::ZERO,
            Duration::from_secs(1),
            &accrual(),
            || b.may_eject(),
        );
        assert!((0..6).all(|_| b.pick(None).unwrap().addr.port() != 1001));
        // The cap (50% of 3 = 1) keeps a second endpoint in.
        let other = b.endpoints()[0].clone();
        other.record(
            Verdict::Failure,
            Duration::ZERO,
            Duration::from_secs(1),
            &accrual(),
            || b.may_eject(),
        );
        assert_eq!(b.ejected(), 1);
    }

    #[test]
    fn peak_ewma_avoids_the_slow_endpoint() {
        let b = Balancer::new(endpoints(2), settings(BalancerKind::PeakEwma), accrual());
        let slow = b.endpoints()[0].clone();
        slow.record(
            Verdict::Success,
            Duration::from_millis(50),
            Duration::from_secs(10),
            &accrual(),
            || false,
        );
        let to_slow = (0..100)
            .filter(|_| b.pick(None).unwrap().addr == slow.addr)
            .count();
        assert_eq!(to_slow, 0);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let b = Balancer::new(
            endpoints(2),
            settings(BalancerKind::LeastRequest),
            accrual(),
        );
        let busy = b.endpoints()[0].clone();
        let _in_flight: Vec<InFlight> = (0..5).map(|_| busy.start()).collect();
        assert!((0..50).all(|_| b.pick(None).unwrap().addr != busy.addr));
    }

    #[test]
    fn ring_hash_is_sticky_and_every_endpoint_out_means_panic_mode() {
        let mut s = settings(BalancerKind::RingHash);
        s.hash_header = Some(http::HeaderName::from_static("x-user"));
        let b = Balancer::new(endpoints(3), s, accrual());
        let first = b.pick(Some(b"alice")).unwrap().addr;
        assert!((0..20).all(|_| b.pick(Some(b"alice")).unwrap().addr == first));
        assert!(
            Balancer::new(vec![], settings(BalancerKind::PeakEwma), accrual())
                .pick(None)
                .is_none()
        );

        let single = Balancer::new(endpoints(1), settings(BalancerKind::PeakEwma), accrual());
        single.endpoints()[0].set_unhealthy(true);
        assert!(single.pick(None).is_some(), "panic mode still serves");
    }
}
