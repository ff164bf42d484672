//! The outbound pipeline: connections from the local application to other services,
//! top to bottom:
//!
//! ```text
//! accept (listen) → detect → HTTP | TCP
//!     HTTP, per request: route → admit → attempts → (mesh TLS) upstream
//!     TCP:               route → connect (mesh TLS) → copy
//! ```
//!
//! A connection redirected to a transparent listener goes where its client meant: a
//! service's virtual IP to that service, one of its endpoints to that endpoint with the
//! service's policy, any other address straight through. Otherwise a request names its
//! service by `Host`/`:authority`, else the listener's default service, which also takes
//! opaque TCP. Endpoints with an identity are reached over mutual TLS (`connect`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::detect::{self, Detected};
use crate::http::body::ProxyBody;
use crate::http::forward::{forward, unrouted};
use crate::http::server::{is_grpc, request_authority, HttpConn};
use crate::io::ClientIo;
use crate::listen::Accepted;
use crate::route::{Route, Toward};
use crate::state::Snapshot;

pub(crate) async fn serve(mut conn: Accepted, stream: TcpStream) {
    let record = conn.open.record();
    let mut io = ClientIo::accepted(
        Bytes::new(),
        stream,
        record.read_bytes.clone(),
        record.write_bytes.clone(),
    );
    let mut buf = BytesMut::new();
    let protocol =
        detect::protocol(conn.protocol(), &mut io, &mut buf, conn.detect_timeout()).await;
    io.unread(buf.freeze());
    conn.open.protocol = protocol;
    match protocol {
        None => {}
        Some(Detected::Opaque) => {
            let default_service = conn.listener.default_service.as_deref();
            // Decided by the config in force now that the connection is known to be opaque.
            let route = route(
                &conn.state,
                &conn.state.snapshot(),
                conn.destination,
                None,
                default_service,
            );
            match route {
                // Boxed: only opaque connections carry the connect and copy state.
                Some(route) => Box::pin(crate::tcp::forward(io, &route)).await,
                None => {
                    tracing::info!(listener = %conn.name, "opaque connection closed: the listener has no default service")
                }
            }
        }
        Some(http) => {
            let http_conn = Arc::new(HttpConn {
                state: conn.state.clone(),
                direction: conn.listener.direction,
                protocol: http,
                listener: conn.name.clone(),
                default_service: conn.listener.default_service.clone(),
                destination: conn.destination,
                client_id: None,
                carries_http1: false,
            });
            crate::http::server::serve(io, http_conn, conn.limits, request, conn.open);
        }
    }
}

/// One HTTP request: route it, then forward it.
async fn request(conn: Arc<HttpConn>, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let grpc = is_grpc(&req);
    let route = route(
        &conn.state,
        &conn.state.snapshot(),
        conn.destination,
        request_authority(&req),
        conn.default_service.as_deref(),
    );
    match route {
        Some(route) => forward(&conn, route, req, start, grpc).await,
        None => unrouted(&conn, &req, grpc, start),
    }
}

/// Where a connection or request goes: its original destination when it was redirected,
/// else its authority, else the listener's default service.
fn route(
    state: &crate::state::State,
    snapshot: &Snapshot,
    destination: Option<SocketAddr>,
    authority: Option<&str>,
    default_service: Option<&str>,
) -> Option<Arc<Route>> {
    match destination {
        Some(dst) => snapshot
            .router
            .destination(Toward::Outbound, dst, &state.metrics),
        None => snapshot.router.route(authority, default_service).cloned(),
    }
}
