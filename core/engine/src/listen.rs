//! Listeners: accepting connections within the connection limit, detecting their
//! protocol, and handing them to the HTTP server or the opaque TCP forwarder.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{ListenerProtocol, ListenerSettings};
use crate::detect::{detect, Detected};
use crate::http::forward::ConnContext;
use crate::io::ClientIo;
use crate::metrics::{DirectionLabel, Label, TcpCloseLabels, TcpLabels};
use crate::proxy::Shared;

/// A running listener. Its settings may change on reload; its address may not.
pub struct Listening {
    pub settings: ArcSwap<ListenerSettings>,
    pub local_addr: SocketAddr,
    stop: CancellationToken,
}

impl Listening {
    /// Stops accepting; connections already open carry on.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Binds a listening socket now, so a reload can fail before anything changes.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    listener.into_std()
}

pub fn spawn(
    shared: Arc<Shared>,
    std_listener: std::net::TcpListener,
    settings: Arc<ListenerSettings>,
) -> std::io::Result<Arc<Listening>> {
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    let listening = Arc::new(Listening {
        local_addr: listener.local_addr()?,
        settings: ArcSwap::new(settings),
        stop: shared.shutdown.child_token(),
    });
    let limit = Arc::new(Semaphore::new(
        shared.settings.load().limits.max_connections,
    ));
    shared.tracker.spawn(accept_loop(
        shared.clone(),
        listener,
        listening.clone(),
        limit,
    ));
    Ok(listening)
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    listening: Arc<Listening>,
    limit: Arc<Semaphore>,
) {
    let addr = listening.local_addr;
    tracing::info!(%addr, name = %listening.settings.load().name, "listening");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = listening.stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Running out of file descriptors is transient: back off briefly.
                tracing::warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%addr, %peer, "connection refused: the listener's connection limit is reached");
            continue;
        };
        shared.tracker.spawn(serve_connection(
            shared.clone(),
            listening.clone(),
            stream,
            permit,
        ));
    }
    tracing::info!(%addr, "stopped listening");
}

async fn serve_connection(
    shared: Arc<Shared>,
    listening: Arc<Listening>,
    mut stream: TcpStream,
    _permit: OwnedSemaphorePermit,
) {
    let settings = listening.settings.load_full();
    let config = shared.settings.load_full();
    let _ = stream.set_nodelay(true);
    let labels = TcpLabels {
        direction: DirectionLabel(settings.direction),
        listener: Label::new(&settings.name),
    };
    let metrics = &shared.metrics;
    metrics.tcp_open.get_or_create(&labels).inc();
    let open = OpenGuard(metrics.tcp_open_connections.get_or_create(&labels).clone());
    open.0.inc();

    let mut buf = BytesMut::new();
    let protocol = match settings.protocol {
        ListenerProtocol::Http1 => Some(Detected::Http1),
        ListenerProtocol::Http2 => Some(Detected::Http2),
        ListenerProtocol::Opaque => Some(Detected::Opaque),
        ListenerProtocol::Detect => detect(&mut stream, &mut buf, config.timeouts.detect)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "reading the first bytes failed");
                None
            }),
    };
    let read_bytes = metrics.tcp_read_bytes.get_or_create(&labels).clone();
    let write_bytes = metrics.tcp_write_bytes.get_or_create(&labels).clone();
    let io = ClientIo::new(buf.freeze(), stream, read_bytes, write_bytes);

    match protocol {
        None => {}
        Some(Detected::Opaque) => {
            let route = shared
                .router
                .load()
                .route(None, settings.default_service.as_deref())
                .cloned();
            match route {
                Some(route) => crate::tcp::forward(io, route).await,
                None => {
                    tracing::info!(listener = %settings.name, "opaque connection closed: the listener has no default service")
                }
            }
        }
        Some(protocol) => {
            let ctx = Arc::new(ConnContext {
                shared: shared.clone(),
                direction: settings.direction,
                default_service: settings.default_service.clone(),
                protocol,
            });
            crate::http::server::serve(io, ctx, config.limits, shared.shutdown.clone()).await;
        }
    }
    let close = TcpCloseLabels {
        direction: labels.direction,
        listener: labels.listener,
        protocol: protocol.map_or("none", Detected::as_str),
    };
    metrics.tcp_close.get_or_create(&close).inc();
}

/// Decrements the open-connection gauge however the connection ends.
struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
