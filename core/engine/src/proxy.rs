//! The running proxy's lifecycle: starting, reloading and draining.
//!
//! A proxy's config is composed from two sources: its own (a file, the admin API or
//! Python) and, with a control plane, what the control plane last delivered (services
//! with endpoints, and mesh-wide authorization). Both go through one reload path
//! ([`Inner::apply`]): compose, validate, bind new listeners, then publish one
//! snapshot. On any error nothing changes and the piece that failed is not kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pymesh_api::config::v1::ProxyConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, ListenerSettings, Settings};
use crate::discover::Discovered;
use crate::listen::{self, Listening};
use crate::metrics::{EndpointStateLabels, Metrics, ReloadLabels};
use crate::route::Router;
use crate::state::{Snapshot, State};
use crate::tls::MeshTls;

/// Why a proxy could not start or take a new config.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config is not valid; it names the field at fault.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The proxy is draining and takes no new config.
    #[error("the proxy is shutting down")]
    ShuttingDown,
    /// A socket could not be set up.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The config field at fault, when there is one.
    pub fn path(&self) -> Option<&str> {
        match self {
            Error::Config(e) => Some(&e.path),
            _ => None,
        }
    }
}

/// A running proxy. Cheap to clone; every clone controls the same proxy.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<State>,
    /// What the running config is composed from; held while a reload runs, so reloads
    /// from the file and from the control plane never interleave.
    sources: Mutex<Sources>,
    admin_addr: SocketAddr,
    /// Cancelled when someone asks the proxy to stop (admin `/shutdown`).
    stop_requested: CancellationToken,
}

struct Sources {
    own: ProxyConfig,
    /// The control plane's last delivered state, once there is one.
    discovered: Option<Discovered>,
    /// Running listeners by name.
    listeners: HashMap<String, Arc<Listening>>,
}

/// One change to what the running config is composed from.
enum Change {
    Own(Box<ProxyConfig>),
    Discovered(Discovered),
}

impl Proxy {
    /// Validates the config, binds every listener and the admin endpoint, and starts
    /// serving. Must be called within a Tokio runtime.
    pub async fn start(config: ProxyConfig) -> Result<Self, Error> {
        let settings = Arc::new(Settings::from_config(config.clone())?);
        let metrics = Metrics::new();
        let mesh = settings
            .identity
            .as_ref()
            .map(|id| Arc::new(MeshTls::new(id.id.clone(), id.trust_anchors.clone())));
        let router = Router::build(&settings, None, mesh.as_ref(), &metrics);
        let admin_listener = listen::bind(settings.admin)
            .map_err(|e| bind_error("admin.address", settings.admin, e))?;
        let mut bound = Vec::new();
        for (i, l) in settings.listeners.iter().enumerate() {
            let socket = listen::bind(l.addr)
                .map_err(|e| bind_error(&format!("listeners[{i}].address"), l.addr, e))?;
            bound.push((l.clone(), socket));
        }
        let snapshot = Snapshot {
            settings: settings.clone(),
            router,
        };
        let state = Arc::new(State::new(snapshot, metrics, mesh));
        let mut listeners = HashMap::new();
        for (listener, socket) in bound {
            let max = settings.limits.max_connections;
            let name = listener.name.clone();
            listeners.insert(name, listen::spawn(state.clone(), socket, listener, max)?);
        }
        let admin_listener = {
            admin_listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(admin_listener)?
        };
        let admin_addr = admin_listener.local_addr()?;
        let proxy = Proxy {
            inner: Arc::new(Inner {
                state: state.clone(),
                sources: Mutex::new(Sources {
                    own: config,
                    discovered: None,
                    listeners,
                }),
                admin_addr,
                stop_requested: CancellationToken::new(),
            }),
        };
        // The admin server holds a weak handle so dropping every Proxy ends it.
        tokio::spawn(crate::admin::serve(admin_listener, proxy.downgrade()));
        tokio::spawn(crate::memory::run(
            state.metrics.memory_returned.clone(),
            state.shutdown.clone(),
        ));
        if let (Some(mesh), Some(identity)) = (&state.mesh, &settings.identity) {
            tokio::spawn(crate::identity::run(
                mesh.clone(),
                identity.clone(),
                state.metrics.identity.clone(),
                state.shutdown.clone(),
            ));
        }
        if let Some(control_plane) = settings.control_plane.clone() {
            let (publish, delivered) = watch::channel(None);
            tokio::spawn(crate::discover::run(
                control_plane,
                state.mesh.clone(),
                publish,
                state.shutdown.clone(),
            ));
            tokio::spawn(follow_control_plane(proxy.downgrade(), delivered));
        }
        tracing::info!(admin = %admin_addr, "proxy started");
        Ok(proxy)
    }

    /// Replaces the proxy's own config. On any error nothing changes; on success,
    /// connections in flight carry on and new requests use the new config.
    pub async fn reload(&self, config: ProxyConfig) -> Result<(), Error> {
        self.inner.reload(Change::Own(Box::new(config)))
    }

    /// [`Proxy::reload`] from JSON or YAML text; a parse error counts as a rejected reload.
    pub async fn reload_text(&self, text: &str) -> Result<(), Error> {
        match crate::config::parse(text) {
            Ok(config) => self.inner.reload(Change::Own(Box::new(config))),
            Err(e) => self.inner.finish_reload(Err(e.into())),
        }
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, and
    /// returns whether every connection finished in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        let state = &self.inner.state;
        state.shutdown.cancel();
        state.tracker.close();
        let drained = tokio::time::timeout(grace, state.tracker.wait())
            .await
            .is_ok();
        tracing::info!(drained, "proxy stopped");
        drained
    }

    /// Resolves when something (the admin endpoint's `/shutdown`) asks the proxy to stop.
    pub async fn stop_requested(&self) {
        self.inner.stop_requested.cancelled().await;
    }

    /// Asks whoever runs the proxy to stop it (see [`Proxy::stop_requested`]).
    pub(crate) fn request_stop(&self) {
        self.inner.stop_requested.cancel();
    }

    /// Whether the proxy can serve: a proxy with a mesh identity needs its certificate.
    pub fn is_ready(&self) -> bool {
        let state = &self.inner.state;
        !state.shutdown.is_cancelled() && state.mesh.as_ref().is_none_or(|m| m.is_certified())
    }

    /// Whether the proxy is draining.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.state.shutdown.is_cancelled()
    }

    /// The admin endpoint's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.inner.admin_addr
    }

    /// Each listener's name and the address it is bound to (a configured port 0
    /// shows the port the OS chose).
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        let sources = self.inner.sources();
        let mut out: Vec<(String, SocketAddr)> = sources
            .listeners
            .values()
            .map(|l| (l.settings.load().name.clone(), l.local_addr))
            .collect();
        out.sort();
        out
    }

    /// Every metric in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let state = &self.inner.state;
        // Endpoint counts are read off the balancers when asked for, so services
        // removed by a reload disappear from them too.
        let gauges = &state.metrics.endpoints;
        gauges.clear();
        for service in state.snapshot().router.targets() {
            let balancer = &service.balancer;
            for (which, count) in [
                ("total", balancer.endpoints().len()),
                ("ejected", balancer.ejected()),
                ("unhealthy", balancer.unhealthy()),
            ] {
                let labels = EndpointStateLabels {
                    dst_service: service.name.clone(),
                    state: which,
                };
                gauges.get_or_create(&labels).set(count as i64);
            }
        }
        state.metrics.render()
    }

    /// Whether the admin endpoint may change the proxy (`admin.enableMutations`).
    pub(crate) fn admin_mutations(&self) -> bool {
        self.inner.state.snapshot().settings.admin_mutations
    }

    /// The running config in the protobuf JSON mapping.
    pub fn config_json(&self) -> String {
        crate::config::to_json(&self.inner.state.snapshot().settings.source)
    }

    fn downgrade(&self) -> WeakProxy {
        WeakProxy(Arc::downgrade(&self.inner))
    }
}

/// Applies each state the control plane delivers, until the proxy is gone.
async fn follow_control_plane(
    proxy: WeakProxy,
    mut delivered: watch::Receiver<Option<Discovered>>,
) {
    while delivered.changed().await.is_ok() {
        let Some(discovered) = delivered.borrow_and_update().clone() else {
            continue;
        };
        let Some(proxy) = proxy.upgrade() else {
            return;
        };
        // A bad state from the control plane is refused (and logged); the running one stays.
        let _ = proxy.inner.reload(Change::Discovered(discovered));
    }
}

impl Inner {
    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reload(&self, change: Change) -> Result<(), Error> {
        let result = self.apply(change);
        self.finish_reload(result)
    }

    fn finish_reload(&self, result: Result<(), Error>) -> Result<(), Error> {
        let outcome = if result.is_ok() { "ok" } else { "rejected" };
        self.state
            .metrics
            .config_reloads
            .get_or_create(&ReloadLabels { result: outcome })
            .inc();
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => tracing::warn!(error = %e, "configuration rejected; the running one stays"),
        }
        result
    }

    /// The one reload path: compose the config from its sources with `change`, check
    /// it against what cannot change while running, bind new listeners, then publish.
    fn apply(&self, change: Change) -> Result<(), Error> {
        let state = &self.state;
        if state.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let mut sources = self.sources();
        let current = state.snapshot();
        let (own, discovered) = match &change {
            Change::Own(own) => (&**own, sources.discovered.as_ref()),
            Change::Discovered(discovered) => (&sources.own, Some(discovered)),
        };
        let settings = Settings::from_config(compose(own, discovered))?;
        if settings.control_plane != current.settings.control_plane {
            return Err(ConfigError::new(
                "control_plane",
                "cannot be added, removed or changed while running; restart the proxy",
            )
            .into());
        }
        if settings.admin != current.settings.admin {
            return Err(ConfigError::new(
                "admin.address",
                format!(
                    "cannot change while running (it is {}); restart the proxy to move it",
                    current.settings.admin
                ),
            )
            .into());
        }
        // Only the trust anchors may change; they are applied once nothing else can fail.
        let anchors = match (&current.settings.identity, &settings.identity, &state.mesh) {
            (None, None, _) => None,
            (Some(old), Some(new), Some(mesh)) if old.same_except_anchors(new) => {
                Some((mesh, new.trust_anchors.clone()))
            }
            _ => {
                return Err(ConfigError::new(
                    "identity",
                    "only the trust anchors can change while running; restart the proxy to change its identity or CA",
                )
                .into())
            }
        };
        // Bind new addresses first: if one fails, nothing has changed yet.
        // A listener stays when its name and configured address stay; otherwise it is
        // replaced (its open connections carry on).
        let running = &sources.listeners;
        let stays = |l: &ListenerSettings| {
            running
                .get(&l.name)
                .is_some_and(|r| r.settings.load().addr == l.addr)
        };
        let mut bound = Vec::new();
        for (i, l) in settings.listeners.iter().enumerate() {
            if !stays(l) {
                let socket = listen::bind(l.addr)
                    .map_err(|e| bind_error(&format!("listeners[{i}].address"), l.addr, e))?;
                bound.push((l.clone(), socket));
            }
        }
        if let Some((mesh, anchors)) = anchors {
            mesh.set_anchors(anchors).map_err(|e| {
                ConfigError::new("identity", format!("the trust anchors cannot be used: {e}"))
            })?;
        }
        let keep: HashMap<String, Arc<ListenerSettings>> = settings
            .listeners
            .iter()
            .filter(|l| stays(l))
            .map(|l| (l.name.clone(), l.clone()))
            .collect();
        let settings = Arc::new(settings);
        let router = Router::build(
            &settings,
            Some(&current.router),
            state.mesh.as_ref(),
            &state.metrics,
        );
        state.publish(Snapshot {
            settings: settings.clone(),
            router,
        });
        match change {
            Change::Own(own) => sources.own = *own,
            Change::Discovered(discovered) => sources.discovered = Some(discovered),
        }
        sources
            .listeners
            .retain(|name, listening| match keep.get(name) {
                Some(settings) => {
                    listening.settings.store(settings.clone());
                    true
                }
                None => {
                    listening.stop();
                    false
                }
            });
        for (listener, socket) in bound {
            let max = settings.limits.max_connections;
            let name = listener.name.clone();
            let listening = listen::spawn(state.clone(), socket, listener, max)?;
            sources.listeners.insert(name, listening);
        }
        Ok(())
    }
}

/// The config to run: the proxy's own, with the control plane's services (and its
/// authorization policy, when it sends one).
fn compose(own: &ProxyConfig, discovered: Option<&Discovered>) -> ProxyConfig {
    let mut config = own.clone();
    if let Some(discovered) = discovered {
        config.services = discovered.services.clone();
        if let Some(authorization) = &discovered.authorization {
            config.authorization = Some(authorization.clone());
        }
    }
    config
}

/// A weak reference to a proxy, for tasks that must not keep it alive.
pub(crate) struct WeakProxy(std::sync::Weak<Inner>);

impl WeakProxy {
    pub(crate) fn upgrade(&self) -> Option<Proxy> {
        self.0.upgrade().map(|inner| Proxy { inner })
    }
}

fn bind_error(path: &str, addr: SocketAddr, e: std::io::Error) -> Error {
    ConfigError::new(path, format!("cannot listen on {addr}: {e}")).into()
}
