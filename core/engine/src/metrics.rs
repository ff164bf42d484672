//! Golden metrics in the Prometheus text format, named as Linkerd users know them
//! (`request_total`, `response_total`, `response_latency_seconds`, `tcp_*`).
//!
//! Label values are `Arc<str>`s fixed by the config (service names, authorities,
//! listener names), so recording a request clones reference counts rather than
//! strings, and label cardinality stays bounded by the config.

use std::fmt::Write as _;
use std::sync::Arc;

use arc_swap::ArcSwap;

use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::Direction;

/// Latency buckets in seconds: fine at the low end, where a proxy's cost lives.
pub(crate) const LATENCY_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// A label value shared by reference count.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Label(pub Arc<str>);

impl Label {
    pub(crate) fn new(value: &str) -> Self {
        Self(Arc::from(value))
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct DirectionLabel(pub Direction);

impl EncodeLabelValue for DirectionLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) direction: DirectionLabel,
    pub(crate) dst_service: Label,
    pub(crate) authority: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct ResponseLabels {
    pub(crate) direction: DirectionLabel,
    pub(crate) dst_service: Label,
    pub(crate) authority: Label,
    pub(crate) status_code: u16,
    /// The gRPC status, for gRPC responses only.
    pub(crate) grpc_status: Option<u32>,
    pub(crate) classification: &'static str,
    /// Why the proxy answered by itself (`pymesh-reason`), or empty.
    pub(crate) error: &'static str,
    /// `true` over mesh TLS, `no_identity` otherwise.
    pub(crate) tls: &'static str,
    /// The peer's mesh identity: `client_id` inbound, `server_id` outbound.
    pub(crate) peer_id: Option<Label>,
}

/// `tls` label values.
pub(crate) fn tls_label(meshed: bool) -> &'static str {
    if meshed {
        "true"
    } else {
        "no_identity"
    }
}

// Written by hand so the labels that do not apply (`grpc_status` on plain HTTP,
// `error` on a proxied response) are left out rather than exported empty.
impl EncodeLabelSet for ResponseLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("direction", self.direction).encode(encoder.encode_label())?;
        ("dst_service", self.dst_service.clone()).encode(encoder.encode_label())?;
        ("authority", self.authority.clone()).encode(encoder.encode_label())?;
        ("status_code", self.status_code as u64).encode(encoder.encode_label())?;
        if let Some(grpc_status) = self.grpc_status {
            ("grpc_status", grpc_status as u64).encode(encoder.encode_label())?;
        }
        ("classification", self.classification).encode(encoder.encode_label())?;
        if !self.error.is_empty() {
            ("error", self.error).encode(encoder.encode_label())?;
        }
        ("tls", self.tls).encode(encoder.encode_label())?;
        if let Some(peer) = &self.peer_id {
            let key = match self.direction.0 {
                Direction::Inbound => "client_id",
                Direction::Outbound => "server_id",
            };
            (key, peer.clone()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LatencyLabels {
    pub(crate) direction: DirectionLabel,
    pub(crate) dst_service: Label,
    pub(crate) status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TcpLabels {
    pub(crate) direction: DirectionLabel,
    pub(crate) listener: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TcpCloseLabels {
    pub(crate) direction: DirectionLabel,
    pub(crate) listener: Label,
    pub(crate) protocol: &'static str,
    pub(crate) tls: &'static str,
    pub(crate) client_id: Option<Label>,
}

/// One authorization decision on an INBOUND listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AuthzLabels {
    pub(crate) listener: Label,
    /// `http` or `tcp`.
    pub(crate) protocol: &'static str,
    /// The policy that decided (`default:…` when none did).
    pub(crate) policy: Label,
    /// `allow` or `deny`.
    pub(crate) decision: &'static str,
    pub(crate) tls: &'static str,
    pub(crate) client_id: Option<Label>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct IdentityRefreshLabels {
    pub(crate) result: &'static str,
}

/// What the identity task records; cloned into it so it needn't hold the proxy.
#[derive(Clone, Default)]
pub(crate) struct IdentityMetrics {
    pub(crate) expiry: Gauge,
    pub(crate) refreshes: Family<IdentityRefreshLabels, Counter>,
}

/// The most handles a [`HandleCache`] keeps; rarer outcomes use the family directly.
const MAX_CACHED: usize = 64;

/// Metric handles looked up by a small key and cached, so that recording on the
/// request path reads a lock-free snapshot instead of taking the family's lock.
pub(crate) struct HandleCache<K, M> {
    entries: ArcSwap<Vec<(K, M)>>,
}

impl<K, M> Default for HandleCache<K, M> {
    fn default() -> Self {
        Self {
            entries: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

impl<K: PartialEq + Clone, M: Clone> HandleCache<K, M> {
    /// Calls `use_it` with the handle for `key`, creating (and caching) it with `make`.
    pub(crate) fn with(&self, key: &K, make: impl FnOnce() -> M, use_it: impl FnOnce(&M)) {
        if let Some((_, handle)) = self.entries.load().iter().find(|(k, _)| k == key) {
            use_it(handle);
            return;
        }
        let handle = make();
        use_it(&handle);
        if self.entries.load().len() < MAX_CACHED {
            self.entries.rcu(|old| {
                let mut entries = Vec::clone(old);
                if !entries.iter().any(|(k, _)| k == key) {
                    entries.push((key.clone(), handle.clone()));
                }
                entries
            });
        }
    }
}

/// Every metric the proxy records, registered once.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) requests: Family<RouteLabels, Counter>,
    pub(crate) responses: Family<ResponseLabels, Counter>,
    pub(crate) latency: Family<LatencyLabels, Histogram>,
    pub(crate) tcp_open: Family<TcpLabels, Counter>,
    pub(crate) tcp_close: Family<TcpCloseLabels, Counter>,
    pub(crate) tcp_open_connections: Family<TcpLabels, Gauge>,
    pub(crate) tcp_read_bytes: Family<TcpLabels, Counter>,
    pub(crate) tcp_write_bytes: Family<TcpLabels, Counter>,
    pub(crate) config_reloads: Family<ReloadLabels, Counter>,
    pub(crate) retries: Family<RetryLabels, Counter>,
    pub(crate) ejections: Family<ServiceLabels, Counter>,
    pub(crate) shed: Family<ShedLabels, Counter>,
    pub(crate) rate_limited: Family<ServiceLabels, Counter>,
    pub(crate) endpoints: Family<EndpointStateLabels, Gauge>,
    pub(crate) authz: Family<AuthzLabels, Counter>,
    pub(crate) identity: IdentityMetrics,
    /// Resident bytes the allocator handed back to the OS after connections freed them.
    pub(crate) memory_returned: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RetryLabels {
    pub(crate) direction: DirectionLabel,
    pub(crate) dst_service: Label,
    /// `attempted`, or `budget_exhausted` when a retry was wanted but not allowed.
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceLabels {
    pub(crate) dst_service: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ShedLabels {
    pub(crate) dst_service: Label,
    /// `max_concurrent`, `max_pending` or `max_connections`.
    pub(crate) limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EndpointStateLabels {
    pub(crate) dst_service: Label,
    /// `total`, `ejected` or `unhealthy`.
    pub(crate) state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReloadLabels {
    pub(crate) result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RouteLabels, Counter>::default();
        let responses = Family::<ResponseLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(
            new_latency_histogram as fn() -> Histogram,
        );
        let tcp_open = Family::<TcpLabels, Counter>::default();
        let tcp_close = Family::<TcpCloseLabels, Counter>::default();
        let tcp_open_connections = Family::<TcpLabels, Gauge>::default();
        let tcp_read_bytes = Family::<TcpLabels, Counter>::default();
        let tcp_write_bytes = Family::<TcpLabels, Counter>::default();
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        let retries = Family::<RetryLabels, Counter>::default();
        let ejections = Family::<ServiceLabels, Counter>::default();
        let shed = Family::<ShedLabels, Counter>::default();
        let rate_limited = Family::<ServiceLabels, Counter>::default();
        let endpoints = Family::<EndpointStateLabels, Gauge>::default();
        let memory_returned = Counter::default();
        let authz = Family::<AuthzLabels, Counter>::default();
        let identity = IdentityMetrics::default();

        registry.register("request", "HTTP requests received", requests.clone());
        registry.register("response", "HTTP responses sent", responses.clone());
        registry.register(
            "response_latency_seconds",
            "Time from a request's arrival to its response headers",
            latency.clone(),
        );
        registry.register("tcp_open", "Connections accepted", tcp_open.clone());
        registry.register("tcp_close", "Connections closed", tcp_close.clone());
        registry.register(
            "tcp_open_connections",
            "Connections open now",
            tcp_open_connections.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from clients",
            tcp_read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to clients",
            tcp_write_bytes.clone(),
        );
        registry.register(
            "config_reload",
            "Configuration reloads",
            config_reloads.clone(),
        );
        registry.register(
            "retry",
            "Retries, attempted or refused by the budget",
            retries.clone(),
        );
        registry.register(
            "endpoint_ejections",
            "Endpoints taken out of rotation by failure accrual",
            ejections.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests refused by a service limit",
            shed.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit",
            rate_limited.clone(),
        );
        registry.register(
            "balancer_endpoints",
            "Endpoints per balancer, by state",
            endpoints.clone(),
        );
        registry.register(
            "inbound_authz",
            "Authorization decisions on inbound traffic, by policy",
            authz.clone(),
        );
        registry.register(
            "identity_cert_expiration_timestamp_seconds",
            "When the proxy's mesh certificate expires (Unix time)",
            identity.expiry.clone(),
        );
        registry.register(
            "identity_cert_refresh",
            "Certificate requests to the mesh CA, by result",
            identity.refreshes.clone(),
        );
        registry.register(
            "memory_returned_bytes",
            "Freed memory handed back to the operating system (resident bytes)",
            memory_returned.clone(),
        );

        Self {
            registry,
            requests,
            responses,
            latency,
            tcp_open,
            tcp_close,
            tcp_open_connections,
            tcp_read_bytes,
            tcp_write_bytes,
            config_reloads,
            retries,
            ejections,
            shed,
            rate_limited,
            endpoints,
            authz,
            identity,
            memory_returned,
        }
    }

    /// The registry in the Prometheus text format, with process figures appended.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        process_metrics(&mut out);
        out.push_str("# EOF\n");
        out
    }
}

fn new_latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// `process_*` figures from /proc, where available (Linux).
fn process_metrics(out: &mut String) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ, fixed at 100 on Linux.
    let page = 4096.0;
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (num(11) + num(12)) / ticks; // utime + stime
    let rss = num(21) * page;
    let _ = writeln!(
        out,
        "# HELP process_cpu_seconds CPU time used by the process."
    );
    let _ = writeln!(out, "# TYPE process_cpu_seconds counter");
    let _ = writeln!(out, "# UNIT process_cpu_seconds seconds");
    let _ = writeln!(out, "process_cpu_seconds_total {cpu}");
    let _ = writeln!(
        out,
        "# HELP process_resident_memory_bytes Resident memory of the process."
    );
    let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge");
    let _ = writeln!(out, "# UNIT process_resident_memory_bytes bytes");
    let _ = writeln!(out, "process_resident_memory_bytes {rss}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_handles_are_the_family_series() {
        let family = Family::<ServiceLabels, Counter>::default();
        let cache = HandleCache::<u16, Counter>::default();
        let labels = ServiceLabels {
            dst_service: Label::new("web"),
        };
        for _ in 0..3 {
            cache.with(
                &200,
                || family.get_or_create(&labels).clone(),
                |c| {
                    c.inc();
                },
            );
        }
        assert_eq!(family.get_or_create(&labels).get(), 3);
        assert_eq!(cache.entries.load().len(), 1);
    }
}
