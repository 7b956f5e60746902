//! Members (Tomcat nodes) and the member table the router reads.
//!
//! The table is an immutable snapshot behind an `Arc`, swapped whole when
//! membership changes: a request holds the snapshot (and its member) it
//! started with, so a change never disturbs a request in flight. A member
//! that stays (same route and address) keeps its `Arc`, pool and counters.
//!
//! A member whose pod is terminating (Kubernetes membership: endpoint
//! `serving` + `terminating`) drains for a limited time only: it keeps its
//! sticky sessions for `drain_timeout` after the balancer first saw it
//! terminating, then routing treats it as down and its sessions fail over
//! (after [`DRAIN_HANDOFF_PAUSE`], so that no request sent to it before
//! the deadline arrives after the session was renamed elsewhere), so that
//! the node is idle before it gets SIGTERM. (Tomcat, once it pauses
//! its connectors, closes a keep-alive AJP connection without reading the
//! request that arrives on it: a request sent then is lost, and a sent
//! request is never replayed.) A manually drained member (file or static
//! membership) drains for as long as it is marked so.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::http_backend::HttpConnection;
use super::metrics::{MemberMetrics, Metrics};
use super::pool::Pool;

/// What membership says about a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Takes sticky and new sessions.
    #[default]
    Ready,
    /// Serves its sticky sessions, gets no new ones (httpd's `N`).
    Draining,
    /// Gets nothing; its sticky sessions fail over.
    Down,
}

impl MemberState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => MemberState::Ready,
            1 => MemberState::Draining,
            _ => MemberState::Down,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            MemberState::Ready => 0,
            MemberState::Draining => 1,
            MemberState::Down => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Ready => "ready",
            MemberState::Draining => "draining",
            MemberState::Down => "down",
        }
    }
}

/// What a failed connect, probe or health check says about a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It is not there: the connection was refused, reset or closed, the
    /// address is unreachable, or it answered what a Tomcat does not. Its
    /// sessions fail over at once.
    Gone,
    /// It did not answer in time: it may be gone (a node that vanished
    /// answers nothing) or only busy (a JVM in a pause, a starved CPU).
    /// Its sessions stay with it for the slow grace (see
    /// [`Member::note_failure`]).
    Slow,
}

/// A member as a membership source describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    pub route: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub state: MemberState,
    /// The member is leaving (its pod is terminating): its draining lasts
    /// at most the table's drain timeout. Set by Kubernetes membership only.
    #[serde(skip)]
    pub terminating: bool,
    /// When the member became ready, as every balancer replica reads it
    /// (Kubernetes membership: the Pod's `Ready` condition's
    /// lastTransitionTime); `None`: when this balancer first saw it ready.
    /// Rebalancing after a join runs on this clock.
    #[serde(skip)]
    pub ready_since: Option<SystemTime>,
}

/// Deadlines live in atomics as milliseconds since a process-wide base
/// instant, plus one (0 means none).
fn deadline_code(t: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// The monotonic instant of wall-clock time `t` (in the past or future).
fn instant_of(t: SystemTime) -> Instant {
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    match t.duration_since(wall_now) {
        Ok(ahead) => now.checked_add(ahead).unwrap_or(now),
        Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
    }
}

/// Between a terminating member's drain deadline and the first failover of
/// its sessions, their requests wait this long, sent nowhere. A request sent
/// to the member just before the deadline can reach Tomcat a few hundred
/// milliseconds later on a busy machine; a failover of the same session in
/// that time renames it on another node, and the late request then finds
/// neither its id nor its new one and gets a new, empty session (one browser
/// session lost in a clean-clone scale-down: answered by the old node 200 ms
/// after both replicas' deadlines). Every replica computes the same deadline
/// from the Pod's deletion time, so with this pause the last request either
/// replica sends to the old node is older than the first it sends elsewhere
/// by at least this much.
pub const DRAIN_HANDOFF_PAUSE: Duration = Duration::from_secs(1);

/// How many recently created session ids the status page shows per member.
const RECENT_SESSIONS: usize = 8;

pub struct Member {
    pub route: String,
    pub address: SocketAddr,
    state: AtomicU8,
    /// Since when (a [`deadline_code`]) it is unhealthy; 0: healthy. Set
    /// by a failed connect or health check, cleared by a passing one.
    unhealthy_since: AtomicU64,
    /// AJP connections (`--backend-protocol ajp`).
    pub pool: Pool,
    /// HTTP/1.1 keep-alive connections (`--backend-protocol http`). A
    /// process speaks one protocol, so one of the two pools stays empty;
    /// an empty pool costs a semaphore and an empty list.
    pub http_pool: Pool<HttpConnection>,
    pub metrics: MemberMetrics,
    /// Bytes moved in both directions, for `bytraffic`.
    pub traffic_bytes: AtomicU64,
    pub new_sessions: AtomicU64,
    recent_sessions: Mutex<VecDeque<(String, u64)>>,
    /// When a terminating member stops taking its sticky sessions
    /// ([`deadline_code`]; 0: not terminating).
    drain_deadline: AtomicU64,
    /// The deadline passed and that was logged and published.
    drain_expired: AtomicBool,
    /// Unix milliseconds since the member is ready (see
    /// [`MemberSpec::ready_since`]); 0 while it is not.
    ready_since_ms: AtomicU64,
    /// Since when (a [`deadline_code`]) every attempt and check timed out
    /// ([`Failure::Slow`]); 0: the last one succeeded.
    slow_since: AtomicU64,
    /// Its pod is labelled leaving ([`crate::crd::LABEL_LEAVING`]): a
    /// scale-down removes it soon. It keeps its sessions until then but is
    /// no target for new or failing-over ones, so that a session of a
    /// removed member moves once, to a member that stays.
    leaving: AtomicBool,
    /// The sessions it served lately ([`super::sessions`]).
    pub sessions: super::sessions::SessionSketch,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("route", &self.route)
            .field("address", &self.address)
            .field("state", &self.state())
            .finish()
    }
}

impl Member {
    pub fn new(spec: &MemberSpec, pool_max: usize, metrics: &Metrics) -> Self {
        let member = Member {
            route: spec.route.clone(),
            address: spec.address,
            state: AtomicU8::new(spec.state.as_u8()),
            unhealthy_since: AtomicU64::new(0),
            pool: Pool::new(pool_max),
            http_pool: Pool::new(pool_max),
            metrics: metrics.for_member(&spec.route),
            traffic_bytes: AtomicU64::new(0),
            new_sessions: AtomicU64::new(0),
            recent_sessions: Mutex::new(VecDeque::with_capacity(RECENT_SESSIONS)),
            drain_deadline: AtomicU64::new(0),
            drain_expired: AtomicBool::new(false),
            ready_since_ms: AtomicU64::new(0),
            slow_since: AtomicU64::new(0),
            leaving: AtomicBool::new(false),
            sessions: super::sessions::SessionSketch::default(),
        };
        member.note_readiness(spec, SystemTime::now());
        member.publish_state();
        member
    }

    /// Keeps the ready clock: a member that is (again) ready takes the
    /// shared time of `spec` when there is one, else `now` when it was not
    /// ready before; a member that is not ready has none.
    fn note_readiness(&self, spec: &MemberSpec, now: SystemTime) {
        if spec.state != MemberState::Ready {
            self.ready_since_ms.store(0, Ordering::Relaxed);
        } else if let Some(shared) = spec.ready_since {
            self.store_ready_since(shared);
        } else if self.ready_since_ms.load(Ordering::Relaxed) == 0 {
            self.store_ready_since(now);
        }
    }

    /// Stores a ready time (0 is kept for "not ready", so the epoch itself
    /// reads as 1 ms).
    fn store_ready_since(&self, t: SystemTime) {
        let ms = t.duration_since(UNIX_EPOCH).map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        self.ready_since_ms.store(ms, Ordering::Relaxed);
    }

    /// Unix milliseconds since the member is ready; `None` while it is not.
    pub fn ready_since_unix_ms(&self) -> Option<u64> {
        Some(self.ready_since_ms.load(Ordering::Relaxed)).filter(|ms| *ms != 0)
    }

    pub fn state(&self) -> MemberState {
        MemberState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: MemberState) {
        self.state.store(state.as_u8(), Ordering::Relaxed);
        self.publish_state();
    }

    pub fn is_healthy(&self) -> bool {
        self.unhealthy_since.load(Ordering::Relaxed) == 0
    }

    /// Returns true when this call changed the health.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        // An unhealthy member keeps the time it became so.
        let changed = if healthy {
            self.unhealthy_since.swap(0, Ordering::Relaxed) != 0
        } else {
            let now = deadline_code(Instant::now());
            self.unhealthy_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        };
        if changed {
            self.publish_state();
        }
        changed
    }

    /// How long it has been unhealthy: it crashed or its host vanished a
    /// moment ago (`None`: it is healthy).
    pub fn unhealthy_for(&self) -> Option<Duration> {
        let since = Some(self.unhealthy_since.load(Ordering::Relaxed)).filter(|since| *since != 0)?;
        Some(Duration::from_millis(deadline_code(Instant::now()).saturating_sub(since)))
    }

    /// Notes a failed connect, probe or check at `now`; true when that
    /// made the member unhealthy. A member that is gone is unhealthy at
    /// once. A slow one only once it has been slow for `grace` without a
    /// success in between: a session moves when its member is unhealthy,
    /// and a move while the member still answers others splits the session
    /// — another balancer replica that did not see it slow still sends the
    /// session's parallel requests there, where the moved session is no
    /// longer found (on a busy machine, health checks of live Tomcats timed
    /// out for about a second at a time, on one replica and not the other).
    pub fn note_failure(&self, failure: Failure, grace: Duration, now: Instant) -> bool {
        match failure {
            Failure::Gone => self.set_healthy(false),
            Failure::Slow => {
                let now_code = deadline_code(now);
                let since = match self.slow_since.compare_exchange(0, now_code, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => now_code,
                    Err(since) => since,
                };
                let slow_for = Duration::from_millis(now_code.saturating_sub(since));
                slow_for >= grace && self.set_healthy(false)
            }
        }
    }

    /// Notes a successful check; true when that made the member healthy again.
    pub fn note_success(&self) -> bool {
        self.slow_since.store(0, Ordering::Relaxed);
        self.set_healthy(true)
    }

    /// Every attempt and check since a while timed out, and the member is
    /// still healthy: within its slow grace.
    pub fn is_slow(&self) -> bool {
        self.slow_since.load(Ordering::Relaxed) != 0 && self.is_healthy()
    }

    /// May serve requests of sessions it already holds.
    pub fn takes_sticky(&self) -> bool {
        self.is_healthy()
            && match self.state() {
                MemberState::Ready => true,
                MemberState::Draining => !self.drain_expired_at(Instant::now()),
                MemberState::Down => false,
            }
    }

    /// The member is terminating: starts its drain clock unless it runs
    /// already (the first sighting counts, later updates do not extend it).
    pub fn start_terminating(&self, timeout: Duration, now: Instant) {
        let deadline = now.checked_add(timeout).map_or(u64::MAX, deadline_code);
        if self.drain_deadline.compare_exchange(0, deadline, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::info!(route = %self.route, address = %self.address, timeout = ?timeout, "member terminating: keeps its sticky sessions until the drain timeout");
            // A zero timeout expires at once; say so now rather than at the next request.
            self.drain_expired_at(now);
        }
    }

    /// Moves the drain deadline of a terminating member to `deadline` when
    /// that is earlier: the deadline every balancer replica computes from
    /// the moment Kubernetes was asked to delete the Pod, instead of this
    /// replica's first sighting of it terminating. The session's requests
    /// leave the member at its deadline, and its failover renames the
    /// session away from it: a replica whose own clock still sends the
    /// session's parallel requests there after that finds the session gone
    /// and gets a new, empty one (one browser session in a real-node
    /// scale-down; the sightings of two replicas differ by up to the
    /// EndpointSlice watch's delay). Earlier only, so a member that stopped
    /// taking requests never takes them again.
    pub fn drain_by(&self, deadline: Instant) {
        let code = deadline_code(deadline);
        let previous = self.drain_deadline.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
            (current != 0 && code < current).then_some(code)
        });
        if previous.is_ok() {
            tracing::debug!(route = %self.route, "drain deadline from the Pod's deletion time");
            self.drain_expired_at(Instant::now());
        }
    }

    /// The member is no longer terminating (a hand-edited slice, say).
    pub fn stop_terminating(&self) {
        if self.drain_deadline.swap(0, Ordering::Relaxed) != 0 {
            self.drain_expired.store(false, Ordering::Relaxed);
            tracing::info!(route = %self.route, "member no longer terminating");
            self.publish_state();
        }
    }

    pub fn is_terminating(&self) -> bool {
        self.drain_deadline.load(Ordering::Relaxed) != 0
    }

    /// True once a terminating member's drain timeout has passed at `now`:
    /// it takes no requests any more. The first call that sees it logs it.
    pub fn drain_expired_at(&self, now: Instant) -> bool {
        let deadline = self.drain_deadline.load(Ordering::Relaxed);
        if deadline == 0 || deadline_code(now) < deadline {
            return false;
        }
        if !self.drain_expired.swap(true, Ordering::Relaxed) {
            tracing::info!(route = %self.route, address = %self.address, "drain timeout passed: the terminating member's sessions fail over to other members");
            self.publish_state();
        }
        true
    }

    /// How much longer a request of this member's sessions waits before it
    /// may fail over: `Some` from the drain deadline until
    /// [`DRAIN_HANDOFF_PAUSE`] after it, `None` otherwise (before the
    /// deadline the member still takes them; after the pause they move).
    pub fn handoff_pause(&self, now: Instant) -> Option<Duration> {
        let deadline = self.drain_deadline.load(Ordering::Relaxed);
        let now = deadline_code(now);
        if deadline == 0 || now < deadline {
            return None;
        }
        let end = deadline.saturating_add(u64::try_from(DRAIN_HANDOFF_PAUSE.as_millis()).unwrap_or(u64::MAX));
        (now < end).then(|| Duration::from_millis(end - now))
    }

    /// Time left before a terminating member stops taking its sticky
    /// sessions; `None` when it is not terminating.
    pub fn drain_remaining(&self, now: Instant) -> Option<Duration> {
        let deadline = self.drain_deadline.load(Ordering::Relaxed);
        (deadline != 0).then(|| Duration::from_millis(deadline.saturating_sub(deadline_code(now))))
    }

    /// The state routing acts on: the membership state, except that a
    /// terminating member past its drain timeout is `drained` (gets nothing).
    pub fn routing_state(&self, now: Instant) -> &'static str {
        match self.state() {
            MemberState::Draining if self.drain_expired_at(now) => "drained",
            MemberState::Ready if self.is_leaving() => "leaving",
            state => state.as_str(),
        }
    }

    /// May be given new sessions (and failing-over ones).
    pub fn takes_new(&self) -> bool {
        self.is_healthy() && self.takes_new_when_healthy()
    }

    /// Would take new sessions if this balancer saw it healthy: ready and
    /// not leaving (what every replica reads alike from the API).
    pub fn takes_new_when_healthy(&self) -> bool {
        self.state() == MemberState::Ready && !self.is_leaving()
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> i64 {
        self.metrics.in_flight.get()
    }

    fn publish_state(&self) {
        let value = match (self.state(), self.is_healthy()) {
            (_, false) | (MemberState::Down, _) => 0,
            (MemberState::Draining, true) if self.drain_expired.load(Ordering::Relaxed) => 0,
            (MemberState::Draining, true) => 1,
            (MemberState::Ready, true) => 2,
        };
        self.metrics.state.set(value);
    }

    pub fn record_new_session(&self, session_id: &str) {
        self.new_sessions.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut recent = self.recent_sessions.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_SESSIONS {
            recent.pop_front();
        }
        recent.push_back((session_id.to_string(), now));
    }

    pub fn recent_sessions(&self) -> Vec<(String, u64)> {
        self.recent_sessions.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().cloned().collect()
    }
}

/// One consistent view of all members.
pub type MemberSnapshot = Arc<Vec<Arc<Member>>>;

pub struct MemberTable {
    current: RwLock<MemberSnapshot>,
    /// Set once the membership source delivered its first member set.
    synced: AtomicBool,
    pool_max: usize,
    /// How long a terminating member keeps its sticky sessions.
    drain_timeout: Duration,
    /// What each member's Pod says (routes → facts), from a source every
    /// replica reads (Kubernetes membership's Pod watch).
    pods: Mutex<std::collections::HashMap<String, PodFacts>>,
}

/// What a member's Pod says, the same for every balancer replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// When it became ready (its `Ready` condition): the clock of
    /// rebalancing, for members the member source gives no ready time.
    pub ready_since: Option<SystemTime>,
    /// Labelled leaving ([`crate::crd::LABEL_LEAVING`]).
    pub leaving: bool,
    /// When its deletion was asked for: its drain clock starts there.
    pub deletion_requested: Option<SystemTime>,
}

impl MemberTable {
    pub fn new(pool_max: usize, drain_timeout: Duration) -> Self {
        MemberTable {
            current: RwLock::new(Arc::new(Vec::new())),
            synced: AtomicBool::new(false),
            pool_max,
            drain_timeout,
            pods: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Records what the Pod of the member with `route` says (`None`: the
    /// Pod is gone) and applies it to the current member of that route: a
    /// new shared ready time, the leaving mark, and a drain deadline from
    /// the deletion time when the member is terminating.
    pub fn set_pod(&self, route: &str, facts: Option<PodFacts>) {
        let facts_now = facts.unwrap_or_default();
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let before = match facts {
            Some(f) => pods.insert(route.to_string(), f),
            None => pods.remove(route),
        }
        .unwrap_or_default();
        drop(pods);
        if before.leaving != facts_now.leaving {
            tracing::info!(route, leaving = facts_now.leaving, "member's leaving mark changed");
        }
        let current = self.snapshot();
        let Some(member) = current.iter().find(|m| m.route == route) else { return };
        if let Some(t) = facts_now.ready_since
            && before.ready_since != Some(t)
            && member.state() == MemberState::Ready
        {
            member.store_ready_since(t);
        }
        member.leaving.store(facts_now.leaving, Ordering::Relaxed);
        if let Some(t) = facts_now.deletion_requested
            && member.is_terminating()
        {
            member.drain_by(instant_of(t + self.drain_timeout));
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    pub fn snapshot(&self) -> MemberSnapshot {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Replaces the member set atomically. Members whose route and address
    /// are unchanged keep their identity; a changed state applies in place.
    pub fn apply(&self, specs: &[MemberSpec], metrics: &Metrics) {
        self.apply_at(specs, metrics, Instant::now());
    }

    /// [`apply`](Self::apply) with the clock given (tests).
    pub fn apply_at(&self, specs: &[MemberSpec], metrics: &Metrics, now: Instant) {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        let old = guard.clone();
        let mut next: Vec<Arc<Member>> = Vec::with_capacity(specs.len());
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let wall_now = SystemTime::now();
        // The members of the first set have been there for all this balancer
        // knows: no rebalancing towards them (a restarted balancer must not
        // move sessions that are where they belong).
        let first_set = !self.synced.load(Ordering::Acquire);
        let long_ago = UNIX_EPOCH + Duration::from_millis(1);
        for spec in specs {
            let pod = pods.get(&spec.route).copied().unwrap_or_default();
            let shared_ready = spec.ready_since.or(pod.ready_since).or(if first_set { Some(long_ago) } else { None });
            let spec = &MemberSpec { ready_since: shared_ready, ..spec.clone() };
            if next.iter().any(|m| m.route == spec.route) {
                tracing::warn!(route = %spec.route, "duplicate route in member set; keeping the first");
                continue;
            }
            match old.iter().find(|m| m.route == spec.route && m.address == spec.address) {
                Some(existing) => {
                    if existing.state() != spec.state {
                        tracing::info!(route = %spec.route, from = existing.state().as_str(), to = spec.state.as_str(), "member state changed");
                        existing.set_state(spec.state);
                    }
                    next.push(existing.clone());
                }
                None => {
                    tracing::info!(route = %spec.route, address = %spec.address, state = spec.state.as_str(), "member added");
                    next.push(Arc::new(Member::new(spec, self.pool_max, metrics)));
                }
            }
            if let Some(member) = next.last() {
                member.note_readiness(spec, wall_now);
                member.leaving.store(pod.leaving, Ordering::Relaxed);
                if spec.terminating {
                    member.start_terminating(self.drain_timeout, now);
                    if let Some(start) = pod.deletion_requested {
                        member.drain_by(instant_of(start + self.drain_timeout));
                    }
                } else {
                    member.stop_terminating();
                }
            }
        }
        for gone in old.iter().filter(|m| !next.iter().any(|n| Arc::ptr_eq(n, m))) {
            tracing::info!(route = %gone.route, address = %gone.address, "member removed");
            gone.metrics.state.set(0);
        }
        *guard = Arc::new(next);
        drop(guard);
        metrics.membership_updates.inc();
        self.synced.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(route: &str, port: u16, state: MemberState) -> MemberSpec {
        MemberSpec {
            route: route.into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            state,
            terminating: false,
            ready_since: None,
        }
    }

    fn terminating(route: &str, port: u16) -> MemberSpec {
        MemberSpec { terminating: true, ..spec(route, port, MemberState::Draining) }
    }

    #[test]
    fn apply_keeps_identity_and_updates_state() {
        let metrics = Metrics::new();
        let table = MemberTable::new(4, Duration::from_secs(5));
        assert!(!table.is_synced());
        table.apply(&[spec("s1", 1, MemberState::Ready), spec("s2", 2, MemberState::Ready)], &metrics);
        let first = table.snapshot();
        table.apply(&[spec("s1", 1, MemberState::Draining), spec("s2", 3, MemberState::Ready)], &metrics);
        let second = table.snapshot();
        assert!(table.is_synced());
        assert!(Arc::ptr_eq(&first[0], &second[0]), "s1 kept its pool and counters");
        assert_eq!(second[0].state(), MemberState::Draining);
        assert!(!Arc::ptr_eq(&first[1], &second[1]), "s2 moved: a new member");
        assert_eq!(first[1].address.port(), 2, "the old snapshot is untouched");
        assert!(second[0].takes_sticky() && !second[0].takes_new());
    }

    #[test]
    fn terminating_member_keeps_sticky_sessions_until_the_drain_timeout() {
        let metrics = Metrics::new();
        let table = MemberTable::new(4, Duration::from_secs(5));
        let t0 = Instant::now();
        table.apply_at(&[spec("s1", 1, MemberState::Ready), spec("s2", 2, MemberState::Ready)], &metrics, t0);
        let s1 = table.snapshot()[0].clone();
        assert_eq!(s1.drain_remaining(t0), None);

        table.apply_at(&[terminating("s1", 1), spec("s2", 2, MemberState::Ready)], &metrics, t0);
        assert!(s1.is_terminating());
        assert!(s1.takes_sticky() && !s1.takes_new(), "draining: sticky only");
        assert_eq!(s1.routing_state(t0), "draining");
        assert_eq!(s1.metrics.state.get(), 1);
        assert_eq!(s1.drain_remaining(t0 + Duration::from_secs(1)), Some(Duration::from_secs(4)));

        // Later updates (watch events, re-lists) do not restart the clock.
        table.apply_at(
            &[terminating("s1", 1), spec("s2", 2, MemberState::Ready)],
            &metrics,
            t0 + Duration::from_secs(3),
        );
        assert!(Arc::ptr_eq(&s1, &table.snapshot()[0]));
        assert_eq!(s1.drain_remaining(t0 + Duration::from_secs(3)), Some(Duration::from_secs(2)));
        assert!(!s1.drain_expired_at(t0 + Duration::from_millis(4999)));
        assert_eq!(s1.metrics.state.get(), 1, "still draining");

        assert!(s1.drain_expired_at(t0 + Duration::from_secs(5)));
        assert_eq!(s1.routing_state(t0 + Duration::from_secs(5)), "drained");
        assert_eq!(s1.metrics.state.get(), 0, "published as taking nothing");
        assert_eq!(s1.drain_remaining(t0 + Duration::from_secs(6)), Some(Duration::ZERO));
        // Its sessions wait out the handoff pause before they fail over.
        assert_eq!(s1.handoff_pause(t0 + Duration::from_millis(4999)), None, "still taking them");
        assert_eq!(s1.handoff_pause(t0 + Duration::from_secs(5)), Some(DRAIN_HANDOFF_PAUSE));
        assert_eq!(
            s1.handoff_pause(t0 + Duration::from_millis(5600)),
            Some(DRAIN_HANDOFF_PAUSE - Duration::from_millis(600))
        );
        assert_eq!(s1.handoff_pause(t0 + Duration::from_secs(5) + DRAIN_HANDOFF_PAUSE), None, "then they move");
        assert_eq!(table.snapshot()[1].handoff_pause(t0 + Duration::from_secs(5)), None, "not terminating");

        // No longer terminating (a hand-edited slice): the clock is cleared.
        table.apply_at(
            &[spec("s1", 1, MemberState::Draining), spec("s2", 2, MemberState::Ready)],
            &metrics,
            t0 + Duration::from_secs(6),
        );
        assert!(!s1.is_terminating());
        assert!(!s1.drain_expired_at(t0 + Duration::from_secs(600)), "a manual drain never times out");
        assert!(s1.takes_sticky());
        assert_eq!(s1.metrics.state.get(), 1);
    }

    /// A Pod whose deletion was asked for at `t`.
    fn deleted(t: SystemTime) -> PodFacts {
        PodFacts { deletion_requested: Some(t), ..PodFacts::default() }
    }

    #[test]
    fn the_drain_clock_starts_at_the_shared_deletion_time_not_at_this_replicas_sighting() {
        let metrics = Metrics::new();
        let table = MemberTable::new(4, Duration::from_secs(5));
        table.apply(&[spec("s1", 1, MemberState::Ready), spec("s2", 2, MemberState::Ready)], &metrics);
        // Deleted 4 s ago; this replica sees it terminating only now.
        table.set_pod("s1", Some(deleted(SystemTime::now() - Duration::from_secs(4))));
        table.apply(&[terminating("s1", 1), spec("s2", 2, MemberState::Ready)], &metrics);
        let s1 = table.snapshot()[0].clone();
        let left = s1.drain_remaining(Instant::now()).expect("terminating");
        assert!(left <= Duration::from_millis(1100), "5 s from the deletion, not from the sighting: {left:?}");
        assert!(s1.takes_sticky());
        // Learnt after the sighting: the deadline moves, earlier only.
        table.apply(&[terminating("s1", 1), terminating("s2", 2)], &metrics);
        table.set_pod("s2", Some(deleted(SystemTime::now() - Duration::from_secs(6))));
        let s2 = table.snapshot()[1].clone();
        assert!(!s2.takes_sticky(), "its shared deadline has passed");
        table.set_pod("s2", Some(deleted(SystemTime::now())));
        assert!(!s2.takes_sticky(), "never back to taking requests");
    }

    #[test]
    fn expired_drain_stops_sticky_routing_now() {
        let metrics = Metrics::new();
        let table = MemberTable::new(4, Duration::from_secs(5));
        // Seen terminating 6 s ago (when the clock allows going back that far).
        let Some(then) = Instant::now().checked_sub(Duration::from_secs(6)) else { return };
        table.apply_at(&[terminating("s1", 1)], &metrics, then);
        let s1 = table.snapshot()[0].clone();
        assert!(!s1.takes_sticky(), "past the timeout the member takes nothing");
        assert!(!s1.takes_new());
        assert!(s1.is_healthy(), "it is not failed, only drained");

        // A zero timeout (no preStop wait): fail over at once.
        let zero = MemberTable::new(4, Duration::ZERO);
        zero.apply(&[terminating("s1", 1)], &metrics);
        assert!(!zero.snapshot()[0].takes_sticky());
        assert_eq!(zero.snapshot()[0].routing_state(Instant::now()), "drained");

        // A huge timeout does not overflow.
        let long = MemberTable::new(4, Duration::MAX);
        long.apply(&[terminating("s1", 1)], &metrics);
        assert!(long.snapshot()[0].takes_sticky());
    }

    #[test]
    fn health_gates_use() {
        let metrics = Metrics::new();
        let m = Member::new(&spec("s1", 1, MemberState::Ready), 4, &metrics);
        assert!(m.takes_new());
        assert!(m.set_healthy(false));
        assert!(!m.set_healthy(false), "no change reported twice");
        assert!(!m.takes_new() && !m.takes_sticky());
        assert_eq!(m.metrics.state.get(), 0);
    }

    #[test]
    fn a_gone_member_fails_at_once_a_slow_one_after_its_grace() {
        let metrics = Metrics::new();
        let grace = Duration::from_secs(5);
        // The process-wide base of the deadline codes is set before t0.
        let _ = deadline_code(Instant::now());
        let t0 = Instant::now();
        let m = Member::new(&spec("s1", 1, MemberState::Ready), 4, &metrics);
        assert!(!m.note_failure(Failure::Slow, grace, t0), "one timeout: still healthy");
        assert!(m.is_slow() && m.takes_sticky(), "slow, keeps its sessions");
        assert!(!m.note_failure(Failure::Slow, grace, t0 + Duration::from_millis(4900)));
        assert!(m.note_failure(Failure::Slow, grace, t0 + grace), "slow for the whole grace: failed");
        assert!(!m.takes_sticky() && !m.is_slow());
        assert!(m.note_success(), "answers again");
        // A success in between starts the grace anew.
        assert!(!m.note_failure(Failure::Slow, grace, t0 + Duration::from_secs(6)));
        assert!(!m.note_success());
        assert!(!m.note_failure(Failure::Slow, grace, t0 + Duration::from_secs(10)));
        assert!(m.takes_sticky(), "4 s after the success, not 10 s after the first timeout");
        assert!(m.note_failure(Failure::Gone, grace, t0 + Duration::from_secs(10)), "gone: at once");
        assert!(!m.takes_sticky());
    }

    #[test]
    fn recent_sessions_are_bounded() {
        let metrics = Metrics::new();
        let m = Member::new(&spec("s1", 1, MemberState::Ready), 4, &metrics);
        for i in 0..20 {
            m.record_new_session(&format!("id{i}.s1"));
        }
        let recent = m.recent_sessions();
        assert_eq!(recent.len(), RECENT_SESSIONS);
        assert_eq!(recent[0].0, "id19.s1", "newest first");
        assert_eq!(m.new_sessions.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn ready_times_come_from_the_shared_clock_and_the_first_set_counts_as_old() {
        let metrics = Metrics::new();
        let table = MemberTable::new(4, Duration::ZERO);
        table.apply(&[spec("old", 1, MemberState::Ready)], &metrics);
        let ready_since =
            |route: &str| table.snapshot().iter().find(|m| m.route == route).and_then(|m| m.ready_since_unix_ms());
        assert_eq!(ready_since("old"), Some(1), "the first set has been there all along");
        let before = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64;
        table.apply(&[spec("old", 1, MemberState::Ready), spec("new", 2, MemberState::Ready)], &metrics);
        assert!(ready_since("new").expect("ready") >= before, "a later member: when this balancer saw it");
        let shared = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        table.set_pod("new", Some(PodFacts { ready_since: Some(shared), ..PodFacts::default() }));
        assert_eq!(ready_since("new"), Some(1_700_000_000_000), "the Pod's Ready time wins");
        table.apply(&[spec("old", 1, MemberState::Ready), spec("new", 2, MemberState::Ready)], &metrics);
        assert_eq!(ready_since("new"), Some(1_700_000_000_000), "and stays across member set updates");
        table.apply(&[spec("old", 1, MemberState::Ready), spec("new", 2, MemberState::Down)], &metrics);
        assert_eq!(ready_since("new"), None, "not ready: no ready time");
        table.set_pod("new", None);
        table.apply(&[spec("old", 1, MemberState::Ready), spec("new", 2, MemberState::Ready)], &metrics);
        assert!(ready_since("new").expect("ready again") >= before, "back: a new ready time");
    }
}
