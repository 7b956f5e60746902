//! Prometheus metrics of the balancer (`/metrics` on the admin port).
//!
//! Per-member series are looked up once when a member is created and kept in
//! [`MemberMetrics`], so serving a request touches only atomics.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            StatusClass::Informational => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirection => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
        })
    }
}

impl StatusClass {
    pub const ALL: [StatusClass; 5] = [
        StatusClass::Informational,
        StatusClass::Success,
        StatusClass::Redirection,
        StatusClass::ClientError,
        StatusClass::ServerError,
    ];

    pub fn index_of(status: u16) -> usize {
        ((status / 100).clamp(1, 5) - 1) as usize
    }
}

/// Why a request to a member failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum BackendErrorKind {
    /// Connect refused or timed out.
    Connect,
    /// A packet broke the protocol.
    Protocol,
    /// No packet within the backend timeout.
    Timeout,
    /// The connection failed mid-exchange.
    Io,
}

/// Why the balancer answered a request itself.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RejectReason {
    /// Request smuggling shapes (CL + TE, duplicate CL, bad chunked).
    BadFraming,
    /// Body larger than `--max-body-bytes`.
    BodyTooLarge,
    /// Head does not fit an AJP packet.
    HeadTooLarge,
    /// No member can take it (503).
    NoMember,
    /// A member was chosen, but none of its connection slots came free in
    /// time (503): the member is overloaded, not gone.
    PoolExhausted,
    /// Sent to a member, failed before a response head (502).
    BadGateway,
    /// Waited too long for a member (504).
    GatewayTimeout,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub member: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub member: String,
    pub status: StatusClass,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub member: String,
    pub kind: BackendErrorKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: RejectReason,
}

type HistogramFamily = Family<MemberLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 250 µs … ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

pub struct Metrics {
    pub registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    backend_errors: Family<ErrorLabels, Counter>,
    in_flight: Family<MemberLabels, Gauge>,
    /// 2 ready, 1 draining, 0 down, drained (terminating past the drain
    /// timeout) or failing health checks.
    member_state: Family<MemberLabels, Gauge>,
    member_sessions: Family<MemberLabels, Gauge>,
    rejected: Family<RejectLabels, Counter>,
    pub failovers: Counter,
    pub sessions_moved: Counter,
    pub moves_deferred: Counter,
    pub client_connections: Gauge,
    pub membership_updates: Counter,
    pub tls_handshake_failures: Counter,
    /// Unix time the served TLS certificate expires.
    pub tls_certificate_not_after: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("clusterapp_balancer");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let backend_errors = Family::<ErrorLabels, Counter>::default();
        let in_flight = Family::<MemberLabels, Gauge>::default();
        let member_state = Family::<MemberLabels, Gauge>::default();
        let member_sessions = Family::<MemberLabels, Gauge>::default();
        let rejected = Family::<RejectLabels, Counter>::default();
        let failovers = Counter::default();
        let sessions_moved = Counter::default();
        let moves_deferred = Counter::default();
        let client_connections = Gauge::default();
        let membership_updates = Counter::default();
        let tls_handshake_failures = Counter::default();
        let tls_certificate_not_after = Gauge::default();
        registry.register("requests", "Requests proxied, by member and status class", requests.clone());
        registry.register("response_head_seconds", "Time from request to response head, by member", latency.clone());
        registry.register("backend_errors", "Failed exchanges with a member, by kind", backend_errors.clone());
        registry.register("in_flight", "Requests in flight, by member", in_flight.clone());
        registry.register(
            "member_state",
            "2 ready, 1 draining, 0 down (or drained: terminating past the drain timeout)",
            member_state.clone(),
        );
        registry.register(
            "member_sessions",
            "Estimated sessions a member served in the last 2 minutes, as this balancer saw them (HyperLogLog, about 3 % error)",
            member_sessions.clone(),
        );
        registry.register("rejected", "Requests answered by the balancer itself, by reason", rejected.clone());
        registry.register("failovers", "Sticky requests moved off their unusable member", failovers.clone());
        registry.register(
            "sessions_moved",
            "Requests that moved their session to a newly joined member by rebalancing (the newcomer renames the session; parallel requests of the session in that moment count each)",
            sessions_moved.clone(),
        );
        registry.register(
            "moves_deferred",
            "Requests whose session was due to move to a newly joined member that could not take it then (unhealthy): the session stayed on its own member",
            moves_deferred.clone(),
        );
        registry.register("client_connections", "Open client connections", client_connections.clone());
        registry.register("membership_updates", "Member sets applied", membership_updates.clone());
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "tls_certificate_not_after_seconds",
            "Unix time at which the served TLS certificate expires (0 without TLS)",
            tls_certificate_not_after.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            backend_errors,
            in_flight,
            member_state,
            member_sessions,
            rejected,
            failovers,
            sessions_moved,
            moves_deferred,
            client_connections,
            membership_updates,
            tls_handshake_failures,
            tls_certificate_not_after,
        }
    }

    pub fn for_member(&self, route: &str) -> MemberMetrics {
        let member = MemberLabels { member: route.to_string() };
        let requests = StatusClass::ALL
            .map(|status| self.requests.get_or_create(&RequestLabels { member: route.to_string(), status }).clone());
        let errors =
            [BackendErrorKind::Connect, BackendErrorKind::Protocol, BackendErrorKind::Timeout, BackendErrorKind::Io]
                .map(|kind| {
                    self.backend_errors.get_or_create(&ErrorLabels { member: route.to_string(), kind }).clone()
                });
        MemberMetrics {
            requests,
            errors,
            latency: self.latency.get_or_create(&member).clone(),
            in_flight: self.in_flight.get_or_create(&member).clone(),
            state: self.member_state.get_or_create(&member).clone(),
        }
    }

    /// Sets a member's session estimate (refreshed when `/metrics` is read).
    pub fn set_member_sessions(&self, route: &str, estimate: i64) {
        self.member_sessions.get_or_create(&MemberLabels { member: route.to_string() }).set(estimate);
    }

    pub fn reject(&self, reason: RejectReason) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Handles to one member's series.
#[derive(Clone)]
pub struct MemberMetrics {
    requests: [Counter; 5],
    errors: [Counter; 4],
    pub latency: Histogram,
    pub in_flight: Gauge,
    pub state: Gauge,
}

impl MemberMetrics {
    pub fn count_response(&self, status: u16) {
        self.requests[StatusClass::index_of(status)].inc();
    }
    pub fn requests_total(&self) -> u64 {
        self.requests.iter().map(|c| c.get()).sum()
    }
    pub fn count_error(&self, kind: BackendErrorKind) {
        self.errors[kind as usize].inc();
    }
    pub fn errors_total(&self) -> u64 {
        self.errors.iter().map(|c| c.get()).sum()
    }
}
