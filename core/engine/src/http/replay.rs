//! Request bodies that can be sent again: the first try streams the client's body
//! through while keeping a copy (reference-counted chunks, so copying is cheap), up to
//! a size cap; a retry replays the copy if the body was complete and within the cap.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

#[derive(Default)]
struct Copy {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    complete: bool,
    too_big: bool,
}

/// The kept copy of a request body, shared with the body being streamed.
#[derive(Clone)]
pub struct Replay {
    copy: Arc<Mutex<Copy>>,
    cap: usize,
}

impl Replay {
    /// A body for another try, if the whole body was seen and fit the cap.
    pub fn body(&self) -> Option<RequestBody> {
        let copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        (copy.complete && !copy.too_big).then(|| RequestBody::Buffered {
            chunks: copy.chunks.iter().cloned().collect(),
            trailers: copy.trailers.clone(),
        })
    }
}

pin_project! {
    #[project = RequestBodyProj]
    pub enum RequestBody {
        /// The client's body, passed through as it arrives (copied when `replay` is set).
        Streaming { #[pin] inner: Incoming, replay: Option<Replay> },
        /// A complete body held in memory.
        Buffered { chunks: VecDeque<Bytes>, trailers: Option<HeaderMap> },
    }
}

impl RequestBody {
    /// The body for the first try, and a handle for replaying it when retries are possible.
    pub fn first(inner: Incoming, cap: Option<usize>) -> (Self, Option<Replay>) {
        if inner.is_end_stream() {
            let empty = RequestBody::Buffered {
                chunks: VecDeque::new(),
                trailers: None,
            };
            let replay = Replay {
                copy: Arc::new(Mutex::new(Copy {
                    complete: true,
                    ..Copy::default()
                })),
                cap: 0,
            };
            return (empty, cap.map(|_| replay));
        }
        // A body announced as larger than the cap can never be replayed: don't copy it.
        let cap = cap.filter(|cap| inner.size_hint().lower() <= *cap as u64);
        let replay = cap.map(|cap| Replay {
            copy: Arc::new(Mutex::new(Copy::default())),
            cap,
        });
        (
            RequestBody::Streaming {
                inner,
                replay: replay.clone(),
            },
            replay,
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            RequestBodyProj::Streaming { inner, replay } => {
                let frame = ready!(inner.poll_frame(cx));
                if let Some(replay) = replay {
                    let mut copy = replay.copy.lock().unwrap_or_else(|p| p.into_inner());
                    match &frame {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                copy.size += data.len();
                                if copy.size > replay.cap {
                                    copy.too_big = true;
                                    copy.chunks.clear();
                                } else if !copy.too_big {
                                    copy.chunks.push(data.clone());
                                }
                            } else if let Some(trailers) = frame.trailers_ref() {
                                copy.trailers = Some(trailers.clone());
                            }
                        }
                        Some(Err(_)) => copy.too_big = true,
                        None => copy.complete = true,
                    }
                }
                Poll::Ready(frame)
            }
            RequestBodyProj::Buffered { chunks, trailers } => {
                if let Some(chunk) = chunks.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming { inner, .. } => inner.is_end_stream(),
            RequestBody::Buffered { chunks, trailers } => chunks.is_empty() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming { inner, .. } => inner.size_hint(),
            RequestBody::Buffered { chunks, trailers } if trailers.is_none() => {
                SizeHint::with_exact(chunks.iter().map(|c| c.len() as u64).sum())
            }
            RequestBody::Buffered { .. } => SizeHint::default(),
        }
    }
}
