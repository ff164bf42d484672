//! Forwarding one HTTP request: route it, pick an endpoint, send it on a pooled
//! connection of the same protocol, and record the golden metrics.
//!
//! Bodies are streamed both ways (never buffered), trailers pass through, and an
//! HTTP/1 protocol switch (`Upgrade`, e.g. WebSocket) is bridged as raw bytes.

use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::body::{grpc_status, OnGrpcEnd, ProxyBody};
use super::headers::{strip_hop_by_hop, wants_upgrade};
use super::local::{respond, Reason};
use crate::config::Direction;
use crate::detect::Detected;
use crate::metrics::{DirectionLabel, Label, LatencyLabels, Metrics, ResponseLabels, RouteLabels};
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
enum Outcome {
    Upstream(Response<Incoming>),
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

    let timeout = route.target.settings.timeouts.request;
    let outcome = match timeout {
        Some(limit) => match tokio::time::timeout(limit, forward(&ctx, &route, req)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Local(Reason::Timeout, format!("no response within {limit:?}")),
        },
        None => forward(&ctx, &route, req).await,
    };

    let metrics = &ctx.shared.metrics;
    let labels = &route.labels[dir];
    let elapsed = start.elapsed();
    let response = match outcome {
        Outcome::Local(reason, detail) => {
            tracing::debug!(service = %route.target.settings.name, reason = reason.as_str(), %detail, "local response");
            let resp = respond(reason, &detail, grpc);
            let grpc_status = grpc.then(|| grpc_status(resp.headers())).flatten();
            record_latency(metrics, labels, resp.status(), elapsed);
            record_response(metrics, labels, resp.status(), grpc_status, Some(reason));
            return Ok(resp);
        }
        Outcome::Upstream(resp) => resp,
    };
    let status = response.status();
    record_latency(metrics, labels, status, elapsed);
    // A gRPC call's outcome is in its trailers, unless the response is trailers-only.
    if grpc && status == StatusCode::OK && !response.headers().contains_key("grpc-status") {
        let on_end = Box::new(GrpcOutcome {
            shared: ctx.shared.clone(),
            labels: labels.clone(),
        });
        return Ok(response.map(|body| ProxyBody::Grpc {
            body,
            on_end: Some(on_end),
        }));
    }
    let grpc_status = grpc.then(|| grpc_status(response.headers())).flatten();
    record_response(metrics, labels, status, grpc_status, None);
    Ok(response.map(|body| ProxyBody::Upstream { body }))
}

/// Records a gRPC response once its trailers (or the end of its stream) arrive.
struct GrpcOutcome {
    shared: Arc<Shared>,
    labels: RouteLabels,
}

impl OnGrpcEnd for GrpcOutcome {
    fn finish(self: Box<Self>, grpc_status: Option<u32>) {
        // A stream that ends without a status failed (reset, or cancelled by the client).
        let status = grpc_status.unwrap_or(2); // UNKNOWN
        record_response(
            &self.shared.metrics,
            &self.labels,
            StatusCode::OK,
            Some(status),
            None,
        );
    }
}

async fn forward(ctx: &ConnContext, route: &Route, mut req: Request<Incoming>) -> Outcome {
    let target = &route.target;
    let Some(endpoint) = target.balancer.pick() else {
        return Outcome::Local(
            Reason::NoEndpoints,
            format!("service {:?} has no endpoints", target.settings.name),
        );
    };
    match ctx.protocol {
        Detected::Http2 => {
            strip_hop_by_hop(req.headers_mut(), false);
            let mut sender = match endpoint.h2.sender().await {
                Ok(sender) => sender,
                Err(e) => return Outcome::Local(Reason::ConnectFailed, e.to_string()),
            };
            if let Err(e) = sender.ready().await {
                return Outcome::Local(
                    Reason::ConnectFailed,
                    format!("HTTP/2 connection to {} closed: {e}", endpoint.addr),
                );
            }
            match sender.send_request(req).await {
                Ok(mut resp) => {
                    strip_hop_by_hop(resp.headers_mut(), false);
                    Outcome::Upstream(resp)
                }
                Err(e) => Outcome::Local(Reason::UpstreamError, format!("{}: {e}", endpoint.addr)),
            }
        }
        _ => {
            let upgrade = wants_upgrade(req.headers());
            let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
            strip_hop_by_hop(req.headers_mut(), upgrade);
            // Keep the authority a client sent in absolute-form as its Host.
            if !req.headers().contains_key(header::HOST) {
                if let Some(value) = req.uri().authority().and_then(|a| a.as_str().parse().ok()) {
                    req.headers_mut().insert(header::HOST, value);
                }
            }
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some(endpoint.authority.clone());
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            match Uri::from_parts(parts) {
                Ok(uri) => *req.uri_mut() = uri,
                Err(e) => {
                    return Outcome::Local(
                        Reason::UpstreamError,
                        format!("cannot address {}: {e}", endpoint.addr),
                    )
                }
            }
            match target.http1.request(req).await {
                Ok(mut resp) => {
                    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    strip_hop_by_hop(resp.headers_mut(), switching);
                    if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
                        let upstream_upgrade = hyper::upgrade::on(&mut resp);
                        tokio::spawn(bridge_upgrade(client_upgrade, upstream_upgrade));
                    }
                    Outcome::Upstream(resp)
                }
                Err(e) if e.is_connect() => Outcome::Local(
                    Reason::ConnectFailed,
                    format!(
                        "connecting to {} failed: {}",
                        endpoint.addr,
                        source_chain(&e)
                    ),
                ),
                Err(e) => Outcome::Local(
                    Reason::UpstreamError,
                    format!("{}: {}", endpoint.addr, source_chain(&e)),
                ),
            }
        }
    }
}

/// Copies bytes both ways once both sides have switched protocols.
async fn bridge_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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

fn record_latency(metrics: &Metrics, labels: &RouteLabels, status: StatusCode, elapsed: Duration) {
    metrics
        .latency
        .get_or_create(&LatencyLabels {
            direction: labels.direction,
            dst_service: labels.dst_service.clone(),
            status_code: status.as_u16(),
        })
        .observe(elapsed.as_secs_f64());
}

/// Counts a response: a failure when it is a 5xx or carries a gRPC error status.
fn record_response(
    metrics: &Metrics,
    labels: &RouteLabels,
    status: StatusCode,
    grpc_status: Option<u32>,
    reason: Option<Reason>,
) {
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
            error: reason.map_or("", Reason::as_str),
        })
        .inc();
}

fn record_unrouted(metrics: &Metrics, direction: Direction, grpc: bool, start: Instant) {
    let unknown = Label::new("");
    let labels = RouteLabels {
        direction: DirectionLabel(direction),
        dst_service: unknown.clone(),
        authority: unknown,
    };
    let status = Reason::UnknownService.status();
    let grpc_status = grpc.then(|| Reason::UnknownService.grpc_status());
    let status = if grpc { StatusCode::OK } else { status };
    record_latency(metrics, &labels, status, start.elapsed());
    record_response(
        metrics,
        &labels,
        status,
        grpc_status,
        Some(Reason::UnknownService),
    );
}
