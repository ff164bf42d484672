//! The response body the proxy sends: an upstream body passed through untouched, an
//! upstream gRPC body whose outcome is read from its trailers, or a local response.
//! An upstream body may start with a frame the proxy already read (to classify a gRPC
//! response before deciding on a retry).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use super::h2_stream::RecvBody;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Called once with a gRPC response's status when its stream ends: from the
/// trailers, or `None` when the stream broke or was dropped before them.
pub(crate) trait OnGrpcEnd: Send + 'static {
    fn finish(self: Box<Self>, grpc_status: Option<u32>);
}

/// An upstream response body, with the frame read ahead (if any) put back in front.
pub(crate) struct UpstreamBody {
    first: Option<Frame<Bytes>>,
    rest: Received,
}

/// A response body as its connection's protocol delivers it.
pub(crate) enum Received {
    /// From a pooled HTTP/1 connection, read by hyper.
    Http1(Incoming),
    /// From an HTTP/2 stream.
    Http2(RecvBody),
}

impl From<Incoming> for Received {
    fn from(body: Incoming) -> Self {
        Received::Http1(body)
    }
}

impl From<RecvBody> for Received {
    fn from(body: RecvBody) -> Self {
        Received::Http2(body)
    }
}

impl Received {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Received::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Received::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    /// The next frame, or the body's end.
    pub(crate) async fn frame(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Received::Http1(body) => body.is_end_stream(),
            Received::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Received::Http1(body) => body.size_hint(),
            Received::Http2(body) => body.size_hint(),
        }
    }
}

impl UpstreamBody {
    pub(crate) fn new(rest: impl Into<Received>) -> Self {
        Self {
            first: None,
            rest: rest.into(),
        }
    }

    pub(crate) fn with_first(first: Frame<Bytes>, rest: Received) -> Self {
        Self {
            first: Some(first),
            rest,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.first {
            None => self.rest.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

pin_project! {
    #[project = ProxyBodyProj]
    pub(crate) enum ProxyBody {
        Upstream { #[pin] body: UpstreamBody },
        Grpc { #[pin] body: UpstreamBody, on_end: Option<Box<dyn OnGrpcEnd>> },
        Local { #[pin] body: Full<Bytes> },
    }

    impl PinnedDrop for ProxyBody {
        fn drop(this: Pin<&mut Self>) {
            if let ProxyBodyProj::Grpc { on_end, .. } = this.project() {
                if let Some(on_end) = on_end.take() {
                    on_end.finish(None);
                }
            }
        }
    }
}

impl ProxyBody {
    pub(crate) fn local(bytes: Bytes) -> Self {
        ProxyBody::Local {
            body: Full::new(bytes),
        }
    }
}

/// The `grpc-status` in a header block, if it has one.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Upstream { body } => body.poll_frame(cx),
            ProxyBodyProj::Local { body } => body.poll_frame(cx).map_err(|never| match never {}),
            ProxyBodyProj::Grpc { body, on_end } => {
                let frame = ready!(body.poll_frame(cx));
                match &frame {
                    Some(Ok(frame)) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            if let Some(on_end) = on_end.take() {
                                on_end.finish(grpc_status(trailers));
                            }
                        }
                    }
                    Some(Err(_)) | None => {
                        if let Some(on_end) = on_end.take() {
                            on_end.finish(None);
                        }
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body } | ProxyBody::Grpc { body, .. } => body.is_end_stream(),
            ProxyBody::Local { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body } | ProxyBody::Grpc { body, .. } => body.size_hint(),
            ProxyBody::Local { body } => body.size_hint(),
        }
    }
}
