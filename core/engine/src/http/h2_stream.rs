//! The two halves of an upstream HTTP/2 stream, on the h2 crate: [`SendBody`] sends a
//! request body into the stream as the peer's flow-control window allows, and
//! [`RecvBody`] is the response's body, giving the window back as it is read.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::header::CONTENT_LENGTH;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::replay::RequestBody;

/// Sends a request body on its stream: a frame at a time once the window has room,
/// trailers last. It stops when the peer resets the stream (an early response) and
/// resets the stream itself when the client's body breaks.
///
/// `Unpin`, so the request's own task can poll it alongside the response, and hand it
/// to a task of its own only when the response comes before the body is all sent.
pub(crate) struct SendBody {
    body: RequestBody,
    stream: SendStream<Bytes>,
}

impl SendBody {
    pub(crate) fn new(body: RequestBody, stream: SendStream<Bytes>) -> Self {
        Self { body, stream }
    }
}

impl Future for SendBody {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            // Room for at least a byte before the next frame is taken from the client;
            // h2 holds what does not fit until the window opens.
            this.stream.reserve_capacity(1);
            if this.stream.capacity() == 0 {
                match ready!(this.stream.poll_capacity(cx)) {
                    Some(Ok(0)) => continue,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "request body not sent: the stream failed");
                        return Poll::Ready(());
                    }
                    None => return Poll::Ready(()),
                }
            } else if let Poll::Ready(reset) = this.stream.poll_reset(cx) {
                tracing::debug!(
                    ?reset,
                    "the upstream reset the stream: request body not sent"
                );
                return Poll::Ready(());
            }
            let sent = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = this.body.is_end_stream();
                        this.stream.send_data(data, end).map(|()| end)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            this.stream.reserve_capacity(0);
                            this.stream.send_trailers(trailers).map(|()| true)
                        }
                        // A kind of frame HTTP/2 cannot carry: skipped.
                        Err(_) => Ok(false),
                    },
                },
                None => {
                    this.stream.reserve_capacity(0);
                    this.stream.send_data(Bytes::new(), true).map(|()| true)
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "the client's request body broke: resetting the stream");
                    this.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
            };
            match sent {
                Ok(true) => return Poll::Ready(()),
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "request body not sent");
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A response body read from its stream. Each DATA frame read gives its bytes back to
/// the stream's window; a reset with `NO_ERROR` after the response ends the body
/// rather than failing it (RFC 9113 §8.1: the server needed no more of the request).
pub(crate) struct RecvBody {
    stream: RecvStream,
    data_done: bool,
    /// What `content-length` says is left to read, when it says.
    remaining: Option<u64>,
}

impl RecvBody {
    pub(crate) fn new(stream: RecvStream, headers: &HeaderMap) -> Self {
        let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
        let remaining = match (lengths.next(), lengths.next()) {
            (Some(only), None) => only.to_str().ok().and_then(|v| v.trim().parse().ok()),
            _ => None,
        };
        Self {
            stream,
            data_done: false,
            remaining,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    if let Some(left) = this.remaining.as_mut() {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(ended_early(e)),
                None => this.data_done = true,
            }
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(ended_early(e)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match (self.stream.is_end_stream(), self.remaining) {
            (true, _) => SizeHint::with_exact(0),
            (false, Some(left)) => SizeHint::with_exact(left),
            (false, None) => SizeHint::default(),
        }
    }
}

/// A stream error while reading: the end of the body when the peer said `NO_ERROR`.
fn ended_early(e: h2::Error) -> Option<Result<Frame<Bytes>, h2::Error>> {
    match e.reason() {
        Some(h2::Reason::NO_ERROR) => None,
        _ => Some(Err(e)),
    }
}
