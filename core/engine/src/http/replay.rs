//! Request bodies that can be sent again: the first try streams the client's body
//! through while keeping a copy (reference-counted chunks, so copying is cheap), up to
//! a size cap; a retry replays the copy once the body is complete and within the cap.
//!
//! An upstream may answer before it has read the whole body (a fast 503). The rest
//! of the client's body is then still read into the copy, so the retry can go on.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::Notify;

/// How long the rest of an abandoned body may take to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Copy {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    complete: bool,
    /// Over the cap, broken, or abandoned: it can't be replayed.
    lost: bool,
}

pub(crate) struct Shared {
    copy: Mutex<Copy>,
    settled: Notify,
    cap: usize,
}

impl Shared {
    fn record(&self, frame: Option<&Result<Frame<Bytes>, hyper::Error>>) {
        let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    copy.size += data.len();
                    if copy.size > self.cap {
                        copy.lost = true;
                        copy.chunks.clear();
                    } else if !copy.lost {
                        copy.chunks.push(data.clone());
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    copy.trailers = Some(trailers.clone());
                }
            }
            Some(Err(_)) => copy.lost = true,
            None => copy.complete = true,
        }
        if copy.complete || copy.lost {
            self.settled.notify_waiters();
        }
    }

    /// The rest of the body will never come.
    fn abandon(&self) {
        self.copy.lock().unwrap_or_else(|p| p.into_inner()).lost = true;
        self.settled.notify_waiters();
    }

    fn settled(&self) -> bool {
        let copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        copy.complete || copy.lost
    }
}

/// The kept copy of a request body, shared with the body being streamed. An empty
/// body (most requests) needs no copy, and no allocation.
#[derive(Clone)]
pub(crate) enum Replay {
    Empty,
    Copied(Arc<Shared>),
}

impl Replay {
    /// Whether the whole body has been seen and fits the cap (no waiting).
    pub(crate) fn is_complete(&self) -> bool {
        let Replay::Copied(shared) = self else {
            return true;
        };
        let copy = shared.copy.lock().unwrap_or_else(|p| p.into_inner());
        copy.complete && !copy.lost
    }

    /// A body for another try: waits for the client's body to finish arriving, and
    /// gives `None` if it was too big or broke.
    pub(crate) async fn body(&self) -> Option<RequestBody> {
        let Replay::Copied(shared) = self else {
            return Some(RequestBody::Buffered {
                chunks: VecDeque::new(),
                trailers: None,
            });
        };
        loop {
            let settled = shared.settled.notified();
            {
                let copy = shared.copy.lock().unwrap_or_else(|p| p.into_inner());
                if copy.lost {
                    return None;
                }
                if copy.complete {
                    return Some(RequestBody::Buffered {
                        chunks: copy.chunks.iter().cloned().collect(),
                        trailers: copy.trailers.clone(),
                    });
                }
            }
            settled.await;
        }
    }
}

pub(crate) enum RequestBody {
    /// The client's body, passed through as it arrives (copied when `replay` is set).
    Streaming {
        inner: Option<Incoming>,
        replay: Option<Replay>,
    },
    /// A complete body held in memory.
    Buffered {
        chunks: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

impl RequestBody {
    /// The body for the first try, and a handle for replaying it when retries are
    /// possible (`cap` is the most that will be copied).
    pub(crate) fn first(inner: Incoming, cap: Option<usize>) -> (Self, Option<Replay>) {
        if inner.is_end_stream() {
            let body = RequestBody::Buffered {
                chunks: VecDeque::new(),
                trailers: None,
            };
            return (body, cap.map(|_| Replay::Empty));
        }
        // A body announced as larger than the cap can never be replayed: don't copy it.
        let cap = cap.filter(|cap| inner.size_hint().lower() <= *cap as u64);
        let replay = cap.map(|cap| {
            Replay::Copied(Arc::new(Shared {
                copy: Mutex::new(Copy::default()),
                settled: Notify::new(),
                cap,
            }))
        });
        let body = RequestBody::Streaming {
            inner: Some(inner),
            replay: replay.clone(),
        };
        (body, replay)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming { inner, replay } => {
                let Some(body) = inner.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = std::task::ready!(Pin::new(body).poll_frame(cx));
                if let Some(Replay::Copied(shared)) = replay {
                    shared.record(frame.as_ref());
                }
                Poll::Ready(frame)
            }
            RequestBody::Buffered { chunks, trailers } => {
                if let Some(chunk) = chunks.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming { inner, .. } => {
                inner.as_ref().is_none_or(|b| b.is_end_stream())
            }
            RequestBody::Buffered { chunks, trailers } => chunks.is_empty() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming {
                inner: Some(inner), ..
            } => inner.size_hint(),
            RequestBody::Streaming { inner: None, .. } => SizeHint::with_exact(0),
            RequestBody::Buffered { chunks, trailers } if trailers.is_none() => {
                SizeHint::with_exact(chunks.iter().map(|c| c.len() as u64).sum())
            }
            RequestBody::Buffered { .. } => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Dropped half-read (the upstream answered early): read the rest into the copy.
        let RequestBody::Streaming {
            inner,
            replay: Some(Replay::Copied(shared)),
        } = self
        else {
            return;
        };
        let Some(mut body) = inner.take() else { return };
        if shared.settled() {
            return;
        }
        let shared = shared.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            shared.abandon();
            return;
        };
        runtime.spawn(async move {
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                loop {
                    let frame = body.frame().await;
                    let done = frame.is_none();
                    shared.record(frame.as_ref());
                    if done || shared.settled() {
                        return;
                    }
                }
            })
            .await;
            if drained.is_err() {
                shared.abandon();
            }
        });
    }
}
