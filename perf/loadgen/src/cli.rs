//! Command-line flags, turned into a checked [`Config`].

use clap::Parser;
use http::HeaderMap;

use crate::config::{self, Config, ConfigError, Protocol, DEFAULT_OPEN_LOOP_INFLIGHT};
use crate::grpc;

/// Constant-rate, open-loop HTTP and gRPC load generator (coordinated-omission corrected, like wrk2).
#[derive(Debug, Parser)]
#[command(name = "pymesh-loadgen", version, about)]
pub struct Args {
    /// Target, http://HOST:PORT/path.
    #[arg(long)]
    pub url: String,

    /// Requests per second over all connections; 0 = closed loop (maximum throughput).
    #[arg(long)]
    pub rate: f64,

    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds of load before measuring (not recorded).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,

    /// Seconds after the stop to wait for outstanding responses (and to send, late, requests
    /// a lagging connection still owes); those still unsent or unanswered then count as
    /// errors ("timeout").
    #[arg(long, default_value_t = 1.0)]
    pub drain: f64,

    /// Keep-alive connections; the schedule is split round-robin over them. With
    /// --new-connection-per-request: the most connections open at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,

    /// The wire protocol (HTTP/2 and gRPC: prior knowledge, h2c).
    #[arg(long, value_enum, default_value_t = Protocol::Http1)]
    pub protocol: Protocol,

    /// HTTP/2 and gRPC only: most requests (grpc-stream: messages) in flight per connection
    /// (default: 128 open loop, 1 closed loop, where it is the number kept in flight).
    /// HTTP/1.1 and --new-connection-per-request always use 1.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub inflight: Option<u32>,

    /// Request method, for example GET or POST (default: GET; gRPC: always POST).
    #[arg(long)]
    pub method: Option<String>,

    /// Request body size in bytes (gRPC: the message payload, sent after the 5-byte
    /// length prefix).
    #[arg(long, default_value_t = 0)]
    pub body_size: usize,

    /// Open a new TCP connection for every request and close it after the response
    /// (HTTP/1.1 sends `connection: close`); connect time counts in the latency. Not with
    /// grpc-stream.
    #[arg(long)]
    pub new_connection_per_request: bool,

    /// Extra request header 'name: value' (repeatable), e.g. --header 'host: svc.local'.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,

    /// Runtime threads (1: a single-threaded runtime, the cheapest).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// Print one JSON object at the end instead of a text summary.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// Check the flags and build the run's configuration.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut headers = HeaderMap::new();
        for header in &self.headers {
            let (name, value) = config::parse_header(header)?;
            headers.append(name, value);
        }
        let rate = config::check_rate(self.rate)?;
        let inflight = match (self.protocol, self.inflight) {
            // One request per connection: --connections bounds the connections open at once.
            _ if self.new_connection_per_request => 1,
            (Protocol::Http1, _) => 1,
            (_, Some(n)) => n as usize,
            (_, None) if rate > 0.0 => DEFAULT_OPEN_LOOP_INFLIGHT,
            (_, None) => 1,
        };
        let method = match (self.protocol.is_grpc(), self.method.as_deref()) {
            (false, method) => config::parse_method(method.unwrap_or("GET"))?,
            (true, None) => http::Method::POST,
            (true, Some(method)) => match config::parse_method(method)? {
                http::Method::POST => http::Method::POST,
                _ => return Err(ConfigError::GrpcMethod(method.to_owned())),
            },
        };
        if self.protocol.is_grpc() && self.body_size > grpc::MAX_MESSAGE {
            return Err(ConfigError::Number {
                flag: "body-size",
                value: self.body_size.to_string(),
                expected: "a gRPC message is at most 4294967295 bytes",
            });
        }
        if self.new_connection_per_request && self.protocol == Protocol::GrpcStream {
            return Err(ConfigError::NewConnectionStream);
        }
        Ok(Config {
            url: self.url.clone(),
            target: config::parse_url(&self.url)?,
            rate,
            duration: config::parse_seconds("duration", self.duration, true)?,
            warmup: config::parse_seconds("warmup", self.warmup, false)?,
            drain: config::parse_seconds("drain", self.drain, false)?,
            connections: self.connections as usize,
            protocol: self.protocol,
            method,
            body_size: self.body_size,
            headers,
            inflight,
            new_connection: self.new_connection_per_request,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["pymesh-loadgen"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv).expect("flags parse").config()
    }

    #[test]
    fn defaults() {
        let c = parse(&["--url", "http://127.0.0.1:1/", "--rate", "100"]).expect("valid");
        assert_eq!(c.connections, 4);
        assert_eq!(c.protocol, Protocol::Http1);
        assert_eq!(c.inflight, 1);
        assert_eq!(c.method, http::Method::GET);
        assert!(!c.new_connection);
    }

    #[test]
    fn http2_inflight_defaults() {
        let open = parse(&["--url", "http://h/", "--rate", "10", "--protocol", "http2"]);
        assert_eq!(
            open.map(|c| c.inflight).ok(),
            Some(DEFAULT_OPEN_LOOP_INFLIGHT)
        );
        let closed = parse(&["--url", "http://h/", "--rate", "0", "--protocol", "http2"]);
        assert_eq!(closed.map(|c| c.inflight).ok(), Some(1));
    }

    #[test]
    fn grpc_is_post_over_http2() {
        let c =
            parse(&["--url", "http://h/", "--rate", "10", "--protocol", "grpc"]).expect("valid");
        assert_eq!(c.method, http::Method::POST);
        assert_eq!(c.inflight, DEFAULT_OPEN_LOOP_INFLIGHT);
        assert!(c.protocol.is_http2() && c.protocol.is_grpc());
        let post = parse(&[
            "--url",
            "http://h/",
            "--rate",
            "0",
            "--protocol",
            "grpc-stream",
            "--method",
            "post",
        ]);
        assert_eq!(
            post.map(|c| (c.method, c.inflight)).ok(),
            Some((http::Method::POST, 1))
        );
        let get = parse(&[
            "--url",
            "http://h/",
            "--rate",
            "10",
            "--protocol",
            "grpc",
            "--method",
            "GET",
        ]);
        assert!(get
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("always POST"));
    }

    #[test]
    fn new_connection_per_request() {
        let grpc = parse(&[
            "--url",
            "http://h/",
            "--rate",
            "10",
            "--protocol",
            "grpc",
            "--new-connection-per-request",
        ]);
        assert_eq!(grpc.map(|c| c.inflight).ok(), Some(1));
        let c = parse(&[
            "--url",
            "http://h/",
            "--rate",
            "10",
            "--new-connection-per-request",
        ]);
        assert_eq!(
            c.map(|c| (c.new_connection, c.inflight)).ok(),
            Some((true, 1))
        );
        let stream = parse(&[
            "--url",
            "http://h/",
            "--rate",
            "10",
            "--protocol",
            "grpc-stream",
            "--new-connection-per-request",
        ]);
        assert!(stream.is_err());
    }

    #[test]
    fn errors_name_the_flag() {
        let err = parse(&["--url", "http://h/", "--rate", "10", "--header", "oops"]);
        assert!(err
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("--header"));
        let err = parse(&["--url", "http://h/", "--rate", "10", "--duration", "0"]);
        assert!(err
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("--duration"));
    }
}
