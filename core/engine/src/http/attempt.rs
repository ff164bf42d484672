//! The tries of one request: pick an endpoint, send on a pooled connection of the
//! client's protocol, record the endpoint's outcome (latency, failure accrual), and
//! try again when the retry policy, the body and the budget all allow it.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::body::{grpc_status, UpstreamBody};
use super::forward::{ConnContext, Outcome};
use super::headers::{strip_hop_by_hop, wants_upgrade};
use super::local::Reason;
use super::replay::RequestBody;
use super::upstream::ConnectError;
use crate::balance::{Endpoint, Transition, Verdict};
use crate::detect::Detected;
use crate::metrics::{RetryLabels, ServiceLabels};
use crate::retry::{self, Failure};
use crate::route::Route;

/// A try that produced no usable response.
struct TryError {
    failure: Failure,
    reason: Reason,
    detail: String,
}

pub(super) async fn run(
    ctx: &ConnContext,
    route: &Route,
    dir: usize,
    mut req: Request<Incoming>,
    deadline: Option<Instant>,
    grpc: bool,
) -> Outcome {
    let target = &route.target;
    let policy = &target.settings.policy;
    let upgrade = ctx.protocol != Detected::Http2 && wants_upgrade(req.headers());
    let mut client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if ctx.protocol != Detected::Http2 && !parts.headers.contains_key(header::HOST) {
        // Keep the authority a client sent in absolute-form as its Host.
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, value);
        }
    }
    let max_attempts = if upgrade {
        1
    } else {
        policy.retries.max_attempts.max(1)
    };
    let (first, replay) = RequestBody::first(
        body,
        (max_attempts > 1).then_some(policy.retries.max_body_bytes),
    );
    let hash_key: Option<Bytes> = policy
        .balancer
        .hash_header
        .as_ref()
        .and_then(|name| parts.headers.get(name))
        .map(|v| Bytes::copy_from_slice(v.as_bytes()));

    let mut body = Some(first);
    let mut attempt = 0;
    let mut failed_on: Option<std::net::SocketAddr> = None;
    loop {
        attempt += 1;
        let Some(this_body) = body.take() else {
            return Outcome::Local(
                Reason::UpstreamError,
                "the request body could not be replayed".into(),
            );
        };
        let Some(endpoint) = pick_avoiding(target, hash_key.as_deref(), failed_on) else {
            return Outcome::Local(
                Reason::NoEndpoints,
                format!("service {:?} has no endpoints", target.settings.name),
            );
        };
        let request = match build(ctx.protocol, &parts, &endpoint, this_body, deadline, grpc) {
            Ok(request) => request,
            Err(e) => return Outcome::Local(Reason::UpstreamError, e),
        };
        let in_flight = endpoint.start();
        let sending = send(ctx, route, &endpoint, request, client_upgrade.take());
        let result = match target.settings.timeouts.per_try {
            Some(limit) => tokio::time::timeout(limit, sending)
                .await
                .unwrap_or_else(|_| {
                    Err(TryError {
                        failure: Failure::TryTimeout,
                        reason: Reason::Timeout,
                        detail: format!(
                            "{} did not answer within the per-try timeout {limit:?}",
                            endpoint.addr
                        ),
                    })
                }),
            None => sending.await,
        };
        // A gRPC status may only be in the trailers: read ahead to find it when the
        // answer decides a retry. Only once the request body is complete, so that a
        // stream whose server waits for the client can't stall here.
        let peek =
            grpc && attempt < max_attempts && replay.as_ref().is_some_and(|r| r.is_complete());
        let result = match result {
            Ok(response) if peek => read_ahead(response).await,
            other => other.map(|response| Answer {
                grpc_status: grpc_status(response.headers()),
                response: response.map(UpstreamBody::new),
            }),
        };
        let rtt = in_flight.finish();

        let (verdict, failure) = classify(&result);
        let transition =
            endpoint.record(verdict, rtt, policy.balancer.decay, &policy.accrual, || {
                target.balancer.may_eject()
            });
        note_transition(ctx, route, &endpoint, transition);

        if let Some(failure) = failure {
            failed_on = Some(endpoint.addr);
            let wanted =
                attempt < max_attempts && retry::retryable(&policy.retries, &parts.method, failure);
            let next = match (&replay, wanted) {
                (Some(replay), true) => replay.body().await,
                _ => None,
            };
            if let Some(next) = next {
                let allowed = target.budget.withdraw();
                count_retry(ctx, route, dir, allowed);
                if allowed {
                    body = Some(next);
                    let pause = retry::backoff(&policy.retries, attempt);
                    let pause = deadline.map_or(pause, |d| {
                        pause.min(d.saturating_duration_since(Instant::now()))
                    });
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
        }
        return match result {
            Ok(answer) => Outcome::Upstream(answer.response, endpoint.tls_identity.clone()),
            Err(e) => Outcome::Local(e.reason, e.detail),
        };
    }
}

/// An endpoint for the next try: a retry goes elsewhere than the try that just failed
/// when the service has another endpoint.
fn pick_avoiding(
    target: &crate::route::Target,
    hash_key: Option<&[u8]>,
    avoid: Option<std::net::SocketAddr>,
) -> Option<std::sync::Arc<Endpoint>> {
    let first = target.balancer.pick(hash_key)?;
    if avoid != Some(first.addr) || target.balancer.endpoints().len() < 2 {
        return Some(first);
    }
    (0..4)
        .filter_map(|_| target.balancer.pick(None))
        .find(|e| Some(e.addr) != avoid)
        .or(Some(first))
}

/// An upstream response, with its gRPC status when it is already known.
struct Answer {
    response: Response<UpstreamBody>,
    grpc_status: Option<u32>,
}

/// Reads a gRPC response's first frame: trailers there (a status and no message) are
/// the call's outcome. The frame is put back in front of the body either way.
async fn read_ahead(response: Response<Incoming>) -> Result<Answer, TryError> {
    if let Some(status) = grpc_status(response.headers()) {
        return Ok(Answer {
            grpc_status: Some(status),
            response: response.map(UpstreamBody::new),
        });
    }
    let (parts, mut body) = response.into_parts();
    match body.frame().await {
        Some(Ok(frame)) => {
            let status = frame.trailers_ref().and_then(grpc_status);
            Ok(Answer {
                grpc_status: status,
                response: Response::from_parts(parts, UpstreamBody::with_first(frame, body)),
            })
        }
        None => Ok(Answer {
            grpc_status: None,
            response: Response::from_parts(parts, UpstreamBody::new(body)),
        }),
        Some(Err(e)) => Err(TryError {
            failure: Failure::Reset,
            reason: Reason::UpstreamError,
            detail: format!("the response broke: {e}"),
        }),
    }
}

/// Whether the endpoint did its job, and what (if anything) is worth a retry.
fn classify(result: &Result<Answer, TryError>) -> (Verdict, Option<Failure>) {
    match result {
        Ok(answer) => {
            let status = answer.response.status().as_u16();
            if status >= 500 {
                return (Verdict::Failure, Some(Failure::Status(status)));
            }
            match answer.grpc_status.filter(|code| *code != 0) {
                // UNAVAILABLE says the endpoint could not serve; other codes are the
                // application's answer.
                Some(14) => (Verdict::Failure, Some(Failure::Grpc(14))),
                Some(code) => (Verdict::Success, Some(Failure::Grpc(code))),
                None => (Verdict::Success, None),
            }
        }
        Err(e) => (Verdict::Failure, Some(e.failure)),
    }
}

fn build(
    protocol: Detected,
    parts: &http::request::Parts,
    endpoint: &Endpoint,
    body: RequestBody,
    deadline: Option<Instant>,
    grpc: bool,
) -> Result<Request<RequestBody>, String> {
    let uri = if protocol == Detected::Http2 {
        // HTTP/2 carries the client's :authority; the connection picks the endpoint.
        parts.uri.clone()
    } else {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(endpoint.authority.clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(uri).map_err(|e| format!("cannot address {}: {e}", endpoint.addr))?
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    if let (true, Some(deadline)) = (grpc, deadline) {
        // The next hop gets what is left of the deadline.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .max(1);
        if let Ok(value) = HeaderValue::from_str(&format!("{left}m")) {
            request.headers_mut().insert("grpc-timeout", value);
        }
    }
    Ok(request)
}

async fn send(
    ctx: &ConnContext,
    route: &Route,
    endpoint: &Endpoint,
    request: Request<RequestBody>,
    client_upgrade: Option<OnUpgrade>,
) -> Result<Response<Incoming>, TryError> {
    let target = &route.target;
    if ctx.protocol == Detected::Http2 {
        let Ok(_waiting) = target.pending.clone().try_acquire_owned() else {
            count_shed(ctx, route, "max_pending");
            return Err(TryError {
                failure: Failure::Connect,
                reason: Reason::Shed,
                detail: format!(
                    "service {:?} has too many requests waiting",
                    target.settings.name
                ),
            });
        };
        let mut sender = endpoint.h2.sender().await.map_err(connect_error)?;
        sender.ready().await.map_err(|e| TryError {
            failure: Failure::Connect,
            reason: Reason::ConnectFailed,
            detail: format!("HTTP/2 connection to {} closed: {e}", endpoint.addr),
        })?;
        drop(_waiting);
        let mut response = sender.send_request(request).await.map_err(|e| TryError {
            failure: Failure::Reset,
            reason: Reason::UpstreamError,
            detail: format!("{}: {e}", endpoint.addr),
        })?;
        strip_hop_by_hop(response.headers_mut(), false);
        return Ok(response);
    }

    match target.http1.request(request).await {
        Ok(mut response) => {
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            strip_hop_by_hop(response.headers_mut(), switching);
            if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(bridge_upgrade(client_upgrade, upstream_upgrade));
            }
            Ok(response)
        }
        Err(e) if e.is_connect() => {
            if let Some(limit @ ConnectError::Limit { .. }) = find_source::<ConnectError>(&e) {
                count_shed(ctx, route, "max_connections");
                return Err(TryError {
                    failure: Failure::Connect,
                    reason: Reason::Shed,
                    detail: limit.to_string(),
                });
            }
            Err(TryError {
                failure: Failure::Connect,
                reason: Reason::ConnectFailed,
                detail: format!(
                    "connecting to {} failed: {}",
                    endpoint.addr,
                    source_chain(&e)
                ),
            })
        }
        Err(e) => Err(TryError {
            failure: Failure::Reset,
            reason: Reason::UpstreamError,
            detail: format!("{}: {}", endpoint.addr, source_chain(&e)),
        }),
    }
}

fn connect_error(e: ConnectError) -> TryError {
    TryError {
        failure: Failure::Connect,
        reason: Reason::ConnectFailed,
        detail: e.to_string(),
    }
}

/// Copies bytes both ways once both sides have switched protocols.
async fn bridge_upgrade(client: OnUpgrade, upstream: OnUpgrade) {
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

fn find_source<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        current = err.source();
    }
    None
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

fn note_transition(ctx: &ConnContext, route: &Route, endpoint: &Endpoint, transition: Transition) {
    let service = &route.target.settings.name;
    match transition {
        Transition::None => {}
        Transition::Ejected => {
            tracing::warn!(%service, endpoint = %endpoint.addr, "endpoint ejected after failures");
            ctx.shared
                .metrics
                .ejections
                .get_or_create(&ServiceLabels {
                    dst_service: route.target.name.clone(),
                })
                .inc();
        }
        Transition::Readmitted => {
            tracing::info!(%service, endpoint = %endpoint.addr, "endpoint readmitted after a successful probe")
        }
    }
}

fn count_retry(ctx: &ConnContext, route: &Route, dir: usize, allowed: bool) {
    let labels = &route.labels[dir];
    ctx.shared
        .metrics
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

pub(super) fn count_shed(ctx: &ConnContext, route: &Route, limit: &'static str) {
    ctx.shared
        .metrics
        .shed
        .get_or_create(&crate::metrics::ShedLabels {
            dst_service: route.target.name.clone(),
            limit,
        })
        .inc();
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let value = value.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let parse = |s: &'static str| parse_grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("123456789m"), None);
        assert_eq!(parse("m"), None);
        assert_eq!(parse("10x"), None);
    }
}
