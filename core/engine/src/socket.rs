//! What every proxied TCP socket is set to, the ones accepted from clients and the ones
//! opened to endpoints alike: no Nagle delay, and TCP keepalive.
//!
//! Keepalive is how a connection whose peer vanished without closing it (a host gone, a
//! cable out, a NAT entry dropped) is found: nothing else would ever end an idle HTTP/2
//! or opaque connection, which holds its buffers (about 22 KiB for HTTP/2) until the
//! process exits. The kernel probes a socket idle for [`KEEPALIVE_IDLE`], then every
//! [`KEEPALIVE_INTERVAL`], and resets it after its default 9 unanswered probes: a dead
//! peer is found within 100 s, and a live one costs one small exchange every 10 s.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Idle time before the first keepalive probe (as Linkerd's proxy is configured).
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between unanswered probes.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Sets a proxied socket's options. Best effort: a socket that refuses one still carries
/// traffic, so a failure is logged at debug level and otherwise ignored.
pub(crate) fn configure(stream: &TcpStream) {
    // Latency matters more than packet count for proxied request/response traffic.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not turn TCP keepalive on");
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn both_ends_get_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let connected = connected.expect("connect");
        let (accepted, _) = accepted.expect("accept");
        for stream in [&connected, &accepted] {
            configure(stream);
            let socket = SockRef::from(stream);
            assert!(stream.nodelay().expect("TCP_NODELAY"));
            assert!(socket.keepalive().expect("SO_KEEPALIVE"));
            assert_eq!(
                socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
                KEEPALIVE_IDLE
            );
            assert_eq!(
                socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
                KEEPALIVE_INTERVAL
            );
        }
    }
}
