//! Connections to endpoints for HTTP: a keep-alive pool per service for HTTP/1
//! (hyper-util's pooled client, with a cap on connections per endpoint) and one
//! multiplexed HTTP/2 connection per endpoint. Connections to meshed endpoints are
//! mutual TLS (see `tls`), whatever the protocol inside.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::Uri;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::replay::RequestBody;
use crate::config::Timeouts;
use crate::io::UpstreamIo;
use crate::tls::{MeshTls, TlsError};
use tokio_util::either::Either;

pub type Http1Client = Client<LimitedConnector, RequestBody>;

/// Why an upstream connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connecting to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{addr} has reached its connection limit")]
    Limit { addr: SocketAddr },
    #[error("mutual TLS with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: TlsError },
}

/// How to reach one endpoint: its connection cap and, when meshed, its identity.
#[derive(Clone)]
pub struct EndpointConnect {
    pub cap: Arc<Semaphore>,
    pub identity: Option<Arc<str>>,
}

/// Per endpoint address, replaced as endpoints change.
pub type ConnectionLimits = Arc<ArcSwap<HashMap<SocketAddr, EndpointConnect>>>;

/// A pooled HTTP/1 client whose connections honour the service's timeouts and caps.
pub fn http1_client(
    timeouts: &Timeouts,
    limits: ConnectionLimits,
    mesh: Option<Arc<MeshTls>>,
) -> Http1Client {
    let mut inner = HttpConnector::new();
    inner.set_connect_timeout(Some(timeouts.connect));
    inner.set_nodelay(true);
    inner.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle)
        .pool_max_idle_per_host(256)
        .build(LimitedConnector {
            inner,
            limits,
            mesh,
            connect_timeout: timeouts.connect,
        })
}

/// Upgrades `stream` to mutual TLS when the endpoint is meshed (the handshake within
/// the connect timeout; a proxy without an identity cannot reach it); otherwise it
/// stays plain TCP.
pub async fn secure(
    stream: TcpStream,
    addr: SocketAddr,
    identity: Option<&str>,
    mesh: Option<&MeshTls>,
    timeout: Duration,
) -> Result<UpstreamIo, ConnectError> {
    match (identity, mesh) {
        (Some(identity), Some(mesh)) => mesh
            .connect(stream, identity, timeout)
            .await
            .map(|tls| Either::Right(Box::new(tls)))
            .map_err(|source| ConnectError::Tls { addr, source }),
        // A meshed endpoint is never reached in plaintext.
        (Some(_), None) => Err(ConnectError::Tls {
            addr,
            source: TlsError::NoLocalIdentity,
        }),
        (None, _) => Ok(Either::Left(stream)),
    }
}

/// Opens a TCP connection within the connect timeout.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout { addr, timeout })?
        .map_err(|source| ConnectError::Io { addr, source })?;
    // Latency matters more than packet count for proxied request/response traffic.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// hyper-util's connector, refusing at once when an endpoint is at its cap.
#[derive(Clone)]
pub struct LimitedConnector {
    inner: HttpConnector,
    limits: ConnectionLimits,
    mesh: Option<Arc<MeshTls>>,
    connect_timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for LimitedConnector {
    type Response = LimitedIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<LimitedIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let addr: Option<SocketAddr> = uri.authority().and_then(|a| a.as_str().parse().ok());
        let endpoint =
            addr.and_then(|addr| self.limits.load().get(&addr).cloned().map(|e| (addr, e)));
        let (permit, identity) = match endpoint {
            Some((addr, endpoint)) => match endpoint.cap.try_acquire_owned() {
                Ok(permit) => (Some(permit), endpoint.identity.map(|id| (addr, id))),
                Err(_) => return Box::pin(async move { Err(ConnectError::Limit { addr }.into()) }),
            },
            None => (None, None),
        };
        let connecting = self.inner.call(uri);
        let mesh = self.mesh.clone();
        let connect_timeout = self.connect_timeout;
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            let io = match identity {
                Some((addr, id)) => {
                    secure(stream, addr, Some(&id), mesh.as_deref(), connect_timeout).await?
                }
                None => Either::Left(stream),
            };
            Ok(LimitedIo {
                io: TokioIo::new(io),
                _permit: permit,
            })
        })
    }
}

pin_project! {
    /// A pooled connection holding its slot under the endpoint's cap until it closes.
    pub struct LimitedIo {
        #[pin]
        io: TokioIo<UpstreamIo>,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl Connection for LimitedIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl hyper::rt::Write for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
}

/// One shared HTTP/2 connection to an endpoint, re-established when it closes.
pub struct H2Connection {
    addr: SocketAddr,
    connect_timeout: Duration,
    identity: Option<Arc<str>>,
    mesh: Option<Arc<MeshTls>>,
    current: ArcSwapOption<http2::SendRequest<RequestBody>>,
    // Serialises reconnects so a burst of requests opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl H2Connection {
    pub fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        identity: Option<Arc<str>>,
        mesh: Option<Arc<MeshTls>>,
    ) -> Self {
        Self {
            addr,
            connect_timeout,
            identity,
            mesh,
            current: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// A sender on a live connection, connecting first if there is none.
    pub async fn sender(&self) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let stream = connect_tcp(self.addr, self.connect_timeout).await?;
        let stream = secure(
            stream,
            self.addr,
            self.identity.as_deref(),
            self.mesh.as_deref(),
            self.connect_timeout,
        )
        .await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: self.addr,
                source,
            })?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.current.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    fn live(&self) -> Option<http2::SendRequest<RequestBody>> {
        let guard = self.current.load();
        guard
            .as_ref()
            .filter(|s| !s.is_closed())
            .map(|s| (**s).clone())
    }
}
