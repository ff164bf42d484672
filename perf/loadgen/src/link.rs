//! One client connection: TCP connect plus the hyper HTTP/1.1 or HTTP/2 handshake, split
//! into the handle that sends requests and the future that drives the socket. Generic over
//! the request body: a whole body (`Full`) for requests, a channel for a gRPC stream.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::config::Protocol;

/// Drives a connection's I/O; completes when the connection closes.
pub type Driver = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// Sends requests (with bodies of type `B`) on a connection.
pub enum Sender<B = Full<Bytes>> {
    Http1(http1::SendRequest<B>),
    Http2(http2::SendRequest<B>),
}

/// A connected, handshaken connection.
pub struct Link<B = Full<Bytes>> {
    pub sender: Sender<B>,
    pub driver: Driver,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect failed")]
    Tcp(#[from] io::Error),
    #[error("{protocol:?} handshake failed")]
    Handshake {
        protocol: Protocol,
        source: hyper::Error,
    },
}

/// Why a request on a connection of its own got no response.
#[derive(Debug, thiserror::Error)]
pub enum OnceError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("request failed")]
    Request(#[from] hyper::Error),
}

/// Connect to `addr` and speak `protocol` (HTTP/2 and gRPC: prior knowledge).
pub async fn connect<B>(addr: SocketAddr, protocol: Protocol) -> Result<Link<B>, ConnectError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    let handshake_failed = |source| ConnectError::Handshake { protocol, source };
    Ok(if protocol.is_http2() {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(handshake_failed)?;
        Link {
            sender: Sender::Http2(sender),
            driver: Box::pin(connection),
        }
    } else {
        let (sender, connection) = http1::handshake(io).await.map_err(handshake_failed)?;
        Link {
            sender: Sender::Http1(sender),
            driver: Box::pin(connection),
        }
    })
}

/// Open a connection for `request` alone and send it; resolves with the response head. The
/// connection is driven on a task of its own and closes once the response has been read and
/// dropped (HTTP/1.1 requests also say `connection: close`).
pub async fn once(
    addr: SocketAddr,
    protocol: Protocol,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, OnceError> {
    let Link { mut sender, driver } = connect(addr, protocol).await?;
    // The connection's own errors surface as the response's.
    tokio::spawn(async move {
        let _ = driver.await;
    });
    sender.ready().await?;
    Ok(sender.send(request).await?)
}

impl<B> Sender<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
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
        request: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper::Error>> + Send + 'static {
        match self {
            Sender::Http1(sender) => Either::Left(sender.send_request(request)),
            Sender::Http2(sender) => Either::Right(sender.send_request(request)),
        }
    }
}
