//! Opaque TCP: bytes copied both ways to an endpoint, with half-close passed on
//! (when one side finishes sending, the other side's write half is shut down).
//! A failed connect counts against the endpoint and is tried on another one. A meshed
//! endpoint is reached over mutual TLS, so opaque TCP is protected like HTTP.

use std::sync::Arc;

use tokio::io::copy_bidirectional;

use crate::balance::{Transition, Verdict};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::upstream::{connect_tcp, secure};
use crate::route::Route;
use crate::tls::MeshTls;

/// Endpoints tried before giving up on a connection.
const CONNECT_TRIES: usize = 3;

pub async fn forward<I>(mut client: I, route: Arc<Route>, mesh: Option<Arc<MeshTls>>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let target = &route.target;
    let policy = &target.settings.policy;
    for _ in 0..CONNECT_TRIES {
        let Some(endpoint) = target.balancer.pick(None) else {
            tracing::info!(service = %target.settings.name, "opaque connection closed: the service has no endpoints");
            return;
        };
        let in_flight = endpoint.start();
        let timeout = target.settings.timeouts.connect;
        let connected = match connect_tcp(endpoint.addr, timeout).await {
            Ok(stream) => {
                let identity = endpoint.identity.as_deref();
                secure(stream, endpoint.addr, identity, mesh.as_deref(), timeout).await
            }
            Err(e) => Err(e),
        };
        let rtt = in_flight.finish();
        let verdict = if connected.is_ok() {
            Verdict::Success
        } else {
            Verdict::Failure
        };
        let transition =
            endpoint.record(verdict, rtt, policy.balancer.decay, &policy.accrual, || {
                target.balancer.may_eject()
            });
        if transition == Transition::Ejected {
            tracing::warn!(service = %target.settings.name, endpoint = %endpoint.addr, "endpoint ejected after failures");
        }
        match connected {
            Ok(mut upstream) => {
                if let Err(e) = copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(service = %target.settings.name, error = %e, "opaque connection ended with an error");
                }
                return;
            }
            Err(e) => {
                tracing::info!(service = %target.settings.name, error = %e, "opaque connect failed")
            }
        }
    }
    tracing::info!(service = %target.settings.name, "opaque connection closed: no endpoint accepted it");
}
