//! The `pymesh-loadgen` binary against an in-process `pymesh-backend` server on
//! 127.0.0.1:0: a paced run has no errors, the right count and ordered percentiles, over
//! HTTP/1.1, HTTP/2, gRPC unary, gRPC streaming and a new connection per request.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Serve `config` on 127.0.0.1:0 from a background thread; the server lives until the test
/// process ends.
fn start_backend(config: pymesh_backend::Config) -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("backend runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("local addr"))
                .expect("report address");
            let _ = pymesh_backend::serve(listener, config, std::future::pending()).await;
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("backend started")
}

fn loadgen(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_pymesh-loadgen"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run pymesh-loadgen");
    assert!(
        output.status.success(),
        "pymesh-loadgen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object on stdout")
}

fn u(report: &Value, pointer: &str) -> u64 {
    report
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing in {report}"))
}

fn check_paced_run(report: &Value, expected_requests: u64) {
    assert_eq!(u(report, "/errors"), 0, "{report}");
    let requests = u(report, "/requests");
    assert!(
        requests.abs_diff(expected_requests) <= 1,
        "{requests} requests, expected {expected_requests}: {report}"
    );
    assert_eq!(u(report, "/status_counts/200"), requests, "{report}");

    let percentiles: Vec<u64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|p| u(report, &format!("/latency_us/{p}")))
        .collect();
    assert!(
        percentiles.windows(2).all(|w| w[0] <= w[1]),
        "{percentiles:?}"
    );
    assert!(
        percentiles[0] > 0,
        "a loopback round trip takes some microseconds"
    );

    let histogram = report["histogram"].as_array().expect("histogram list");
    let pairs: Vec<(f64, u64)> = histogram
        .iter()
        .map(|pair| {
            let p = pair[0].as_f64().expect("percentile");
            let v = pair[1].as_u64().expect("value");
            (p, v)
        })
        .collect();
    assert_eq!(pairs.first().map(|p| p.0), Some(0.0));
    assert_eq!(pairs.last().map(|p| p.0), Some(100.0));
    assert!(
        pairs
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{pairs:?}"
    );
    assert_eq!(pairs.last().map(|p| p.1), Some(percentiles[4]));
}

#[test]
fn http1_at_200_rps_for_1_s_has_no_errors() {
    let addr = start_backend(pymesh_backend::Config::default());
    let url = format!("http://{addr}/");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    check_paced_run(&report, 200);
    assert_eq!(report["requested_rps"].as_f64(), Some(200.0));
}

#[test]
fn http2_post_at_200_rps_for_1_s_has_no_errors() {
    let addr = start_backend(pymesh_backend::Config::default());
    let url = format!("http://{addr}/upload");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--protocol",
        "http2",
        "--method",
        "POST",
        "--body-size",
        "512",
        "--header",
        "host: svc.local",
        "--connections",
        "2",
        "--threads",
        "2",
    ]);
    check_paced_run(&report, 200);
    assert_eq!(report["protocol"], "http2");
}

#[test]
fn a_stalled_server_shows_up_as_latency_and_timeouts() {
    // Every response takes 300 ms: one HTTP/1.1 connection can do ~3 rps but 50 are asked
    // for. Coordinated-omission correction must report latencies far above 300 ms, and the
    // requests never sent or still out at the end as timeouts.
    let addr = start_backend(pymesh_backend::Config {
        delay: Duration::from_millis(300),
        ..Default::default()
    });
    let url = format!("http://{addr}/");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "50",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--connections",
        "1",
        "--drain",
        "0.1",
    ]);
    assert_eq!(u(&report, "/requests"), 50, "{report}");
    let timeouts = u(&report, "/error_counts/timeout");
    assert!(timeouts >= 40, "{report}");
    assert_eq!(u(&report, "/errors"), timeouts, "{report}");
    assert!(u(&report, "/latency_us/max") > 400_000, "{report}");
}

#[test]
fn requests_a_lagging_connection_owes_are_sent_late_in_the_drain_not_dropped() {
    // Every response takes 50 ms, so one HTTP/1.1 connection does ~20 rps; 50 rps for 0.4 s
    // asks it for 20 requests. By the stop it has sent only about 8: the rest are sent late
    // in the drain (their latency runs from when they were due) and all are answered. A
    // generator that falls behind is not an error of the system under test.
    let addr = start_backend(pymesh_backend::Config {
        delay: Duration::from_millis(50),
        ..Default::default()
    });
    let url = format!("http://{addr}/");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "50",
        "--duration",
        "0.4",
        "--warmup",
        "0",
        "--connections",
        "1",
        "--drain",
        "5",
    ]);
    assert_eq!(u(&report, "/requests"), 20, "{report}");
    assert_eq!(u(&report, "/errors"), 0, "{report}");
    assert_eq!(u(&report, "/status_counts/200"), 20, "{report}");
    // The last request was due at 0.38 s and could not be answered before ~1 s.
    assert!(u(&report, "/latency_us/max") > 400_000, "{report}");
}

#[test]
fn closed_loop_runs_flat_out() {
    let addr = start_backend(pymesh_backend::Config::default());
    let url = format!("http://{addr}/");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "0",
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
    ]);
    assert_eq!(u(&report, "/errors"), 0, "{report}");
    assert!(u(&report, "/requests") > 100, "{report}");
}

#[test]
fn unreachable_target_fails_fast_with_a_clear_error() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_pymesh-loadgen"))
        .args([
            "--url",
            &format!("http://127.0.0.1:{port}/"),
            "--rate",
            "10",
            "--duration",
            "5",
        ])
        .output()
        .expect("run pymesh-loadgen");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot connect to 127.0.0.1"), "{stderr}");
}

#[test]
fn grpc_unary_at_200_rps_for_1_s_has_no_errors() {
    let addr = start_backend(pymesh_backend::Config::default());
    let url = format!("http://{addr}/pymesh.bench.Echo/Unary");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--protocol",
        "grpc",
        "--body-size",
        "1024",
        "--connections",
        "2",
    ]);
    check_paced_run(&report, 200);
    assert_eq!(report["protocol"], "grpc");
    assert_eq!(u(&report, "/grpc_status_counts/0"), 200, "{report}");
}

#[test]
fn grpc_unary_without_grpc_status_is_an_error() {
    // Not a gRPC answer (the backend sees no gRPC content type): 200, but no grpc-status.
    let addr = start_backend(pymesh_backend::Config::default());
    let url = format!("http://{addr}/");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "100",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--protocol",
        "grpc",
        "--header",
        "content-type: text/plain",
    ]);
    assert_eq!(u(&report, "/requests"), 50, "{report}");
    assert_eq!(u(&report, "/status_counts/200"), 50, "{report}");
    assert_eq!(u(&report, "/grpc_status_counts/missing"), 50, "{report}");
    assert_eq!(u(&report, "/errors"), 50, "{report}");
}

#[test]
fn grpc_stream_at_200_messages_per_s_for_1_s_has_no_errors() {
    let addr = start_backend(pymesh_backend::Config::default());
    let url = format!("http://{addr}/pymesh.bench.Echo/Stream");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--protocol",
        "grpc-stream",
        "--body-size",
        "3000",
        "--connections",
        "2",
    ]);
    check_paced_run(&report, 200);
    assert_eq!(report["protocol"], "grpc-stream");
}

#[test]
fn grpc_stream_closed_loop_keeps_one_message_in_flight() {
    let addr = start_backend(pymesh_backend::Config::default());
    let url = format!("http://{addr}/pymesh.bench.Echo/Stream");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "0",
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
        "--protocol",
        "grpc-stream",
        "--connections",
        "1",
    ]);
    assert_eq!(u(&report, "/errors"), 0, "{report}");
    assert!(u(&report, "/requests") > 100, "{report}");
}

#[test]
fn new_connection_per_request_at_200_rps_for_1_s_has_no_errors() {
    let addr = start_backend(pymesh_backend::Config::default());
    let url = format!("http://{addr}/");
    let report = loadgen(&[
        "--url",
        &url,
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--connections",
        "4",
        "--new-connection-per-request",
    ]);
    check_paced_run(&report, 200);
    assert_eq!(report["new_connection_per_request"], true);
    let grpc = loadgen(&[
        "--url",
        &url,
        "--rate",
        "100",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--protocol",
        "grpc",
        "--new-connection-per-request",
    ]);
    check_paced_run(&grpc, 50);
}
