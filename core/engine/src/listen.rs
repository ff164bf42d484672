//! Listeners: binding, accepting connections within the connection limit, and handing
//! each one to its direction's pipeline (`inbound` or `outbound`) with the settings it
//! is decided by. A connection keeps no config snapshot: an HTTP request reads the one
//! in force when it arrives, and an opaque connection the one in force once it has been
//! detected, so a long-lived connection never pins a config every reload has replaced.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Direction, Limits, ListenerProtocol, ListenerSettings};
use crate::detect::Detected;
use crate::record::ConnectionRecord;
use crate::state::State;

/// A running listener. Its settings may change on reload; its address may not.
pub(crate) struct Listening {
    pub(crate) settings: ArcSwap<ListenerSettings>,
    pub(crate) local_addr: SocketAddr,
    stop: CancellationToken,
}

impl Listening {
    /// Stops accepting; connections already open carry on.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

/// An accepted connection, as a pipeline receives it (with its socket).
pub(crate) struct Accepted {
    pub(crate) state: Arc<State>,
    pub(crate) listener: Arc<ListenerSettings>,
    /// The header limits of the config in force when the connection arrived.
    pub(crate) limits: Limits,
    /// How long detection (and TLS termination before it) may take, from `accepted_at`.
    pub(crate) detect: std::time::Duration,
    pub(crate) accepted_at: Instant,
    /// The listener's name, shared with metrics and authorization.
    pub(crate) name: Arc<str>,
    pub(crate) open: Open,
    /// On a transparent listener, the address the client dialed, when netfilter
    /// redirected the connection here.
    pub(crate) destination: Option<SocketAddr>,
}

impl Accepted {
    /// How the listener decides the protocol: a transparent listener's opaque ports skip
    /// detection.
    pub(crate) fn protocol(&self) -> ListenerProtocol {
        match self.destination {
            Some(dst) if self.listener.opaque_ports.contains(&dst.port()) => {
                ListenerProtocol::Opaque
            }
            _ => self.listener.protocol,
        }
    }

    /// What is left of the detect timeout (TLS termination may have used some).
    pub(crate) fn detect_timeout(&self) -> std::time::Duration {
        self.detect.saturating_sub(self.accepted_at.elapsed())
    }
}

/// What a connection holds for as long as it is open, whichever task serves it: its
/// place under the listener's connection limit and its metrics record, counted as
/// closed (with what was learnt of it meanwhile) when this is dropped.
pub(crate) struct Open {
    state: Arc<State>,
    record: ConnectionRecord,
    _permit: OwnedSemaphorePermit,
    /// What detection found; none if the connection ended first.
    pub(crate) protocol: Option<Detected>,
    /// The client's mesh identity, when it came over mesh TLS.
    pub(crate) client: Option<Arc<str>>,
}

impl Open {
    pub(crate) fn record(&self) -> &ConnectionRecord {
        &self.record
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.record
            .close(&self.state.metrics, self.protocol, self.client.take());
    }
}

/// Binds a listening socket now, so a reload can fail before anything changes.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    listener.into_std()
}

pub(crate) fn spawn(
    state: Arc<State>,
    std_listener: std::net::TcpListener,
    settings: Arc<ListenerSettings>,
    max_connections: usize,
) -> std::io::Result<Arc<Listening>> {
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    let listening = Arc::new(Listening {
        local_addr: listener.local_addr()?,
        settings: ArcSwap::new(settings),
        stop: state.shutdown.child_token(),
    });
    let limit = Arc::new(Semaphore::new(max_connections));
    state.tracker.spawn(accept_loop(
        state.clone(),
        listener,
        listening.clone(),
        limit,
    ));
    Ok(listening)
}

async fn accept_loop(
    state: Arc<State>,
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
        let settings = listening.settings.load_full();
        state
            .tracker
            .spawn(serve(state.clone(), settings, stream, permit));
    }
    tracing::info!(%addr, "stopped listening");
}

async fn serve(
    state: Arc<State>,
    listener: Arc<ListenerSettings>,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
) {
    crate::socket::configure(&stream);
    let name: Arc<str> = Arc::from(listener.name.as_str());
    let destination = listener
        .transparent
        .then(|| crate::orig_dst::redirected_from(&stream))
        .flatten();
    let (limits, detect) = {
        let snapshot = state.snapshot();
        (snapshot.settings.limits, snapshot.settings.timeouts.detect)
    };
    let open = Open {
        record: ConnectionRecord::open(&state.metrics, listener.direction, &name),
        state: state.clone(),
        _permit: permit,
        protocol: None,
        client: None,
    };
    let accepted = Accepted {
        destination,
        open,
        limits,
        detect,
        accepted_at: Instant::now(),
        state,
        listener,
        name,
    };
    // Each direction's future is boxed at its own size: the task cell, which an opaque
    // connection holds for its whole life, is then not as big as the larger of the two.
    // (An HTTP connection is served from a task of its own: `http::server::serve`.)
    match accepted.listener.direction {
        Direction::Inbound => Box::pin(crate::inbound::serve(accepted, stream)).await,
        Direction::Outbound => Box::pin(crate::outbound::serve(accepted, stream)).await,
    }
}
