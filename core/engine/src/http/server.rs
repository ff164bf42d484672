//! Serving one client connection as HTTP/1.1 or HTTP/2 with hyper, with the proxy's
//! header limits, and a graceful close when the proxy drains.
//!
//! hyper answers what it cannot parse: a malformed request gets 400, a head over
//! the limits gets 431, and the connection closes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use super::forward::{handle, ConnContext};
use crate::config::Limits;
use crate::detect::Detected;
use tokio::io::{AsyncRead, AsyncWrite};

pub async fn serve<I>(io: I, ctx: Arc<ConnContext>, limits: Limits, shutdown: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = ctx.protocol;
    let service = service_fn(move |req| handle(ctx.clone(), req));
    let io = TokioIo::new(io);
    let result = match protocol {
        Detected::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(limits.max_header_bytes as u32)
                .serve_connection(io, service);
            until_drained(conn, &shutdown, |c| c.graceful_shutdown()).await
        }
        _ => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .max_buf_size(limits.max_header_bytes)
                .max_headers(limits.max_headers)
                .serve_connection(io, service)
                .with_upgrades();
            until_drained(conn, &shutdown, |c| c.graceful_shutdown()).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(protocol = protocol.as_str(), error = %e, "client connection ended with an error");
    }
}

/// Drives a hyper connection to its end; once `shutdown` fires, asks it to finish
/// what is in flight and close (`graceful`) rather than cutting it off.
pub(crate) async fn until_drained<C: Future>(
    conn: C,
    shutdown: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}
