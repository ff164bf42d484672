//! Forwarding one HTTP request: route it, admit it (rate limit, concurrency limit),
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
use crate::config::Direction;
use crate::detect::Detected;
use crate::metrics::{
    DirectionLabel, Label, LatencyLabels, Metrics, ResponseLabels, ServiceLabels,
};
use crate::proxy::Shared;
use crate::route::{direction_index, Route};

/// What every request on one client connection shares.
pub struct ConnContext {
    pub shared: Arc<Shared>,
    pub direction: Direction,
    pub default_service: Option<String>,
    pub protocol: Detected,
}

/// The outcome of forwarding, before metrics are recorded.
// Moved once per request; boxing the response would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
pub(super) enum Outcome {
    Upstream(Response<UpstreamBody>),
    Local(Reason, String),
}

pub async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let start = Instant::now();
    let grpc = is_grpc(&req);
    let route = {
        let router = ctx.shared.router.load();
        router
            .route(request_authority(&req), ctx.default_service.as_deref())
            .cloned()
    };
    let Some(route) = route else {
        let authority = request_authority(&req).unwrap_or("").to_owned();
        record_unrouted(&ctx.shared.metrics, ctx.direction, grpc, start);
        let detail = format!("no service matches authority {authority:?}");
        return Ok(respond(Reason::UnknownService, &detail, grpc));
    };
    let dir = direction_index(ctx.direction);
    route.count_request(dir, &ctx.shared.metrics);

    let outcome = admit_and_forward(&ctx, &route, dir, req, start, grpc).await;

    let metrics = &ctx.shared.metrics;
    let elapsed = start.elapsed();
    let response = match outcome {
        Outcome::Local(reason, detail) => {
            tracing::debug!(service = %route.target.settings.name, reason = reason.as_str(), %detail, "local response");
            let resp = respond(reason, &detail, grpc);
            let grpc_status = grpc.then(|| grpc_status(resp.headers())).flatten();
            record_latency(metrics, &route, dir, resp.status(), elapsed);
            record_response(
                metrics,
                &route,
                dir,
                resp.status(),
                grpc_status,
                Some(reason),
            );
            return Ok(resp);
        }
        Outcome::Upstream(resp) => resp,
    };
    let status = response.status();
    record_latency(metrics, &route, dir, status, elapsed);
    // A gRPC call's outcome is in its trailers, unless the response is trailers-only.
    if grpc && status == StatusCode::OK && !response.headers().contains_key("grpc-status") {
        let on_end = Box::new(GrpcOutcome {
            shared: ctx.shared.clone(),
            route: route.clone(),
            dir,
        });
        return Ok(response.map(|body| ProxyBody::Grpc {
            body,
            on_end: Some(on_end),
        }));
    }
    let grpc_status = grpc.then(|| grpc_status(response.headers())).flatten();
    record_response(metrics, &route, dir, status, grpc_status, None);
    Ok(response.map(|body| ProxyBody::Upstream { body }))
}

/// Records a gRPC response once its trailers (or the end of its stream) arrive.
struct GrpcOutcome {
    shared: Arc<Shared>,
    route: Arc<Route>,
    dir: usize,
}

impl OnGrpcEnd for GrpcOutcome {
    fn finish(self: Box<Self>, grpc_status: Option<u32>) {
        // A stream that ends without a status failed (reset, or cancelled by the client).
        let status = grpc_status.unwrap_or(2); // UNKNOWN
        record_response(
            &self.shared.metrics,
            &self.route,
            self.dir,
            StatusCode::OK,
            Some(status),
            None,
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
    if let Some(bucket) = &target.rate_limit {
        if !bucket.try_take() {
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

/// Counts a response: a failure when it is a 5xx or carries a gRPC error status.
fn record_response(
    metrics: &Metrics,
    route: &Route,
    dir: usize,
    status: StatusCode,
    grpc_status: Option<u32>,
    reason: Option<Reason>,
) {
    let labels = &route.labels[dir];
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
            })
            .clone()
    };
    let key = (dir, status.as_u16(), grpc_status, error);
    route.responses.with(&key, make, |c| {
        c.inc();
    });
}

/// A request no service took: rare, so recorded on the families directly.
fn record_unrouted(metrics: &Metrics, direction: Direction, grpc: bool, start: Instant) {
    let unknown = Label::new("");
    let status = if grpc {
        StatusCode::OK
    } else {
        Reason::UnknownService.status()
    };
    metrics
        .latency
        .get_or_create(&LatencyLabels {
            direction: DirectionLabel(direction),
            dst_service: unknown.clone(),
            status_code: status.as_u16(),
        })
        .observe(start.elapsed().as_secs_f64());
    metrics
        .responses
        .get_or_create(&ResponseLabels {
            direction: DirectionLabel(direction),
            dst_service: unknown.clone(),
            authority: unknown,
            status_code: status.as_u16(),
            grpc_status: grpc.then(|| Reason::UnknownService.grpc_status()),
            classification: "failure",
            error: Reason::UnknownService.as_str(),
        })
        .inc();
}
