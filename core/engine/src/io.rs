//! The stream shapes a connection takes: an accepted socket whose bytes are counted for
//! the TCP metrics ([`CountedIo`]), any stream with bytes read during detection put back
//! in front ([`Prefixed`]; an accepted connection is a [`ClientIo`]), and an HTTP/2
//! connection's stream whose writes go out together ([`Coalesced`]).

use std::io;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::ready;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An accepted connection: detection's bytes first, every byte counted.
pub(crate) type ClientIo = Prefixed<CountedIo>;

impl ClientIo {
    /// `prefix` is what detection already read from `stream` (counted here).
    pub(crate) fn accepted(
        prefix: Bytes,
        stream: TcpStream,
        read_bytes: Counter,
        write_bytes: Counter,
    ) -> Self {
        read_bytes.inc_by(prefix.len() as u64);
        Prefixed::new(
            prefix,
            CountedIo {
                stream,
                read_bytes,
                write_bytes,
            },
        )
    }
}

/// A client socket whose bytes in either direction are counted.
pub(crate) struct CountedIo {
    stream: TcpStream,
    read_bytes: Counter,
    write_bytes: Counter,
}

impl AsyncRead for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read_bytes.inc_by(n as u64);
        }
        poll
    }
}

impl AsyncWrite for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = poll {
            self.write_bytes.inc_by(n as u64);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.write_bytes.inc_by(n as u64);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A stream with bytes already read from it (during detection) put back in front.
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The bytes put back, taken out: the stream reads from its source until more are.
    pub(crate) fn take_prefix(&mut self) -> Bytes {
        std::mem::take(&mut self.prefix)
    }

    /// Puts bytes read through this stream back in front of any not yet read.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            joined.freeze()
        };
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        if this.prefix.is_empty() {
            // Release the buffer: an idle keep-alive connection shouldn't hold it.
            this.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes held back until this many bytes are waiting are sent at once.
const COALESCE_LIMIT: usize = 64 * 1024;

/// What a burst of held writes starts with, so that a small exchange's frames do not
/// grow the buffer a few bytes at a time.
const COALESCE_START: usize = 4 * 1024;

/// An HTTP/2 connection's stream: what is written is held, and goes out in one write
/// once every task has had its turn to add to it.
///
/// h2 flushes whenever its connection task runs out of queued frames, but the frames of
/// one exchange are queued by several tasks, or by one task at several turns: a response's
/// body by hyper's pipe task after its HEADERS, its trailers after its DATA, a request's
/// body as it arrives. Written as they come, a small gRPC call costs two writes each way
/// where one would carry it, and on loopback each write also pays for waking the reader. So the
/// first flush of a burst is put off by one turn of the scheduler (the task is woken and
/// h2 flushes again when it next runs), and the second writes everything held.
pub(crate) struct Coalesced<S> {
    inner: S,
    held: Vec<u8>,
    /// How much of `held` the socket has taken.
    written: usize,
    /// The flush was put off once since `held` last emptied: the next one writes.
    deferred: bool,
}

impl<S> Coalesced<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            held: Vec::new(),
            written: 0,
            deferred: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Writes out everything held. The buffer is released once empty: an idle
    /// connection holds none.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.held = Vec::new();
        self.written = 0;
        self.deferred = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: `false` when they are too many to hold, and go
    /// straight to the socket once what was held before them has.
    fn poll_room_for(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.held.len() + len > COALESCE_LIMIT {
            ready!(self.poll_write_held(cx))?;
        }
        if len > COALESCE_LIMIT {
            return Poll::Ready(Ok(false));
        }
        if self.held.is_empty() {
            self.held.reserve(len.max(COALESCE_START));
        }
        Poll::Ready(Ok(true))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(this.poll_room_for(cx, len))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            this.held.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    /// Vectored writes are copied in whole, which lets h2 hand over a DATA frame's
    /// payload with its header rather than copying it into its own buffer first.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.held.is_empty() {
            if !this.deferred {
                // Put off by one turn: the task runs again (and h2 flushes again) after
                // the tasks it woke, which may have more frames for the same write.
                this.deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_write_held(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    use super::*;

    /// A socket that takes every write whole and remembers each one.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        shut: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write(io: &mut Coalesced<Recorder>, cx: &mut Context<'_>, data: &[u8]) {
        let poll = Pin::new(io).poll_write(cx, data);
        assert!(matches!(poll, Poll::Ready(Ok(n)) if n == data.len()));
    }

    fn flush(io: &mut Coalesced<Recorder>, cx: &mut Context<'_>) {
        assert!(matches!(Pin::new(io).poll_flush(cx), Poll::Ready(Ok(()))));
    }

    #[test]
    fn writes_before_and_after_a_put_off_flush_go_out_as_one() {
        let wakes = Arc::new(CountingWaker::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Recorder::default());

        write(&mut io, &mut cx, b"HEADERS");
        flush(&mut io, &mut cx);
        assert!(io.inner.writes.is_empty(), "the first flush is put off");
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "and the task woken to flush again"
        );

        let vectored = [IoSlice::new(b"DATA"), IoSlice::new(b"payload")];
        let poll = Pin::new(&mut io).poll_write_vectored(&mut cx, &vectored);
        assert!(matches!(poll, Poll::Ready(Ok(11))));
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.writes, vec![b"HEADERSDATApayload".to_vec()]);
        assert_eq!(io.held.capacity(), 0, "an idle connection holds no buffer");

        // A flush with nothing held neither writes nor wakes; the next burst is put off again.
        flush(&mut io, &mut cx);
        write(&mut io, &mut cx, b"TRAILERS");
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.writes.len(), 1);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
        flush(&mut io, &mut cx);
        assert_eq!(io.inner.writes.len(), 2);
    }

    #[test]
    fn a_write_too_big_to_hold_follows_what_was_held() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Recorder::default());

        write(&mut io, &mut cx, b"small");
        let big = vec![7u8; COALESCE_LIMIT + 1];
        write(&mut io, &mut cx, &big);
        assert_eq!(io.inner.writes, vec![b"small".to_vec(), big]);
    }

    #[test]
    fn shutdown_writes_what_is_held_first() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Recorder::default());

        write(&mut io, &mut cx, b"GOAWAY");
        flush(&mut io, &mut cx);
        assert!(matches!(
            Pin::new(&mut io).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.inner.writes, vec![b"GOAWAY".to_vec()]);
        assert!(io.inner.shut);
    }
}
