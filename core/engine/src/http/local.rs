//! Responses the proxy makes itself, each saying why in a `pymesh-reason` header.
//! gRPC clients get a trailers-only response with a gRPC status instead of an HTTP error.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::body::ProxyBody;

pub(crate) const REASON_HEADER: &str = "pymesh-reason";

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    UnknownService,
    NoEndpoints,
    ConnectFailed,
    Timeout,
    UpstreamError,
    /// A service limit (concurrency, pending, connections) refused the request.
    Shed,
    /// An authorization policy refused the client.
    Denied,
    RateLimited,
    /// A path that path policies and the application could read differently.
    BadPath,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownService => "unknown-service",
            Reason::NoEndpoints => "no-endpoints",
            Reason::ConnectFailed => "connect-failed",
            Reason::Timeout => "timeout",
            Reason::UpstreamError => "upstream-error",
            Reason::Shed => "shed",
            Reason::RateLimited => "rate-limited",
            Reason::Denied => "denied",
            Reason::BadPath => "bad-path",
        }
    }

    pub(crate) fn status(self) -> StatusCode {
        match self {
            Reason::UnknownService => StatusCode::NOT_FOUND,
            Reason::NoEndpoints | Reason::Shed => StatusCode::SERVICE_UNAVAILABLE,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::Denied => StatusCode::FORBIDDEN,
            Reason::BadPath => StatusCode::BAD_REQUEST,
            Reason::ConnectFailed | Reason::UpstreamError => StatusCode::BAD_GATEWAY,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The gRPC status code a gRPC client should see.
    pub(crate) fn grpc_status(self) -> u32 {
        match self {
            Reason::UnknownService => 12, // UNIMPLEMENTED
            Reason::NoEndpoints | Reason::ConnectFailed | Reason::UpstreamError | Reason::Shed => {
                14
            } // UNAVAILABLE
            Reason::RateLimited => 8,     // RESOURCE_EXHAUSTED
            Reason::Denied => 7,          // PERMISSION_DENIED
            Reason::BadPath => 3,         // INVALID_ARGUMENT
            Reason::Timeout => 4,         // DEADLINE_EXCEEDED
        }
    }
}

/// A response made by the proxy; `detail` goes into the body (or grpc-message).
pub(crate) fn respond(
    reason: Reason,
    detail: &dyn std::fmt::Display,
    grpc: bool,
) -> Response<ProxyBody> {
    let mut builder = Response::builder().header(REASON_HEADER, reason.as_str());
    let body = if grpc {
        builder = builder
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", reason.grpc_status())
            .header("grpc-message", sanitize(&detail.to_string()));
        Bytes::new()
    } else {
        builder = builder
            .status(reason.status())
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8");
        Bytes::from(format!("{}: {detail}\n", reason.as_str()))
    };
    builder
        .body(ProxyBody::local(body))
        .unwrap_or_else(|_| Response::new(ProxyBody::local(Bytes::from_static(b"proxy error\n"))))
}

/// Header values must be visible ASCII; anything else is replaced.
fn sanitize(detail: &str) -> HeaderValue {
    let clean: String = detail
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("proxy error"))
}
