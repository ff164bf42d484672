//! The one request a run sends over and over, prepared once and stamped out per send.

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, Scheme, Uri};
use http::{HeaderMap, HeaderValue, Method, Request, Version};
use http_body_util::Full;

use crate::config::{Config, Protocol};

/// Method, URI, headers and body of the run's request. Building one clones reference-counted
/// parts only (plus the header map).
pub struct RequestTemplate {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl RequestTemplate {
    /// HTTP/1.1 sends origin-form (`/path`) with a `Host` header (the user's, else the URL's
    /// authority). HTTP/2 sends the authority as `:authority` (from a user `Host` header if it
    /// is a valid authority) and no `Host` header.
    pub fn new(config: &Config) -> Self {
        let mut headers = config.headers.clone();
        let target = &config.target;
        let (uri, version) = match config.protocol {
            Protocol::Http1 => {
                if !headers.contains_key(HOST) {
                    if let Ok(host) = HeaderValue::from_str(target.authority.as_str()) {
                        headers.insert(HOST, host);
                    }
                }
                (Uri::from(target.path.clone()), Version::HTTP_11)
            }
            Protocol::Http2 => {
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
            }
        };
        Self {
            method: config.method.clone(),
            uri,
            version,
            headers,
            body: Bytes::from(vec![b'x'; config.body_size]),
        }
    }

    /// A fresh request.
    pub fn build(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
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
}
