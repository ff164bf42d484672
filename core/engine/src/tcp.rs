//! Opaque TCP: bytes copied both ways to an endpoint of the routed service, with
//! half-close passed on (when one side finishes sending, the other side's write half
//! is shut down). A failed connect counts against the endpoint with the balancer, like
//! an HTTP try, and is tried on another endpoint. Connections go through `connect`, so
//! a meshed endpoint is reached over mutual TLS and the endpoint's cap applies.

use std::net::SocketAddr;

use tokio::io::{copy_bidirectional, AsyncRead, AsyncWrite};

use crate::balance::Verdict;
use crate::route::Route;

/// Endpoints tried before giving up on a connection.
const CONNECT_TRIES: usize = 3;

pub(crate) async fn forward<I>(mut client: I, route: &Route)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let service = &route.target;
    let name = &service.settings.name;
    let mut failed_on: Option<SocketAddr> = None;
    for _ in 0..CONNECT_TRIES {
        let Some(endpoint) = service.balancer.pick_avoiding(None, failed_on) else {
            tracing::info!(service = %name, "opaque connection closed: the service has no endpoints");
            return;
        };
        let Some(upstream) = service.upstream(&endpoint) else {
            return;
        };
        let in_flight = endpoint.start();
        let connected = upstream.connect().await;
        let verdict = match connected {
            Ok(_) => Verdict::Success,
            Err(_) => Verdict::Failure,
        };
        service
            .balancer
            .record(&endpoint, verdict, in_flight.finish());
        match connected {
            Ok(mut upstream) => {
                if let Err(e) = copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(service = %name, error = %e, "opaque connection ended with an error");
                }
                return;
            }
            Err(e) => {
                failed_on = Some(endpoint.addr);
                tracing::info!(service = %name, error = %e, "opaque connect failed");
            }
        }
    }
    tracing::info!(service = %name, "opaque connection closed: no endpoint accepted it");
}
