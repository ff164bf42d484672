//! Recording what became of each connection and request in the golden metrics: the
//! one place the request path writes them, for HTTP and TCP alike. Handles are cached
//! per route (see `metrics::HandleCache`), so recording takes no shared lock.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::Direction;
use crate::detect::Detected;
use crate::http::body::OnGrpcEnd;
use crate::http::local::Reason;
use crate::metrics::{
    tls_label, DirectionLabel, Label, LatencyLabels, Metrics, ResponseLabels, RetryLabels,
    ServiceLabels, ShedLabels, TcpCloseLabels, TcpLabels,
};
use crate::route::Route;
use crate::service::Service;
use crate::state::State;

/// A connection from accept to close: counted open, its bytes counted as they pass,
/// and counted closed with what it turned out to be.
pub(crate) struct ConnectionRecord {
    labels: TcpLabels,
    open: Gauge,
    pub(crate) read_bytes: Counter,
    pub(crate) write_bytes: Counter,
}

impl ConnectionRecord {
    pub(crate) fn open(metrics: &Metrics, direction: Direction, listener: &Arc<str>) -> Self {
        let labels = TcpLabels {
            direction: DirectionLabel(direction),
            listener: Label(listener.clone()),
        };
        metrics.tcp_open.get_or_create(&labels).inc();
        let open = metrics.tcp_open_connections.get_or_create(&labels).clone();
        open.inc();
        Self {
            read_bytes: metrics.tcp_read_bytes.get_or_create(&labels).clone(),
            write_bytes: metrics.tcp_write_bytes.get_or_create(&labels).clone(),
            labels,
            open,
        }
    }

    /// Counts the close: `protocol` is what detection found (none if the connection
    /// ended first), `client` the mesh identity it came with.
    pub(crate) fn close(
        &self,
        metrics: &Metrics,
        protocol: Option<Detected>,
        client: Option<Arc<str>>,
    ) {
        let close = TcpCloseLabels {
            direction: self.labels.direction,
            listener: self.labels.listener.clone(),
            protocol: protocol.map_or("none", Detected::as_str),
            tls: tls_label(client.is_some()),
            client_id: client.map(Label),
        };
        metrics.tcp_close.get_or_create(&close).inc();
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// How a request was answered, for its response counter.
pub(crate) struct Answered {
    pub(crate) status: StatusCode,
    pub(crate) grpc_status: Option<u32>,
    /// Why the proxy answered by itself, when it did.
    pub(crate) reason: Option<Reason>,
    /// The mesh peer on the far side of the hop (see `HttpConn::peer`).
    pub(crate) peer: Option<Arc<str>>,
}

/// Records a routed request's latency (to its response head).
pub(crate) fn latency(
    metrics: &Metrics,
    route: &Route,
    dir: usize,
    status: StatusCode,
    elapsed: Duration,
) {
    let labels = &route.labels[dir];
    let make = || {
        metrics
            .latency
            .get_or_create(&LatencyLabels {
                direction: labels.direction,
                dst_service: labels.dst_service.clone(),
                status_code: status.as_u16(),
            })
            .clone()
    };
    route.latency.with(&(dir, status.as_u16()), make, |h| {
        h.observe(elapsed.as_secs_f64())
    });
}

/// Counts a routed response: a failure when it is a 5xx or carries a gRPC error status.
pub(crate) fn response(metrics: &Metrics, route: &Route, dir: usize, answered: Answered) {
    let labels = &route.labels[dir];
    let Answered {
        status,
        grpc_status,
        reason,
        peer,
    } = answered;
    let error = reason.map_or("", Reason::as_str);
    let make = || {
        let failed = status.is_server_error() || grpc_status.is_some_and(|s| s != 0);
        metrics
            .responses
            .get_or_create(&ResponseLabels {
                direction: labels.direction,
                dst_service: labels.dst_service.clone(),
                authority: labels.authority.clone(),
                status_code: status.as_u16(),
                grpc_status,
                classification: if failed { "failure" } else { "success" },
                error,
                tls: tls_label(peer.is_some()),
                peer_id: peer.clone().map(Label),
            })
            .clone()
    };
    let key = (dir, status.as_u16(), grpc_status, error, peer.clone());
    route.responses.with(&key, make, |c| {
        c.inc();
    });
}

/// A request no service took (or that policy refused): rare, so recorded on the
/// families directly.
pub(crate) fn unrouted(
    metrics: &Metrics,
    direction: Direction,
    reason: Reason,
    grpc: bool,
    peer: Option<Arc<str>>,
    elapsed: Duration,
) {
    let direction = DirectionLabel(direction);
    let unknown = Label::new("");
    let status = if grpc {
        StatusCode::OK
    } else {
        reason.status()
    };
    metrics
        .latency
        .get_or_create(&LatencyLabels {
            direction,
            dst_service: unknown.clone(),
            status_code: status.as_u16(),
        })
        .observe(elapsed.as_secs_f64());
    metrics
        .responses
        .get_or_create(&ResponseLabels {
            direction,
            dst_service: unknown.clone(),
            authority: unknown,
            status_code: status.as_u16(),
            grpc_status: grpc.then(|| reason.grpc_status()),
            classification: "failure",
            error: reason.as_str(),
            tls: tls_label(peer.is_some()),
            peer_id: peer.map(Label),
        })
        .inc();
}

/// Records a gRPC response once its trailers (or the end of its stream) arrive.
pub(crate) struct GrpcOutcome {
    pub(crate) state: Arc<State>,
    pub(crate) route: Arc<Route>,
    pub(crate) dir: usize,
    pub(crate) peer: Option<Arc<str>>,
}

impl OnGrpcEnd for GrpcOutcome {
    fn finish(self: Box<Self>, grpc_status: Option<u32>) {
        // A stream that ends without a status failed (reset, or cancelled by the client).
        let status = grpc_status.unwrap_or(2); // UNKNOWN
        response(
            &self.state.metrics,
            &self.route,
            self.dir,
            Answered {
                status: StatusCode::OK,
                grpc_status: Some(status),
                reason: None,
                peer: self.peer,
            },
        );
    }
}

/// Counts a retry that was wanted: `allowed` says whether the budget let it go.
pub(crate) fn retry(metrics: &Metrics, route: &Route, dir: usize, allowed: bool) {
    let labels = &route.labels[dir];
    metrics
        .retries
        .get_or_create(&RetryLabels {
            direction: labels.direction,
            dst_service: labels.dst_service.clone(),
            result: if allowed {
                "attempted"
            } else {
                "budget_exhausted"
            },
        })
        .inc();
}

/// Counts a request refused by one of the service's limits.
pub(crate) fn shed(metrics: &Metrics, service: &Service, limit: &'static str) {
    metrics
        .shed
        .get_or_create(&ShedLabels {
            dst_service: service.name.clone(),
            limit,
        })
        .inc();
}

pub(crate) fn rate_limited(metrics: &Metrics, service: &Service) {
    metrics
        .rate_limited
        .get_or_create(&ServiceLabels {
            dst_service: service.name.clone(),
        })
        .inc();
}
