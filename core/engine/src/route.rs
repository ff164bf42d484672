//! The routing table: which service a request or connection goes to, by its
//! `Host`/`:authority` or the listener's default service.
//!
//! A table is built once per config, as part of its snapshot (see `state`); requests
//! already in flight keep the table they started with. The table maps authorities to
//! services; what survives a reload lives with the service (see `service`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::config::{Direction, Settings};
use crate::metrics::{DirectionLabel, HandleCache, Label, Metrics, RouteLabels};
use crate::service::Service;
use crate::tls::MeshTls;

/// A service reached through one of its authorities.
pub(crate) struct Route {
    pub(crate) target: Arc<Service>,
    /// Indexed by [`direction_index`].
    pub(crate) labels: [RouteLabels; 2],
    /// Created on first use, so a direction that never sees traffic has no series.
    requests: [OnceLock<Counter>; 2],
    /// Response counters by (direction, status, gRPC status, local reason).
    pub(crate) responses: HandleCache<ResponseKey, Counter>,
    /// Latency histograms by (direction, status).
    pub(crate) latency: HandleCache<(usize, u16), Histogram>,
}

/// What tells one response counter of a route from another.
/// (direction, status, gRPC status, local reason, mesh peer identity)
pub(crate) type ResponseKey = (usize, u16, Option<u32>, &'static str, Option<Arc<str>>);

pub(crate) fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

#[derive(Default)]
pub(crate) struct Router {
    by_authority: HashMap<String, Arc<Route>>,
    targets: HashMap<String, Arc<Service>>,
}

impl Router {
    pub(crate) fn build(
        settings: &Settings,
        previous: Option<&Router>,
        mesh: Option<&Arc<MeshTls>>,
        metrics: &Metrics,
    ) -> Self {
        let mut router = Router::default();
        for service in &settings.services {
            let target = match previous.and_then(|p| p.targets.get(&service.name)) {
                Some(old) if old.settings == *service => old.clone(),
                old => Arc::new(Service::new(
                    service.clone(),
                    old.map(|t| &**t),
                    mesh,
                    metrics,
                )),
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
    pub(crate) fn route(
        &self,
        authority: Option<&str>,
        fallback: Option<&str>,
    ) -> Option<&Arc<Route>> {
        if let Some(authority) = authority {
            if let Some(route) = self.by_authority(authority) {
                return Some(route);
            }
        }
        // A service's first authority is its name.
        fallback.and_then(|name| self.by_authority.get(name))
    }

    /// Every service's target, for figures such as endpoint counts.
    pub(crate) fn targets(&self) -> impl Iterator<Item = &Arc<Service>> {
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

impl Route {
    fn new(target: Arc<Service>, authority: &str) -> Self {
        let labels = [Direction::Inbound, Direction::Outbound].map(|direction| RouteLabels {
            direction: DirectionLabel(direction),
            dst_service: target.name.clone(),
            authority: Label::new(authority),
        });
        Self {
            target,
            labels,
            requests: [OnceLock::new(), OnceLock::new()],
            responses: HandleCache::default(),
            latency: HandleCache::default(),
        }
    }

    /// Counts a request arriving in direction `dir` (see [`direction_index`]).
    pub(crate) fn count_request(&self, dir: usize, metrics: &Metrics) {
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
        let router = Router::build(&settings, None, None, &Metrics::new());
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
