//! Opaque TCP: bytes copied both ways to an endpoint, with half-close passed on
//! (when one side finishes sending, the other side's write half is shut down).

use std::sync::Arc;

use tokio::io::copy_bidirectional;

use crate::http::upstream::connect_tcp;
use crate::io::ClientIo;
use crate::route::Route;

pub async fn forward(mut client: ClientIo, route: Arc<Route>) {
    let target = &route.target;
    let Some(endpoint) = target.balancer.pick() else {
        tracing::info!(service = %target.settings.name, "opaque connection closed: the service has no endpoints");
        return;
    };
    let mut upstream = match connect_tcp(endpoint.addr, target.settings.timeouts.connect).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::info!(service = %target.settings.name, error = %e, "opaque connection closed");
            return;
        }
    };
    if let Err(e) = copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(service = %target.settings.name, error = %e, "opaque connection ended with an error");
    }
}
