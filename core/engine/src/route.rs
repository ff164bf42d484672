//! The routing table: which service a request or connection goes to, by its
//! `Host`/`:authority` or the listener's default service, or (on a transparent
//! listener) by the original destination its client dialed.
//!
//! A table is built once per config, as part of its snapshot (see `state`); requests
//! already in flight keep the table they started with. The table maps authorities and
//! virtual IPs to services; what survives a reload lives with the service (see
//! `service`). Destinations that no virtual IP claims (an endpoint dialed directly,
//! an address outside the mesh, the local application inbound) get a service of their
//! own the first time they are seen, kept in a small table that is read without a lock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::config::{Direction, ServiceSettings, Settings, Timeouts};
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

/// Destinations kept with a service of their own; past this, a new destination is
/// served with a service built for its connection alone (no pooled connections).
const MAX_DESTINATIONS: usize = 1024;
/// The service name of destinations past [`MAX_DESTINATIONS`].
const UNLISTED_DESTINATION: &str = "unlisted-destination";

#[derive(Default)]
pub(crate) struct Router {
    by_authority: HashMap<String, Arc<Route>>,
    targets: HashMap<String, Arc<Service>>,
    /// Services by their virtual IP.
    by_virtual_ip: HashMap<IpAddr, Arc<Route>>,
    /// Which service each endpoint address belongs to (the first that lists it).
    endpoint_owners: HashMap<SocketAddr, Arc<ServiceSettings>>,
    destinations: Destinations,
}

/// How a destination is reached: as seen from the local application (outbound), or as
/// the local application itself (inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Toward {
    /// The application dialed it: a service's endpoint keeps the service's policy and
    /// identity (mutual TLS); any other address is passed through.
    Outbound,
    /// The local application, at the port a peer dialed: plain, on this host.
    Local,
}

/// Services built for destinations as they are first seen: copied whole on insert (rare)
/// so that reading, once per connection, takes no lock.
#[derive(Default)]
struct Destinations {
    routes: ArcSwap<HashMap<(Toward, SocketAddr), Arc<Route>>>,
    mesh: Option<Arc<MeshTls>>,
    /// The proxy-wide timeouts, which a destination's own service takes.
    timeouts: Timeouts,
}

impl Router {
    pub(crate) fn build(
        settings: &Settings,
        previous: Option<&Router>,
        mesh: Option<&Arc<MeshTls>>,
        metrics: &Metrics,
    ) -> Self {
        let mut router = Router {
            destinations: Destinations {
                mesh: mesh.cloned(),
                timeouts: settings.timeouts,
                ..Destinations::default()
            },
            ..Router::default()
        };
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
            if let Some(ip) = service.virtual_ip {
                let route = Route::new(target.clone(), &ip.to_string());
                router.by_virtual_ip.insert(ip, Arc::new(route));
            }
            for endpoint in &service.endpoints {
                router
                    .endpoint_owners
                    .entry(endpoint.addr)
                    .or_insert_with(|| service.clone());
            }
            router.targets.insert(service.name.clone(), target);
        }
        // Destinations whose service would be built the same way keep it, with its
        // connections; the rest are built again when next seen.
        if let Some(previous) = previous {
            let kept: HashMap<_, _> = previous
                .destinations
                .routes
                .load()
                .iter()
                .filter(|((toward, addr), route)| {
                    router.destination_settings(*toward, *addr).as_ref()
                        == Some(&*route.target.settings)
                })
                .map(|(key, route)| (*key, route.clone()))
                .collect();
            router.destinations.routes.store(Arc::new(kept));
        }
        router
    }

    /// The route for a connection's original destination: a service's virtual IP routes
    /// to the service (any port); any other destination to a service of its own.
    pub(crate) fn destination(
        &self,
        toward: Toward,
        addr: SocketAddr,
        metrics: &Metrics,
    ) -> Option<Arc<Route>> {
        if toward == Toward::Outbound {
            if let Some(route) = self.by_virtual_ip.get(&addr.ip()) {
                return Some(route.clone());
            }
        }
        let key = (toward, addr);
        let routes = self.destinations.routes.load();
        if let Some(route) = routes.get(&key) {
            return Some(route.clone());
        }
        let full = routes.len() >= MAX_DESTINATIONS;
        drop(routes);
        let mut settings = self.destination_settings(toward, addr)?;
        if full {
            // Not kept, and counted under one name so that label values stay bounded.
            settings.name = UNLISTED_DESTINATION.to_owned();
        }
        let name = settings.name.clone();
        let mesh = self.destinations.mesh.as_ref();
        let service = Service::new(Arc::new(settings), None, mesh, metrics);
        let route = Arc::new(Route::new(Arc::new(service), &name));
        if full {
            return Some(route);
        }
        let mut kept = None;
        self.destinations.routes.rcu(|routes| {
            kept = routes.get(&key).cloned();
            if kept.is_some() {
                return routes.clone();
            }
            let mut more = HashMap::clone(routes);
            more.insert(key, route.clone());
            Arc::new(more)
        });
        // Another connection may have built it first: use the one kept.
        Some(kept.unwrap_or(route))
    }

    /// How a destination's own service is configured.
    fn destination_settings(&self, toward: Toward, addr: SocketAddr) -> Option<ServiceSettings> {
        let owner = self
            .endpoint_owners
            .get(&addr)
            .filter(|_| toward == Toward::Outbound);
        Some(match owner {
            Some(owner) => owner.narrowed_to(addr)?,
            None => ServiceSettings::destination(addr, self.destinations.timeouts),
        })
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

    const MESH: &str = r#"
listeners: [{address: "127.0.0.1:0"}]
services:
  - name: web
    virtualIp: 10.240.0.7
    endpoints:
      - {address: "10.1.0.1:8080", identity: "spiffe://cluster.local/ns/default/sa/web"}
      - {address: "10.1.0.2:8080", identity: "spiffe://cluster.local/ns/default/sa/web"}
"#;

    fn router(text: &str, previous: Option<&Router>) -> Router {
        let settings = Settings::from_config(parse(text).unwrap()).unwrap();
        Router::build(&settings, previous, None, &Metrics::new())
    }

    #[test]
    fn a_virtual_ip_routes_to_its_service_on_any_port() {
        let router = router(MESH, None);
        let metrics = Metrics::new();
        for port in [80, 8080] {
            let dst = SocketAddr::new("10.240.0.7".parse().unwrap(), port);
            let route = router.destination(Toward::Outbound, dst, &metrics).unwrap();
            assert_eq!(route.target.settings.name, "web");
            assert_eq!(route.target.settings.endpoints.len(), 2);
        }
    }

    #[test]
    fn an_endpoint_dialed_directly_keeps_its_service_and_identity_alone() {
        let router = router(MESH, None);
        let metrics = Metrics::new();
        let dst: SocketAddr = "10.1.0.2:8080".parse().unwrap();
        let route = router.destination(Toward::Outbound, dst, &metrics).unwrap();
        let settings = &route.target.settings;
        assert_eq!(settings.name, "web");
        assert_eq!(settings.endpoints.len(), 1);
        assert_eq!(settings.endpoints[0].addr, dst);
        assert!(settings.endpoints[0].identity.is_some());
        // Kept: the next connection shares its service (and connections).
        let again = router.destination(Toward::Outbound, dst, &metrics).unwrap();
        assert!(Arc::ptr_eq(&route, &again));
    }

    #[test]
    fn other_destinations_pass_through_and_the_local_application_is_plain() {
        let router = router(MESH, None);
        let metrics = Metrics::new();
        let outside: SocketAddr = "10.9.9.9:443".parse().unwrap();
        let route = router
            .destination(Toward::Outbound, outside, &metrics)
            .unwrap();
        assert_eq!(route.target.settings.name, "10.9.9.9:443");
        assert_eq!(route.target.settings.endpoints[0].addr, outside);
        assert!(route.target.settings.endpoints[0].identity.is_none());
        // Inbound, this pod's own endpoint address is the local application, in plaintext.
        let own: SocketAddr = "10.1.0.1:8080".parse().unwrap();
        let local = router.destination(Toward::Local, own, &metrics).unwrap();
        assert_eq!(local.target.settings.name, "10.1.0.1:8080");
        assert!(local.target.settings.endpoints[0].identity.is_none());
        // Nor does a virtual IP mean anything inbound.
        let vip: SocketAddr = "10.240.0.7:80".parse().unwrap();
        let local = router.destination(Toward::Local, vip, &metrics).unwrap();
        assert_eq!(local.target.settings.endpoints[0].addr, vip);
    }

    #[test]
    fn a_reload_keeps_destinations_it_does_not_change() {
        let first = router(MESH, None);
        let metrics = Metrics::new();
        let endpoint: SocketAddr = "10.1.0.1:8080".parse().unwrap();
        let outside: SocketAddr = "10.9.9.9:443".parse().unwrap();
        let before = first
            .destination(Toward::Outbound, endpoint, &metrics)
            .unwrap();
        let passthrough = first
            .destination(Toward::Outbound, outside, &metrics)
            .unwrap();
        // The endpoint's identity changes; the outside address is untouched.
        let changed = MESH.replacen("sa/web", "sa/web-v2", 1);
        let second = router(&changed, Some(&first));
        let after = second
            .destination(Toward::Outbound, endpoint, &metrics)
            .unwrap();
        assert!(!Arc::ptr_eq(&before, &after));
        assert!(after.target.settings.endpoints[0]
            .identity
            .as_deref()
            .is_some_and(|id| id.ends_with("web-v2")));
        let kept = second
            .destination(Toward::Outbound, outside, &metrics)
            .unwrap();
        assert!(Arc::ptr_eq(&passthrough, &kept));
    }

    #[test]
    fn past_the_table_size_destinations_share_one_name() {
        let router = router(MESH, None);
        let metrics = Metrics::new();
        for port in 1..=MAX_DESTINATIONS as u16 {
            let dst = SocketAddr::new("10.9.0.1".parse().unwrap(), port);
            router.destination(Toward::Outbound, dst, &metrics).unwrap();
        }
        let dst: SocketAddr = "10.9.0.2:1".parse().unwrap();
        let route = router.destination(Toward::Outbound, dst, &metrics).unwrap();
        assert_eq!(route.target.settings.name, UNLISTED_DESTINATION);
        assert_eq!(route.target.settings.endpoints[0].addr, dst);
        assert_eq!(router.destinations.routes.load().len(), MAX_DESTINATIONS);
    }

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
