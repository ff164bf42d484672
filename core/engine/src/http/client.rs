//! HTTP connections to a service's endpoints: a keep-alive pool per service for
//! HTTP/1 (hyper-util's pooled client) and one multiplexed HTTP/2 connection per
//! endpoint. Both connect through `connect`, so caps and mutual TLS apply alike.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::Uri;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::{Connected, Connection as ConnectionInfo};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::replay::RequestBody;
use crate::config::Timeouts;
use crate::connect::{ConnectError, Connection, Upstream};
use crate::io::Coalesced;

pub(crate) type Http1Client = Client<UpstreamConnector, RequestBody>;

/// The endpoints a service's pool may connect to, replaced as endpoints change.
pub(crate) type Upstreams = Arc<ArcSwap<HashMap<SocketAddr, Arc<Upstream>>>>;

/// A pooled HTTP/1 client whose connections honour the service's timeouts and caps.
pub(crate) fn http1_client(timeouts: &Timeouts, upstreams: Upstreams) -> Http1Client {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle)
        .pool_max_idle_per_host(256)
        .build(UpstreamConnector { upstreams })
}

/// hyper-util's connector: a request's authority is an endpoint's address, reached
/// through its [`Upstream`].
#[derive(Clone)]
pub(crate) struct UpstreamConnector {
    upstreams: Upstreams,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = PooledIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<PooledIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let addr: Option<SocketAddr> = uri.authority().and_then(|a| a.as_str().parse().ok());
        let upstream = addr.and_then(|addr| self.upstreams.load().get(&addr).cloned());
        Box::pin(async move {
            let Some(upstream) = upstream else {
                return Err(format!("{uri} is not an endpoint of this service").into());
            };
            let connection = upstream.connect().await?;
            Ok(PooledIo {
                io: TokioIo::new(connection),
            })
        })
    }
}

/// A pooled HTTP/1 connection.
pub(crate) struct PooledIo {
    io: TokioIo<Connection>,
}

impl ConnectionInfo for PooledIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for PooledIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

const UNKNOWN: u8 = 0;
const CARRIES_HTTP1: u8 = 1;
const HTTP2_ONLY: u8 = 2;

/// One shared HTTP/2 connection to an endpoint, re-established when it closes. To a
/// proxy that negotiated `tls::MESH_ALPN` it also carries HTTP/1 requests.
pub(crate) struct H2Connection {
    upstream: Arc<Upstream>,
    current: ArcSwapOption<http2::SendRequest<RequestBody>>,
    /// What the last connection negotiated: `CARRIES_HTTP1` or `HTTP2_ONLY`; `UNKNOWN`
    /// before the first.
    peer: AtomicU8,
    // Serialises reconnects so a burst of requests opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl H2Connection {
    pub(crate) fn new(upstream: Arc<Upstream>) -> Self {
        Self {
            upstream,
            current: ArcSwapOption::empty(),
            peer: AtomicU8::new(UNKNOWN),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether HTTP/1 requests go to this endpoint over this connection: `None` until a
    /// connection has been made and the peer has said.
    pub(crate) fn carries_http1(&self) -> Option<bool> {
        match self.peer.load(Ordering::Relaxed) {
            CARRIES_HTTP1 => Some(true),
            HTTP2_ONLY => Some(false),
            _ => None,
        }
    }

    pub(crate) fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// A sender on a live connection, connecting first if there is none.
    pub(crate) async fn sender(&self) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let addr = self.upstream.addr;
        let stream = self.upstream.connect().await?;
        let peer = if stream.carries_http1() {
            CARRIES_HTTP1
        } else {
            HTTP2_ONLY
        };
        self.peer.store(peer, Ordering::Relaxed);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(Coalesced::new(stream)))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
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
