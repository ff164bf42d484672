//! The proxy side of the control plane: watch this proxy's configuration and every
//! service's endpoints, and apply them to the running proxy without dropping
//! connections.
//!
//! Fail static: when the control plane is away the proxy keeps serving what it last
//! had, reconnects with jittered exponential backoff rotating over the replicas, and
//! only replaces its state once a new session has delivered a complete one (the
//! config and the full endpoint set of every service in it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pymesh_api::config::v1::{Authorization, Endpoint, ProxyConfig, Service};
use pymesh_api::mesh::v1::discovery_client::DiscoveryClient;
use pymesh_api::mesh::v1::{ProxyIdentity, WatchConfigRequest, WatchEndpointsRequest};
use tokio_stream::{StreamExt, StreamMap};
use tonic::transport::{Channel, Endpoint as ChannelEndpoint};

use crate::config::ControlPlaneSettings;
use crate::proxy::WeakProxy;

/// What the control plane last delivered, merged into the proxy's own file config.
#[derive(Default)]
pub(crate) struct Delivered {
    /// The proxy's own config (listeners, admin, control plane), from its file.
    bootstrap: Option<ProxyConfig>,
    /// Services with their endpoints, from the last complete session state.
    services: Option<Vec<Service>>,
    /// Mesh-wide authorization policy, when the control plane sends one.
    authorization: Option<Authorization>,
}

impl Delivered {
    /// The config to run: the bootstrap with the control plane's services (and its
    /// authorization policy, when it sends one), if any.
    pub(crate) fn compose(&self) -> Option<ProxyConfig> {
        let mut config = self.bootstrap.clone()?;
        if let Some(services) = &self.services {
            config.services = services.clone();
        }
        if let Some(authorization) = &self.authorization {
            config.authorization = Some(authorization.clone());
        }
        Some(config)
    }
}

pub(crate) type SharedDelivered = Arc<Mutex<Delivered>>;

pub(crate) fn new_state(bootstrap: ProxyConfig) -> SharedDelivered {
    Arc::new(Mutex::new(Delivered {
        bootstrap: Some(bootstrap),
        services: None,
        authorization: None,
    }))
}

/// Replaces the bootstrap (a reload of the proxy's own file) and gives the config to run.
pub(crate) fn set_bootstrap(state: &SharedDelivered, bootstrap: ProxyConfig) -> ProxyConfig {
    let mut delivered = state.lock().unwrap_or_else(|p| p.into_inner());
    delivered.bootstrap = Some(bootstrap);
    delivered.compose().unwrap_or_default()
}

/// Runs until the proxy is dropped or shut down.
pub(crate) async fn run(proxy: WeakProxy, settings: ControlPlaneSettings, state: SharedDelivered) {
    let identity = ProxyIdentity {
        namespace: settings.namespace.clone(),
        service_account: settings.service_account.clone(),
        workload: settings.workload.clone(),
        proxy_id: format!("{}-{}", std::process::id(), fastrand::u32(..)),
    };
    let mut failures: u32 = 0;
    let mut next = 0usize;
    loop {
        let Some(shutdown) = proxy.upgrade().map(|p| p.shared().shutdown.clone()) else {
            return;
        };
        if shutdown.is_cancelled() {
            return;
        }
        let address = &settings.addresses[next % settings.addresses.len()];
        let session = Session {
            proxy: &proxy,
            identity: identity.clone(),
            state: &state,
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
                failures = failures.saturating_add(1);
                tracing::warn!(control_plane = %address, error = %e, "control plane unreachable; serving the last state");
            }
        }
        next += 1;
        let ceiling = settings
            .backoff_base
            .saturating_mul(1 << failures.min(16))
            .min(settings.backoff_max);
        // Jitter between half and the whole ceiling, so proxies don't reconnect in step.
        let pause = ceiling.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("the {0} stream ended")]
    Ended(String),
    #[error("the proxy stopped")]
    Stopped,
}

struct Session<'a> {
    proxy: &'a WeakProxy,
    identity: ProxyIdentity,
    state: &'a SharedDelivered,
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
        let channel = ChannelEndpoint::from_shared(address.to_owned())
            .map_err(SessionError::Connect)?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            // Notice a vanished control plane within seconds, not at the next TCP timeout.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect()
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
                    self.apply(services, authorization.as_ref(), &endpoints)
                        .await?;
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

    async fn apply(
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
        let config = {
            let mut delivered = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if delivered.services.as_ref() == Some(&merged)
                && delivered.authorization.as_ref() == authorization
                && self.established
            {
                return Ok(());
            }
            delivered.services = Some(merged);
            delivered.authorization = authorization.cloned();
            delivered.compose()
        };
        self.established = true;
        let proxy = self.proxy.upgrade().ok_or(SessionError::Stopped)?;
        if let Some(config) = config {
            // A bad state from the control plane is refused (and logged) by the
            // engine; the running one stays.
            let _ = proxy.apply_discovered(config).await;
        }
        Ok(())
    }
}
