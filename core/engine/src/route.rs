//! The routing table: which service a request or connection goes to, by its
//! `Host`/`:authority` or the listener's default service.
//!
//! A table is built once per config and swapped atomically on reload; requests
//! already in flight keep the table they started with. Targets whose settings did
//! not change keep their connection pools across reloads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::balance::{Balancer, Endpoint};
use crate::config::{Direction, ServiceSettings, Settings};
use crate::http::upstream::{http1_client, ConnectionLimits, EndpointConnect, Http1Client};
use crate::limit::RateLimiter;
use crate::metrics::{DirectionLabel, HandleCache, Label, Metrics, RouteLabels};
use crate::retry::RetryBudget;
use crate::tls::MeshTls;
use prometheus_client::metrics::histogram::Histogram;

/// A service as the data plane uses it.
pub struct Target {
    pub name: Label,
    pub settings: Arc<ServiceSettings>,
    pub balancer: Balancer,
    pub http1: Http1Client,
    connection_limits: ConnectionLimits,
    pub budget: RetryBudget,
    /// Requests in flight to the service (`limits.max_concurrent`).
    pub concurrency: Arc<Semaphore>,
    /// Requests waiting for an upstream stream (`limits.max_pending`).
    pub pending: Arc<Semaphore>,
    pub rate_limit: Option<RateLimiter>,
    /// Stops the service's health checks when the target is replaced.
    _health_checks: Option<DropGuard>,
}

/// A service reached through one of its authorities.
pub struct Route {
    pub target: Arc<Target>,
    pub authority: Label,
    /// Indexed by [`direction_index`].
    pub labels: [RouteLabels; 2],
    /// Created on first use, so a direction that never sees traffic has no series.
    requests: [OnceLock<Counter>; 2],
    /// Response counters by (direction, status, gRPC status, local reason).
    pub responses: HandleCache<ResponseKey, Counter>,
    /// Latency histograms by (direction, status).
    pub latency: HandleCache<(usize, u16), Histogram>,
}

/// What tells one response counter of a route from another.
/// (direction, status, gRPC status, local reason, mesh peer identity)
pub type ResponseKey = (usize, u16, Option<u32>, &'static str, Option<Arc<str>>);

pub fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

#[derive(Default)]
pub struct Router {
    by_authority: HashMap<String, Arc<Route>>,
    targets: HashMap<String, Arc<Target>>,
}

impl Router {
    pub fn build(
        settings: &Settings,
        previous: Option<&Router>,
        mesh: Option<&Arc<MeshTls>>,
    ) -> Self {
        let mut router = Router::default();
        for service in &settings.services {
            let target = match previous.and_then(|p| p.targets.get(&service.name)) {
                Some(old) if old.settings == *service => old.clone(),
                old => Arc::new(Target::new(service.clone(), old.map(|t| &**t), mesh)),
            };
            for authority in &service.authorities {
                let route = Route::new(target.clone(), authority);
                router
                    .by_authority
                    .insert(authority.clone(), Arc::new(route));
            }
            router.targets.insert(service.name.clone(), target);
        }
        router
    }

    /// The route for a request's authority, else for the fallback service.
    pub fn route(&self, authority: Option<&str>, fallback: Option<&str>) -> Option<&Arc<Route>> {
        if let Some(authority) = authority {
            if let Some(route) = self.by_authority(authority) {
                return Some(route);
            }
        }
        // A service's first authority is its name.
        fallback.and_then(|name| self.by_authority.get(name))
    }

    /// Every service's target, for figures such as endpoint counts.
    pub fn targets(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.targets.values()
    }

    fn by_authority(&self, authority: &str) -> Option<&Arc<Route>> {
        let lowered;
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = authority.to_ascii_lowercase();
            &lowered
        } else {
            authority
        };
        self.by_authority.get(authority).or_else(|| {
            // `host:port` also matches a service listed by host alone.
            let (host, port) = authority.rsplit_once(':')?;
            port.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
            self.by_authority.get(host)
        })
    }
}

impl Target {
    fn new(
        settings: Arc<ServiceSettings>,
        previous: Option<&Target>,
        mesh: Option<&Arc<MeshTls>>,
    ) -> Self {
        let timeouts = settings.timeouts;
        let limits = settings.policy.limits;
        // Endpoints that stay keep their state (load, ejection, HTTP/2 connection)
        // unless what they were built from changed.
        let reusable: HashMap<SocketAddr, &Arc<Endpoint>> = previous
            .filter(|p| {
                p.settings.timeouts.connect == timeouts.connect
                    && p.settings.policy.limits == limits
            })
            .map(|p| p.balancer.endpoints().iter().map(|e| (e.addr, e)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<Endpoint>> = settings
            .endpoints
            .iter()
            .map(|e| match reusable.get(&e.addr) {
                Some(existing)
                    if existing.weight == e.weight && existing.identity == e.identity =>
                {
                    Arc::clone(existing)
                }
                _ => Arc::new(Endpoint::new(
                    e.addr,
                    e.weight,
                    timeouts.connect,
                    limits.max_connections,
                    e.identity.clone(),
                    mesh.cloned(),
                )),
            })
            .collect();
        let caps: HashMap<SocketAddr, EndpointConnect> = endpoints
            .iter()
            .map(|e| {
                let connect = EndpointConnect {
                    cap: e.connections.clone(),
                    identity: e.identity.clone(),
                };
                (e.addr, connect)
            })
            .collect();
        // The HTTP/1 pool survives a reload when its timeouts do.
        let (http1, connection_limits) = match previous {
            // ...and no endpoint's identity changed: its pooled connections were made
            // (plain, or verified as someone else) for the old one.
            Some(p)
                if p.settings.timeouts == timeouts && same_identities(&p.settings, &settings) =>
            {
                p.connection_limits.store(Arc::new(caps));
                (p.http1.clone(), p.connection_limits.clone())
            }
            _ => {
                let limits: ConnectionLimits = Arc::new(ArcSwap::from_pointee(caps));
                (
                    http1_client(&timeouts, limits.clone(), mesh.cloned()),
                    limits,
                )
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
        Self {
            name: Label::new(&settings.name),
            balancer: Balancer::new(endpoints, policy.balancer.clone(), policy.accrual),
            http1,
            connection_limits,
            budget: RetryBudget::new(policy.retries.budget),
            concurrency: Arc::new(Semaphore::new(limits.max_concurrent)),
            pending: Arc::new(Semaphore::new(limits.max_pending)),
            rate_limit: policy.rate_limit.map(RateLimiter::new),
            _health_checks: health_checks,
            settings,
        }
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

impl Route {
    fn new(target: Arc<Target>, authority: &str) -> Self {
        let labels = [Direction::Inbound, Direction::Outbound].map(|direction| RouteLabels {
            direction: DirectionLabel(direction),
            dst_service: target.name.clone(),
            authority: Label::new(authority),
        });
        Self {
            target,
            authority: labels[0].authority.clone(),
            labels,
            requests: [OnceLock::new(), OnceLock::new()],
            responses: HandleCache::default(),
            latency: HandleCache::default(),
        }
    }

    /// Counts a request arriving in direction `dir` (see [`direction_index`]).
    pub fn count_request(&self, dir: usize, metrics: &Metrics) {
        self.requests[dir]
            .get_or_init(|| metrics.requests.get_or_create(&self.labels[dir]).clone())
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Settings};

    #[test]
    fn routes_by_authority_then_host_then_fallback() {
        let text = r#"
listeners: [{address: "127.0.0.1:0"}]
services:
  - {name: web, authorities: ["web.local:8080"]}
  - {name: api}
"#;
        let settings = Settings::from_config(parse(text).unwrap()).unwrap();
        let router = Router::build(&settings, None, None);
        let name = |r: Option<&Arc<Route>>| r.map(|r| r.target.settings.name.clone());
        assert_eq!(
            name(router.route(Some("WEB.local:8080"), None)).as_deref(),
            Some("web")
        );
        assert_eq!(
            name(router.route(Some("api:9090"), None)).as_deref(),
            Some("api")
        );
        assert_eq!(
            name(router.route(Some("other"), Some("api"))).as_deref(),
            Some("api")
        );
        assert!(router.route(Some("other"), None).is_none());
    }
}
