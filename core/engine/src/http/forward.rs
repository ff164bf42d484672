//! Forwarding one HTTP request: authorize it (inbound), route it, admit it (rate limit, concurrency limit),
//! give it a deadline (the request timeout, or a shorter `grpc-timeout`), hand it to
//! the tries in `attempt`, and record the golden metrics.
//!
//! Bodies are streamed both ways (only a bounded copy is kept for retries), trailers
//! pass through, and an HTTP/1 protocol switch (`Upgrade`, e.g. WebSocket) is
//! bridged as raw bytes.

use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::attempt::{count_shed, parse_grpc_timeout};
use super::body::{grpc_status, OnGrpcEnd, ProxyBody, UpstreamBody};
use super::local::{respond, Reason};
use crate::authz::{decide, Subject};
use crate::config::Direction;
use crate::detect::Detected;
use crate::metrics::{
    tls_label, DirectionLabel, Label, LatencyLabels, Metrics, ResponseLabels, ServiceLabels,
};
use crate::proxy::Shared;
use crate::route::{direction_index, Route};

/// What every request on one client connection shares.
pub struct ConnContext {
    pub shared: Arc<Shared>,
    pub direction: Direction,
    pub default_service: Option<String>,
    pub protocol: Detected,
    /// The listener's name, for authorization.
    pub listener: Arc<str>,
    /// The client's mesh identity, when it came over mesh TLS.
    pub client_id: Option<Arc<str>>,
}

/// The outcome of forwarding, before metrics are recorded.
// Moved once per request; boxing the response would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
pub(super) enum Outcome {
    /// With the identity of the meshed endpoint that answered, over mutual TLS.
    Upstream(Response<UpstreamBody>, Option<Arc<str>>),
    Local(Reason, String),
}

pub async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let start = Instant::now();
    let grpc = is_grpc(&req);
    if ctx.direction == Direction::Inbound {
        if let Some(denied) = authorize(&ctx, &req, grpc, start) {
            return Ok(denied);
        }
    }
    let route = {
        let router = ctx.shared.router.load();
        // Inbound traffic is for the local application, whatever authority it names.
        let authority = match ctx.direction {
            Direction::Inbound => None,
            Direction::Outbound => request_authority(&req),
        };
        router
            .route(authority, ctx.default_service.as_deref())
            .cloned()
    };
    let Some(route) = route else {
        let authority = request_authority(&req).unwrap_or("").to_owned();
        record_unrouted(&ctx, Reason::UnknownService, grpc, start);
        let detail = format!("no service matches authority {authority:?}");
        return Ok(respond(Reason::UnknownService, &detail, grpc));
    };
    let dir = direction_index(ctx.direction);
    route.count_request(dir, &ctx.shared.metrics);

    let outcome = admit_and_forward(&ctx, &route, dir, req, start, grpc).await;

    let metrics = &ctx.shared.metrics;
    let elapsed = start.elapsed();
    // The peer on the far side of a mesh TLS hop: the client inbound, the endpoint outbound.
    let inbound_peer = || ctx.client_id.clone();
    let response = match outcome {
        Outcome::Local(reason, detail) => {
            tracing::debug!(service = %route.target.settings.name, reason = reason.as_str(), %detail, "local response");
            let resp = respond(reason, &detail, grpc);
            let grpc_status = grpc.then(|| grpc_status(resp.headers())).flatten();
            record_latency(metrics, &route, dir, resp.status(), elapsed);
            let peer = match ctx.direction {
                Direction::Inbound => inbound_peer(),
                Direction::Outbound => None,
            };
            record_response(
                metrics,
                &route,
                dir,
                Answered {
                    status: resp.status(),
                    grpc_status,
                    reason: Some(reason),
                    peer,
                },
            );
            return Ok(resp);
        }
        Outcome::Upstream(resp, server_id) => match ctx.direction {
            Direction::Inbound => (resp, inbound_peer()),
            Direction::Outbound => (resp, server_id),
        },
    };
    let (response, peer) = response;
    let status = response.status();
    record_latency(metrics, &route, dir, status, elapsed);
    // A gRPC call's outcome is in its trailers, unless the response is trailers-only.
    if grpc && status == StatusCode::OK && !response.headers().contains_key("grpc-status") {
        let on_end = Box::new(GrpcOutcome {
            shared: ctx.shared.clone(),
            route: route.clone(),
            dir,
            peer,
        });
        return Ok(response.map(|body| ProxyBody::Grpc {
            body,
            on_end: Some(on_end),
        }));
    }
    let grpc_status = grpc.then(|| grpc_status(response.headers())).flatten();
    record_response(
        metrics,
        &route,
        dir,
        Answered {
            status,
            grpc_status,
            reason: None,
            peer,
        },
    );
    Ok(response.map(|body| ProxyBody::Upstream { body }))
}

/// Records a gRPC response once its trailers (or the end of its stream) arrive.
struct GrpcOutcome {
    shared: Arc<Shared>,
    route: Arc<Route>,
    dir: usize,
    peer: Option<Arc<str>>,
}

impl OnGrpcEnd for GrpcOutcome {
    fn finish(self: Box<Self>, grpc_status: Option<u32>) {
        // A stream that ends without a status failed (reset, or cancelled by the client).
        let status = grpc_status.unwrap_or(2); // UNKNOWN
        record_response(
            &self.shared.metrics,
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

async fn admit_and_forward(
    ctx: &ConnContext,
    route: &Route,
    dir: usize,
    req: Request<Incoming>,
    start: Instant,
    grpc: bool,
) -> Outcome {
    let target = &route.target;
    if let Some(limiter) = &target.rate_limit {
        if !limiter.try_take(ctx.client_id.as_ref()) {
            ctx.shared
                .metrics
                .rate_limited
                .get_or_create(&ServiceLabels {
                    dst_service: target.name.clone(),
                })
                .inc();
            return Outcome::Local(
                Reason::RateLimited,
                format!("service {:?} is over its rate limit", target.settings.name),
            );
        }
    }
    // Shed at once rather than queue without bound.
    let Ok(_in_flight) = target.concurrency.clone().try_acquire_owned() else {
        count_shed(ctx, route, "max_concurrent");
        return Outcome::Local(
            Reason::Shed,
            format!(
                "service {:?} has too many requests in flight",
                target.settings.name
            ),
        );
    };
    target.budget.deposit();

    let configured = target.settings.timeouts.request;
    let asked = req
        .headers()
        .get("grpc-timeout")
        .and_then(parse_grpc_timeout);
    let limit = match (configured, asked) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let deadline = limit.map(|limit| start + limit);
    let tries = super::attempt::run(ctx, route, dir, req, deadline, grpc);
    match (deadline, limit) {
        (Some(deadline), Some(limit)) => tokio::time::timeout_at(deadline, tries)
            .await
            .unwrap_or_else(|_| {
                Outcome::Local(Reason::Timeout, format!("no response within {limit:?}"))
            }),
        _ => tries.await,
    }
}

/// `:authority` (HTTP/2, or HTTP/1 absolute-form), else the `Host` header.
fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn record_latency(
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

/// How a request was answered, for its response counter.
struct Answered {
    status: StatusCode,
    grpc_status: Option<u32>,
    /// Why the proxy answered by itself, when it did.
    reason: Option<Reason>,
    peer: Option<Arc<str>>,
}

/// Counts a response: a failure when it is a 5xx or carries a gRPC error status.
fn record_response(metrics: &Metrics, route: &Route, dir: usize, answered: Answered) {
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

/// Checks an inbound request against authorization policy; a denied one gets 403
/// (gRPC PERMISSION_DENIED) naming the policy.
fn authorize(
    ctx: &ConnContext,
    req: &Request<Incoming>,
    grpc: bool,
    start: Instant,
) -> Option<Response<ProxyBody>> {
    let shared = &ctx.shared;
    let subject = Subject {
        listener: &ctx.listener,
        client: ctx.client_id.as_deref(),
        request: Some((req.method(), req.uri().path())),
    };
    let decision = decide(&shared.settings.load().authorization, &subject);
    shared.authz_counters.record(
        &shared.metrics,
        &ctx.listener,
        "http",
        ctx.client_id.as_ref(),
        &decision,
    );
    if decision.allowed {
        return None;
    }
    record_unrouted(ctx, Reason::Denied, grpc, start);
    let client = ctx
        .client_id
        .as_deref()
        .unwrap_or("an unauthenticated client");
    let detail = format!("policy {:?} does not allow {client}", decision.policy);
    let mut resp = respond(Reason::Denied, &detail, grpc);
    if let Ok(value) = http::HeaderValue::from_str(&decision.policy) {
        resp.headers_mut().insert("pymesh-policy", value);
    }
    Some(resp)
}

/// A request no service took (or that policy refused): rare, so recorded on the
/// families directly.
fn record_unrouted(ctx: &ConnContext, reason: Reason, grpc: bool, start: Instant) {
    let metrics = &ctx.shared.metrics;
    let direction = DirectionLabel(ctx.direction);
    let unknown = Label::new("");
    let status = if grpc {
        StatusCode::OK
    } else {
        reason.status()
    };
    let peer = match ctx.direction {
        Direction::Inbound => ctx.client_id.clone(),
        Direction::Outbound => None,
    };
    metrics
        .latency
        .get_or_create(&LatencyLabels {
            direction,
            dst_service: unknown.clone(),
            status_code: status.as_u16(),
        })
        .observe(start.elapsed().as_secs_f64());
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
