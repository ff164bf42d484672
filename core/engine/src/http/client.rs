//! HTTP/2 connections to a service's endpoints: one multiplexed connection per
//! endpoint (HTTP/1 has its keep-alive pool, `pool.rs`). Both connect through
//! `connect`, so caps and mutual TLS apply alike.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::replay::RequestBody;
use crate::connect::{ConnectError, Upstream};
use crate::io::Coalesced;

/// The endpoints a service's pool may connect to, replaced as endpoints change.
pub(crate) type Upstreams = Arc<ArcSwap<HashMap<SocketAddr, Arc<Upstream>>>>;

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
