//! The admin endpoint (loopback by default): `/metrics`, `/live`, `/ready`, `/listeners`
//! and `GET /config`, read-only; `PUT /config` (reload) and `POST /shutdown` only when
//! `admin.enableMutations` is on, and then only for requests no browser page or DNS
//! rebinding can make (see [`refuse_mutation`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::WeakProxy;
use crate::Error;

/// The largest config the admin endpoint accepts.
const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

pub(crate) async fn serve(listener: TcpListener, proxy: WeakProxy) {
    let proxy = Arc::new(proxy);
    // The admin endpoint stays up while the proxy drains, so that `/ready` can say 503 and
    // `/metrics` show the drain; its connections close once the proxy is gone.
    let gone = CancellationToken::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = closed(&proxy) => break,
        };
        let proxy = proxy.clone();
        let gone = gone.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(proxy.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            let result =
                crate::http::server::until_drained(conn, &gone, |c| c.graceful_shutdown()).await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    gone.cancel();
}

async fn closed(proxy: &WeakProxy) {
    loop {
        if proxy.upgrade().is_none() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn handle(
    proxy: Arc<WeakProxy>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(proxy) = proxy.upgrade() else {
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "stopped\n"));
    };
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(proxy.metrics_text())))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "metrics\n")),
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") if proxy.is_shutting_down() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        (&Method::GET, "/ready") if !proxy.is_ready() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for a certificate from the mesh CA\n",
        ),
        (&Method::GET, "/ready") => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/config") => json(StatusCode::OK, proxy.config_json()),
        (&Method::GET, "/listeners") => {
            let listeners: Vec<_> = proxy
                .listeners()
                .into_iter()
                .map(
                    |(name, addr)| serde_json::json!({ "name": name, "address": addr.to_string() }),
                )
                .collect();
            json(
                StatusCode::OK,
                serde_json::Value::from(listeners).to_string(),
            )
        }
        (&Method::PUT | &Method::POST, "/config") => match refuse_mutation(&proxy, &req, true) {
            Some(refused) => refused,
            None => reload(&proxy, req).await,
        },
        (&Method::POST, "/shutdown") => match refuse_mutation(&proxy, &req, false) {
            Some(refused) => refused,
            None => {
                proxy.request_stop();
                text(StatusCode::OK, "shutting down\n")
            }
        },
        (_, "/metrics" | "/live" | "/ready" | "/config" | "/listeners" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /live, /ready, /config\n",
        ),
    };
    Ok(response)
}

/// Why a request that would change the proxy is refused, if it is: mutations are off;
/// its `Host` is not a loopback address (a page on another name, DNS rebinding); it has an
/// `Origin` (every browser's cross-site request does); a config that is not JSON or YAML
/// (`text/plain` is what a form can send without a preflight).
fn refuse_mutation(
    proxy: &crate::Proxy,
    req: &Request<Incoming>,
    has_config: bool,
) -> Option<Response<Full<Bytes>>> {
    if !proxy.admin_mutations() {
        return Some(text(
            StatusCode::FORBIDDEN,
            "the admin endpoint is read-only: set admin.enableMutations to reload or stop the proxy through it (or edit its config file)\n",
        ));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        return Some(text(
            StatusCode::FORBIDDEN,
            "a change needs a loopback Host (127.0.0.1, [::1] or localhost)\n",
        ));
    }
    if req.headers().contains_key(header::ORIGIN) {
        return Some(text(
            StatusCode::FORBIDDEN,
            "a change is not taken from a browser page (the request has an Origin)\n",
        ));
    }
    if has_config {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let accepted = [
            "application/json",
            "application/yaml",
            "application/x-yaml",
            "text/yaml",
        ];
        if !accepted.iter().any(|t| essence.eq_ignore_ascii_case(t)) {
            return Some(text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "a config is sent as application/json or application/yaml\n",
            ));
        }
    }
    None
}

/// `Host` names this machine's loopback: `localhost`, or a loopback IP, with any port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn reload(proxy: &crate::Proxy, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = match Limited::new(req.into_body(), MAX_CONFIG_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return error_json(
                StatusCode::BAD_REQUEST,
                "",
                &format!("cannot read the config: {e}"),
            )
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error_json(StatusCode::BAD_REQUEST, "", "the config is not UTF-8");
    };
    match proxy.reload_text(text).await {
        Ok(()) => json(StatusCode::OK, proxy.config_json()),
        Err(Error::Config(e)) => error_json(StatusCode::BAD_REQUEST, &e.path, &e.message),
        Err(e) => error_json(StatusCode::SERVICE_UNAVAILABLE, "", &e.to_string()),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_json(status: StatusCode, path: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": { "path": path, "message": message } });
    json(status, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn only_loopback_hosts_may_change_the_proxy() {
        for ok in [
            "127.0.0.1:4191",
            "127.0.0.9",
            "localhost:80",
            "LOCALHOST",
            "[::1]:4191",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:4191",
            "10.0.0.1:4191",
            "localhost.evil.example",
            "[::2]:1",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
