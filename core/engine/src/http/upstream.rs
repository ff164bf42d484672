//! Connections to endpoints for HTTP: a keep-alive pool per service for HTTP/1
//! (hyper-util's pooled client) and one multiplexed HTTP/2 connection per endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::Timeouts;

pub type Http1Client = Client<HttpConnector, Incoming>;

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
}

/// A pooled HTTP/1 client whose connections honour the service's timeouts.
pub fn http1_client(timeouts: &Timeouts) -> Http1Client {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeouts.connect));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle)
        .pool_max_idle_per_host(256)
        .build(connector)
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

/// One shared HTTP/2 connection to an endpoint, re-established when it closes.
pub struct H2Connection {
    addr: SocketAddr,
    connect_timeout: Duration,
    current: ArcSwapOption<http2::SendRequest<Incoming>>,
    // Serialises reconnects so a burst of requests opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl H2Connection {
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            connect_timeout,
            current: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// A sender on a live connection, connecting first if there is none.
    pub async fn sender(&self) -> Result<http2::SendRequest<Incoming>, ConnectError> {
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let stream = connect_tcp(self.addr, self.connect_timeout).await?;
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

    fn live(&self) -> Option<http2::SendRequest<Incoming>> {
        let guard = self.current.load();
        guard
            .as_ref()
            .filter(|s| !s.is_closed())
            .map(|s| (**s).clone())
    }
}
