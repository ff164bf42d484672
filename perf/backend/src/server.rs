//! The accept loop: one task per accepted connection, handed to the mode's handler.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Config, Mode};
use crate::{http, tcp_echo};

/// Accept connections on `listener` and serve them as `config` says, until `shutdown`
/// completes. Connections still open then are dropped with the runtime.
///
/// Accept errors (for example running out of file descriptors) are reported on stderr and
/// retried after a short pause rather than ending the server.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let http = Arc::new(http::Server::new(&config));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(err) => {
                        eprintln!("pymesh-backend: accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Latency matters more than packet count for a benchmark peer.
                let _ = stream.set_nodelay(true);
                match config.mode {
                    Mode::Http => {
                        let http = Arc::clone(&http);
                        tokio::spawn(async move { http.serve_connection(stream).await });
                    }
                    Mode::TcpEcho => {
                        tokio::spawn(tcp_echo::serve_connection(stream));
                    }
                }
            }
        }
    }
}
