//! The one request a run sends over and over, prepared once and stamped out per send.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE};
use http::uri::{Authority, Scheme, Uri};
use http::{HeaderMap, HeaderValue, Method, Request, Version};
use http_body_util::Full;

use crate::config::Config;
use crate::grpc;

/// Method, URI, headers and body of the run's request (gRPC: the call, whose body is one
/// length-prefixed message). Building one clones reference-counted parts only (plus the
/// header map).
pub struct RequestTemplate {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl RequestTemplate {
    /// HTTP/1.1 sends origin-form (`/path`) with a `Host` header (the user's, else the URL's
    /// authority), and `connection: close` when every request has a connection of its own.
    /// HTTP/2 and gRPC send the authority as `:authority` (from a user `Host` header if it is
    /// a valid authority) and no `Host` header. gRPC adds `content-type: application/grpc`
    /// and `te: trailers` unless the user gave them.
    pub fn new(config: &Config) -> Self {
        let mut headers = config.headers.clone();
        let target = &config.target;
        let (uri, version) = if !config.protocol.is_http2() {
            if !headers.contains_key(HOST) {
                if let Ok(host) = HeaderValue::from_str(target.authority.as_str()) {
                    headers.insert(HOST, host);
                }
            }
            if config.new_connection {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            (Uri::from(target.path.clone()), Version::HTTP_11)
        } else {
            let authority = headers
                .remove(HOST)
                .and_then(|host| Authority::try_from(host.as_bytes()).ok())
                .unwrap_or_else(|| target.authority.clone());
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority);
            parts.path_and_query = Some(target.path.clone());
            let uri = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from(target.path.clone()));
            (uri, Version::HTTP_2)
        };
        let body = if config.protocol.is_grpc() {
            headers.entry(CONTENT_TYPE).or_insert(grpc::CONTENT_TYPE);
            headers.entry(TE).or_insert(grpc::TE);
            // The size was checked with the flags; an empty message is the fallback.
            grpc::message(config.body_size).unwrap_or_else(|| Bytes::from_static(&[0; 5]))
        } else {
            Bytes::from(vec![b'x'; config.body_size])
        };
        Self {
            method: config.method.clone(),
            uri,
            version,
            headers,
            body,
        }
    }

    /// The request body (gRPC: one length-prefixed message).
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }

    /// A fresh request.
    pub fn build(&self) -> Request<Full<Bytes>> {
        self.build_with(Full::new(self.body.clone()))
    }

    /// A fresh request with `body` instead of the template's (a gRPC stream's channel).
    pub fn build_with<B>(&self, body: B) -> Request<B> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Args;
    use clap::Parser;

    fn template(args: &[&str]) -> RequestTemplate {
        let mut argv = vec!["pymesh-loadgen", "--rate", "1"];
        argv.extend_from_slice(args);
        let config = Args::try_parse_from(argv)
            .expect("flags parse")
            .config()
            .expect("valid config");
        RequestTemplate::new(&config)
    }

    #[test]
    fn http1_uses_origin_form_and_host() {
        let r = template(&["--url", "http://127.0.0.1:9/x?y"]).build();
        assert_eq!(r.uri().to_string(), "/x?y");
        assert_eq!(r.headers()[HOST], "127.0.0.1:9");
    }

    #[test]
    fn http2_moves_host_to_authority() {
        let r = template(&[
            "--url",
            "http://127.0.0.1:9/x",
            "--protocol",
            "http2",
            "--header",
            "host: svc.local",
        ])
        .build();
        assert_eq!(r.uri().to_string(), "http://svc.local/x");
        assert!(!r.headers().contains_key(HOST));
    }

    #[test]
    fn grpc_is_a_post_with_one_framed_message() {
        let t = template(&[
            "--url",
            "http://127.0.0.1:9/echo.Echo/Unary",
            "--protocol",
            "grpc",
            "--body-size",
            "3",
        ]);
        let r = t.build();
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.version(), Version::HTTP_2);
        assert_eq!(r.uri().to_string(), "http://127.0.0.1:9/echo.Echo/Unary");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(r.headers()[TE], "trailers");
        assert_eq!(&t.body()[..], &[0, 0, 0, 0, 3, b'x', b'x', b'x']);
        let own = template(&[
            "--url",
            "http://h/",
            "--protocol",
            "grpc-stream",
            "--header",
            "content-type: application/grpc+proto",
        ])
        .build();
        assert_eq!(own.headers()[CONTENT_TYPE], "application/grpc+proto");
    }

    #[test]
    fn new_connections_close_after_one_request() {
        let r = template(&["--url", "http://h/", "--new-connection-per-request"]).build();
        assert_eq!(r.headers()[CONNECTION], "close");
        let keep = template(&["--url", "http://h/"]).build();
        assert!(!keep.headers().contains_key(CONNECTION));
    }
}
