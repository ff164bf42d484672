//! Validated settings for one run, and the parsing of the user's URL and headers.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{HeaderMap, Method};

/// Open-loop HTTP/2 connections keep at most this many requests in flight unless told.
pub const DEFAULT_OPEN_LOOP_INFLIGHT: usize = 128;

/// The wire protocol of the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// HTTP/1.1 keep-alive: one request in flight per connection.
    Http1,
    /// HTTP/2 prior knowledge (h2c): requests multiplexed on each connection.
    Http2,
    /// gRPC unary over h2c: each request one length-prefixed message of --body-size bytes;
    /// success is HTTP 200 with `grpc-status: 0`.
    Grpc,
    /// gRPC bidirectional streaming over h2c: one long-lived call per connection; each
    /// request is one message sent and its echo received (for an echo server).
    GrpcStream,
}

impl Protocol {
    /// Whether the connection speaks HTTP/2 (prior knowledge).
    pub fn is_http2(self) -> bool {
        !matches!(self, Protocol::Http1)
    }

    /// Whether requests are gRPC calls.
    pub fn is_grpc(self) -> bool {
        matches!(self, Protocol::Grpc | Protocol::GrpcStream)
    }
}

/// Where the load goes.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port` as given (used for `Host` / `:authority` unless a header overrides it).
    pub authority: Authority,
    /// Host part, to resolve.
    pub host: String,
    pub port: u16,
    pub path: PathAndQuery,
}

/// Everything a run needs, checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// The URL as the user wrote it (for the report).
    pub url: String,
    pub target: Target,
    /// Requests per second over all connections; `0.0` means closed loop.
    pub rate: f64,
    pub duration: Duration,
    pub warmup: Duration,
    /// How long to wait for outstanding responses after the last send.
    pub drain: Duration,
    pub connections: usize,
    pub protocol: Protocol,
    pub method: Method,
    /// Request body size in bytes (gRPC: the message payload, after the 5-byte prefix).
    pub body_size: usize,
    pub headers: HeaderMap,
    /// Most requests in flight on one connection (always 1 for HTTP/1.1).
    pub inflight: usize,
    /// Open a fresh connection for every request (and close it after the response) instead
    /// of keeping `connections` connections alive; `connections` then bounds how many are
    /// open at once.
    pub new_connection: bool,
}

/// A setting the user gave that cannot work, with what would.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--url {url:?}: {reason} (expected http://HOST:PORT/path)")]
    Url { url: String, reason: String },
    #[error("--header {header:?}: {reason} (expected 'name: value')")]
    Header { header: String, reason: String },
    #[error("--method {0:?}: not an HTTP method token (for example GET or POST)")]
    Method(String),
    #[error("--method {0:?}: gRPC calls are always POST (leave --method out, or say POST)")]
    GrpcMethod(String),
    #[error("--new-connection-per-request cannot be combined with --protocol grpc-stream (a stream lives on one connection; use grpc for unary calls)")]
    NewConnectionStream,
    #[error("--{flag} {value}: {expected}")]
    Number {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// Parse `http://host[:port][/path]`.
pub fn parse_url(url: &str) -> Result<Target, ConfigError> {
    let bad = |reason: &str| ConfigError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|err: http::uri::InvalidUri| bad(&err.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("https is not supported (plain HTTP and h2c only)")),
        Some(_) => return Err(bad("the scheme must be http")),
        None => return Err(bad("missing scheme")),
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| bad("missing host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info is not supported"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    Ok(Target {
        host: host.to_owned(),
        port: authority.port_u16().unwrap_or(80),
        path: uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        authority,
    })
}

/// Parse one `name: value` header.
pub fn parse_header(header: &str) -> Result<(HeaderName, HeaderValue), ConfigError> {
    let bad = |reason: String| ConfigError::Header {
        header: header.to_owned(),
        reason,
    };
    let (name, value) = header
        .split_once(':')
        .ok_or_else(|| bad("no ':' between name and value".to_owned()))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|err| bad(format!("bad name: {err}")))?;
    let value =
        HeaderValue::from_str(value.trim()).map_err(|err| bad(format!("bad value: {err}")))?;
    Ok((name, value))
}

/// Parse an HTTP method token (case-insensitive: `get` is `GET`).
pub fn parse_method(method: &str) -> Result<Method, ConfigError> {
    Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| ConfigError::Method(method.to_owned()))
}

/// A non-negative, finite number of seconds (strictly positive if `positive`).
pub fn parse_seconds(
    flag: &'static str,
    seconds: f64,
    positive: bool,
) -> Result<Duration, ConfigError> {
    let ok = seconds.is_finite() && seconds >= 0.0 && (!positive || seconds > 0.0);
    let duration = ok
        .then(|| Duration::try_from_secs_f64(seconds).ok())
        .flatten();
    duration.ok_or(ConfigError::Number {
        flag,
        value: seconds.to_string(),
        expected: if positive {
            "expected a positive number of seconds"
        } else {
            "expected zero or a positive number of seconds"
        },
    })
}

/// A request rate: finite, `0` (closed loop) up to 10 million per second.
pub fn check_rate(rate: f64) -> Result<f64, ConfigError> {
    if rate.is_finite() && (0.0..=10_000_000.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(ConfigError::Number {
            flag: "rate",
            value: rate.to_string(),
            expected: "expected requests per second from 0 (closed loop) to 10000000",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8080/a/b?c=d").expect("valid");
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8080, "/a/b?c=d")
        );
        let t = parse_url("http://[::1]").expect("valid");
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 80, "/"));
        for bad in [
            "https://x/",
            "127.0.0.1:80",
            "ftp://x/",
            "http:///x",
            "not a url",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers() {
        let (n, v) = parse_header("Host: svc.local:80").expect("valid");
        assert_eq!(
            (n.as_str(), v.to_str().ok()),
            ("host", Some("svc.local:80"))
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }

    #[test]
    fn numbers() {
        assert!(parse_seconds("duration", 0.0, true).is_err());
        assert!(parse_seconds("duration", f64::NAN, true).is_err());
        assert_eq!(
            parse_seconds("warmup", 0.0, false).ok(),
            Some(Duration::ZERO)
        );
        assert!(check_rate(-1.0).is_err());
        assert!(check_rate(f64::INFINITY).is_err());
        assert_eq!(check_rate(0.0).ok(), Some(0.0));
        assert_eq!(parse_method("post").ok(), Some(Method::POST));
    }
}
