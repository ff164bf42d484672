//! Listeners: accepting connections within the connection limit, detecting their
//! protocol, and handing them to the HTTP server or the opaque TCP forwarder. On an
//! INBOUND listener of a meshed proxy, mesh TLS is terminated first (the client's
//! identity is then known), and opaque TCP is checked against authorization policy.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::authz::{decide, Subject};
use crate::config::{Direction, ListenerProtocol, ListenerSettings, TlsMode};
use crate::detect::{detect, Detected};
use crate::http::forward::ConnContext;
use crate::io::{ClientIo, Prefixed};
use crate::metrics::{tls_label, DirectionLabel, Label, TcpCloseLabels, TcpLabels};
use crate::proxy::Shared;
use crate::tls::{peek_client_hello, Hello};

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
    let read_bytes = metrics.tcp_read_bytes.get_or_create(&labels).clone();
    let write_bytes = metrics.tcp_write_bytes.get_or_create(&labels).clone();

    let started = tokio::time::Instant::now();
    let detect_timeout = config.timeouts.detect;
    let mut buf = BytesMut::new();
    // Mesh TLS is terminated on INBOUND listeners of a proxy with an identity.
    let mesh = shared
        .mesh
        .as_ref()
        .filter(|_| settings.direction == Direction::Inbound && settings.tls != TlsMode::Disabled);
    let hello = match mesh {
        Some(_) => read_hello(&mut stream, &mut buf, detect_timeout).await,
        None => Hello::NotTls,
    };
    let meshed = match (&hello, mesh) {
        (Hello::Tls { sni: Some(sni) }, Some(mesh)) => *sni == mesh.sni,
        _ => false,
    };
    let conn = Conn {
        shared: &shared,
        settings: &settings,
        listener: &labels.listener.0,
        detect_timeout: detect_timeout.saturating_sub(started.elapsed()),
    };
    let mut client_id = None;
    let io = ClientIo::accepted(buf.split().freeze(), stream, read_bytes, write_bytes);
    let protocol = match mesh {
        Some(mesh) if meshed => match mesh.accept(io, HANDSHAKE_TIMEOUT).await {
            Ok((mut tls, client)) => {
                client_id = Some(client);
                let protocol = conn.protocol(&mut tls, &mut buf).await;
                let io = Prefixed::new(buf.freeze(), tls);
                conn.dispatch(io, protocol, client_id.clone()).await;
                protocol
            }
            Err(e) => {
                tracing::info!(listener = %settings.name, error = %e, "mesh TLS handshake refused");
                None
            }
        },
        _ if settings.tls == TlsMode::Strict => {
            tracing::info!(listener = %settings.name, "connection refused: the listener is STRICT and the client did not use mesh TLS");
            None
        }
        _ => {
            let mut io = io;
            let protocol = conn.protocol(&mut io, &mut buf).await;
            io.unread(buf.freeze());
            conn.dispatch(io, protocol, None).await;
            protocol
        }
    };
    let close = TcpCloseLabels {
        direction: labels.direction,
        listener: labels.listener,
        protocol: protocol.map_or("none", Detected::as_str),
        tls: tls_label(client_id.is_some()),
        client_id: client_id.map(Label),
    };
    metrics.tcp_close.get_or_create(&close).inc();
}

/// Reads until the first bytes are known to be a TLS ClientHello or not.
async fn read_hello(stream: &mut TcpStream, buf: &mut BytesMut, timeout: Duration) -> Hello {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !buf.is_empty() {
            match peek_client_hello(buf) {
                Hello::Partial if buf.len() < MAX_HELLO_BYTES => {}
                Hello::Partial => return Hello::NotTls,
                found => return found,
            }
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Closed, silent (server-speaks-first) or failed: not mesh TLS.
            _ => return Hello::NotTls,
        }
    }
}

/// The most an inbound mesh TLS handshake may take once its ClientHello is in.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A ClientHello longer than this is not one a mesh proxy sends.
const MAX_HELLO_BYTES: usize = 16 * 1024;

/// One accepted connection, once any mesh TLS is off it.
struct Conn<'a> {
    shared: &'a Arc<Shared>,
    settings: &'a ListenerSettings,
    listener: &'a Arc<str>,
    detect_timeout: Duration,
}

impl Conn<'_> {
    async fn protocol<S: AsyncRead + Unpin>(
        &self,
        io: &mut S,
        buf: &mut BytesMut,
    ) -> Option<Detected> {
        match self.settings.protocol {
            ListenerProtocol::Http1 => Some(Detected::Http1),
            ListenerProtocol::Http2 => Some(Detected::Http2),
            ListenerProtocol::Opaque => Some(Detected::Opaque),
            ListenerProtocol::Detect => {
                detect(io, buf, self.detect_timeout)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::debug!(error = %e, "reading the first bytes failed");
                        None
                    })
            }
        }
    }

    async fn dispatch<I>(&self, io: I, protocol: Option<Detected>, client_id: Option<Arc<str>>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (shared, settings) = (self.shared, self.settings);
        match protocol {
            None => {}
            Some(Detected::Opaque) => {
                if settings.direction == Direction::Inbound {
                    let subject = Subject {
                        listener: &settings.name,
                        client: client_id.as_deref(),
                        request: None,
                    };
                    let decision = decide(&shared.settings.load().authorization, &subject);
                    shared.authz_counters.record(
                        &shared.metrics,
                        self.listener,
                        "tcp",
                        client_id.as_ref(),
                        &decision,
                    );
                    if !decision.allowed {
                        tracing::info!(listener = %settings.name, policy = %decision.policy, client = ?client_id, "opaque connection denied by policy");
                        return;
                    }
                }
                let route = shared
                    .router
                    .load()
                    .route(None, settings.default_service.as_deref())
                    .cloned();
                match route {
                    Some(route) => crate::tcp::forward(io, route, shared.mesh.clone()).await,
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
                    listener: self.listener.clone(),
                    client_id,
                });
                let limits = shared.settings.load().limits;
                crate::http::server::serve(io, ctx, limits, shared.shutdown.clone()).await;
            }
        }
    }
}

/// Decrements the open-connection gauge however the connection ends.
struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
