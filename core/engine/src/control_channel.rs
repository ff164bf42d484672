//! Channels to the control plane (Discovery) and to the CA (Identity): TLS 1.3 whose
//! server chain must end at the trust anchors and name the control plane's identity,
//! with this proxy's mesh certificate presented once it has one; or plaintext, when
//! configured so for local development.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::config::Transport;
use crate::errors::source_chain;
use crate::tls::MeshTls;

/// How long connecting (TCP and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelError {
    #[error("{address:?} is not an address: {reason}")]
    Address { address: String, reason: String },
    #[error("the control plane is reached over mutual TLS, and this proxy has no mesh identity")]
    NoIdentity,
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
}

/// A channel to `address` (`http://host:port`), set up by `configure` (timeouts,
/// keep-alives) and carried as `transport` says; over TLS, this proxy's certificate is
/// presented when it has one and `present`.
pub(crate) async fn connect(
    address: &str,
    transport: &Transport,
    mesh: Option<&Arc<MeshTls>>,
    present: bool,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, ChannelError> {
    let endpoint =
        Endpoint::from_shared(address.to_owned()).map_err(|e| ChannelError::Address {
            address: address.to_owned(),
            reason: source_chain(&e),
        })?;
    let endpoint = configure(endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true));
    let connected = match transport {
        Transport::Plaintext => endpoint.connect().await,
        Transport::Tls { identity } => {
            let mesh = mesh.ok_or(ChannelError::NoIdentity)?.clone();
            let connector = TlsConnector {
                mesh,
                expected: identity.clone(),
                present,
            };
            endpoint.connect_with_connector(connector).await
        }
    };
    connected.map_err(|e| ChannelError::Connect {
        address: address.to_owned(),
        reason: source_chain(&e),
    })
}

/// Says once, where a task starts, that its channel is not protected.
pub(crate) fn warn_if_plaintext(transport: &Transport, what: &str) {
    if *transport == Transport::Plaintext {
        tracing::warn!(
            "{what} is reached in plaintext (configured for local development): anyone on the path can read and change what it sends"
        );
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// tonic's connector: TCP, then TLS to the expected control-plane identity.
#[derive(Clone)]
struct TlsConnector {
    mesh: Arc<MeshTls>,
    expected: Arc<str>,
    present: bool,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (mesh, expected, present) = (self.mesh.clone(), self.expected.clone(), self.present);
        Box::pin(async move {
            let authority = uri.authority().ok_or("the address names no host:port")?;
            let stream =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority.as_str()))
                    .await
                    .map_err(|_| format!("connecting timed out after {CONNECT_TIMEOUT:?}"))??;
            let _ = stream.set_nodelay(true);
            let tls = mesh
                .connect_control_plane(stream, &expected, present, CONNECT_TIMEOUT)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}
