//! Process-wide state of the balancer: settings, the member table, the
//! router, metrics and the connector secret, shared by every client
//! connection, the health checker, membership watchers and the admin server.
//!
//! It lives apart from the request exchange ([`super::exchange`]) because
//! its lifetime is the process's, not a request's: one [`Balancer`] behind an
//! `Arc`, built once by [`super::build`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::member::{Failure, Member, MemberTable};
use super::metrics::Metrics;
use super::moves::SessionMoves;
use super::pool::PoolSettings;
use super::routing::Router;

/// The connector secret. Its `Debug` never shows the value.
pub struct AjpSecret(String);

impl AjpSecret {
    pub fn new(secret: String) -> Self {
        AjpSecret(secret)
    }

    /// The value, for the `FORWARD_REQUEST` secret attribute only.
    pub(super) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AjpSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AjpSecret(<redacted>)")
    }
}

/// What the balancer speaks to the members, with what that protocol needs.
#[derive(Debug)]
pub enum Backend {
    /// AJP/1.3 with the connector's secret.
    Ajp(AjpSecret),
    /// HTTP/1.1: the client's facts travel in `X-Forwarded-*` and `SSL_*`
    /// headers, which Tomcat's `RemoteIpValve` and `SSLValve` read. There is
    /// no secret: only the network (a NetworkPolicy) keeps others off the port.
    Http,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub packet_size: usize,
    pub sticky_cookie: String,
    pub sticky_path_param: String,
    pub backend_timeout: Duration,
    pub max_body_bytes: Option<u64>,
    /// How long a terminating member keeps its sticky sessions.
    pub drain_timeout: Duration,
    /// Write an access log line per request.
    pub access_log: bool,
}

/// Shared state of the balancer.
pub struct Balancer {
    pub settings: ProxySettings,
    pub pool_settings: PoolSettings,
    pub members: MemberTable,
    pub router: Router,
    pub metrics: Metrics,
    pub(super) backend: Backend,
    shutting_down: AtomicBool,
    /// Failovers come one per moved session; the log gets at most one line a second.
    pub(super) failover_log: LogLimiter,
    /// Moving sessions whose first request is out or was answered.
    pub(super) moves: Arc<SessionMoves>,
}

impl Balancer {
    pub fn new(
        settings: ProxySettings,
        pool_settings: PoolSettings,
        pool_max: usize,
        router: Router,
        backend: Backend,
    ) -> Self {
        Balancer {
            members: MemberTable::new(pool_max, settings.drain_timeout),
            settings,
            pool_settings,
            router,
            metrics: Metrics::new(),
            backend,
            shutting_down: AtomicBool::new(false),
            failover_log: LogLimiter::new(Duration::from_secs(1)),
            moves: Arc::default(),
        }
    }

    /// The moving sessions' bookkeeping with this replica's place among
    /// its peers (see [`super::moves`]).
    pub fn with_session_moves(mut self, moves: SessionMoves) -> Self {
        self.moves = Arc::new(moves);
        self
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Notes a failed connect, probe or health check of `member` (passive
    /// and active health alike): a member that is gone is marked failed at
    /// once, a slow one after its grace ([`Member::note_failure`]).
    pub fn note_failure(&self, member: &Member, failure: Failure, why: &dyn std::fmt::Display) {
        let was_slow = member.is_slow();
        if member.note_failure(failure, self.pool_settings.slow_grace, Instant::now()) {
            member.pool.clear();
            member.http_pool.clear();
            tracing::warn!(route = %member.route, address = %member.address, error = %why, "member marked failed");
        } else if member.is_slow() && !was_slow {
            tracing::warn!(
                route = %member.route,
                address = %member.address,
                error = %why,
                grace = ?self.pool_settings.slow_grace,
                "member slow: its sessions wait for it during the grace"
            );
        }
    }
}

/// Lets a repetitive log line through at most once per interval and counts
/// the ones it held back.
#[derive(Debug)]
pub struct LogLimiter {
    epoch: Instant,
    interval_ms: u64,
    /// Milliseconds after `epoch` from which the next line may pass.
    next_ms: AtomicU64,
    held_back: AtomicU64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            epoch: Instant::now(),
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when this line may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self.next_ms.compare_exchange(next, now + self.interval_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_lets_one_line_a_period_through_and_counts_the_rest() {
        let limiter = LogLimiter::new(Duration::from_millis(200));
        assert_eq!(limiter.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(limiter.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limiter.allow(), Some(5), "the next line reports the five held back");
        assert_eq!(limiter.allow(), None);
    }

    #[test]
    fn secret_is_not_in_debug_output() {
        let s = AjpSecret::new("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
