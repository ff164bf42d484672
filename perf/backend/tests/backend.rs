//! The `pymesh-backend` binary, driven over real sockets: startup line, HTTP/1.1, h2c,
//! gRPC echo (streaming), TCP echo, environment variables and SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running backend process, killed when dropped.
struct Backend {
    child: Child,
    addr: SocketAddr,
}

impl Backend {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pymesh-backend"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start pymesh-backend");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the startup line");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("unexpected startup line {line:?}"));
        Self { child, addr }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn h1(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    sender
}

async fn h2<B>(addr: SocketAddr) -> http2::SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

fn grpc_message(payload: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(payload);
    Bytes::from(framed)
}

#[tokio::test]
async fn http1_get_and_post_get_the_fixed_body() {
    let backend = Backend::start(&["--response-size", "100"], &[]);
    let mut sender = h1(backend.addr).await;
    for (method, body) in [("GET", ""), ("POST", "some request body"), ("GET", "")] {
        sender.ready().await.expect("keep-alive connection ready");
        let request = Request::builder()
            .method(method)
            .uri("/any/path")
            .header("host", "backend")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "application/octet-stream"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body.len(), 100);
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_on_the_same_port() {
    let backend = Backend::start(&[], &[("PYMESH_BACKEND_RESPONSE_SIZE", "7")]);
    let mut sender = h2(backend.addr).await;
    let request = Request::builder()
        .uri(format!("http://{}/", backend.addr))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body.len(), 7, "PYMESH_BACKEND_RESPONSE_SIZE applies");
}

#[tokio::test]
async fn grpc_echo_streams_message_by_message() {
    let backend = Backend::start(&[], &[]);
    let mut sender = h2(backend.addr).await;
    let (mut tx, body) = Channel::<Bytes>::new(4);
    let request = Request::builder()
        .method("POST")
        .uri(format!("http://{}/echo.Echo/Stream", backend.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("request");
    let first = grpc_message(b"hello");
    tx.send_data(first.clone())
        .await
        .expect("send first message");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let mut body = response.into_body();

    // The first message comes back before the request stream ends: a real stream.
    let mut echoed = Vec::new();
    while echoed.len() < first.len() {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("first echo in time")
            .expect("a frame")
            .expect("no error");
        echoed.extend_from_slice(&frame.into_data().expect("data frame"));
    }
    assert_eq!(echoed, first);

    let second = grpc_message(&[7u8; 3000]);
    tx.send_data(second.clone())
        .await
        .expect("send second message");
    drop(tx);
    let rest = body.collect().await.expect("rest of the body");
    let trailers = rest.trailers().cloned().expect("trailers");
    assert_eq!(rest.to_bytes(), second);
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test]
async fn tcp_echo_mode_echoes_bytes() {
    let backend = Backend::start(&["--mode", "tcp-echo"], &[]);
    let mut stream = TcpStream::connect(backend.addr).await.expect("connect");
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut reader, mut writer) = stream.split();
    let write = async {
        writer.write_all(&payload).await.expect("write");
        writer.shutdown().await.expect("half-close");
    };
    let mut echoed = Vec::new();
    let read = reader.read_to_end(&mut echoed);
    let ((), read) = tokio::join!(write, read);
    read.expect("read the echo");
    assert_eq!(echoed, payload);
}

#[test]
fn exits_on_sigterm() {
    let mut backend = Backend::start(&["--threads", "2"], &[]);
    let status = Command::new("kill")
        .args(["-TERM", &backend.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = backend.child.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            return;
        }
        assert!(Instant::now() < deadline, "still running 5 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_flags_are_rejected() {
    let output = Command::new(env!("CARGO_BIN_EXE_pymesh-backend"))
        .args(["--mode", "udp"])
        .output()
        .expect("run pymesh-backend");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--mode"));
}
