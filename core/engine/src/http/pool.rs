//! The HTTP/1 keep-alive pool of a service: connections to its endpoints, reused one
//! request at a time, that give their memory back while idle.
//!
//! A pooled connection that has had nothing to do for [`PARK_AFTER`] is *parked*: its
//! hyper client connection ends without closing the socket (hyper's read and write
//! buffers and its dispatch channel, ~29 KB, are freed) and the bare socket waits in the
//! pool. The next request to that endpoint checks the socket is still open and quiet,
//! makes a fresh hyper connection on it and goes out, without a TCP or TLS handshake.
//! This is the client-side twin of `park.rs`: a proxy that held a burst's worth of
//! upstream connections holds their sockets afterwards, not their buffers.
//!
//! Connections are kept last in, first out (the warmest is reused), at most
//! [`MAX_IDLE_PER_ENDPOINT`] per endpoint, and closed after the service's idle timeout.
//! A request that asks to switch protocols (`Upgrade`) gets a connection of its own,
//! never pooled. A request that a reused connection did not take (it closed before the
//! request was written) is sent again once on another connection: it never reached the
//! endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{header, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::client::Upstreams;
use super::replay::RequestBody;
use crate::connect::{ConnectError, Connection};

/// How long a pooled connection waits with nothing to do before it is parked: long
/// enough that a connection under steady load never is (a fresh hyper connection costs
/// a few allocations), short enough that idle connections shrink within seconds.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// The most idle connections kept per endpoint; more are closed as they come back.
pub(crate) const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Why a request through the pool failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// No connection could be had: nothing was sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The exchange on the connection failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// A service's HTTP/1 pool. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub(crate) struct Http1Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    upstreams: Upstreams,
    idle_timeout: Duration,
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    reaper_running: AtomicBool,
}

struct Idle {
    since: Instant,
    state: IdleState,
}

enum IdleState {
    /// A hyper connection ready for its next request.
    Live(Live),
    /// A bare socket, between keep-alive requests.
    Parked(Connection),
}

/// A hyper connection's sender, and the flag its task reads when the connection ends:
/// set, the pool ended it to park its socket.
struct Live {
    sender: http1::SendRequest<RequestBody>,
    park: Arc<AtomicBool>,
}

impl Http1Pool {
    /// A pool of connections to `upstreams`, closed after `idle_timeout` unused.
    pub(crate) fn new(upstreams: Upstreams, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                upstreams,
                idle_timeout,
                idle: Mutex::new(HashMap::new()),
                reaper_running: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` to `addr`, one of the pool's endpoints, and returns the response
    /// head; the connection comes back to the pool once the exchange is over.
    pub(crate) async fn request(
        &self,
        addr: SocketAddr,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, PoolError> {
        request_target(&mut request);
        // The rare paths that open or re-serve a connection are boxed: their handshakes'
        // state is not carried by every request's future, only by the ones that take them.
        if may_switch_protocols(&request) {
            return Box::pin(self.upgrade(addr, request)).await;
        }
        let (mut live, reused) = match self.take_reusable(addr) {
            Some(IdleState::Live(live)) => (live, true),
            Some(IdleState::Parked(connection)) => {
                (Box::pin(self.serve(addr, connection)).await?, true)
            }
            None => (Box::pin(self.connect(addr)).await?, false),
        };
        match live.sender.try_send_request(request).await {
            Ok(response) => {
                self.check_in_when_ready(addr, live);
                Ok(response)
            }
            Err(mut unsent) => match unsent.take_message() {
                // A reused connection closed before taking the request: it never left
                // this proxy, so it goes once more, on a new connection.
                Some(request) if reused => Box::pin(self.send_on_new(addr, request)).await,
                _ => Err(unsent.into_error().into()),
            },
        }
    }

    /// The most recently idle connection that is still open: a live one ready for a
    /// request, or a parked socket with nothing waiting on it.
    fn take_reusable(&self, addr: SocketAddr) -> Option<IdleState> {
        while let Some(idle) = self.inner.take_idle(addr) {
            match idle.state {
                IdleState::Live(live) if live.sender.is_ready() => {
                    return Some(IdleState::Live(live))
                }
                IdleState::Parked(connection) if connection.is_quiet() => {
                    return Some(IdleState::Parked(connection))
                }
                // Closed while idle: let it go.
                _ => {}
            }
        }
        None
    }

    async fn send_on_new(
        &self,
        addr: SocketAddr,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, PoolError> {
        let mut live = self.connect(addr).await?;
        let response = live.sender.send_request(request).await?;
        self.check_in_when_ready(addr, live);
        Ok(response)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Live, PoolError> {
        let connection = self.inner.open(addr).await?;
        self.serve(addr, connection).await
    }

    /// A hyper connection on `connection`, driven by a task of its own that hands the
    /// socket back for parking when the pool ends the connection for that.
    async fn serve(&self, addr: SocketAddr, connection: Connection) -> Result<Live, PoolError> {
        let (sender, conn) = http1::handshake(TokioIo::new(connection)).await?;
        let park = Arc::new(AtomicBool::new(false));
        let parking = park.clone();
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            match conn.without_shutdown().await {
                Ok(parts) if parking.load(Ordering::Relaxed) && parts.read_buf.is_empty() => {
                    if let Some(pool) = pool.upgrade() {
                        pool.park(addr, parts.io.into_inner());
                    }
                }
                // Ended by the endpoint, or after `Connection: close`: the socket closes.
                Ok(_) => {}
                Err(e) => tracing::debug!(%addr, error = %e, "upstream HTTP/1 connection ended"),
            }
        });
        Ok(Live { sender, park })
    }

    /// A connection of its own for a request that may switch protocols: hyper hands the
    /// socket to the upgrade, so it never comes back to the pool.
    async fn upgrade(
        &self,
        addr: SocketAddr,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, PoolError> {
        let connection = self.inner.open(addr).await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(connection)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender.send_request(request).await?)
    }

    /// Puts `live` back once its exchange is over (the response read to its end, the
    /// request body sent): at once if it already is, else from a small task.
    fn check_in_when_ready(&self, addr: SocketAddr, mut live: Live) {
        if live.sender.is_ready() {
            self.inner
                .insert(addr, Instant::now(), IdleState::Live(live));
            return;
        }
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            if live.sender.ready().await.is_ok() {
                if let Some(pool) = pool.upgrade() {
                    pool.insert(addr, Instant::now(), IdleState::Live(live));
                }
            }
        });
    }
}

impl PoolInner {
    async fn open(&self, addr: SocketAddr) -> Result<Connection, ConnectError> {
        let upstream = self.upstreams.load().get(&addr).cloned();
        let Some(upstream) = upstream else {
            return Err(ConnectError::Io {
                addr,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not an endpoint of this service",
                ),
            });
        };
        upstream.connect().await
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get_mut(&addr).and_then(Vec::pop)
    }

    /// A socket whose hyper connection the pool ended: idle since `PARK_AFTER` ago,
    /// when it was last used.
    fn park(self: &Arc<Self>, addr: SocketAddr, connection: Connection) {
        if connection.is_quiet() {
            connection.release_wakers();
            let now = Instant::now();
            let since = now.checked_sub(PARK_AFTER).unwrap_or(now);
            self.insert(addr, since, IdleState::Parked(connection));
        }
    }

    fn insert(self: &Arc<Self>, addr: SocketAddr, since: Instant, state: IdleState) {
        let start_reaper = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let list = idle.entry(addr).or_default();
            if list.len() >= MAX_IDLE_PER_ENDPOINT {
                return; // dropped after the lock: the connection closes
            }
            list.push(Idle { since, state });
            // Under the lock, as the reaper's stop is: no entry is left unswept.
            !self.reaper_running.swap(true, Ordering::Relaxed)
        };
        if start_reaper {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }

    /// Takes out the connections idle for the idle timeout or to an endpoint the service
    /// no longer has (to close) and the hyper connections idle for [`PARK_AFTER`] (to
    /// park), for the caller to let go of outside the lock; and says whether the reaper
    /// stops (nothing left idle).
    fn sweep(&self, now: Instant) -> (Vec<Idle>, bool) {
        let mut out = Vec::new();
        let endpoints = self.upstreams.load();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        for (addr, list) in idle.iter_mut() {
            // A reload took the endpoint out: its connections close now, not at the timeout.
            let removed = !endpoints.contains_key(addr);
            out.extend(list.extract_if(.., |entry| {
                let idle_for = now.saturating_duration_since(entry.since);
                let timed_out = removed || idle_for >= self.idle_timeout;
                match &entry.state {
                    IdleState::Live(live) if timed_out || idle_for >= PARK_AFTER => {
                        // Its hyper connection ends either way; the socket is parked
                        // unless the connection has been idle for the whole timeout.
                        live.park.store(!timed_out, Ordering::Relaxed);
                        true
                    }
                    _ => timed_out,
                }
            }));
        }
        idle.retain(|_, list| !list.is_empty());
        let stop = idle.is_empty();
        if stop {
            // Nothing left to watch: the reaper stops, and the next insert starts one.
            self.reaper_running.store(false, Ordering::Relaxed);
        }
        (out, stop)
    }
}

/// Every [`PARK_AFTER`] while the pool has idle connections: parks and closes them.
async fn reap(pool: Weak<PoolInner>) {
    let mut tick = tokio::time::interval(PARK_AFTER);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is at once
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let (out, stop) = pool.sweep(Instant::now());
        // A dropped sender ends its hyper connection, whose task parks the socket or
        // closes it as flagged.
        drop(out);
        if stop {
            return;
        }
    }
}

/// The request target HTTP/1 sends to an origin server: the path and query (origin
/// form), or for `CONNECT` the endpoint's address (authority form).
fn request_target(request: &mut Request<RequestBody>) {
    let uri = request.uri();
    let target = if request.method() == Method::CONNECT {
        uri.authority().cloned().map(Uri::from)
    } else {
        let path = uri.path_and_query().cloned();
        Some(Uri::from(path.unwrap_or_else(|| {
            http::uri::PathAndQuery::from_static("/")
        })))
    };
    if let Some(target) = target {
        *request.uri_mut() = target;
    }
}

/// Asks to switch protocols (`headers::wants_upgrade` kept its `Upgrade` header).
fn may_switch_protocols(request: &Request<RequestBody>) -> bool {
    request.method() == Method::CONNECT || request.headers().contains_key(header::UPGRADE)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use arc_swap::ArcSwap;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;

    use super::*;
    use crate::connect::Upstream;

    /// A keep-alive HTTP/1 backend on loopback that answers each request with its path
    /// and counts the connections it accepted; with `close_after`, it closes each
    /// connection that long after accepting it, keep-alive or not.
    async fn backend(close_after: Option<Duration>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(|request: Request<Incoming>| async move {
                            let path = request.uri().path().to_owned();
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(path))))
                        });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    match close_after {
                        Some(after) => drop(tokio::time::timeout(after, conn).await),
                        None => drop(conn.await),
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn upstream(addr: SocketAddr) -> Arc<Upstream> {
        Arc::new(Upstream::new(addr, None, Duration::from_secs(1), 100, None))
    }

    fn pool_to(addr: SocketAddr, idle_timeout: Duration) -> Http1Pool {
        let upstreams: Upstreams = Arc::new(ArcSwap::from_pointee(HashMap::from([(
            addr,
            upstream(addr),
        )])));
        Http1Pool::new(upstreams, idle_timeout)
    }

    async fn get(pool: &Http1Pool, addr: SocketAddr, path: &str) -> String {
        let request = Request::get(format!("http://{addr}{path}"))
            .header(header::HOST, "backend")
            .body(empty())
            .expect("request");
        let response = pool.request(addr, request).await.expect("response");
        let body = response.into_body().collect().await.expect("body");
        String::from_utf8(body.to_bytes().to_vec()).expect("utf-8")
    }

    fn empty() -> RequestBody {
        RequestBody::Buffered {
            chunks: VecDeque::new(),
            trailers: None,
        }
    }

    #[test]
    fn requests_go_out_in_origin_form_and_connect_in_authority_form() {
        let mut get = Request::get("http://127.0.0.1:9/a/b?c=d")
            .body(empty())
            .expect("request");
        request_target(&mut get);
        assert_eq!(get.uri(), "/a/b?c=d");
        let mut bare = Request::get("http://127.0.0.1:9")
            .body(empty())
            .expect("request");
        request_target(&mut bare);
        assert_eq!(bare.uri(), "/");
        let mut connect = Request::connect("http://127.0.0.1:9/")
            .body(empty())
            .expect("request");
        request_target(&mut connect);
        assert_eq!(connect.uri(), "127.0.0.1:9");
    }

    /// (live, parked) idle connections to `addr`.
    fn idle(pool: &Http1Pool, addr: SocketAddr) -> (usize, usize) {
        let idle = pool.inner.idle.lock().expect("lock");
        let list = idle.get(&addr).map(Vec::as_slice).unwrap_or_default();
        let live = list
            .iter()
            .filter(|e| matches!(e.state, IdleState::Live(_)))
            .count();
        (live, list.len() - live)
    }

    /// Long enough for the reaper to have swept a connection idle for `PARK_AFTER`.
    const AFTER_PARKING: Duration = Duration::from_millis(2_600);

    #[tokio::test]
    async fn sequential_requests_share_one_connection_which_is_parked_while_idle_and_reused() {
        let (addr, accepted) = backend(None).await;
        let pool = pool_to(addr, Duration::from_secs(90));
        for i in 0..5 {
            assert_eq!(get(&pool, addr, &format!("/{i}")).await, format!("/{i}"));
        }
        tokio::task::yield_now().await;
        assert_eq!(idle(&pool, addr), (1, 0), "back in the pool, live");
        tokio::time::sleep(AFTER_PARKING).await;
        assert_eq!(idle(&pool, addr), (0, 1), "parked: only its socket is held");
        assert_eq!(get(&pool, addr, "/after").await, "/after");
        assert_eq!(get(&pool, addr, "/again").await, "/again");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the parked socket was reused"
        );
        tokio::task::yield_now().await;
        assert_eq!(idle(&pool, addr), (1, 0));
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_while_idle_is_not_reused() {
        let (addr, accepted) = backend(Some(Duration::from_millis(1_500))).await;
        let pool = pool_to(addr, Duration::from_secs(90));
        assert_eq!(get(&pool, addr, "/first").await, "/first");
        tokio::time::sleep(AFTER_PARKING).await;
        // Closed by the backend after it was parked, or before: either way the next
        // request goes out on a new connection and succeeds.
        assert_eq!(get(&pool, addr, "/second").await, "/second");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let (addr, accepted) = backend(None).await;
        let pool = pool_to(addr, Duration::from_millis(1_500));
        assert_eq!(get(&pool, addr, "/first").await, "/first");
        tokio::time::sleep(Duration::from_millis(3_200)).await;
        assert_eq!(idle(&pool, addr), (0, 0), "closed, not kept");
        let running = || pool.inner.reaper_running.load(Ordering::Relaxed);
        assert!(!running(), "with nothing idle the reaper stops");
        assert_eq!(get(&pool, addr, "/second").await, "/second");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        tokio::task::yield_now().await;
        assert!(running(), "and starts again with the next idle connection");
    }

    #[tokio::test]
    async fn idle_connections_to_a_removed_endpoint_close_at_the_next_sweep() {
        let (addr, _) = backend(None).await;
        let (kept, _) = backend(None).await;
        let pool = pool_to(addr, Duration::from_secs(90));
        let both = HashMap::from([(addr, upstream(addr)), (kept, upstream(kept))]);
        pool.inner.upstreams.store(Arc::new(both));
        assert_eq!(get(&pool, addr, "/a").await, "/a");
        assert_eq!(get(&pool, kept, "/b").await, "/b");
        tokio::task::yield_now().await;
        assert_eq!((idle(&pool, addr), idle(&pool, kept)), ((1, 0), (1, 0)));
        // A reload takes `addr` out of the service.
        pool.inner
            .upstreams
            .store(Arc::new(HashMap::from([(kept, upstream(kept))])));
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        assert_eq!(
            idle(&pool, addr),
            (0, 0),
            "closed, though far from its idle timeout"
        );
        let (live, parked) = idle(&pool, kept);
        assert_eq!(
            live + parked,
            1,
            "the kept endpoint's connection stays (or is parked)"
        );
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_all_come_back() {
        let (addr, accepted) = backend(None).await;
        let pool = pool_to(addr, Duration::from_secs(90));
        let requests = (0..8).map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { get(&pool, addr, &format!("/{i}")).await })
        });
        for (i, request) in requests.enumerate() {
            assert_eq!(request.await.expect("task"), format!("/{i}"));
        }
        tokio::task::yield_now().await;
        let opened = accepted.load(Ordering::SeqCst);
        assert_eq!(idle(&pool, addr), (opened, 0), "every connection is back");
    }
}
