//! The tries of one request: pick an endpoint (a retry avoids the one that just
//! failed), send on a pooled connection of the client's protocol, record the
//! endpoint's outcome with the balancer (latency, failure accrual), and try again
//! when the retry policy, the body and the budget all allow it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::body::{grpc_status, BoxError, Received, UpstreamBody};
use super::forward::{Refusal, Upstream};
use super::headers::{strip_hop_by_hop, wants_upgrade};
use super::local::Reason;
use super::pool::PoolError;
use super::replay::RequestBody;
use super::server::HttpConn;
use crate::backoff::Backoff;
use crate::balance::{Endpoint, Verdict};
use crate::connect::ConnectError;
use crate::detect::Detected;
use crate::errors::source_chain;
use crate::record;
use crate::retry::{self, Failure};
use crate::route::Route;
use crate::tls::ORIG_PROTO;

/// Why one try produced no usable response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TryError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("service {0:?} has too many requests waiting")]
    Pending(String),
    #[error("{addr} did not answer within the per-try timeout {limit:?}")]
    PerTryTimeout { addr: SocketAddr, limit: Duration },
    #[error("HTTP/2 connection to {addr} closed: {source}")]
    Closed { addr: SocketAddr, source: h2::Error },
    #[error("{addr}: {source}")]
    Reset { addr: SocketAddr, source: h2::Error },
    #[error("{addr}: {}", source_chain(.source))]
    Http1 {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the response broke: {0}")]
    BrokenResponse(BoxError),
}

impl TryError {
    /// What the failure means for retrying.
    pub(crate) fn failure(&self) -> Failure {
        match self {
            TryError::Connect(_) | TryError::Pending(_) | TryError::Closed { .. } => {
                Failure::Connect
            }
            TryError::PerTryTimeout { .. } => Failure::TryTimeout,
            TryError::Reset { .. } | TryError::Http1 { .. } | TryError::BrokenResponse(_) => {
                Failure::Reset
            }
        }
    }

    /// What the client is told, when this was the last try.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            TryError::Connect(ConnectError::Limit { .. }) | TryError::Pending(_) => Reason::Shed,
            TryError::Connect(_) | TryError::Closed { .. } => Reason::ConnectFailed,
            TryError::PerTryTimeout { .. } => Reason::Timeout,
            TryError::Reset { .. } | TryError::Http1 { .. } | TryError::BrokenResponse(_) => {
                Reason::UpstreamError
            }
        }
    }
}

pub(super) async fn run(
    conn: &HttpConn,
    route: &Route,
    dir: usize,
    mut req: Request<Incoming>,
    deadline: Option<Instant>,
    grpc: bool,
) -> Result<Upstream, Refusal> {
    let service = &route.target;
    let policy = &service.settings.policy;
    let metrics = &conn.state.metrics;
    let client_h2 = conn.protocol == Detected::Http2;
    let upgrade = !client_h2 && wants_upgrade(req.headers());
    let mut client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // The mark is the proxies' own: honoured only from a peer proxy that negotiated it,
    // removed from every request either way.
    let marked = parts.headers.remove(ORIG_PROTO);
    let carried = if client_h2 && conn.carries_http1 {
        marked.as_ref().and_then(http1_version)
    } else {
        None
    };
    if let Some(version) = carried {
        // An HTTP/1 request a peer proxy carried over HTTP/2: HTTP/1 again from here.
        parts.version = version;
    }
    let http1 = !client_h2 || carried.is_some();
    if http1 && !parts.headers.contains_key(header::HOST) {
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
    let backoff = Backoff::new(policy.retries.backoff_base, policy.retries.backoff_max);

    let mut body = Some(first);
    let mut attempt = 0;
    let mut failed_on: Option<SocketAddr> = None;
    loop {
        attempt += 1;
        let this_body = body.take().ok_or(Refusal::NotReplayable)?;
        let endpoint = service
            .balancer
            .pick_avoiding(hash_key.as_deref(), failed_on)
            .ok_or_else(|| Refusal::NoEndpoints(service.settings.name.clone()))?;
        // Outbound HTTP/1 to a proxy that negotiated it travels on its HTTP/2 connection.
        let over_h2 = http1
            && carried.is_none()
            && !upgrade
            && parts.method != http::Method::CONNECT
            && carries_http1(route, &endpoint).await;
        let wire = if over_h2 {
            Wire::Http1OverHttp2
        } else if http1 {
            Wire::Http1
        } else {
            Wire::Http2
        };
        let request = build(wire, &parts, &endpoint, this_body, deadline, grpc)?;
        let in_flight = endpoint.start();
        let sending = send(conn, route, &endpoint, wire, request, client_upgrade.take());
        let result =
            match service.settings.timeouts.per_try {
                Some(limit) => tokio::time::timeout(limit, sending).await.unwrap_or(Err(
                    TryError::PerTryTimeout {
                        addr: endpoint.addr,
                        limit,
                    },
                )),
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
        service.balancer.record(&endpoint, verdict, rtt);

        if let Some(failure) = failure {
            failed_on = Some(endpoint.addr);
            let wanted =
                attempt < max_attempts && retry::retryable(&policy.retries, &parts.method, failure);
            let next = match (&replay, wanted) {
                (Some(replay), true) => replay.body().await,
                _ => None,
            };
            if let Some(next) = next {
                let allowed = service.budget.withdraw();
                record::retry(metrics, route, dir, allowed);
                if allowed {
                    body = Some(next);
                    let pause = backoff.pause(attempt);
                    let pause = deadline.map_or(pause, |d| {
                        pause.min(d.saturating_duration_since(Instant::now()))
                    });
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
        }
        let answer = result?;
        let server_id = service
            .upstream(&endpoint)
            .and_then(|u| u.tls_identity().cloned());
        return Ok(Upstream {
            response: answer.response,
            server_id,
        });
    }
}

/// An upstream response, with its gRPC status when it is already known.
struct Answer {
    response: Response<UpstreamBody>,
    grpc_status: Option<u32>,
}

/// Reads a gRPC response's first frame: trailers there (a status and no message) are
/// the call's outcome. The frame is put back in front of the body either way.
async fn read_ahead(response: Response<Received>) -> Result<Answer, TryError> {
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
        Some(Err(e)) => Err(TryError::BrokenResponse(e)),
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
        Err(e) => (Verdict::Failure, Some(e.failure())),
    }
}

/// How one try travels to its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// On the service's pooled HTTP/1 connections.
    Http1,
    /// On the endpoint's HTTP/2 connection.
    Http2,
    /// An HTTP/1 request on the endpoint's HTTP/2 connection to a peer proxy, marked
    /// with [`ORIG_PROTO`]; the peer delivers it as HTTP/1.
    Http1OverHttp2,
}

/// Whether `endpoint` is a proxy that takes HTTP/1 over HTTP/2: known from the last
/// connection to it, else learned by making one (an endpoint that cannot be reached is
/// left to the HTTP/1 path, whose error the client then gets).
async fn carries_http1(route: &Route, endpoint: &Endpoint) -> bool {
    // The endpoint's HTTP/2 connection holds its upstream: no lookup in the shared table.
    let Some(h2) = route
        .target
        .h2(endpoint)
        .filter(|h2| h2.upstream().tls_identity().is_some())
    else {
        return false;
    };
    match h2.carries_http1() {
        Some(known) => known,
        None => h2.sender().await.is_ok() && h2.carries_http1() == Some(true),
    }
}

/// `HTTP/1.1` or `HTTP/1.0` in an [`ORIG_PROTO`] mark.
fn http1_version(mark: &HeaderValue) -> Option<Version> {
    match mark.as_bytes() {
        b"HTTP/1.1" => Some(Version::HTTP_11),
        b"HTTP/1.0" => Some(Version::HTTP_10),
        _ => None,
    }
}

fn build(
    wire: Wire,
    parts: &http::request::Parts,
    endpoint: &Endpoint,
    body: RequestBody,
    deadline: Option<Instant>,
    grpc: bool,
) -> Result<Request<RequestBody>, Refusal> {
    let uri = if wire == Wire::Http2 {
        // HTTP/2 carries the client's :authority; the connection picks the endpoint.
        parts.uri.clone()
    } else {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        // Carried over HTTP/2, the Host travels as :authority (the peer puts it back).
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok());
        uri.authority = match (wire, host) {
            (Wire::Http1OverHttp2, Some(host)) => Some(host),
            _ => Some(endpoint.authority.clone()),
        };
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(uri).map_err(|e| Refusal::Address {
            addr: endpoint.addr,
            source: e.into(),
        })?
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    if wire == Wire::Http1OverHttp2 {
        let mark = if parts.version == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        request.headers_mut().remove(header::HOST);
        request
            .headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static(mark));
        *request.version_mut() = Version::HTTP_2;
    }
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
    conn: &HttpConn,
    route: &Route,
    endpoint: &Endpoint,
    wire: Wire,
    request: Request<RequestBody>,
    client_upgrade: Option<OnUpgrade>,
) -> Result<Response<Received>, TryError> {
    let service = &route.target;
    let metrics = &conn.state.metrics;
    let addr = endpoint.addr;
    if wire != Wire::Http1 {
        let Ok(_waiting) = service.pending.clone().try_acquire_owned() else {
            record::shed(metrics, service, "max_pending");
            return Err(TryError::Pending(service.settings.name.clone()));
        };
        let h2 = service.h2(endpoint).ok_or(ConnectError::Io {
            addr,
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        let sender = h2.sender().await.inspect_err(|e| {
            if matches!(e, ConnectError::Limit { .. }) {
                record::shed(metrics, service, "max_connections");
            }
        })?;
        let sender = sender
            .ready()
            .await
            .map_err(|source| TryError::Closed { addr, source })?;
        let stream = sender
            .open(request)
            .await
            .map_err(|source| TryError::Reset { addr, source })?;
        drop(_waiting);
        let mut response = stream
            .response()
            .await
            .map_err(|source| TryError::Reset { addr, source })?;
        strip_hop_by_hop(response.headers_mut(), false);
        if wire == Wire::Http1OverHttp2 {
            // Back to an HTTP/1 client.
            *response.version_mut() = Version::HTTP_11;
        }
        return Ok(response.map(Received::from));
    }

    match service.http1.request(addr, request).await {
        Ok(mut response) => {
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            strip_hop_by_hop(response.headers_mut(), switching);
            if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(bridge_upgrade(client_upgrade, upstream_upgrade));
            }
            Ok(response.map(Received::from))
        }
        Err(PoolError::Connect(e)) => {
            if matches!(e, ConnectError::Limit { .. }) {
                record::shed(metrics, service, "max_connections");
            }
            Err(e.into())
        }
        Err(PoolError::Http(e)) => Err(TryError::Http1 { addr, source: e }),
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

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
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

#[cfg(test)]
mod outcome_tests {
    use super::*;

    #[test]
    fn failures_are_typed_for_retries_and_for_the_client() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let limit = TryError::Connect(ConnectError::Limit { addr });
        assert_eq!(limit.failure(), Failure::Connect);
        assert_eq!(limit.reason(), Reason::Shed);
        let refused = TryError::Connect(ConnectError::Io {
            addr,
            source: std::io::ErrorKind::ConnectionRefused.into(),
        });
        assert_eq!(refused.failure(), Failure::Connect);
        assert_eq!(refused.reason(), Reason::ConnectFailed);
        assert!(refused
            .to_string()
            .contains("connecting to 127.0.0.1:1 failed"));
        let slow = TryError::PerTryTimeout {
            addr,
            limit: Duration::from_millis(5),
        };
        assert_eq!(slow.failure(), Failure::TryTimeout);
        assert_eq!(slow.reason(), Reason::Timeout);
        assert_eq!(
            TryError::Pending("web".into()).reason(),
            Reason::Shed,
            "a full queue sheds"
        );
    }
}
