//! Parking idle HTTP/1 client connections: a keep-alive connection that has had nothing
//! to do for [`PARK_AFTER`] gives hyper's connection state back (its 8 KiB read buffer,
//! 8 KiB write buffer and dispatcher) and waits on the bare socket; once the next
//! request's head is all here ([`wait_for_head`]), a fresh hyper connection serves it.
//! The first request of a connection is gathered the same way. An idle connection then
//! costs its socket and a few hundred bytes of task, not ~17 KiB, and neither does a
//! client that sends its head slowly: this is what lets a proxy hold thousands of idle
//! keep-alive clients, or a slowloris crowd, the way nginx does.
//!
//! hyper cannot be asked whether it is idle, so the connection watches it from outside:
//! [`Watched`] counts the bytes hyper reads and notes a write left pending, and
//! [`Guarded`] response bodies count the responses not yet finished. hyper is idle, with
//! nothing in its buffers that `into_parts` would not hand back, when every response
//! has finished, nothing was read since the last one finished, no write is pending, and
//! the last request had no body (one whose body was not read to its end is never
//! parked: what is left of it must not be taken for the next request).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::io::Prefixed;

/// How long a keep-alive connection waits with nothing to do before it is parked. Long
/// enough that a connection under steady load never is (re-creating hyper's state costs
/// a few allocations), short enough that an idle crowd shrinks within seconds.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// How long a parked connection waits for its next request before it is closed: the
/// keep-alive timeout hyper's header-read timer gave unparked connections.
pub(crate) const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(30);

/// How long the rest of a request head may take once its first bytes have come: hyper's
/// own header-read timeout, which applied before heads were gathered outside it.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The most bytes read at once while waiting for a head (see [`wait_for_head`]).
const WAKE_READ: usize = 1024;

/// What the watched stream and the response bodies of one connection tell its loop.
/// Everything happens on the connection's own task, so relaxed atomics suffice.
#[derive(Default)]
pub(crate) struct Activity {
    /// Requests started (the service was called).
    started: AtomicU64,
    /// Responses whose body finished or was dropped.
    finished: AtomicU64,
    /// Bytes hyper has read from the stream.
    read: AtomicU64,
    /// `read` when the last response finished.
    read_at_finish: AtomicU64,
    /// The last write or flush returned `Pending`: hyper still holds bytes to send.
    write_pending: AtomicBool,
    /// The last request came with a body.
    last_had_body: AtomicBool,
}

impl Activity {
    /// A request was handed to the service.
    pub(crate) fn request(&self, has_body: bool) {
        self.last_had_body.store(has_body, Relaxed);
        self.started.fetch_add(1, Relaxed);
    }

    /// hyper is between requests with nothing buffered (see the module's header).
    fn idle(&self) -> bool {
        let finished = self.finished.load(Relaxed);
        finished == self.started.load(Relaxed)
            && finished > 0
            && self.read.load(Relaxed) == self.read_at_finish.load(Relaxed)
            && !self.write_pending.load(Relaxed)
            && !self.last_had_body.load(Relaxed)
    }

    /// Which idle stretch this is: it changes whenever a response finishes.
    fn stretch(&self) -> u64 {
        self.finished.load(Relaxed)
    }

    fn response_finished(&self) {
        self.read_at_finish.store(self.read.load(Relaxed), Relaxed);
        self.finished.fetch_add(1, Relaxed);
    }
}

/// The client stream as hyper sees it: reads counted, a pending write noted.
pub(crate) struct Watched<S> {
    inner: Prefixed<S>,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: Prefixed<S>, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    fn note_write<T>(&self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.activity
            .write_pending
            .store(poll.is_pending(), Relaxed);
        poll
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.activity.read.fetch_add(n as u64, Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        self.note_write(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_write(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that tells the connection when it is done (finished or dropped).
pub(crate) struct Guarded<B> {
    body: B,
    activity: Option<Arc<Activity>>,
}

impl<B> Guarded<B> {
    pub(crate) fn new(body: B, activity: Arc<Activity>) -> Self {
        Self {
            body,
            activity: Some(activity),
        }
    }

    fn finish(&mut self) {
        if let Some(activity) = self.activity.take() {
            activity.response_finished();
        }
    }
}

impl<B> Drop for Guarded<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Drives `conn` until it ends (`Some` of its output), or until it has been idle for
/// [`PARK_AFTER`] (`None`: the caller takes its parts back). Once `shutdown` fires, asks
/// it to finish what is in flight and close (`graceful`), and never parks it.
///
/// The idle timer is not reset per request: when it fires during a newer idle stretch,
/// it is moved to that stretch's end, so a busy connection pays one timer wake a second.
pub(crate) async fn drive<C: Future + Unpin>(
    conn: &mut C,
    activity: &Activity,
    shutdown: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut C>),
) -> Option<C::Output> {
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let timer = tokio::time::sleep(PARK_AFTER);
    tokio::pin!(timer);
    // The idle stretch being timed, and when it began.
    let mut stretch: Option<(u64, Instant)> = None;
    let mut graceful = Some(graceful);
    poll_fn(|cx| {
        if graceful.is_some() && cancelled.as_mut().poll(cx).is_ready() {
            if let Some(graceful) = graceful.take() {
                graceful(Pin::new(&mut *conn));
            }
        }
        if let Poll::Ready(output) = Pin::new(&mut *conn).poll(cx) {
            return Poll::Ready(Some(output));
        }
        if graceful.is_none() || !activity.idle() {
            stretch = None;
            return Poll::Pending;
        }
        let current = activity.stretch();
        let began = match stretch {
            Some((s, began)) if s == current => began,
            _ => {
                let began = Instant::now();
                stretch = Some((current, began));
                began
            }
        };
        let due = began + PARK_AFTER;
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= due {
                return Poll::Ready(None);
            }
            timer.as_mut().reset(due);
        }
    })
    .await
}

/// Waits, without hyper, until the head of the connection's next request is all here,
/// and puts what came back in front of the stream. A connection whose client is idle or
/// sends its head slowly then holds the bytes it sent, not a hyper connection's 16 KiB of
/// buffers: this is what keeps a crowd of slow-header clients (slowloris) small.
///
/// True when hyper has something to read: a whole head, `max_head` bytes without one's
/// end (hyper answers 431), or what came before the client closed (hyper answers that).
/// False, and the connection is closed, when nothing came, when the client went quiet
/// ([`KEEP_ALIVE_IDLE`] before a request starts, [`HEAD_TIMEOUT`] once one has), or when
/// the proxy is shutting down.
pub(crate) async fn wait_for_head<S: AsyncRead + Unpin>(
    io: &mut Prefixed<S>,
    max_head: usize,
    shutdown: &CancellationToken,
) -> bool {
    let mut head = BytesMut::from(io.take_prefix());
    let mut scanned = 0;
    let mut deadline = Instant::now()
        + if head.is_empty() {
            KEEP_ALIVE_IDLE
        } else {
            HEAD_TIMEOUT
        };
    let ready = loop {
        if head_ends(&head, &mut scanned) || head.len() >= max_head {
            break true;
        }
        let read = tokio::time::timeout_at(deadline, poll_fn(|cx| read_into(io, &mut head, cx)));
        tokio::select! {
            read = read => match read {
                Ok(Ok(0)) => break !head.is_empty(),
                Ok(Ok(n)) => {
                    if head.len() == n {
                        deadline = Instant::now() + HEAD_TIMEOUT;
                    }
                }
                Ok(Err(_)) | Err(_) => break false,
            },
            () = shutdown.cancelled() => break false,
        }
    };
    io.unread(head.freeze());
    ready
}

/// Whether `head` holds the end of a request head, an empty line (after CRLF, or a bare
/// LF as hyper also accepts), looking only at what `scanned` says is new since the last call.
fn head_ends(head: &[u8], scanned: &mut usize) -> bool {
    // The last two bytes already looked at may start the end with a new byte.
    let from = scanned.saturating_sub(2);
    *scanned = head.len();
    let tail = &head[from..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Reads what is there (up to [`WAKE_READ`]) onto the end of `head`; 0 at EOF.
fn read_into<S: AsyncRead + Unpin>(
    io: &mut Prefixed<S>,
    head: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut space = [0u8; WAKE_READ];
    let mut buf = ReadBuf::new(&mut space);
    std::task::ready!(Pin::new(io).poll_read(cx, &mut buf))?;
    head.extend_from_slice(buf.filled());
    Poll::Ready(Ok(buf.filled().len()))
}

/// A parked connection's stream, back from hyper: what hyper had read but not parsed
/// goes back in front.
pub(crate) fn unpark<S>(watched: Watched<S>, read_buf: Bytes) -> Prefixed<S> {
    let mut io = watched.inner;
    io.unread(read_buf);
    io
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends_in_pieces(pieces: &[&[u8]]) -> Vec<bool> {
        let mut head = Vec::new();
        let mut scanned = 0;
        pieces
            .iter()
            .map(|piece| {
                head.extend_from_slice(piece);
                head_ends(&head, &mut scanned)
            })
            .collect()
    }

    #[test]
    fn the_end_of_a_head_is_found_however_it_is_split() {
        assert_eq!(
            ends_in_pieces(&[b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"]),
            [true]
        );
        assert_eq!(
            ends_in_pieces(&[b"GET / HTTP/1.1\r\nhost: a\r", b"\n", b"\r", b"\n"]),
            [false, false, false, true]
        );
        assert_eq!(
            ends_in_pieces(&[b"GET / HTTP/1.1\nhost: a\n", b"\n"]),
            [false, true]
        );
        assert_eq!(
            ends_in_pieces(&[b"GET / HTTP/1.1\r\n", b"host: a\r\n"]),
            [false, false]
        );
    }
}
