//! The request path's promises, tested in-process with real sockets on 127.0.0.1:0:
//! one config snapshot per request across reloads, a retry away from an endpoint that
//! refused the first connection, and opaque-TCP ejections counted like HTTP ones.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pymesh_engine::{config, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP backend answering `<name> <path>`.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    let body = format!("{name} {}", req.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An address where nothing listens (bound, then released).
async fn refused() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn listener(proxy: &Proxy, name: &str) -> SocketAddr {
    proxy
        .listeners()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, addr)| addr)
        .unwrap()
}

/// One HTTP/1.1 GET on a fresh connection: the status and the body.
async fn get(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_refused_first_connection_is_retried_on_the_other_endpoint_from_the_first_request() {
    let live = backend("live").await;
    let dead = refused().await;
    // Fresh proxies, since the defect was in what a new proxy knows of its endpoints.
    for _ in 0..5 {
        let text = format!(
            r#"{{"admin": {{"address": "127.0.0.1:0"}},
                "listeners": [{{"name": "out", "address": "127.0.0.1:0"}}],
                "services": [{{"name": "web", "endpoints": [{{"address": "{live}"}}, {{"address": "{dead}"}}]}}]}}"#
        );
        let proxy = Proxy::start(config::parse(&text).unwrap()).await.unwrap();
        let out = listener(&proxy, "out");
        for i in 0..6 {
            let (status, body) = get(out, "web", "/").await;
            assert_eq!(status, StatusCode::OK, "request {i}: {body}");
            assert_eq!(body, "live /");
        }
        proxy.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_authorized_and_routed_by_one_config_while_reloads_run() {
    // Config A sends the local application's traffic to backend A and denies /b;
    // config B sends it to backend B and denies /a. A request decided by one config
    // gets "A /a", "B /b" or 403; "A /b" or "B /a" would be a mixed pair.
    let (a, b) = (backend("A").await, backend("B").await);
    let text = |backend: SocketAddr, deny: &str| {
        format!(
            r#"{{"admin": {{"address": "127.0.0.1:0"}},
                "listeners": [{{"name": "in", "address": "127.0.0.1:0", "direction": "INBOUND", "defaultService": "app"}}],
                "services": [{{"name": "app", "endpoints": [{{"address": "{backend}"}}]}}],
                "authorization": {{"policies": [{{"name": "no-{deny}", "action": "DENY", "paths": ["/{deny}"]}}]}}}}"#
        )
    };
    let config_a = config::parse(&text(a, "b")).unwrap();
    let config_b = config::parse(&text(b, "a")).unwrap();
    let proxy = Proxy::start(config_a.clone()).await.unwrap();
    let inbound = listener(&proxy, "in");

    let reloading = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                let next = if i % 2 == 0 { &config_b } else { &config_a };
                proxy.reload(next.clone()).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let seen: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let mut clients = Vec::new();
    for c in 0..4 {
        let seen = seen.clone();
        clients.push(tokio::spawn(async move {
            // One keep-alive connection per client, so each request reads its own snapshot.
            let stream = TcpStream::connect(inbound).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            for i in 0..300 {
                let path = if (i + c) % 2 == 0 { "/a" } else { "/b" };
                let req = Request::get(path)
                    .header("host", "app")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let body = String::from_utf8_lossy(&body).into_owned();
                match (status, body.as_str()) {
                    (StatusCode::OK, "A /a") => seen[0].fetch_add(1, Ordering::Relaxed),
                    (StatusCode::OK, "B /b") => seen[1].fetch_add(1, Ordering::Relaxed),
                    (StatusCode::FORBIDDEN, _) => seen[2].fetch_add(1, Ordering::Relaxed),
                    other => panic!("{path} was decided by two configs: {other:?}"),
                };
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    reloading.await.unwrap();
    // Both configs served requests, so the reloads really ran under the traffic.
    let counts: Vec<usize> = seen.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert!(counts.iter().all(|n| *n > 0), "{counts:?}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_opaque_endpoint_that_is_ejected_is_counted() {
    let echo = tcp_echo().await;
    let dead = refused().await;
    let text = format!(
        r#"{{"admin": {{"address": "127.0.0.1:0"}},
            "listeners": [{{"name": "db", "address": "127.0.0.1:0", "protocol": "OPAQUE", "defaultService": "db"}}],
            "services": [{{"name": "db",
                           "endpoints": [{{"address": "{echo}"}}, {{"address": "{dead}"}}],
                           "balancer": {{"kind": "ROUND_ROBIN"}},
                           "failureAccrual": {{"consecutiveFailures": 1}}}}]}}"#
    );
    let proxy = Proxy::start(config::parse(&text).unwrap()).await.unwrap();
    let db = listener(&proxy, "db");
    for i in 0..8u8 {
        let mut stream = TcpStream::connect(db).await.unwrap();
        stream.write_all(&[i; 4]).await.unwrap();
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [i; 4], "connection {i} reached the echo server");
    }
    let metrics = proxy.metrics_text();
    assert!(
        metrics.contains("endpoint_ejections_total{dst_service=\"db\"} 1"),
        "{metrics}"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}
