//! The little of gRPC's wire format the load needs, without protobuf types: the 5-byte
//! length prefix of a message, counting whole messages in a response stream whose DATA
//! frames split or merge them, and a call's status from its trailers.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// Bytes before every message: a compressed flag (0 here) and the length, big-endian u32.
pub const PREFIX_LEN: usize = 5;

/// The largest message payload the 4-byte length can describe.
pub const MAX_MESSAGE: usize = u32::MAX as usize;

/// `content-type` of a gRPC call.
pub const CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// `te: trailers`, which gRPC requires of clients (proxies use it to tell gRPC apart).
pub const TE: HeaderValue = HeaderValue::from_static("trailers");

const STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// One uncompressed message of `payload_size` filler bytes, length-prefixed; `None` if the
/// size does not fit the 4-byte length.
pub fn message(payload_size: usize) -> Option<Bytes> {
    let length = u32::try_from(payload_size).ok()?;
    let mut framed = BytesMut::with_capacity(PREFIX_LEN + payload_size);
    framed.put_u8(0);
    framed.put_u32(length);
    framed.put_bytes(b'x', payload_size);
    Some(framed.freeze())
}

/// How a call ended, from its `grpc-status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// A status code (0 = OK).
    Code(u32),
    /// No `grpc-status`, or one that is not a number: the call did not end properly.
    Missing,
}

impl Status {
    pub const OK: Status = Status::Code(0);

    /// The status of a finished call: from its trailers, else from the response headers
    /// (a trailers-only response carries it there).
    pub fn of(head: &HeaderMap, trailers: Option<&HeaderMap>) -> Self {
        trailers
            .and_then(|trailers| trailers.get(STATUS))
            .or_else(|| head.get(STATUS))
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok())
            .map_or(Status::Missing, Status::Code)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Code(code) => write!(f, "{code}"),
            Status::Missing => f.write_str("missing"),
        }
    }
}

/// Counts the whole messages in a stream of bytes cut anywhere.
#[derive(Debug, Default)]
pub struct MessageCounter {
    prefix: [u8; PREFIX_LEN],
    /// Prefix bytes seen of the current message.
    prefix_seen: usize,
    /// Payload bytes still to come of the current message (once its prefix is complete).
    remaining: u64,
}

impl MessageCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the next bytes of the stream; returns how many messages they completed.
    pub fn push(&mut self, mut data: &[u8]) -> usize {
        let mut completed = 0;
        while !data.is_empty() {
            if self.prefix_seen < PREFIX_LEN {
                let take = (PREFIX_LEN - self.prefix_seen).min(data.len());
                self.prefix[self.prefix_seen..self.prefix_seen + take]
                    .copy_from_slice(&data[..take]);
                self.prefix_seen += take;
                data = &data[take..];
                if self.prefix_seen < PREFIX_LEN {
                    break;
                }
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
            } else {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.remaining -= take as u64;
                data = &data[take..];
            }
            if self.prefix_seen == PREFIX_LEN && self.remaining == 0 {
                completed += 1;
                self.prefix_seen = 0;
            }
        }
        completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_length_prefixed() {
        let m = message(3).expect("small");
        assert_eq!(&m[..], &[0, 0, 0, 0, 3, b'x', b'x', b'x']);
        assert_eq!(message(0).map(|m| m.len()), Some(PREFIX_LEN));
    }

    #[test]
    fn counts_messages_however_the_bytes_are_cut() {
        let mut stream = Vec::new();
        for size in [0, 1, 300, 7] {
            stream.extend_from_slice(&message(size).expect("small"));
        }
        for cut in [1, 2, 5, 6, 64, stream.len()] {
            let mut counter = MessageCounter::new();
            let total: usize = stream.chunks(cut).map(|c| counter.push(c)).sum();
            assert_eq!(total, 4, "cut every {cut} bytes");
        }
        let mut counter = MessageCounter::new();
        assert_eq!(counter.push(&stream[..PREFIX_LEN + 2]), 1);
        assert_eq!(counter.push(&stream[PREFIX_LEN + 2..]), 3);
    }

    #[test]
    fn status_from_trailers_or_headers() {
        let mut trailers = HeaderMap::new();
        trailers.insert(STATUS, HeaderValue::from_static("0"));
        let mut head = HeaderMap::new();
        assert_eq!(Status::of(&head, Some(&trailers)), Status::OK);
        assert_eq!(Status::of(&head, None), Status::Missing);
        head.insert(STATUS, HeaderValue::from_static("14"));
        assert_eq!(Status::of(&head, None), Status::Code(14));
        assert_eq!(Status::of(&head, Some(&HeaderMap::new())), Status::Code(14));
        trailers.insert(STATUS, HeaderValue::from_static("oops"));
        assert_eq!(
            Status::of(&HeaderMap::new(), Some(&trailers)),
            Status::Missing
        );
        assert_eq!(Status::Code(14).to_string(), "14");
    }
}
