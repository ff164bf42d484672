//! HTTP/2 connections to a service's endpoints: one multiplexed connection per
//! endpoint (HTTP/1 has its keep-alive pool, `pool.rs`). Both connect through
//! `connect`, so caps and mutual TLS apply alike.
//!
//! Streams are opened with the h2 crate directly, from the request's own task: the
//! connection has one task, and a request costs no task or channel of its own (hyper's
//! client adds a task per request, two with a body, and a channel hop each way).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Ping, PingPong};
use http::{Request, Response};
use http_body::Body;

use super::h2_stream::{RecvBody, SendBody};
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
    current: ArcSwapOption<H2Sender>,
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
    pub(crate) async fn sender(&self) -> Result<H2Sender, ConnectError> {
        match self.live() {
            Some(sender) => Ok(sender),
            // Boxed: the handshake's state is not carried by every request's future,
            // only by the rare one that connects.
            None => Box::pin(self.reconnect()).await,
        }
    }

    async fn reconnect(&self) -> Result<H2Sender, ConnectError> {
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
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false)
            .handshake(Coalesced::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping_pong = connection.ping_pong();
        let ended = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                    }
                }
                () = keep_alive(ping_pong) => {
                    tracing::debug!(%addr, "upstream HTTP/2 connection unanswered: closing it");
                }
            }
            ended.store(true, Ordering::Relaxed);
        });
        let sender = H2Sender { send, closed };
        self.current.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    /// A sender on the current connection, if it is still open.
    fn live(&self) -> Option<H2Sender> {
        let guard = self.current.load();
        guard
            .as_ref()
            .filter(|s| !s.closed.load(Ordering::Relaxed))
            .map(|s| (**s).clone())
    }
}

// As hyper's client sets them: windows large enough that a fast link is not held to
// the protocol's 64 KiB default, and a bound on what a stream may buffer unsent.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A connection is pinged this often, and closed when the answer is this late.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pings the peer every [`KEEP_ALIVE_INTERVAL`]; returns once one goes unanswered
/// for [`KEEP_ALIVE_TIMEOUT`] (a peer gone without closing the connection).
async fn keep_alive(ping_pong: Option<PingPong>) {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Opens streams on one HTTP/2 connection; marks it closed for the next request once
/// the connection no longer takes streams.
#[derive(Clone)]
pub(crate) struct H2Sender {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl H2Sender {
    /// Checks that the connection still takes streams: an error once it has closed or the
    /// peer has sent GOAWAY (and the connection is then marked closed).
    pub(crate) async fn ready(self) -> Result<ReadySender, h2::Error> {
        let closed = self.closed;
        match self.send.ready().await {
            Ok(send) => Ok(ReadySender(send)),
            Err(e) => {
                closed.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

/// A sender that may open a stream now.
pub(crate) struct ReadySender(SendRequest<Bytes>);

impl ReadySender {
    /// Opens a stream for `request`. Past the peer's limit on concurrent streams, h2 holds
    /// a new stream back until another ends: this waits until it has opened, so that the
    /// caller counts it as waiting until then.
    pub(crate) async fn open(
        mut self,
        request: Request<RequestBody>,
    ) -> Result<OpenStream, h2::Error> {
        let (head, body) = request.into_parts();
        let end_of_stream = body.is_end_stream();
        let (response, stream) = self
            .0
            .send_request(Request::from_parts(head, ()), end_of_stream)?;
        self.0.ready().await?;
        Ok(OpenStream {
            response,
            body: (!end_of_stream).then(|| SendBody::new(body, stream)),
        })
    }
}

/// A request's open stream: its response to come, and its body still to send.
pub(crate) struct OpenStream {
    response: ResponseFuture,
    body: Option<SendBody>,
}

impl OpenStream {
    /// Waits for the response head, sending the request body from this task meanwhile;
    /// a body still going when the response comes (a stream both ways) goes on in a task
    /// of its own.
    pub(crate) async fn response(self) -> Result<Response<RecvBody>, h2::Error> {
        let OpenStream {
            mut response,
            mut body,
        } = self;
        let head = std::future::poll_fn(|cx| {
            if let Some(sending) = body.as_mut() {
                if Pin::new(sending).poll(cx).is_ready() {
                    body = None;
                }
            }
            Pin::new(&mut response).poll(cx)
        })
        .await?;
        if let Some(sending) = body {
            tokio::spawn(sending);
        }
        let (parts, stream) = head.into_parts();
        let body = RecvBody::new(stream, &parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    /// An h2c backend on loopback (hyper's server) allowing `max_streams` concurrent
    /// streams: `/echo` streams the request body back as it comes, `/hold` answers once
    /// `release` is notified, anything else at once.
    async fn backend(max_streams: u32, release: Arc<Notify>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let release = release.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let release = release.clone();
                    async move {
                        let body = match request.uri().path() {
                            "/echo" => request.into_body().boxed(),
                            "/hold" => {
                                release.notified().await;
                                Full::new(Bytes::from_static(b"held"))
                                    .map_err(|n| match n {})
                                    .boxed()
                            }
                            _ => Full::new(Bytes::from_static(b"quick"))
                                .map_err(|n| match n {})
                                .boxed(),
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    fn connection_to(addr: SocketAddr) -> H2Connection {
        H2Connection::new(Arc::new(Upstream::new(
            addr,
            None,
            Duration::from_secs(1),
            100,
            None,
        )))
    }

    fn request(addr: SocketAddr, path: &str, chunks: VecDeque<Bytes>) -> Request<RequestBody> {
        Request::post(format!("http://{addr}{path}"))
            .body(RequestBody::Buffered {
                chunks,
                trailers: None,
            })
            .expect("request")
    }

    async fn open(conn: &H2Connection, request: Request<RequestBody>) -> OpenStream {
        let sender = conn.sender().await.expect("connected");
        let ready = sender.ready().await.expect("ready");
        ready.open(request).await.expect("opened")
    }

    async fn body_of(stream: OpenStream) -> Bytes {
        let response = stream.response().await.expect("response");
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_stream_through_both_ways() {
        let addr = backend(100, Arc::new(Notify::new())).await;
        let conn = connection_to(addr);
        // 6 MiB: past the backend's window for the request, and this side's 2 MiB stream
        // and 5 MiB connection windows for the echoed response, which starts coming back
        // before the request body has all gone.
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let chunks: VecDeque<Bytes> = std::iter::repeat_n(chunk, 96).collect();
        let echoed = body_of(open(&conn, request(addr, "/echo", chunks)).await).await;
        assert_eq!(echoed.len(), 6 * 1024 * 1024);
        assert!(echoed.iter().all(|b| *b == 7));
        // The connection is still usable, and it is the same one.
        let again = body_of(open(&conn, request(addr, "/", VecDeque::new())).await).await;
        assert_eq!(again, "quick");
    }

    #[tokio::test]
    async fn a_stream_past_the_peers_limit_waits_to_open_until_another_ends() {
        let release = Arc::new(Notify::new());
        let addr = backend(1, release.clone()).await;
        let conn = connection_to(addr);
        // A first exchange, so that the backend's SETTINGS (one stream at a time) are in.
        let first = body_of(open(&conn, request(addr, "/", VecDeque::new())).await).await;
        assert_eq!(first, "quick");

        let held = open(&conn, request(addr, "/hold", VecDeque::new())).await;
        let held = tokio::spawn(body_of(held));
        let second = open(&conn, request(addr, "/", VecDeque::new()));
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), second.as_mut())
                .await
                .is_err(),
            "opened while the only stream allowed was in use"
        );
        release.notify_one();
        assert_eq!(held.await.expect("held task"), "held");
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("opened once the other stream ended");
        assert_eq!(body_of(second).await, "quick");
    }
}
