//! Choosing an endpoint for each request or connection.
//!
//! The default is power of two choices over PeakEWMA (pending requests times a
//! decaying latency estimate), so slow or busy endpoints get less traffic; round-robin,
//! least-request and consistent hashing are options. Ejected or unhealthy endpoints
//! are skipped; if every endpoint is out, all of them are used again ("panic mode"),
//! since failing everything is never better.

pub(crate) mod endpoint;
mod ring;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(crate) use endpoint::{Endpoint, Transition, Verdict};
use prometheus_client::metrics::counter::Counter;

use crate::config::policy::{AccrualSettings, BalancerKind, BalancerSettings};
use ring::Ring;

/// The most slots a round-robin schedule may have; larger weights are scaled down.
const MAX_SLOTS: u64 = 4096;

pub(crate) struct Balancer {
    /// The service's name, for logs.
    service: Arc<str>,
    endpoints: Vec<Arc<Endpoint>>,
    settings: BalancerSettings,
    accrual: AccrualSettings,
    schedule: Vec<u32>,
    next: AtomicUsize,
    ring: Option<Ring>,
    /// `endpoint_ejections_total` for this service.
    ejections: Counter,
}

impl Balancer {
    pub(crate) fn new(
        service: Arc<str>,
        endpoints: Vec<Arc<Endpoint>>,
        settings: BalancerSettings,
        accrual: AccrualSettings,
        ejections: Counter,
    ) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let ring = (settings.kind == BalancerKind::RingHash).then(|| {
            let members: Vec<(std::net::SocketAddr, u32)> =
                endpoints.iter().map(|e| (e.addr, e.weight)).collect();
            Ring::new(&members)
        });
        Self {
            service,
            schedule: smooth_schedule(&weights),
            endpoints,
            settings,
            accrual,
            next: AtomicUsize::new(0),
            ring,
            ejections,
        }
    }

    pub(crate) fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    #[cfg(test)]
    fn pick(&self, hash_key: Option<&[u8]>) -> Option<Arc<Endpoint>> {
        self.pick_avoiding(hash_key, None)
    }

    /// The endpoint for the next request (or connection): never `avoid` (the endpoint
    /// a retry's previous try failed on) while another can be had. `hash_key` is the
    /// value of the ring-hash header, when the request has one.
    pub(crate) fn pick_avoiding(
        &self,
        hash_key: Option<&[u8]>,
        avoid: Option<SocketAddr>,
    ) -> Option<Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let chosen = self
            .choose(hash_key, avoid)
            .or_else(|| avoid.and_then(|_| self.choose(hash_key, None)));
        let index = chosen.unwrap_or_else(|| self.panic_pick());
        Some(self.endpoints[index].clone())
    }

    /// Records what became of a request (or connection) sent to `endpoint`, and
    /// applies failure accrual under the service's cap on ejections.
    pub(crate) fn record(
        &self,
        endpoint: &Endpoint,
        verdict: Verdict,
        rtt: Duration,
    ) -> Transition {
        let transition = endpoint.record(verdict, rtt, self.settings.decay, &self.accrual, || {
            self.may_eject()
        });
        match transition {
            Transition::None => {}
            Transition::Ejected => {
                tracing::warn!(service = %self.service, endpoint = %endpoint.addr, "endpoint ejected after failures");
                self.ejections.inc();
            }
            Transition::Readmitted => {
                tracing::info!(service = %self.service, endpoint = %endpoint.addr, "endpoint readmitted after a successful probe")
            }
        }
        transition
    }

    fn choose(&self, hash_key: Option<&[u8]>, avoid: Option<SocketAddr>) -> Option<usize> {
        let usable = |i: usize| {
            let e = &self.endpoints[i];
            Some(e.addr) != avoid && e.eligible()
        };
        match (&self.ring, hash_key) {
            (Some(ring), Some(key)) => ring
                .walk(key)
                .take(self.endpoints.len() * 4)
                .find(|i| usable(*i) && self.endpoints[*i].claim()),
            _ => match self.settings.kind {
                BalancerKind::RoundRobin => self.round_robin(usable),
                BalancerKind::LeastRequest => {
                    self.p2c(usable, |e| (e.pending() as f64 + 1.0) / f64::from(e.weight))
                }
                BalancerKind::PeakEwma | BalancerKind::RingHash => {
                    self.p2c(usable, |e| e.cost(self.settings.decay))
                }
            },
        }
    }

    /// Whether one more endpoint may be ejected under `max_ejection_percent`.
    pub(crate) fn may_eject(&self) -> bool {
        let n = self.endpoints.len();
        if n < 2 {
            return false;
        }
        let allowed = (n * self.accrual.max_ejection_percent as usize / 100).max(1);
        self.ejected() < allowed
    }

    pub(crate) fn ejected(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_ejected()).count()
    }

    pub(crate) fn unhealthy(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_unhealthy()).count()
    }

    fn round_robin(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.schedule.len();
        (0..len).find_map(|_| {
            let slot = self.next.fetch_add(1, Ordering::Relaxed) % len;
            let i = self.schedule[slot] as usize;
            (usable(i) && self.endpoints[i].claim()).then_some(i)
        })
    }

    /// Power of two choices: of two random usable endpoints, the cheaper one.
    fn p2c(
        &self,
        usable: impl Fn(usize) -> bool,
        cost: impl Fn(&Endpoint) -> f64,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 1 {
            return (usable(0) && self.endpoints[0].claim()).then_some(0);
        }
        let a = fastrand::usize(..n);
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        let best = match (usable(a), usable(b)) {
            (true, true) if cost(&self.endpoints[b]) < cost(&self.endpoints[a]) => Some(b),
            (true, _) => Some(a),
            (false, true) => Some(b),
            (false, false) => None,
        };
        if let Some(i) = best.filter(|i| self.endpoints[*i].claim()) {
            return Some(i);
        }
        // Both draws were out: take the cheapest endpoint that is in.
        let mut order: Vec<usize> = (0..n).filter(|i| usable(*i)).collect();
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

    use super::endpoint::InFlight;
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

    fn balancer(
        endpoints: Vec<Arc<Endpoint>>,
        settings: BalancerSettings,
        accrual: AccrualSettings,
    ) -> Balancer {
        Balancer::new(
            Arc::from("test"),
            endpoints,
            settings,
            accrual,
            Counter::default(),
        )
    }

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let addr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Arc::new(Endpoint::new(addr, 1))
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
        let b = balancer(endpoints(3), settings(BalancerKind::RoundRobin), accrual());
        let picks: Vec<u16> = (0..6).map(|_| b.pick(None).unwrap().addr.port()).collect();
        assert_eq!(picks, vec![1000, 1001, 1002, 1000, 1001, 1002]);
        let bad = b.endpoints()[1].clone();
        assert_eq!(
            b.record(&bad, Verdict::Failure, Duration::ZERO),
            Transition::Ejected
        );
        assert_eq!(b.ejections.get(), 1, "the ejection is counted");
        assert!((0..6).all(|_| b.pick(None).unwrap().addr.port() != 1001));
        // The cap (50% of 3 = 1) keeps a second endpoint in.
        let other = b.endpoints()[0].clone();
        b.record(&other, Verdict::Failure, Duration::ZERO);
        assert_eq!(b.ejected(), 1);
        assert_eq!(b.ejections.get(), 1);
    }

    #[test]
    fn peak_ewma_avoids_the_slow_endpoint() {
        let b = balancer(endpoints(2), settings(BalancerKind::PeakEwma), accrual());
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
        let b = balancer(
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
        let b = balancer(endpoints(3), s, accrual());
        let first = b.pick(Some(b"alice")).unwrap().addr;
        assert!((0..20).all(|_| b.pick(Some(b"alice")).unwrap().addr == first));
        assert!(
            balancer(vec![], settings(BalancerKind::PeakEwma), accrual())
                .pick(None)
                .is_none()
        );

        let single = balancer(endpoints(1), settings(BalancerKind::PeakEwma), accrual());
        single.endpoints()[0].set_unhealthy(true);
        assert!(single.pick(None).is_some(), "panic mode still serves");
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed_even_when_it_looks_cheapest() {
        // The failed endpoint has answered nothing, so its latency estimate is the
        // default; the live one was slower on its first (connecting) request.
        let mut accrual = accrual();
        accrual.consecutive_failures = 5;
        let b = balancer(endpoints(2), settings(BalancerKind::PeakEwma), accrual);
        let (live, dead) = (b.endpoints()[0].clone(), b.endpoints()[1].clone());
        b.record(&live, Verdict::Success, Duration::from_millis(20));
        b.record(&dead, Verdict::Failure, Duration::ZERO);
        assert!(dead.cost(Duration::from_secs(10)) < live.cost(Duration::from_secs(10)));
        for _ in 0..50 {
            let next = b.pick_avoiding(None, Some(dead.addr)).unwrap();
            assert_eq!(next.addr, live.addr);
        }
        // With nothing else to go to, the avoided endpoint is still used.
        let single = balancer(endpoints(1), settings(BalancerKind::RoundRobin), accrual);
        let only = single.endpoints()[0].addr;
        assert_eq!(single.pick_avoiding(None, Some(only)).unwrap().addr, only);
    }
}
