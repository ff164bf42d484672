//! Serving one client connection as HTTP/1.1 or HTTP/2 with hyper, with the proxy's
//! header limits, and a graceful close when the proxy drains. Each request goes to
//! the direction's handler (`inbound::request` or `outbound::request`).
//!
//! hyper answers what it cannot parse: a malformed request gets 400, a head over
//! the limits gets 431, and the connection closes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::body::ProxyBody;
use super::park::{self, Activity, Guarded, Watched};
use crate::config::{Direction, Limits};
use crate::detect::Detected;
use crate::io::{Coalesced, Prefixed};
use crate::listen::Open;
use crate::state::State;

/// What every request on one client connection shares.
pub(crate) struct HttpConn {
    pub(crate) state: Arc<State>,
    pub(crate) direction: Direction,
    pub(crate) protocol: Detected,
    /// The listener's name, for authorization.
    pub(crate) listener: Arc<str>,
    pub(crate) default_service: Option<String>,
    /// The address the client dialed, when netfilter redirected it to a transparent
    /// listener: requests go where it meant them to, whatever authority they name.
    pub(crate) destination: Option<std::net::SocketAddr>,
    /// The client's mesh identity, when it came over mesh TLS.
    pub(crate) client_id: Option<Arc<str>>,
    /// The client is a proxy that negotiated `tls::MESH_ALPN`: an HTTP/2 request of its
    /// marked with `tls::ORIG_PROTO` is an HTTP/1 request, delivered as one.
    pub(crate) carries_http1: bool,
}

impl HttpConn {
    /// The mesh peer a response is labelled with: the client inbound, the endpoint
    /// that answered (`server`) outbound.
    pub(crate) fn peer(&self, server: Option<Arc<str>>) -> Option<Arc<str>> {
        match self.direction {
            Direction::Inbound => self.client_id.clone(),
            Direction::Outbound => server,
        }
    }
}

/// Serves the connection from a task of its own, which holds `open` until the connection
/// ends and is tracked like every connection's task, so a drain waits for it. The
/// caller's task ends here, and with it the state it was sized for (detection, TLS
/// termination): a keep-alive connection held for hours keeps only what serving HTTP
/// needs, in one task sized for its protocol.
pub(crate) fn serve<I, H, F>(
    io: Prefixed<I>,
    conn: Arc<HttpConn>,
    limits: Limits,
    handler: H,
    open: Open,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Arc<HttpConn>, Request<Incoming>) -> F + Copy + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let tracker = conn.state.tracker.clone();
    match conn.protocol {
        Detected::Http2 => tracker.spawn(async move {
            let _open = open;
            ended(serve_http2(io, conn, limits, handler).await);
        }),
        _ => tracker.spawn(async move {
            let _open = open;
            ended(serve_http1(io, conn, limits, handler).await);
        }),
    };
}

fn ended(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

async fn serve_http2<I, H, F>(
    io: Prefixed<I>,
    conn: Arc<HttpConn>,
    limits: Limits,
    handler: H,
) -> hyper::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Arc<HttpConn>, Request<Incoming>) -> F + Copy + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let shutdown = conn.state.shutdown.clone();
    let service = service_fn(move |req| {
        // Boxed: what a stream in flight carries is a pointer, not the whole request path.
        Box::pin(handler(conn.clone(), req)).map(Ok::<_, Infallible>)
    });
    let http = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .serve_connection(TokioIo::new(Coalesced::new(io)), service);
    until_drained(http, &shutdown, |c| c.graceful_shutdown()).await
}

/// HTTP/1: each request's head is gathered on the bare stream (`park::wait_for_head`),
/// then served by hyper, which is given up again once the connection has idled
/// (`park::drive`): a fresh hyper connection serves the next head.
// Not an async fn on purpose: see the comment in the body.
#[allow(clippy::manual_async_fn)]
fn serve_http1<I, H, F>(
    mut io: Prefixed<I>,
    conn: Arc<HttpConn>,
    limits: Limits,
    handler: H,
) -> impl Future<Output = hyper::Result<()>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Arc<HttpConn>, Request<Incoming>) -> F + Copy + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // An async block rather than an async fn, and no builder kept between requests: what
    // the block captures is its state, where an async fn's parameters are also copied into
    // locals, and every idle connection would carry both copies.
    async move {
        let activity = Arc::new(Activity::default());
        loop {
            // The head comes in before hyper's connection (and its buffers) is made for it.
            if !park::wait_for_head(&mut io, limits.max_header_bytes, &conn.state.shutdown).await {
                return Ok(());
            }
            let service = {
                let conn = conn.clone();
                let activity = activity.clone();
                service_fn(move |req: Request<Incoming>| {
                    activity.request(!req.body().is_end_stream());
                    let activity = activity.clone();
                    // Boxed: hyper keeps one slot per HTTP/1 connection for the request in
                    // flight, sized by this future; a pointer there, not the whole request
                    // path, is what a connection carries between requests.
                    Box::pin(handler(conn.clone(), req)).map(move |response| {
                        Ok::<_, Infallible>(response.map(|body| Guarded::new(body, activity)))
                    })
                })
            };
            let watched = Watched::new(io, activity.clone());
            let mut http = Box::new(
                http1_builder(&limits)
                    .serve_connection(TokioIo::new(watched), service)
                    .with_upgrades(),
            );
            let shutdown = &conn.state.shutdown;
            if let Some(result) =
                park::drive(&mut *http, &activity, shutdown, |c| c.graceful_shutdown()).await
            {
                return result;
            }
            // Moved out of, the box itself is freed at the end of this turn of the loop,
            // before the wait for the next head at the top of the next.
            let Some(parts) = http.into_parts() else {
                return Ok(());
            };
            tracing::trace!("idle HTTP/1 connection parked");
            io = park::unpark(parts.io.into_inner(), parts.read_buf);
        }
    }
}

/// hyper's HTTP/1 server settings: the proxy's header limits, and its timer.
fn http1_builder(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
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

/// `:authority` (HTTP/2, or HTTP/1 absolute-form), else the `Host` header.
pub(crate) fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
