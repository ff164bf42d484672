//! What the request path shares, and nothing more: the config [`Snapshot`] (settings,
//! routes and authorization, swapped together), the metrics, mesh TLS and the shutdown
//! signal. It depends on nothing above the request path; lifecycle is in `proxy`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::DecisionCounters;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::tls::MeshTls;

/// One config as the request path uses it. A connection (HTTP: a request) reads one
/// snapshot and decides everything from it, so a reload can never have a request
/// authorized by one config and routed by another.
pub(crate) struct Snapshot {
    pub(crate) settings: Arc<Settings>,
    pub(crate) router: Router,
}

pub(crate) struct State {
    snapshot: ArcSwap<Snapshot>,
    pub(crate) metrics: Metrics,
    /// Mutual TLS, when the proxy has a mesh identity. Fixed for the proxy's life
    /// (only the trust anchors change on reload).
    pub(crate) mesh: Option<Arc<MeshTls>>,
    pub(crate) authz_counters: DecisionCounters,
    /// Cancelled when the proxy drains: listeners stop and connections close gracefully.
    pub(crate) shutdown: CancellationToken,
    /// Every connection's task, so draining can wait for them.
    pub(crate) tracker: TaskTracker,
}

impl State {
    pub(crate) fn new(snapshot: Snapshot, metrics: Metrics, mesh: Option<Arc<MeshTls>>) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            mesh,
            authz_counters: DecisionCounters::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// The config in force now.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Puts a new config in force for every connection (HTTP: request) that starts from now.
    pub(crate) fn publish(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }
}
