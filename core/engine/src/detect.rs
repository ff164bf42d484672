//! Protocol detection from a connection's first bytes, with a timeout.
//!
//! HTTP/2 is recognised by its connection preface (prior knowledge, h2c); HTTP/1 by
//! httparse accepting a request line; anything else, or silence until the timeout
//! (a server-speaks-first protocol), is opaque TCP.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ListenerProtocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    Http1,
    Http2,
    Opaque,
}

impl Detected {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Detected::Http1 => "http1",
            Detected::Http2 => "http2",
            Detected::Opaque => "opaque",
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is decided as HTTP/1 and left to hyper's limits.
const MAX_DETECT_BYTES: usize = 8 * 1024;

/// The protocol of a connection on a listener configured for `configured`: fixed, or
/// detected from its first bytes (read into `buf`). `None` when it closed first.
pub(crate) async fn protocol<S: AsyncRead + Unpin>(
    configured: ListenerProtocol,
    io: &mut S,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Option<Detected> {
    match configured {
        ListenerProtocol::Http1 => Some(Detected::Http1),
        ListenerProtocol::Http2 => Some(Detected::Http2),
        ListenerProtocol::Opaque => Some(Detected::Opaque),
        ListenerProtocol::Detect => detect(io, buf, timeout).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "reading the first bytes failed");
            None
        }),
    }
}

/// Reads from `stream` into `buf` until the protocol is known or `timeout` passes.
/// Returns `Ok(None)` when the client closed without sending anything.
pub(crate) async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<Option<Detected>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = classify(buf) {
            return Ok(Some(found));
        }
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(0)) if buf.is_empty() => return Ok(None),
            Ok(Ok(0)) | Err(_) => return Ok(Some(classify_final(buf))),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Decides from what has arrived so far, or `None` to wait for more.
pub(crate) fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    let mut no_headers = [];
    match httparse::Request::new(&mut no_headers).parse(buf) {
        // A full request line followed by a header, or by the end of the head.
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            Some(Detected::Http1)
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_DETECT_BYTES => Some(Detected::Http1),
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(classify_final(buf)),
    }
}

/// Decides with no more bytes to come: something that starts like an HTTP method is
/// HTTP/1 (so a malformed request gets a 400 from the HTTP server), else opaque.
pub(crate) fn classify_final(buf: &[u8]) -> Detected {
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len > 0 && buf.get(method_len) == Some(&b' ') {
        Detected::Http1
    } else {
        Detected::Opaque
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_protocols() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Some(Detected::Http1)
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\n\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"GET /pa"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Detected::Opaque));
        assert_eq!(classify(b"hello\n"), Some(Detected::Opaque));
        // Malformed, but an HTTP method: the HTTP server answers it with 400.
        assert_eq!(classify(b"GET /a b c\r\n"), Some(Detected::Http1));
        assert_eq!(classify_final(b"abc"), Detected::Opaque);
        assert_eq!(classify_final(b"GET /slow"), Detected::Http1);
    }
}
