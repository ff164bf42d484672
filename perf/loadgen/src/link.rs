//! One client connection: TCP connect plus the hyper HTTP/1.1 or HTTP/2 handshake, split
//! into the handle that sends requests and the future that drives the socket.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::config::Protocol;

/// Drives a connection's I/O; completes when the connection closes.
pub type Driver = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// Sends requests on a connection.
pub enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// A connected, handshaken connection.
pub struct Link {
    pub sender: Sender,
    pub driver: Driver,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect failed: {0}")]
    Tcp(#[from] io::Error),
    #[error("{protocol:?} handshake failed: {source}")]
    Handshake {
        protocol: Protocol,
        source: hyper::Error,
    },
}

/// Connect to `addr` and speak `protocol` (HTTP/2: prior knowledge).
pub async fn connect(addr: SocketAddr, protocol: Protocol) -> Result<Link, ConnectError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    let handshake_failed = |source| ConnectError::Handshake { protocol, source };
    Ok(match protocol {
        Protocol::Http1 => {
            let (sender, connection) = http1::handshake(io).await.map_err(handshake_failed)?;
            Link {
                sender: Sender::Http1(sender),
                driver: Box::pin(connection),
            }
        }
        Protocol::Http2 => {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(handshake_failed)?;
            Link {
                sender: Sender::Http2(sender),
                driver: Box::pin(connection),
            }
        }
    })
}

impl Sender {
    /// Wait until the connection can take a request (HTTP/1.1: the previous exchange is done).
    pub async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::Http1(sender) => sender.ready().await,
            Sender::Http2(sender) => sender.ready().await,
        }
    }

    /// Queue `request` on the connection; the future resolves with the response head.
    pub fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper::Error>> + Send + 'static {
        match self {
            Sender::Http1(sender) => Either::Left(sender.send_request(request)),
            Sender::Http2(sender) => Either::Right(sender.send_request(request)),
        }
    }
}
