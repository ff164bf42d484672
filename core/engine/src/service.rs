//! A service as the data plane uses it: its balancer, the connections to its
//! endpoints, its retry budget and its limits. This is what survives a reload: a
//! service whose settings stay is kept whole, and one whose settings change keeps the
//! endpoints and connections that its new settings leave as they were.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::balance::{Balancer, Endpoint};
use crate::config::{EndpointSettings, ServiceSettings};
use crate::connect::Upstream;
use crate::http::client::{H2Connection, Upstreams};
use crate::http::pool::Http1Pool;
use crate::limit::RateLimiter;
use crate::metrics::{Label, Metrics, ServiceLabels};
use crate::retry::RetryBudget;
use crate::tls::MeshTls;

pub(crate) struct Service {
    pub(crate) name: Label,
    pub(crate) settings: Arc<ServiceSettings>,
    /// Load and health of the endpoints.
    pub(crate) balancer: Balancer,
    /// How each endpoint is reached, by address (shared with the HTTP/1 pool).
    upstreams: Upstreams,
    /// The pooled HTTP/1 client.
    pub(crate) http1: Http1Pool,
    /// One HTTP/2 connection per endpoint, by address.
    h2: HashMap<SocketAddr, Arc<H2Connection>>,
    pub(crate) budget: RetryBudget,
    /// Requests in flight to the service (`limits.max_concurrent`).
    pub(crate) concurrency: Arc<Semaphore>,
    /// Requests waiting for an upstream stream (`limits.max_pending`).
    pub(crate) pending: Arc<Semaphore>,
    pub(crate) rate_limit: Option<RateLimiter>,
    /// Stops the service's health checks when the service is replaced.
    _health_checks: Option<DropGuard>,
}

impl Service {
    pub(crate) fn new(
        settings: Arc<ServiceSettings>,
        previous: Option<&Service>,
        mesh: Option<&Arc<MeshTls>>,
        metrics: &Metrics,
    ) -> Self {
        let name = Label::new(&settings.name);
        let timeouts = settings.timeouts;
        let limits = settings.policy.limits;
        let old = |e: &EndpointSettings| {
            previous.and_then(|p| p.settings.endpoints.iter().find(|o| o.addr == e.addr))
        };
        // An endpoint keeps its load and health while it stays the same workload.
        let endpoints: Vec<Arc<Endpoint>> = settings
            .endpoints
            .iter()
            .map(|e| {
                let kept = previous
                    .filter(|_| {
                        old(e).is_some_and(|o| o.weight == e.weight && o.identity == e.identity)
                    })
                    .and_then(|p| p.balancer.endpoints().iter().find(|k| k.addr == e.addr));
                kept.cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(e.addr, e.weight)))
            })
            .collect();
        // Connections (and the cap on them) stay while how to reach the endpoint does.
        let upstreams: HashMap<SocketAddr, Arc<Upstream>> = settings
            .endpoints
            .iter()
            .map(|e| {
                let kept = previous
                    .and_then(|p| p.upstreams.load().get(&e.addr).cloned())
                    .filter(|u| u.same(&e.identity, timeouts.connect, limits.max_connections));
                let upstream = kept.unwrap_or_else(|| {
                    Arc::new(Upstream::new(
                        e.addr,
                        e.identity.clone(),
                        timeouts.connect,
                        limits.max_connections,
                        mesh.cloned(),
                    ))
                });
                (e.addr, upstream)
            })
            .collect();
        let h2 = upstreams
            .iter()
            .map(|(addr, upstream)| {
                let kept = previous
                    .and_then(|p| p.h2.get(addr))
                    .filter(|h2| Arc::ptr_eq(h2.upstream(), upstream));
                let h2 = kept
                    .cloned()
                    .unwrap_or_else(|| Arc::new(H2Connection::new(upstream.clone())));
                (*addr, h2)
            })
            .collect();
        // The HTTP/1 pool survives a reload when its timeouts do and no endpoint's
        // identity changed (its pooled connections were made for the old one).
        let (http1, upstreams) = match previous {
            Some(p)
                if p.settings.timeouts == timeouts && same_identities(&p.settings, &settings) =>
            {
                p.upstreams.store(Arc::new(upstreams));
                (p.http1.clone(), p.upstreams.clone())
            }
            _ => {
                let upstreams: Upstreams = Arc::new(ArcSwap::from_pointee(upstreams));
                (Http1Pool::new(upstreams.clone(), timeouts.idle), upstreams)
            }
        };
        let policy = &settings.policy;
        let health_checks = policy.health_check.clone().map(|check| {
            let stop = CancellationToken::new();
            crate::health::spawn(
                &settings.name,
                &endpoints,
                http1.clone(),
                check,
                stop.clone(),
            );
            stop.drop_guard()
        });
        let ejections = metrics
            .ejections
            .get_or_create(&ServiceLabels {
                dst_service: name.clone(),
            })
            .clone();
        Self {
            balancer: Balancer::new(
                name.0.clone(),
                endpoints,
                policy.balancer.clone(),
                policy.accrual,
                ejections,
            ),
            name,
            upstreams,
            http1,
            h2,
            budget: RetryBudget::new(policy.retries.budget),
            concurrency: Arc::new(Semaphore::new(limits.max_concurrent)),
            pending: Arc::new(Semaphore::new(limits.max_pending)),
            rate_limit: policy.rate_limit.map(RateLimiter::new),
            _health_checks: health_checks,
            settings,
        }
    }

    /// How `endpoint` is reached.
    pub(crate) fn upstream(&self, endpoint: &Endpoint) -> Option<Arc<Upstream>> {
        self.upstreams.load().get(&endpoint.addr).cloned()
    }

    /// The HTTP/2 connection to `endpoint`.
    pub(crate) fn h2(&self, endpoint: &Endpoint) -> Option<&Arc<H2Connection>> {
        self.h2.get(&endpoint.addr)
    }
}

/// Whether every endpoint address in both has the same identity in both.
fn same_identities(old: &ServiceSettings, new: &ServiceSettings) -> bool {
    let identities: HashMap<SocketAddr, &Option<Arc<str>>> = old
        .endpoints
        .iter()
        .map(|e| (e.addr, &e.identity))
        .collect();
    new.endpoints
        .iter()
        .all(|e| identities.get(&e.addr).is_none_or(|id| **id == e.identity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Settings};

    fn service(text: &str, previous: Option<&Service>) -> Service {
        let settings = Settings::from_config(parse(text).unwrap()).unwrap();
        let metrics = Metrics::new();
        Service::new(settings.services[0].clone(), previous, None, &metrics)
    }

    const TWO: &str = r#"{"listeners": [{"address": "127.0.0.1:0"}],
        "services": [{"name": "web", "endpoints": [
            {"address": "127.0.0.1:1001"}, {"address": "127.0.0.1:1002"}]}]}"#;

    #[tokio::test]
    async fn what_stays_the_same_survives_a_reload() {
        let old = service(TWO, None);
        // A new weight for one endpoint and a longer request timeout.
        let new = service(
            r#"{"listeners": [{"address": "127.0.0.1:0"}],
                "services": [{"name": "web", "timeouts": {"request": "3s"}, "endpoints": [
                    {"address": "127.0.0.1:1001"}, {"address": "127.0.0.1:1002", "weight": 5}]}]}"#,
            Some(&old),
        );
        let (old_a, old_b) = (&old.balancer.endpoints()[0], &old.balancer.endpoints()[1]);
        let (new_a, new_b) = (&new.balancer.endpoints()[0], &new.balancer.endpoints()[1]);
        assert!(Arc::ptr_eq(old_a, new_a), "load and health stay");
        assert!(
            !Arc::ptr_eq(old_b, new_b),
            "a new weight is a new balancer entry"
        );
        // How each endpoint is reached did not change: connections and caps stay.
        for e in [new_a, new_b] {
            let (before, after) = (old.upstream(e).unwrap(), new.upstream(e).unwrap());
            assert!(Arc::ptr_eq(&before, &after));
            assert!(Arc::ptr_eq(old.h2(e).unwrap(), new.h2(e).unwrap()));
        }
    }

    #[tokio::test]
    async fn a_new_identity_means_new_connections() {
        let old = service(TWO, None);
        let new = service(
            r#"{"listeners": [{"address": "127.0.0.1:0"}],
                "services": [{"name": "web", "endpoints": [
                    {"address": "127.0.0.1:1001", "identity": "spiffe://cluster.local/ns/a/sa/b"},
                    {"address": "127.0.0.1:1002"}]}]}"#,
            Some(&old),
        );
        let a = &new.balancer.endpoints()[0];
        assert!(!Arc::ptr_eq(
            &old.upstream(a).unwrap(),
            &new.upstream(a).unwrap()
        ));
        assert!(!Arc::ptr_eq(old.h2(a).unwrap(), new.h2(a).unwrap()));
        assert!(
            !Arc::ptr_eq(&old.upstreams, &new.upstreams),
            "the HTTP/1 pool is rebuilt: its idle connections were made for the old identity"
        );
    }
}
