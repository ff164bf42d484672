//! Connecting to an endpoint: TCP within the connect timeout, mutual TLS when the
//! endpoint is meshed (a meshed endpoint is never reached in plaintext), and the
//! endpoint's cap on open connections. HTTP (both versions) and opaque TCP connect
//! through here, so every protocol gets the same protection and the same limits.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::either::Either;

use crate::tls::{MeshTls, TlsError, MESH_ALPN};

/// Why an upstream connection could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connecting to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: h2::Error },
    #[error("{addr} has reached its connection limit")]
    Limit { addr: SocketAddr },
    #[error("mutual TLS with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: TlsError },
}

/// A connection to an endpoint: plain TCP, or mutual TLS to a meshed proxy.
pub(crate) type UpstreamIo = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// How to reach one endpoint. Shared by every protocol's connections to it, and kept
/// across reloads while its address, identity, timeout and cap stay the same.
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    /// The identity of a meshed endpoint, as configured.
    pub(crate) identity: Option<Arc<str>>,
    timeout: Duration,
    /// Open connections allowed (`limits.max_connections`).
    cap: Arc<Semaphore>,
    max_connections: usize,
    mesh: Option<Arc<MeshTls>>,
}

impl Upstream {
    pub(crate) fn new(
        addr: SocketAddr,
        identity: Option<Arc<str>>,
        timeout: Duration,
        max_connections: usize,
        mesh: Option<Arc<MeshTls>>,
    ) -> Self {
        Self {
            addr,
            identity,
            timeout,
            cap: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            mesh,
        }
    }

    /// Whether this can stand for an endpoint configured like this.
    pub(crate) fn same(
        &self,
        identity: &Option<Arc<str>>,
        timeout: Duration,
        max_connections: usize,
    ) -> bool {
        self.identity == *identity
            && self.timeout == timeout
            && self.max_connections == max_connections
    }

    /// The identity the endpoint proved over mutual TLS, when this proxy reaches it so.
    pub(crate) fn tls_identity(&self) -> Option<&Arc<str>> {
        self.identity.as_ref().filter(|_| self.mesh.is_some())
    }

    /// A new connection, within the cap: refused at once when the endpoint is at it.
    pub(crate) async fn connect(&self) -> Result<Connection, ConnectError> {
        let addr = self.addr;
        let permit = self
            .cap
            .clone()
            .try_acquire_owned()
            .map_err(|_| ConnectError::Limit { addr })?;
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr,
                timeout: self.timeout,
            })?
            .map_err(|source| ConnectError::Io { addr, source })?;
        crate::socket::configure(&stream);
        let mut carries_http1 = false;
        let io = match (&self.identity, &self.mesh) {
            (Some(identity), Some(mesh)) => {
                // Boxed: the handshake's state (kilobytes) is not carried by every
                // future that may connect, only while it runs.
                let tls = Box::pin(mesh.connect(stream, identity, self.timeout))
                    .await
                    .map_err(|source| ConnectError::Tls { addr, source })?;
                carries_http1 = tls.get_ref().1.alpn_protocol() == Some(MESH_ALPN);
                Either::Right(Box::new(tls))
            }
            (Some(_), None) => {
                return Err(ConnectError::Tls {
                    addr,
                    source: TlsError::NoLocalIdentity,
                })
            }
            (None, _) => Either::Left(stream),
        };
        Ok(Connection {
            io,
            carries_http1,
            _permit: permit,
        })
    }
}

/// An open connection to an endpoint, holding its slot under the cap until it closes.
pub(crate) struct Connection {
    io: UpstreamIo,
    /// The endpoint is a proxy that negotiated `tls::MESH_ALPN`: HTTP/1 requests may be
    /// carried to it over HTTP/2.
    carries_http1: bool,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    pub(crate) fn carries_http1(&self) -> bool {
        self.carries_http1
    }

    /// Lets go of the task that last polled the socket. tokio keeps that task's waker in
    /// the socket's registration until the socket is polled again, and with the waker the
    /// task's memory (a finished hyper connection's, about 2 KB); a parked socket is not
    /// polled until it is reused. No-op wakers take its place.
    pub(crate) fn release_wakers(&self) {
        let tcp = match &self.io {
            Either::Left(tcp) => tcp,
            Either::Right(tls) => tls.get_ref().0,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Ready or not, the registration now holds the no-op waker (or, when ready, none).
        let _ = tcp.poll_read_ready(&mut cx);
        let _ = tcp.poll_write_ready(&mut cx);
    }

    /// Open with nothing waiting to be read: the endpoint has neither closed it nor
    /// sent anything unasked, so a pooled connection may carry the next request.
    pub(crate) fn is_quiet(&self) -> bool {
        let fd = match &self.io {
            Either::Left(tcp) => tcp.as_raw_fd(),
            Either::Right(tls) => tls.get_ref().0.as_raw_fd(),
        };
        let mut byte = 0u8;
        // SAFETY: `fd` is this connection's open socket, and the buffer is one byte we
        // own; MSG_PEEK leaves whatever is there to be read, MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recv(
                fd,
                std::ptr::addr_of_mut!(byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Wake, Waker};

    use super::*;

    /// A task's waker, counted by its `Arc`.
    struct Task;

    impl Wake for Task {
        fn wake(self: Arc<Self>) {}
    }

    #[tokio::test]
    async fn a_parked_socket_lets_go_of_the_task_that_last_polled_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let _peer = listener.accept().await.expect("accept");
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let connection = Connection {
            io: Either::Left(stream),
            carries_http1: false,
            _permit: permit,
        };
        // A task waiting to read, as a finished hyper connection's was: its waker stays
        // with the socket's registration.
        let task = Arc::new(Task);
        let waker = Waker::from(task.clone());
        let Either::Left(tcp) = &connection.io else {
            panic!("a plain TCP connection")
        };
        assert!(tcp
            .poll_read_ready(&mut Context::from_waker(&waker))
            .is_pending());
        drop(waker);
        assert_eq!(Arc::strong_count(&task), 2, "the socket holds the waker");
        connection.release_wakers();
        assert_eq!(Arc::strong_count(&task), 1, "the waker was let go");
        assert!(connection.is_quiet());
    }
}
