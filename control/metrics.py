"""The control plane's own metrics (Prometheus text format, served on the admin port).

Names follow the project's conventions (base units, counters end in ``_total``); the
latency buckets are the conventional ones, from 50 µs to 10 s.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Latency buckets, in seconds: the engine's (core/engine/src/metrics.rs), from 50 µs.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)

#: ``identity_certify_total`` results: a certificate, a proof refused, a bad request, over a rate
#: limit, or the CA unable to issue (its issuer expired, the TokenReview API away)
CERTIFY_RESULTS = ("issued", "denied", "invalid", "rate_limited", "error")


class ControlMetrics:
    """Every metric of one control-plane process, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected_proxies = Gauge(
            "control_connected_proxies", "Proxies with at least one open watch.", registry=r)
        self.watches = Gauge(
            "control_active_watches", "Open watch streams, by kind (config, endpoints).", ["kind"], registry=r)
        self.pushes = Counter(
            "control_pushes_total", "Updates written to watchers, by kind and whether it was a full state.",
            ["kind", "full"], registry=r)
        self.push_latency = Histogram(
            "control_push_latency_seconds",
            "From a change reaching the control plane's state to the update being written to a watcher.",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.resyncs = Counter(
            "control_watch_resyncs_total",
            "Watchers that fell too far behind and were sent a fresh full state instead.", registry=r)
        self.source_errors = Counter(
            "control_source_errors_total", "Errors reported by the source of truth (each distinct one once).",
            registry=r)
        self.source_healthy = Gauge(
            "control_source_healthy", "1 when the source reports no error.", registry=r)
        self.ready = Gauge("control_ready", "1 once the source has loaded.", registry=r)
        self.services = Gauge("control_services", "Services in the mesh state.", registry=r)
        self.endpoints = Gauge("control_endpoints", "Endpoints in the mesh state, over all services.", registry=r)
        self.registrations = Counter(
            "control_registrations_total", "Register and Deregister calls, by operation and result.",
            ["operation", "result"], registry=r)
        self.certify = Counter(
            "identity_certify_total", "Certify calls of the Identity service (the mesh's CA), by result.",
            ["result"], registry=r)
        self.issuer_expiry = Gauge(
            "identity_issuer_expiry_timestamp_seconds",
            "When the CA's current issuer certificate expires (Unix time); rotate it before.", registry=r)
        self.issuer_rejected = Counter(
            "identity_issuer_reload_rejected_total",
            "Checks that found changed issuer files that cannot be used (the current issuer stays).",
            registry=r)
        for result in CERTIFY_RESULTS:
            self.certify.labels(result)
        for kind in ("config", "endpoints"):
            self.watches.labels(kind)
            self.push_latency.labels(kind)
            for full in ("true", "false"):
                self.pushes.labels(kind, full)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
