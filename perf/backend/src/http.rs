//! `http` mode: HTTP/1.1 and h2c on one port; a fixed-size `200` for every request, or a gRPC
//! echo when the request says `content-type: application/grpc`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use crate::config::Config;
use crate::grpc;

/// The body of every response: the preallocated payload or a gRPC echo stream.
pub type ReplyBody = Either<Full<Bytes>, grpc::EchoBody>;

/// Shared by every connection of one server: the protocol builder and the response recipe.
pub struct Server {
    builder: auto::Builder<TokioExecutor>,
    responder: Responder,
}

impl Server {
    /// Prepare the server for `config` (the response body is allocated once, here).
    pub fn new(config: &Config) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        Self {
            builder,
            responder: Responder::new(config),
        }
    }

    /// Serve one accepted connection until the client closes it. Protocol errors end the
    /// connection quietly: a load generator's abrupt close is not worth a log line.
    pub async fn serve_connection(&self, stream: TcpStream) {
        let responder = self.responder.clone();
        let service = service_fn(move |request| responder.clone().respond(request));
        let _ = self
            .builder
            .serve_connection(TokioIo::new(stream), service)
            .await;
    }
}

/// Builds the answer to one request. Cloning it is cheap (the body is reference-counted).
#[derive(Clone)]
pub struct Responder {
    body: Bytes,
    delay: Duration,
}

impl Responder {
    /// A responder whose payload is `config.response_size` bytes.
    pub fn new(config: &Config) -> Self {
        Self {
            body: Bytes::from(vec![b'x'; config.response_size]),
            delay: config.delay,
        }
    }

    /// Answer one request: gRPC echo, or drain the request body and send the payload.
    pub async fn respond(
        self,
        request: Request<Incoming>,
    ) -> Result<Response<ReplyBody>, Infallible> {
        if grpc::is_grpc(&request) {
            self.wait().await;
            return Ok(grpc::echo(request).map(Either::Right));
        }
        let mut body = request.into_body();
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                // The client went away mid-body; the answer below will not be read either.
                break;
            }
        }
        self.wait().await;
        let mut response = Response::new(Either::Left(Full::new(self.body.clone())));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        Ok(response)
    }

    async fn wait(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}
