//! The admin endpoint (loopback by default): `/metrics`, `/live`, `/ready`,
//! `/config` (GET the running config; PUT a new one to reload) and `POST /shutdown`.

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

pub(crate) async fn serve(listener: TcpListener, proxy: WeakProxy, shutdown: CancellationToken) {
    let proxy = Arc::new(proxy);
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
            // The admin endpoint stays up while draining (so /ready can say 503) and
            // closes once the proxy is gone.
            () = closed(&proxy) => break,
        };
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(proxy.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            let result =
                crate::http::server::until_drained(conn, &shutdown, |c| c.graceful_shutdown())
                    .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
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
        (&Method::PUT | &Method::POST, "/config") => reload(&proxy, req).await,
        (&Method::POST, "/shutdown") => {
            proxy.request_stop();
            text(StatusCode::OK, "shutting down\n")
        }
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
