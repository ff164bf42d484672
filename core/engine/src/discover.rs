//! The proxy side of the control plane: watch this proxy's configuration and every
//! service's endpoints, and apply them to the running proxy without dropping
//! connections.
//!
//! Fail static: when the control plane is away the proxy keeps serving what it last
//! had, reconnects with jittered exponential backoff rotating over the replicas, and
//! only replaces its state once a new session has delivered a complete one (the
//! config and the full endpoint set of every service in it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use pymesh_api::config::v1::{Authorization, Endpoint, Service};
use pymesh_api::mesh::v1::discovery_client::DiscoveryClient;
use pymesh_api::mesh::v1::{ProxyIdentity, WatchConfigRequest, WatchEndpointsRequest};
use tokio::sync::watch;
use tokio_stream::{StreamExt, StreamMap};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::config::{ControlPlaneSettings, Transport};
use crate::control_channel::{self, ChannelError};
use crate::tls::MeshTls;

/// A complete state from the control plane: every service with its endpoints, and
/// mesh-wide authorization when it sends one. The proxy lays it over its own config.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Discovered {
    pub(crate) services: Vec<Service>,
    pub(crate) authorization: Option<Authorization>,
}

/// Watches the control plane until `shutdown` (or until nobody listens to `publish`),
/// publishing each complete state it delivers.
pub(crate) async fn run(
    settings: ControlPlaneSettings,
    mesh: Option<Arc<MeshTls>>,
    publish: watch::Sender<Option<Discovered>>,
    shutdown: CancellationToken,
) {
    control_channel::warn_if_plaintext(&settings.transport, "the control plane");
    let identity = ProxyIdentity {
        namespace: settings.namespace.clone(),
        service_account: settings.service_account.clone(),
        workload: settings.workload.clone(),
        proxy_id: format!("{}-{}", std::process::id(), fastrand::u32(..)),
    };
    let backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
    let mut failures: u32 = 0;
    let mut next = 0usize;
    loop {
        if shutdown.is_cancelled() || publish.is_closed() {
            return;
        }
        let address = &settings.addresses[next % settings.addresses.len()];
        // Discovery needs this proxy's certificate: wait for the first one.
        if let (Transport::Tls { .. }, Some(mesh)) = (&settings.transport, &mesh) {
            while !mesh.is_certified() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
        let session = Session {
            transport: &settings.transport,
            mesh: mesh.as_ref(),
            publish: &publish,
            identity: identity.clone(),
            established: false,
        };
        let outcome = tokio::select! {
            outcome = session.run(address) => outcome,
            () = shutdown.cancelled() => return,
        };
        match outcome {
            // A session that delivered a state resets the backoff.
            (true, e) => {
                failures = 0;
                tracing::warn!(control_plane = %address, error = %e, "control plane stream ended; serving the last state");
            }
            (false, e) => {
                tracing::warn!(control_plane = %address, error = %e, "control plane unreachable; serving the last state");
            }
        }
        failures = failures.saturating_add(1);
        next += 1;
        tokio::select! {
            () = tokio::time::sleep(backoff.pause(failures)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] ChannelError),
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("the {0} stream ended")]
    Ended(String),
    #[error("the proxy stopped")]
    Stopped,
}

struct Session<'a> {
    transport: &'a Transport,
    mesh: Option<&'a Arc<MeshTls>>,
    publish: &'a watch::Sender<Option<Discovered>>,
    identity: ProxyIdentity,
    established: bool,
}

impl Session<'_> {
    /// Returns whether a complete state was delivered, and why the session ended.
    async fn run(mut self, address: &str) -> (bool, SessionError) {
        let error = match self.watch(address).await {
            Ok(never) => match never {},
            Err(e) => e,
        };
        (self.established, error)
    }

    async fn watch(&mut self, address: &str) -> Result<std::convert::Infallible, SessionError> {
        let channel = control_channel::connect(address, self.transport, self.mesh, true, |e| {
            // Notice a vanished control plane within seconds, not at the next TCP timeout.
            e.http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
        })
        .await?;
        let mut client = DiscoveryClient::new(channel);
        let mut configs = client
            .watch_config(WatchConfigRequest {
                identity: Some(self.identity.clone()),
            })
            .await?
            .into_inner();
        tracing::info!(control_plane = %address, "watching the control plane");

        let mut watches: StreamMap<
            String,
            tonic::Streaming<pymesh_api::mesh::v1::EndpointsUpdate>,
        > = StreamMap::new();
        let mut services: Option<Vec<Service>> = None;
        let mut authorization: Option<Authorization> = None;
        let mut endpoints: HashMap<String, BTreeMap<String, Endpoint>> = HashMap::new();
        let mut complete: HashSet<String> = HashSet::new();
        loop {
            tokio::select! {
                update = configs.message() => {
                    let update = update?.ok_or_else(|| SessionError::Ended("config".into()))?;
                    let config = update.config.unwrap_or_default();
                    authorization = config.authorization;
                    let wanted: Vec<Service> = config.services;
                    self.follow(&mut client, &mut watches, &wanted).await?;
                    let names: HashSet<&str> = wanted.iter().map(|s| s.name.as_str()).collect();
                    endpoints.retain(|name, _| names.contains(name.as_str()));
                    complete.retain(|name| names.contains(name.as_str()));
                    services = Some(wanted);
                }
                Some((service, update)) = watches.next() => {
                    let update = update?;
                    let set = endpoints.entry(service.clone()).or_default();
                    if update.full {
                        set.clear();
                        complete.insert(service);
                    }
                    for endpoint in update.added {
                        set.insert(endpoint.address.clone(), endpoint);
                    }
                    for address in &update.removed {
                        set.remove(address);
                    }
                }
            }
            if let Some(services) = &services {
                if services.iter().all(|s| complete.contains(&s.name)) {
                    self.apply(services, authorization.as_ref(), &endpoints)?;
                }
            }
        }
    }

    /// Opens endpoint watches for new services and drops those of removed ones.
    async fn follow(
        &self,
        client: &mut DiscoveryClient<Channel>,
        watches: &mut StreamMap<String, tonic::Streaming<pymesh_api::mesh::v1::EndpointsUpdate>>,
        services: &[Service],
    ) -> Result<(), SessionError> {
        let names: HashSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let stale: Vec<String> = watches
            .keys()
            .filter(|k| !names.contains(k.as_str()))
            .cloned()
            .collect();
        for name in stale {
            watches.remove(&name);
        }
        for service in services {
            if !watches.contains_key(&service.name) {
                let stream = client
                    .watch_endpoints(WatchEndpointsRequest {
                        service: service.name.clone(),
                        identity: Some(self.identity.clone()),
                    })
                    .await?
                    .into_inner();
                watches.insert(service.name.clone(), stream);
            }
        }
        Ok(())
    }

    fn apply(
        &mut self,
        services: &[Service],
        authorization: Option<&Authorization>,
        endpoints: &HashMap<String, BTreeMap<String, Endpoint>>,
    ) -> Result<(), SessionError> {
        let merged: Vec<Service> = services
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.endpoints = endpoints
                    .get(&s.name)
                    .map(|set| set.values().cloned().collect())
                    .unwrap_or_default();
                s
            })
            .collect();
        let discovered = Discovered {
            services: merged,
            authorization: authorization.cloned(),
        };
        self.established = true;
        if self.publish.is_closed() {
            return Err(SessionError::Stopped);
        }
        self.publish.send_if_modified(|last| {
            let changed = last.as_ref() != Some(&discovered);
            if changed {
                *last = Some(discovered);
            }
            changed
        });
        Ok(())
    }
}
