//! The running proxy: its shared state, starting, reloading and draining.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::DecisionCounters;
use crate::config::{ConfigError, ProxyConfig, Settings};
use crate::listen::{self, Listening};
use crate::metrics::{EndpointStateLabels, Metrics, ReloadLabels};
use crate::route::Router;
use crate::tls::MeshTls;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the proxy is shutting down")]
    ShuttingDown,
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

/// State every connection and the admin endpoint share.
pub struct Shared {
    pub settings: ArcSwap<Settings>,
    pub router: ArcSwap<Router>,
    pub metrics: Metrics,
    /// Mutual TLS, when the proxy has a mesh identity. Fixed for the proxy's life
    /// (only the trust anchors change on reload).
    pub mesh: Option<Arc<MeshTls>>,
    pub authz_counters: DecisionCounters,
    /// Cancelled when the proxy drains: listeners stop and connections close gracefully.
    pub shutdown: CancellationToken,
    /// Cancelled when someone asks the proxy to stop (admin `/shutdown`).
    pub stop_requested: CancellationToken,
    pub tracker: TaskTracker,
}

/// A running proxy. Cheap to clone; every clone controls the same proxy.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Set when a control plane is configured: its last state, merged on reload.
    discovered: Option<crate::discover::SharedDelivered>,
    /// Running listeners by name. Only reloads touch this.
    listeners: Mutex<HashMap<String, Arc<Listening>>>,
    admin_addr: SocketAddr,
}

impl Proxy {
    /// Validates the config, binds every listener and the admin endpoint, and starts
    /// serving. Must be called within a Tokio runtime.
    pub async fn start(config: ProxyConfig) -> Result<Self, Error> {
        let discovered = config
            .control_plane
            .is_some()
            .then(|| crate::discover::new_state(config.clone()));
        let settings = Settings::from_config(config)?;
        let control_plane = settings.control_plane.clone();
        let metrics = Metrics::new();
        let mesh = settings
            .identity
            .as_ref()
            .map(|id| Arc::new(MeshTls::new(id.id.clone(), id.trust_anchors.clone())));
        let router = Router::build(&settings, None, mesh.as_ref());
        let admin_listener = listen::bind(settings.admin)
            .map_err(|e| bind_error("admin.address", settings.admin, e))?;
        let mut bound = Vec::new();
        for (i, l) in settings.listeners.iter().enumerate() {
            let socket = listen::bind(l.addr)
                .map_err(|e| bind_error(&format!("listeners[{i}].address"), l.addr, e))?;
            bound.push((l.clone(), socket));
        }
        let shared = Arc::new(Shared {
            settings: ArcSwap::from_pointee(settings),
            router: ArcSwap::from_pointee(router),
            metrics,
            mesh,
            authz_counters: DecisionCounters::default(),
            shutdown: CancellationToken::new(),
            stop_requested: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let mut listeners = HashMap::new();
        for (settings, socket) in bound {
            let name = settings.name.clone();
            listeners.insert(name, listen::spawn(shared.clone(), socket, settings)?);
        }
        let admin_listener = {
            admin_listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(admin_listener)?
        };
        let admin_addr = admin_listener.local_addr()?;
        let proxy = Proxy {
            inner: Arc::new(Inner {
                shared: shared.clone(),
                discovered: discovered.clone(),
                listeners: Mutex::new(listeners),
                admin_addr,
            }),
        };
        // The admin server holds a weak handle so dropping every Proxy ends it.
        tokio::spawn(crate::admin::serve(
            admin_listener,
            Arc::downgrade(&proxy.inner).into(),
            shared.shutdown.clone(),
        ));
        if let (Some(mesh), Some(identity)) = (&shared.mesh, &shared.settings.load().identity) {
            tokio::spawn(crate::identity::run(
                mesh.clone(),
                identity.clone(),
                shared.metrics.identity.clone(),
                shared.shutdown.clone(),
            ));
        }
        if let (Some(settings), Some(state)) = (control_plane, discovered) {
            tokio::spawn(crate::discover::run(
                Arc::downgrade(&proxy.inner).into(),
                settings,
                state,
            ));
        }
        tracing::info!(admin = %admin_addr, "proxy started");
        Ok(proxy)
    }

    /// Replaces the running config. On any error nothing changes; on success,
    /// connections in flight carry on and new requests use the new config.
    pub async fn reload(&self, config: ProxyConfig) -> Result<(), Error> {
        self.finish_reload(self.inner.reload_own(config))
    }

    /// Applies a state delivered by the control plane (services with endpoints,
    /// merged into the proxy's own config).
    pub(crate) async fn apply_discovered(&self, config: ProxyConfig) -> Result<(), Error> {
        self.finish_reload(self.inner.reload(config))
    }

    /// [`Proxy::reload`] from JSON or YAML text; a parse error counts as a rejected reload.
    pub async fn reload_text(&self, text: &str) -> Result<(), Error> {
        let result = crate::config::parse(text)
            .map_err(Error::from)
            .and_then(|config| self.inner.reload_own(config));
        self.finish_reload(result)
    }

    fn finish_reload(&self, result: Result<(), Error>) -> Result<(), Error> {
        let outcome = if result.is_ok() { "ok" } else { "rejected" };
        self.inner
            .shared
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

    /// Stops accepting, lets in-flight requests finish for up to `grace`, and
    /// returns whether every connection finished in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        let shared = &self.inner.shared;
        shared.shutdown.cancel();
        shared.tracker.close();
        let drained = tokio::time::timeout(grace, shared.tracker.wait())
            .await
            .is_ok();
        tracing::info!(drained, "proxy stopped");
        drained
    }

    /// Resolves when something (the admin endpoint's `/shutdown`) asks the proxy to stop.
    pub async fn stop_requested(&self) {
        self.inner.shared.stop_requested.cancelled().await;
    }

    /// Whether the proxy can serve: a proxy with a mesh identity needs its certificate.
    pub fn is_ready(&self) -> bool {
        let shared = &self.inner.shared;
        !shared.shutdown.is_cancelled() && shared.mesh.as_ref().is_none_or(|m| m.is_certified())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shared.shutdown.is_cancelled()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.inner.admin_addr
    }

    /// Each listener's name and the address it is bound to (a configured port 0
    /// shows the port the OS chose).
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        let listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, SocketAddr)> = listeners
            .values()
            .map(|l| (l.settings.load().name.clone(), l.local_addr))
            .collect();
        out.sort();
        out
    }

    pub fn metrics_text(&self) -> String {
        let shared = &self.inner.shared;
        // Endpoint counts are read off the balancers when asked for, so services
        // removed by a reload disappear from them too.
        let gauges = &shared.metrics.endpoints;
        gauges.clear();
        for target in shared.router.load().targets() {
            let balancer = &target.balancer;
            for (state, count) in [
                ("total", balancer.endpoints().len()),
                ("ejected", balancer.ejected()),
                ("unhealthy", balancer.unhealthy()),
            ] {
                let labels = EndpointStateLabels {
                    dst_service: target.name.clone(),
                    state,
                };
                gauges.get_or_create(&labels).set(count as i64);
            }
        }
        shared.metrics.render()
    }

    /// The running config in the protobuf JSON mapping.
    pub fn config_json(&self) -> String {
        crate::config::to_json(&self.inner.shared.settings.load().source)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }
}

impl Inner {
    /// A new config of the proxy's own (file, admin API, Python): with a control
    /// plane, its services are merged in.
    fn reload_own(&self, config: ProxyConfig) -> Result<(), Error> {
        let running = self.shared.settings.load().control_plane.clone();
        let wanted = Settings::from_config(config.clone())?.control_plane;
        if running != wanted {
            return Err(ConfigError::new(
                "control_plane",
                "cannot be added, removed or changed while running; restart the proxy",
            )
            .into());
        }
        match &self.discovered {
            Some(state) => self.reload(crate::discover::set_bootstrap(state, config)),
            None => self.reload(config),
        }
    }

    fn reload(&self, config: ProxyConfig) -> Result<(), Error> {
        let shared = &self.shared;
        if shared.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let settings = Settings::from_config(config)?;
        let current = shared.settings.load();
        if settings.admin != current.admin {
            return Err(ConfigError::new(
                "admin.address",
                format!(
                    "cannot change while running (it is {}); restart the proxy to move it",
                    current.admin
                ),
            )
            .into());
        }
        // Only the trust anchors may change; they are applied once nothing else can fail.
        let anchors = match (&current.identity, &settings.identity, &shared.mesh) {
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
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        // Bind new addresses first: if one fails, nothing has changed yet.
        // A listener stays when its name and configured address stay; otherwise it is
        // replaced (its open connections carry on).
        let stays = |l: &crate::config::ListenerSettings| {
            listeners
                .get(&l.name)
                .is_some_and(|running| running.settings.load().addr == l.addr)
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
        let router = Router::build(&settings, Some(&shared.router.load()), shared.mesh.as_ref());
        let keep: HashMap<String, Arc<crate::config::ListenerSettings>> = settings
            .listeners
            .iter()
            .filter(|l| stays(l))
            .map(|l| (l.name.clone(), l.clone()))
            .collect();
        shared.router.store(Arc::new(router));
        shared.settings.store(Arc::new(settings));

        listeners.retain(|name, listening| match keep.get(name) {
            Some(settings) => {
                listening.settings.store(settings.clone());
                true
            }
            None => {
                listening.stop();
                false
            }
        });
        for (settings, socket) in bound {
            let name = settings.name.clone();
            listeners.insert(name, listen::spawn(shared.clone(), socket, settings)?);
        }
        Ok(())
    }
}

/// A weak reference to a proxy, for tasks that must not keep it alive.
pub(crate) struct WeakProxy(std::sync::Weak<Inner>);

impl From<std::sync::Weak<Inner>> for WeakProxy {
    fn from(weak: std::sync::Weak<Inner>) -> Self {
        Self(weak)
    }
}

impl WeakProxy {
    pub fn upgrade(&self) -> Option<Proxy> {
        self.0.upgrade().map(|inner| Proxy { inner })
    }
}

fn bind_error(path: &str, addr: SocketAddr, e: std::io::Error) -> Error {
    ConfigError::new(path, format!("cannot listen on {addr}: {e}")).into()
}
