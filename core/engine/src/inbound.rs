//! The inbound pipeline: connections from peers (and local clients) for the local
//! application, top to bottom:
//!
//! ```text
//! accept (listen) → mesh TLS terminate → detect → authorize → HTTP | TCP
//!     HTTP, per request: authorize → the local application's service → admit → attempts
//!     TCP:               authorize → the local application's service → connect → copy
//! ```
//!
//! Mesh TLS (recognised by its SNI) is terminated with client certificates required,
//! so the client's identity is known to authorization and metrics. Any other TLS is
//! passed through untouched as opaque bytes. Inbound traffic always goes to the local
//! application, whatever authority it names: on a transparent listener at the address
//! its client dialed (netfilter's original destination), else the listener's default
//! service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::authz::{authorize, Decision};
use crate::config::TlsMode;
use crate::detect::{self, Detected};
use crate::http::body::ProxyBody;
use crate::http::forward::{forward, unrouted};
use crate::http::local::Reason;
use crate::http::server::{is_grpc, HttpConn};
use crate::io::{ClientIo, Prefixed};
use crate::listen::Accepted;
use crate::route::{Route, Toward};
use crate::state::{Snapshot, State};
use crate::tls::{peek_client_hello, Hello, MeshTls, MESH_ALPN};

/// The most an inbound mesh TLS handshake may take once its ClientHello is in.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A ClientHello longer than this is not one a mesh proxy sends.
const MAX_HELLO_BYTES: usize = 16 * 1024;

pub(crate) async fn serve(conn: Accepted, mut stream: TcpStream) {
    // Mesh TLS first: a proxy with an identity terminates it unless the listener says not.
    let mesh = (conn.state.mesh.clone()).filter(|_| conn.listener.tls != TlsMode::Disabled);
    let mut hello_bytes = BytesMut::new();
    let (meshed, mesh_alpn) = match &mesh {
        Some(mesh) => {
            let timeout = conn.detect_timeout();
            match read_hello(&mut stream, &mut hello_bytes, timeout).await {
                Hello::Tls {
                    sni: Some(sni),
                    mesh_alpn,
                } if sni == mesh.sni => (true, mesh_alpn),
                _ => (false, false),
            }
        }
        None => (false, false),
    };
    let record = conn.open.record();
    let io = ClientIo::accepted(
        hello_bytes.freeze(),
        stream,
        record.read_bytes.clone(),
        record.write_bytes.clone(),
    );
    // The handshake and the TLS session are boxed: a plaintext connection's task does not
    // carry their size, and a mesh one holds the session (kilobytes) only while it lives.
    match mesh {
        Some(mesh) if meshed => Box::pin(mesh_tls(conn, &mesh, io, mesh_alpn)).await,
        _ if conn.listener.tls == TlsMode::Strict => {
            tracing::info!(listener = %conn.name, "connection refused: the listener is STRICT and the client did not use mesh TLS");
        }
        _ => carry_on(conn, io, None).await,
    }
}

/// Terminates mesh TLS, then carries on inside it.
async fn mesh_tls(mut conn: Accepted, mesh: &MeshTls, io: ClientIo, offers_mesh_alpn: bool) {
    match mesh.accept(io, HANDSHAKE_TIMEOUT, offers_mesh_alpn).await {
        Ok((tls, client)) => {
            // The client is a proxy that carries HTTP/1 over HTTP/2 to this one.
            let peer = MeshPeer {
                id: client.clone(),
                carries_http1: tls.get_ref().1.alpn_protocol() == Some(MESH_ALPN),
            };
            conn.open.client = Some(client);
            let io = Prefixed::new(Bytes::new(), tls);
            carry_on(conn, io, Some(peer)).await;
        }
        Err(e) => {
            tracing::info!(listener = %conn.name, error = %e, "mesh TLS handshake refused");
        }
    }
}

/// A client that came over mesh TLS.
struct MeshPeer {
    id: Arc<str>,
    /// It negotiated [`MESH_ALPN`]: its HTTP/1 requests may come over HTTP/2.
    carries_http1: bool,
}

/// Detect, then HTTP or opaque TCP.
async fn carry_on<I>(mut conn: Accepted, mut io: Prefixed<I>, peer: Option<MeshPeer>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::new();
    let protocol =
        detect::protocol(conn.protocol(), &mut io, &mut buf, conn.detect_timeout()).await;
    io.unread(buf.freeze());
    conn.open.protocol = protocol;
    let carries_http1 = peer.as_ref().is_some_and(|p| p.carries_http1);
    let client = peer.map(|p| p.id);
    let Some(protocol) = protocol else {
        return;
    };
    match protocol {
        // Boxed: only opaque connections carry the connect and copy state.
        Detected::Opaque => Box::pin(tcp(&conn, io, client)).await,
        http => {
            let http_conn = Arc::new(HttpConn {
                state: conn.state.clone(),
                direction: conn.listener.direction,
                protocol: http,
                listener: conn.name.clone(),
                default_service: conn.listener.default_service.clone(),
                destination: conn.destination,
                client_id: client,
                carries_http1,
            });
            crate::http::server::serve(io, http_conn, conn.limits, request, conn.open);
        }
    }
}

/// An opaque connection: authorized as a whole, then copied to the local application.
async fn tcp<I>(conn: &Accepted, io: I, client: Option<Arc<str>>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // Decided by the config in force now that the connection is known to be opaque.
    let snapshot = conn.state.snapshot();
    let decision = authorize(
        &conn.state,
        &snapshot.settings.authorization,
        &conn.name,
        client.as_ref(),
        None,
    );
    if !decision.allowed {
        tracing::info!(listener = %conn.name, policy = %decision.policy, client = ?client, "opaque connection denied by policy");
        return;
    }
    let default_service = conn.listener.default_service.as_deref();
    let route = local_application(&conn.state, &snapshot, conn.destination, default_service);
    drop(snapshot);
    match route {
        // Boxed: only opaque connections carry the connect and copy state.
        Some(route) => Box::pin(crate::tcp::forward(io, &route)).await,
        None => {
            tracing::info!(listener = %conn.name, "opaque connection closed: the listener has no default service")
        }
    }
}

/// One HTTP request: authorize it, then forward it to the local application.
async fn request(conn: Arc<HttpConn>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let grpc = is_grpc(&req);
    let snapshot = conn.state.snapshot();
    if crate::authz::reads_paths(&snapshot.settings.authorization, &conn.listener) {
        if let Some(problem) = crate::authz::ambiguous_path(req.uri().path()) {
            return bad_path(&conn, problem, grpc, start);
        }
    }
    let decision = authorize(
        &conn.state,
        &snapshot.settings.authorization,
        &conn.listener,
        conn.client_id.as_ref(),
        Some((req.method(), req.uri().path())),
    );
    if !decision.allowed {
        return denied(&conn, &decision, grpc, start);
    }
    set_client_identity(req.headers_mut(), conn.client_id.as_deref());
    // Inbound traffic is for the local application, whatever authority it names.
    let route = local_application(
        &conn.state,
        &snapshot,
        conn.destination,
        conn.default_service.as_deref(),
    );
    let Some(route) = route else {
        return unrouted(&conn, &req, grpc, start);
    };
    drop(snapshot);
    forward(&conn, route, req, start, grpc).await
}

/// The local application: at the address the client dialed when it was redirected here,
/// else the listener's default service.
fn local_application(
    state: &State,
    snapshot: &Snapshot,
    destination: Option<SocketAddr>,
    default_service: Option<&str>,
) -> Option<Arc<Route>> {
    match destination {
        Some(dst) => snapshot
            .router
            .destination(Toward::Local, dst, &state.metrics),
        None => snapshot.router.route(None, default_service).cloned(),
    }
}

/// 400 for a path that path policies could read one way and the application another.
fn bad_path(conn: &HttpConn, problem: &str, grpc: bool, start: Instant) -> Response<ProxyBody> {
    crate::record::unrouted(
        &conn.state.metrics,
        conn.direction,
        Reason::BadPath,
        grpc,
        conn.client_id.clone(),
        start.elapsed(),
    );
    let detail = format!("the path has {problem}, which an application may resolve past this listener's path policies");
    crate::http::local::respond(Reason::BadPath, &detail, grpc)
}

/// Headers that claim who the client is; only this proxy, which verified it, may say so.
const CLIENT_IDENTITY_HEADERS: [&str; 3] = [
    "pymesh-client-id",
    "l5d-client-id",
    "x-forwarded-client-cert",
];

/// The application can trust `pymesh-client-id`: whatever a client sent under these names
/// is dropped, and the identity from its verified mesh certificate (if any) is set.
fn set_client_identity(headers: &mut http::HeaderMap, client: Option<&str>) {
    for name in CLIENT_IDENTITY_HEADERS {
        headers.remove(name);
    }
    if let Some(value) = client.and_then(|id| http::HeaderValue::from_str(id).ok()) {
        headers.insert(CLIENT_IDENTITY_HEADERS[0], value);
    }
}

/// 403 (gRPC PERMISSION_DENIED) naming the policy that refused the client.
fn denied(conn: &HttpConn, decision: &Decision, grpc: bool, start: Instant) -> Response<ProxyBody> {
    let metrics = &conn.state.metrics;
    let peer = conn.client_id.clone();
    crate::record::unrouted(
        metrics,
        conn.direction,
        Reason::Denied,
        grpc,
        peer,
        start.elapsed(),
    );
    let client = conn
        .client_id
        .as_deref()
        .unwrap_or("an unauthenticated client");
    let detail = format!("policy {:?} does not allow {client}", decision.policy);
    let mut resp = crate::http::local::respond(Reason::Denied, &detail, grpc);
    if let Ok(value) = http::HeaderValue::from_str(&decision.policy) {
        resp.headers_mut().insert("pymesh-policy", value);
    }
    resp
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
