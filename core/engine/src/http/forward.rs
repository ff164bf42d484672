//! One routed HTTP request, the same in both directions: admit it (rate limit,
//! concurrency limit), give it a deadline (the request timeout, or a shorter
//! `grpc-timeout`), run its tries (`attempt`), and record the golden metrics.
//!
//! Bodies are streamed both ways (only a bounded copy is kept for retries), trailers
//! pass through, and an HTTP/1 protocol switch (`Upgrade`, e.g. WebSocket) is
//! bridged as raw bytes.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::attempt::{self, parse_grpc_timeout, TryError};
use super::body::{grpc_status, ProxyBody, UpstreamBody};
use super::local::{respond, Reason};
use super::server::HttpConn;
use crate::record::{self, Answered, GrpcOutcome};
use crate::route::{direction_index, Route};

/// Why the proxy answered a routed request itself.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("service {0:?} is over its rate limit")]
    RateLimited(String),
    #[error("service {0:?} has too many requests in flight")]
    Concurrency(String),
    #[error("service {0:?} has no endpoints")]
    NoEndpoints(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("the request body could not be replayed")]
    NotReplayable,
    #[error("cannot address {addr}: {source}")]
    Address {
        addr: std::net::SocketAddr,
        source: http::Error,
    },
    #[error(transparent)]
    Try(#[from] TryError),
}

impl Refusal {
    pub(crate) fn reason(&self) -> Reason {
        match self {
            Refusal::RateLimited(_) => Reason::RateLimited,
            Refusal::Concurrency(_) => Reason::Shed,
            Refusal::NoEndpoints(_) => Reason::NoEndpoints,
            Refusal::Timeout(_) => Reason::Timeout,
            Refusal::NotReplayable | Refusal::Address { .. } => Reason::UpstreamError,
            Refusal::Try(e) => e.reason(),
        }
    }
}

/// An upstream's answer, with the identity of the meshed endpoint that gave it.
pub(crate) struct Upstream {
    pub(crate) response: Response<UpstreamBody>,
    pub(crate) server_id: Option<Arc<str>>,
}

pub(crate) async fn forward(
    conn: &HttpConn,
    route: Arc<Route>,
    req: Request<Incoming>,
    start: Instant,
    grpc: bool,
) -> Response<ProxyBody> {
    let dir = direction_index(conn.direction);
    let metrics = &conn.state.metrics;
    route.count_request(dir, metrics);

    let outcome = admit_and_try(conn, &route, dir, req, start, grpc).await;

    let elapsed = start.elapsed();
    let Upstream {
        response,
        server_id,
    } = match outcome {
        Ok(upstream) => upstream,
        Err(refusal) => {
            let reason = refusal.reason();
            tracing::debug!(service = %route.target.settings.name, reason = reason.as_str(), detail = %refusal, "local response");
            let resp = respond(reason, &refusal, grpc);
            let grpc_status = grpc.then(|| grpc_status(resp.headers())).flatten();
            record::latency(metrics, &route, dir, resp.status(), elapsed);
            let answered = Answered {
                status: resp.status(),
                grpc_status,
                reason: Some(reason),
                peer: conn.peer(None),
            };
            record::response(metrics, &route, dir, answered);
            return resp;
        }
    };
    let peer = conn.peer(server_id);
    let status = response.status();
    record::latency(metrics, &route, dir, status, elapsed);
    // A gRPC call's outcome is in its trailers, unless the response is trailers-only.
    if grpc && status == StatusCode::OK && !response.headers().contains_key("grpc-status") {
        let on_end = Box::new(GrpcOutcome {
            state: conn.state.clone(),
            route: route.clone(),
            dir,
            peer,
        });
        return response.map(|body| ProxyBody::Grpc {
            body,
            on_end: Some(on_end),
        });
    }
    let grpc_status = grpc.then(|| grpc_status(response.headers())).flatten();
    let answered = Answered {
        status,
        grpc_status,
        reason: None,
        peer,
    };
    record::response(metrics, &route, dir, answered);
    response.map(|body| ProxyBody::Upstream { body })
}

async fn admit_and_try(
    conn: &HttpConn,
    route: &Route,
    dir: usize,
    req: Request<Incoming>,
    start: Instant,
    grpc: bool,
) -> Result<Upstream, Refusal> {
    let service = &route.target;
    let metrics = &conn.state.metrics;
    if let Some(limiter) = &service.rate_limit {
        if !limiter.try_take(conn.client_id.as_ref()) {
            record::rate_limited(metrics, service);
            return Err(Refusal::RateLimited(service.settings.name.clone()));
        }
    }
    // Shed at once rather than queue without bound.
    let Ok(_in_flight) = service.concurrency.clone().try_acquire_owned() else {
        record::shed(metrics, service, "max_concurrent");
        return Err(Refusal::Concurrency(service.settings.name.clone()));
    };
    service.budget.deposit();

    let configured = service.settings.timeouts.request;
    let asked = req
        .headers()
        .get("grpc-timeout")
        .and_then(parse_grpc_timeout);
    let limit = match (configured, asked) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let deadline = limit.map(|limit| start + limit);
    let tries = attempt::run(conn, route, dir, req, deadline, grpc);
    match (deadline, limit) {
        (Some(deadline), Some(limit)) => tokio::time::timeout_at(deadline, tries)
            .await
            .unwrap_or(Err(Refusal::Timeout(limit))),
        _ => tries.await,
    }
}

/// 404 for a request no service takes.
pub(crate) fn unrouted<B>(
    conn: &HttpConn,
    req: &Request<B>,
    grpc: bool,
    start: Instant,
) -> Response<ProxyBody> {
    let authority = super::server::request_authority(req).unwrap_or("");
    let peer = conn.peer(None);
    let metrics = &conn.state.metrics;
    record::unrouted(
        metrics,
        conn.direction,
        Reason::UnknownService,
        grpc,
        peer,
        start.elapsed(),
    );
    let detail = format!("no service matches authority {authority:?}");
    respond(Reason::UnknownService, &detail, grpc)
}
