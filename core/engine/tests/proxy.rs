//! In-process integration tests: a real backend and a real proxy on 127.0.0.1:0,
//! talking HTTP/1.1, HTTP/2 and raw TCP through real sockets.

use std::convert::Infallible;
use std::net::SocketAddr;
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

/// An HTTP/1.1 + HTTP/2 backend answering `<name> <authority> <path>`.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    let authority = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| {
                            req.headers()
                                .get("host")
                                .map(|h| h.to_str().unwrap().to_owned())
                        })
                        .unwrap_or_default();
                    let body = format!("{name} {authority} {}", req.uri().path());
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

fn config(web: &[SocketAddr], extra: &str) -> config::ProxyConfig {
    let endpoints: Vec<String> = web
        .iter()
        .map(|a| format!("{{\"address\": \"{a}\"}}"))
        .collect();
    let text = format!(
        r#"{{
            "admin": {{"address": "127.0.0.1:0"}},
            "listeners": [{{"name": "main", "address": "127.0.0.1:0"}} {extra}],
            "services": [{{"name": "web", "endpoints": [{}]}}, {{"name": "echo", "endpoints": []}}]
        }}"#,
        endpoints.join(",")
    );
    config::parse(&text).unwrap()
}

fn listener(proxy: &Proxy, name: &str) -> SocketAddr {
    proxy
        .listeners()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
}

async fn http1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> (StatusCode, String) {
    sender.ready().await.unwrap();
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_is_routed_by_host_and_reload_keeps_the_connection() {
    let (a, b) = (backend("a").await, backend("b").await);
    let proxy = Proxy::start(config(&[a], "")).await.unwrap();
    let mut client = http1(listener(&proxy, "main")).await;

    assert_eq!(
        get(&mut client, "web", "/one").await,
        (StatusCode::OK, "a web /one".into())
    );
    let (status, body) = get(&mut client, "elsewhere", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("unknown-service"), "{body}");

    proxy.reload(config(&[b], "")).await.unwrap();
    // Same client connection, new endpoint.
    assert_eq!(
        get(&mut client, "web", "/two").await,
        (StatusCode::OK, "b web /two".into())
    );

    let mut bad = config(&[b], "");
    bad.services[0].endpoints[0].address = "nowhere".into();
    let err = proxy.reload(bad).await.unwrap_err();
    assert_eq!(err.path(), Some("services[0].endpoints[0].address"));
    assert_eq!(get(&mut client, "web", "/three").await.1, "b web /three");

    let metrics = proxy.metrics_text();
    assert!(
        metrics.contains(r#"config_reload_total{result="ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"config_reload_total{result="rejected"} 1"#),
        "{metrics}"
    );
    assert!(proxy.shutdown(Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_keeps_the_authority() {
    let a = backend("a").await;
    let proxy = Proxy::start(config(&[a], "")).await.unwrap();
    let stream = TcpStream::connect(listener(&proxy, "main")).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..10 {
        let req = Request::get(format!("http://web/h2/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("a web /h2/{i}"));
    }
    assert!(proxy.shutdown(Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_is_copied_with_half_close() {
    let echo = tcp_echo().await;
    let text = format!(
        r#"{{"admin": {{"address": "127.0.0.1:0"}},
            "listeners": [{{"name": "tcp", "address": "127.0.0.1:0", "protocol": "OPAQUE", "defaultService": "echo"}}],
            "services": [{{"name": "echo", "endpoints": [{{"address": "{echo}"}}]}}]}}"#
    );
    let proxy = Proxy::start(config::parse(&text).unwrap()).await.unwrap();
    let mut stream = TcpStream::connect(listener(&proxy, "tcp")).await.unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload);
    assert!(proxy.shutdown(Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_added_by_reload_serves_and_a_busy_port_is_rejected() {
    let a = backend("a").await;
    let proxy = Proxy::start(config(&[a], "")).await.unwrap();
    proxy
        .reload(config(
            &[a],
            r#", {"name": "extra", "address": "127.0.0.1:0"}"#,
        ))
        .await
        .unwrap();
    let mut client = http1(listener(&proxy, "extra")).await;
    assert_eq!(get(&mut client, "web", "/x").await.1, "a web /x");

    let busy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken = busy.local_addr().unwrap();
    let extra = format!(r#", {{"name": "taken", "address": "{taken}"}}"#);
    let err = proxy.reload(config(&[a], &extra)).await.unwrap_err();
    assert_eq!(err.path(), Some("listeners[1].address"));
    // The failed reload changed nothing: "extra" was not removed.
    assert!(proxy.listeners().iter().any(|(n, _)| n == "extra"));
    assert!(proxy.shutdown(Duration::from_secs(1)).await);
}

/// Reads from `stream` until `text` has arrived (or the stream ends), returning all read.
async fn read_until(stream: &mut TcpStream, text: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(text) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the proxy answered within 5 s")
            .unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Sends `request` on `stream` and reads until `answer` has arrived.
async fn exchange(stream: &mut TcpStream, request: &[u8], answer: &str) -> String {
    stream.write_all(request).await.unwrap();
    read_until(stream, answer).await
}

/// Longer than the proxy's park delay (1 s): the connection has given hyper's state back.
const IDLE_PAST_PARKING: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_is_parked_and_serves_what_comes_next() {
    let a = backend("a").await;
    let proxy = Proxy::start(config(&[a], "")).await.unwrap();
    let mut client = TcpStream::connect(listener(&proxy, "main")).await.unwrap();
    assert!(exchange(
        &mut client,
        b"GET /zero HTTP/1.1\r\nhost: web\r\n\r\n",
        "a web /zero"
    )
    .await
    .starts_with("HTTP/1.1 200"));

    // Parked; then a head in pieces, longer than one wake-up read, with a second request
    // pipelined behind it: both answered, in order, on the same connection.
    tokio::time::sleep(IDLE_PAST_PARKING).await;
    client.write_all(b"GET /one HTTP/1.1\r\nho").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pad = "p".repeat(3000);
    let rest = format!(
        "st: web\r\nx-pad: {pad}\r\n\r\nGET /two HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n"
    );
    client.write_all(rest.as_bytes()).await.unwrap();
    let mut answers = String::new();
    client.read_to_string(&mut answers).await.unwrap();
    let one = answers.find("a web /one").expect(&answers);
    let two = answers.find("a web /two").expect(&answers);
    assert!(one < two, "{answers}");
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");

    // A request with a body, then idle: the next request is served as usual.
    let mut client = TcpStream::connect(listener(&proxy, "main")).await.unwrap();
    assert!(exchange(
        &mut client,
        b"POST /three HTTP/1.1\r\nhost: web\r\ncontent-length: 5\r\n\r\nhello",
        "a web /three"
    )
    .await
    .starts_with("HTTP/1.1 200"));
    tokio::time::sleep(IDLE_PAST_PARKING).await;
    assert!(exchange(
        &mut client,
        b"GET /four HTTP/1.1\r\nhost: web\r\n\r\n",
        "a web /four"
    )
    .await
    .starts_with("HTTP/1.1 200"));

    // A parked connection does not hold up a drain: it is closed.
    let mut parked = TcpStream::connect(listener(&proxy, "main")).await.unwrap();
    exchange(
        &mut parked,
        b"GET /five HTTP/1.1\r\nhost: web\r\n\r\n",
        "a web /five",
    )
    .await;
    tokio::time::sleep(IDLE_PAST_PARKING).await;
    assert!(proxy.shutdown(Duration::from_secs(5)).await);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), parked.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?} {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_is_gathered_before_hyper_serves_it() {
    let a = backend("a").await;
    let proxy = Proxy::start(config(&[a], "")).await.unwrap();

    // A first request whose head trickles in, a few bytes at a time: served once it ends.
    let mut client = TcpStream::connect(listener(&proxy, "main")).await.unwrap();
    for piece in [&b"GET /slow HT"[..], b"TP/1.1\r\nhost: w", b"eb\r\n", b"\r"] {
        client.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(exchange(&mut client, b"\n", "a web /slow")
        .await
        .starts_with("HTTP/1.1 200"));

    // Bare LF line endings end a head too, as hyper's parser accepts them.
    let mut client = TcpStream::connect(listener(&proxy, "main")).await.unwrap();
    assert!(
        exchange(&mut client, b"GET /lf HTTP/1.1\nhost: web\n\n", "a web /lf")
            .await
            .starts_with("HTTP/1.1 200")
    );

    // A head past the limit, never ended, is not waited on: hyper answers 431.
    let mut client = TcpStream::connect(listener(&proxy, "main")).await.unwrap();
    let endless = format!(
        "GET / HTTP/1.1\r\nhost: web\r\nx-pad: {}",
        "p".repeat(70 * 1024)
    );
    let _ = client.write_all(endless.as_bytes()).await;
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut answer))
        .await
        .expect("an answer, not a wait")
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 431"),
        "{:?}",
        &answer[..n]
    );

    // A client that closes in the middle of a head gets hyper's answer to it, not a hang.
    let mut client = TcpStream::connect(listener(&proxy, "main")).await.unwrap();
    client.write_all(b"GET / HTTP/1.1\r\nhost").await.unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was left open");
}
