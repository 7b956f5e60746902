//! The operator's Prometheus metrics (served on `/metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// Metrics and health flags shared by the controller and the admin server.
pub struct OperatorState {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub api_writes: Counter,
    pub api_requests: Counter,
    pub leader: Gauge,
    /// The process runs its loops (leader election or controller).
    pub live: AtomicBool,
    /// Standby, or leader with its caches filled.
    pub ready: AtomicBool,
}

impl OperatorState {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("clusterapp_operator");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let api_writes = Counter::default();
        let api_requests = Counter::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by error", reconcile_errors.clone());
        registry.register("reconcile_duration_seconds", "Duration of one reconcile", reconcile_duration.clone());
        registry.register(
            "api_writes",
            "Write requests (apply, status, events) sent to the API server by reconciles",
            api_writes.clone(),
        );
        registry.register(
            "api_requests",
            "Requests (reads and writes) sent to the API server by reconciles; watches not counted",
            api_requests.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        Arc::new(OperatorState {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            api_writes,
            api_requests,
            leader,
            live: AtomicBool::new(false),
            ready: AtomicBool::new(false),
        })
    }

    pub fn observe_reconcile(&self, took: Duration, error: Option<&str>) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
        if let Some(label) = error {
            self.reconcile_errors.get_or_create(&ErrorLabels { error: label.to_string() }).inc();
        }
    }

    pub fn reconcile_count(&self) -> u64 {
        self.reconciles.get()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
