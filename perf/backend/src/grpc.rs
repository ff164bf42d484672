//! gRPC echo without protobuf types: the request's DATA frames are copied to the response as
//! they arrive, so every length-prefixed message comes back unchanged (streaming included),
//! and the response ends with the trailer `grpc-status: 0`.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Whether `request` is a gRPC call (`content-type: application/grpc` or `application/grpc+…`).
pub fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// The echo response to a gRPC `request`: same content type, the request body streamed back.
pub fn echo(request: Request<Incoming>) -> Response<EchoBody> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/grpc"));
    let mut response = Response::new(EchoBody::new(request.into_body()));
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    response
}

/// A response body that replays a request body's data frames, then the gRPC OK trailers.
/// The request's own trailers (if any) are dropped.
pub struct EchoBody {
    request: Incoming,
    finished: bool,
}

impl EchoBody {
    /// Echo `request`.
    pub fn new(request: Incoming) -> Self {
        Self {
            request,
            finished: false,
        }
    }
}

fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.request).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(_request_trailers) => continue,
                },
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => {
                    self.finished = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(ok_trailers()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        // The echo is as long as the request, but trailers follow: never claim an exact size,
        // or HTTP/1.1 would use content-length and drop the trailers.
        let mut hint = SizeHint::new();
        hint.set_lower(self.request.size_hint().lower());
        hint
    }
}
