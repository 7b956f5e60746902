//! Sticky routing with httpd's semantics, and one failover member per session.
//!
//! The route is the part of the session id after the first `.`
//! (`A1B2C3.s1` → `s1`). The id comes from the `;jsessionid=` path
//! parameter when present (it wins, as in mod_proxy_balancer), else from the
//! session cookie.
//!
//! # Why failover is a pure function of the session
//!
//! When a session's member cannot take it, the request moves to another
//! member, which has the session (replicated) and whose
//! `JvmRouteBinderValve` renames it for itself: `B.s1` becomes `B.s2` on s2,
//! and the cluster learns the new id. A browser sends a page's requests in
//! parallel over several connections, which the balancer Service spreads
//! over every balancer replica; all of them still carry `B.s1` until the
//! first answer's new cookie arrives. If they reach *different* members the
//! session splits: after s2 renamed `B.s1` to `B.s2`, a request carrying
//! `B.s1` on s3 finds neither `B.s1` nor `B.s3` there, and the application
//! gets a new, empty session. (The valve copes with parallel requests only
//! when they land on the same member: it then finds `B.<its route>` and
//! follows the rename.)
//!
//! So the failover member is chosen by rendezvous (highest-random-weight)
//! hashing of the session's base (the id before the route, which the rename
//! keeps) against each usable member's route: every request of the session,
//! on every replica that sees the same members, picks the same one, and no
//! counter or clock takes part. When a member leaves, only its own sessions
//! move, each to its own highest-weighted survivor; when one joins, a
//! failing-over session moves to it only if the newcomer now weighs most for
//! it. Draining members are never chosen: they are on their way out. A
//! request whose route names no member at all (the member was removed, e.g.
//! after a scale-down) is a session whose home is gone and moves by the same
//! rule, so requests that carry the old id reach the same member as those
//! that failed over while the home was still listed.
//!
//! # Rebalancing after a join
//!
//! A member that joins (after a scale-up, a rolling update, or a node's
//! return) gets no existing session by stickiness alone. With rebalancing on,
//! a session whose home is ready moves to the member its base weighs most for
//! when that member is a newcomer: for a while after the newcomer became
//! ready, from `ready + REBALANCE_LEAD + u × ramp` (u in [0, 1), another hash
//! of the base, so moves spread evenly over the ramp instead of flooding the
//! new node) until `ready + REBALANCE_LEAD + ramp + REBALANCE_HOLD`. The
//! newcomer renames each moved session (`B.s1` → `B.s4`); from then on the
//! session is sticky to it, which is also where the rule would send it, so
//! nothing moves twice. Every member ends with the sessions that weigh most
//! for it among the ready members: 1/n of them, in expectation.
//!
//! Why two replicas cannot split a session while it moves: a move must
//! happen at one instant for every request of the session, or a request that
//! still carries `B.s1` reaches s1 after s4 renamed the session there, and
//! s1 finds no `B.s1` (the request's route is s1's own, so the valve does not
//! look for `B.s1`'s new name). So nothing in the rule is local: the base,
//! the ready members, and the newcomer's ready time, which Kubernetes
//! membership reads from the Pod's `Ready` condition (the same value for
//! every replica), not from when this replica happened to see it. The lead
//! (a few seconds) lets every replica learn of the newcomer before the first
//! session moves to it; both replicas then flip each session at the same
//! wall-clock instant, up to the skew of their clocks. What remains local is
//! a member's health: a replica that alone sees the newcomer fail a check
//! does not move sessions to it while the other does; the same holds for
//! failover. Static and file membership, where there is no shared clock, use
//! the time this balancer first saw the member ready: there one replica is
//! the usual deployment.
//!
//! Two replicas can still disagree while their views of the members differ:
//! for the time a membership change takes to reach both, or when only one
//! of them saw a member fail. So a member's failure moves its sessions
//! only when it is certain: a refused or reset connection; a member that
//! only times out keeps its sessions (their requests wait and try it
//! again) until it has timed out for the slow grace (see
//! [`Member::note_failure`]): on a busy machine, checks of live Tomcats
//! timed out for about a second at a time on one replica and not the
//! other, and each such blip split the sessions it moved. Scale-downs take
//! the other disagreement out of the common case: the operator marks every
//! node the new count removes at once, so each session of a removed node
//! moves once, to a node that stays ([`crate::crd::LABEL_LEAVING`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};

use super::config::LbMethod;
use super::member::{Member, MemberState};

/// The session id in a `;name=value` path parameter of `path` (the query
/// already removed). The value ends at the next `;`, `/` or the end.
pub fn session_id_from_path<'a>(path: &'a str, param: &str) -> Option<&'a str> {
    let mut rest = path;
    while let Some(i) = rest.find(';') {
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix(param).and_then(|r| r.strip_prefix('=')) {
            let end = after.find([';', '/']).unwrap_or(after.len());
            let value = &after[..end];
            if !value.is_empty() {
                return Some(value);
            }
        }
    }
    None
}

/// The first cookie named `name` in the request's `Cookie` headers.
pub fn session_id_from_cookies<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    for header in headers.get_all(COOKIE) {
        let Ok(text) = header.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((k, v)) = cookie_pair(pair)
                && k == name
                && !v.is_empty()
            {
                return Some(v);
            }
        }
    }
    None
}

/// One `name=value` of a Cookie header: the name, and the value without
/// surrounding blanks and quotes.
fn cookie_pair(pair: &str) -> Option<(&str, &str)> {
    let (name, value) = pair.trim().split_once('=')?;
    Some((name, value.trim().trim_matches('"')))
}

/// `headers` with the session cookie `name` set to `new_id` where it is
/// `old_id` (the rest of each Cookie header as it was): for a request that
/// still carries a session's old id after its new member renamed it (see
/// [`super::moves`]). `None` when no cookie carries `old_id` (the id came
/// in the path): the request then goes as it is.
pub fn with_session_cookie(headers: &HeaderMap, name: &str, old_id: &str, new_id: &str) -> Option<HeaderMap> {
    let mut rewritten = headers.clone();
    rewritten.remove(COOKIE);
    let mut changed = false;
    for header in headers.get_all(COOKIE) {
        let value = match header.to_str() {
            Ok(text) if text.contains(old_id) => {
                let pairs: Vec<String> = text
                    .split(';')
                    .map(|pair| match cookie_pair(pair) {
                        Some((k, v)) if k == name && v == old_id => {
                            changed = true;
                            format!("{name}={new_id}")
                        }
                        _ => pair.trim().to_string(),
                    })
                    .collect();
                HeaderValue::from_str(&pairs.join("; ")).unwrap_or_else(|_| header.clone())
            }
            _ => header.clone(),
        };
        rewritten.append(COOKIE, value);
    }
    changed.then_some(rewritten)
}

/// A request's session as the router needs it: the base (the id before its
/// route, unchanged when Tomcat renames the session for a new member) and the
/// route (after the first `.`, non-empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionKey<'a> {
    pub base: &'a str,
    pub route: &'a str,
}

impl<'a> SessionKey<'a> {
    /// `None` for an id without a route (not one of our members' ids).
    pub fn of_session_id(session_id: &'a str) -> Option<Self> {
        match session_id.split_once('.') {
            Some((base, route)) if !route.is_empty() => Some(SessionKey { base, route }),
            _ => None,
        }
    }
}

/// The session a request names, if its id has a route.
pub fn session_of_request<'a>(
    path: &'a str,
    headers: &'a HeaderMap,
    cookie: &str,
    param: &str,
) -> Option<SessionKey<'a>> {
    session_id_from_path(path, param)
        .or_else(|| session_id_from_cookies(headers, cookie))
        .and_then(SessionKey::of_session_id)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// MurmurHash3's 64-bit finaliser: FNV-1a alone mixes the last bytes of the
/// route poorly, and routes differ mostly in their last bytes (`shop-0`,
/// `shop-1`, …).
fn avalanche(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The hash state of a session base, ready to be weighed against routes.
/// Written out here (not `std::hash`, whose output may change between Rust
/// releases) because every balancer replica, of any version in a rolling
/// upgrade, must weigh a session the same way; a unit test pins values.
#[derive(Debug, Clone, Copy)]
pub struct SessionWeigher(u64);

impl SessionWeigher {
    pub fn new(base: &str) -> Self {
        // 0xff never occurs in UTF-8, so base and route cannot run together.
        SessionWeigher(fnv1a(fnv1a(FNV_OFFSET, base.as_bytes()), &[0xff]))
    }

    /// The rendezvous weight of `route` for this session.
    pub fn weight(&self, route: &str) -> u64 {
        avalanche(fnv1a(self.0, route.as_bytes()))
    }

    /// A hash of the session base alone, for the session estimates
    /// ([`crate::balancer::sessions`]).
    pub fn sketch_hash(&self) -> u64 {
        avalanche(self.0 ^ 0x5bd1_e995_5bd1_e995)
    }

    /// Where in a newcomer's ramp this session moves: a fraction in [0, 1),
    /// independent of its weights for routes.
    pub fn ramp_fraction(&self) -> f64 {
        // NUL never occurs in a route (a Pod name), so this is no route's weight.
        (self.weight("\0ramp") >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The member with the highest weight among `candidates` (ties, which
    /// need a 64-bit collision, go to the smaller route so the choice stays
    /// independent of the members' order).
    pub fn choose<'m>(&self, candidates: impl Iterator<Item = &'m Arc<Member>>) -> Option<&'m Arc<Member>> {
        candidates
            .map(|m| (self.weight(&m.route), m))
            .max_by(|(wa, a), (wb, b)| wa.cmp(wb).then_with(|| b.route.cmp(&a.route)))
            .map(|(_, m)| m)
    }
}

/// Identity of a member within one request's retry loop (the `Arc` address;
/// an integer so the request future stays `Send`).
pub fn member_key(member: &Arc<Member>) -> usize {
    Arc::as_ptr(member) as usize
}

/// How a member was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The request's own route.
    Sticky,
    /// Its route's member is unusable or gone: moved (the session is
    /// replicated) to the member its id weighs most for.
    Failover,
    /// Its member is fine, but the session moves to a newcomer that it
    /// weighs most for (rebalancing after a join).
    Rebalanced,
    /// Its member is fine and the session is due to move to a newcomer that
    /// cannot take it now (unhealthy): it stays on its own member, as with
    /// `Sticky`, and moves once the newcomer is healthy again (within the
    /// newcomer's window).
    MoveDeferred,
    /// No session id with a route (or an unknown route without failover):
    /// by the balancing method.
    Balanced,
}

/// Where a session due to move by rebalancing goes now.
enum RebalanceTarget<'m> {
    /// To this newcomer.
    Move(&'m Arc<Member>),
    /// Nowhere yet: its newcomer cannot take it now.
    Deferred,
}

/// Why no member was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoMember {
    /// The route's member is unusable and failover is off.
    StickyMemberUnusable,
    /// Nothing is usable.
    NoneUsable,
}

/// From a newcomer's ready time until the first session may move to it:
/// long enough for every balancer replica to have seen it join.
pub const REBALANCE_LEAD: Duration = Duration::from_secs(5);
/// How long after its ramp a newcomer still takes the sessions that weigh
/// most for it (a session that makes no request in the ramp moves at its
/// next one within this time). After it, sessions born elsewhere stay where
/// they are: moving every session to its heaviest member all the time would
/// move most new sessions once, for nothing. Kept short for the same
/// reason: a session born on an old member while the window is open moves
/// once if it weighs most for the newcomer; one that is idle through the
/// whole window stays (an idle session is no load).
pub const REBALANCE_HOLD: Duration = Duration::from_secs(60);

pub struct Router {
    pub method: LbMethod,
    pub failover: bool,
    /// Rebalancing after a join: moves spread over this long; `None`: off.
    pub rebalance_ramp: Option<Duration>,
    /// A member ready before this (unix ms) is no newcomer.
    rebalance_after_ms: u64,
    next: AtomicUsize,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Wall-clock time in unix milliseconds.
pub fn unix_now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Router {
    pub fn new(method: LbMethod, failover: bool) -> Self {
        Router { method, failover, rebalance_ramp: None, rebalance_after_ms: 0, next: AtomicUsize::new(0) }
    }

    /// Turns rebalancing after a join on, its moves spread over `ramp`, for
    /// members that became ready at or after `after_ms` (unix ms).
    pub fn with_rebalancing(mut self, ramp: Duration, after_ms: u64) -> Self {
        self.rebalance_ramp = Some(ramp);
        self.rebalance_after_ms = after_ms;
        self
    }

    /// Whether a newcomer's rebalancing window is open at `now_ms` (unix ms).
    pub fn rebalance_window_open(&self, member: &Member, now_ms: u64) -> bool {
        match (self.rebalance_ramp, member.ready_since_unix_ms()) {
            (Some(ramp), Some(since)) if since >= self.rebalance_after_ms => {
                let start = since.saturating_add(millis(REBALANCE_LEAD));
                let end = start.saturating_add(millis(ramp)).saturating_add(millis(REBALANCE_HOLD));
                (start..end).contains(&now_ms)
            }
            _ => false,
        }
    }

    /// The newcomer `session` moves to now, if any (see the module doc).
    fn rebalance_target<'m>(
        &self,
        members: &'m [Arc<Member>],
        session: SessionKey<'_>,
        home: &Arc<Member>,
        now_ms: u64,
    ) -> Option<RebalanceTarget<'m>> {
        let ramp = self.rebalance_ramp?;
        if home.state() != MemberState::Ready || !members.iter().any(|m| self.rebalance_window_open(m, now_ms)) {
            return None;
        }
        let weigher = SessionWeigher::new(session.base);
        // Health does not narrow the candidates: it is what this replica
        // saw, and a replica that finds the newcomer unhealthy must keep
        // the session home rather than send it to a second choice that the
        // other replicas would not make.
        let target = weigher.choose(members.iter().filter(|m| m.takes_new_when_healthy()))?;
        if Arc::ptr_eq(target, home) || !self.rebalance_window_open(target, now_ms) {
            return None;
        }
        let since = target.ready_since_unix_ms()?;
        let offset = (millis(ramp) as f64 * weigher.ramp_fraction()) as u64;
        let move_at = since.saturating_add(millis(REBALANCE_LEAD)).saturating_add(offset);
        if now_ms < move_at {
            return None;
        }
        Some(if target.takes_new() { RebalanceTarget::Move(target) } else { RebalanceTarget::Deferred })
    }

    /// Chooses a member for a request of `session` (if it names one),
    /// skipping members in `tried` (earlier attempts of the same request that
    /// failed to connect).
    pub fn choose(
        &self,
        members: &[Arc<Member>],
        session: Option<SessionKey<'_>>,
        tried: &[usize],
    ) -> Result<(Arc<Member>, Choice), NoMember> {
        self.choose_at(members, session, tried, unix_ms(SystemTime::now()))
    }

    /// [`choose`](Self::choose) at wall-clock time `now_ms` (unix ms).
    pub fn choose_at(
        &self,
        members: &[Arc<Member>],
        session: Option<SessionKey<'_>>,
        tried: &[usize],
        now_ms: u64,
    ) -> Result<(Arc<Member>, Choice), NoMember> {
        let untried = |m: &Arc<Member>| !tried.contains(&member_key(m));
        let Some(session) = session else {
            return self.balance(members, &untried).map(|m| (m, Choice::Balanced)).ok_or(NoMember::NoneUsable);
        };
        // A terminating member past its drain timeout still runs: it is the
        // last resort for its own sessions when they cannot move (failover
        // off, or no other member), rather than a certain 503.
        let mut last_resort = None;
        match members.iter().find(|m| m.route == session.route) {
            Some(member) => {
                if member.takes_sticky() && untried(member) {
                    if tried.is_empty() {
                        match self.rebalance_target(members, session, member, now_ms) {
                            Some(RebalanceTarget::Move(newcomer)) => return Ok((newcomer.clone(), Choice::Rebalanced)),
                            Some(RebalanceTarget::Deferred) => return Ok((member.clone(), Choice::MoveDeferred)),
                            None => {}
                        }
                    }
                    return Ok((member.clone(), Choice::Sticky));
                }
                if member.is_healthy() && member.state() == MemberState::Draining && untried(member) {
                    last_resort = Some(member);
                }
                if !self.failover {
                    return last_resort.map(|m| (m.clone(), Choice::Sticky)).ok_or(NoMember::StickyMemberUnusable);
                }
            }
            // No member has this route. Without failover that is httpd's
            // answer too: balance as a new session.
            None if !self.failover => {
                return self.balance(members, &untried).map(|m| (m, Choice::Balanced)).ok_or(NoMember::NoneUsable);
            }
            None => {}
        }
        let weigher = SessionWeigher::new(session.base);
        match weigher.choose(members.iter().filter(|m| m.takes_new() && untried(m))) {
            Some(chosen) => Ok((chosen.clone(), Choice::Failover)),
            None => last_resort.map(|m| (m.clone(), Choice::Sticky)).ok_or(NoMember::NoneUsable),
        }
    }

    /// A member for a new session, by the balancing method.
    fn balance(&self, members: &[Arc<Member>], untried: &dyn Fn(&Arc<Member>) -> bool) -> Option<Arc<Member>> {
        let eligible = |m: &&Arc<Member>| m.takes_new() && untried(m);
        let count = members.iter().filter(eligible).count();
        if count == 0 {
            return None;
        }
        // Ties (and byrequests) rotate, so equal members share the load.
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let rotated = members.iter().filter(eligible).cycle().skip(start).take(count);
        let chosen = match self.method {
            LbMethod::Byrequests => rotated.into_iter().next(),
            LbMethod::Bybusyness => rotated.min_by_key(|m| m.in_flight()),
            LbMethod::Bytraffic => rotated.min_by_key(|m| m.traffic_bytes.load(Ordering::Relaxed)),
        };
        chosen.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::member::{MemberSpec, MemberTable, PodFacts};
    use crate::balancer::metrics::Metrics;
    use http::HeaderValue;

    /// Only the session cookie with exactly the old id changes; other
    /// cookies, other Cookie headers and a cookie of another name holding
    /// the same value stay as they were; no match gives `None`.
    #[test]
    fn the_session_cookie_is_rewritten_and_nothing_else() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("theme=dark; other=abc.gone"));
        headers.append(COOKIE, HeaderValue::from_static("a=1;JSESSIONID=\"abc.gone\" ; b=2"));
        headers.insert("x-other", HeaderValue::from_static("abc.gone"));
        let rewritten = with_session_cookie(&headers, "JSESSIONID", "abc.gone", "abc.new").expect("rewritten");
        let cookies: Vec<_> = rewritten.get_all(COOKIE).iter().map(|v| v.to_str().expect("ascii")).collect();
        assert_eq!(cookies, ["theme=dark; other=abc.gone", "a=1; JSESSIONID=abc.new; b=2"]);
        assert_eq!(rewritten.get("x-other"), headers.get("x-other"));
        assert_eq!(session_id_from_cookies(&rewritten, "JSESSIONID"), Some("abc.new"));
        assert!(with_session_cookie(&headers, "JSESSIONID", "abc.other", "abc.new").is_none());
        assert!(with_session_cookie(&HeaderMap::new(), "JSESSIONID", "abc.gone", "abc.new").is_none());
    }
    use std::time::{Duration, Instant};

    /// Members with these routes and states (and ready times, unix ms;
    /// `None`: when the member was made).
    fn members_since(list: &[(&str, MemberState, Option<u64>)]) -> Vec<Arc<Member>> {
        let metrics = Metrics::new();
        list.iter()
            .enumerate()
            .map(|(i, (route, state, since_ms))| {
                let spec = MemberSpec {
                    route: route.to_string(),
                    address: ([127, 0, 0, 1], 9000 + i as u16).into(),
                    state: *state,
                    terminating: false,
                    ready_since: since_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                };
                Arc::new(Member::new(&spec, 4, &metrics))
            })
            .collect()
    }

    fn members(states: &[(&str, MemberState)]) -> Vec<Arc<Member>> {
        members_since(&states.iter().map(|(r, s)| (*r, *s, None)).collect::<Vec<_>>())
    }

    fn key(id: &str) -> Option<SessionKey<'_>> {
        SessionKey::of_session_id(id)
    }

    fn route_of_request<'a>(path: &'a str, headers: &'a HeaderMap) -> Option<&'a str> {
        session_of_request(path, headers, "JSESSIONID", "jsessionid").map(|s| s.route)
    }

    #[test]
    fn routes_of_ids() {
        assert_eq!(key("ABC.s1"), Some(SessionKey { base: "ABC", route: "s1" }));
        assert_eq!(key("ABC.shop-0").map(|k| k.route), Some("shop-0"));
        assert_eq!(key("ABC.s1.extra").map(|k| k.route), Some("s1.extra"), "everything after the first dot");
        assert_eq!(key("ABC"), None);
        assert_eq!(key("ABC."), None);
        assert_eq!(key(".s1"), Some(SessionKey { base: "", route: "s1" }));
    }

    #[test]
    fn path_parameter() {
        assert_eq!(session_id_from_path("/counter/;jsessionid=ABC.s2", "jsessionid"), Some("ABC.s2"));
        assert_eq!(session_id_from_path("/a;x=1;jsessionid=ABC.s2;y=2/b", "jsessionid"), Some("ABC.s2"));
        assert_eq!(session_id_from_path("/a;jsessionidx=ABC.s2", "jsessionid"), None);
        assert_eq!(session_id_from_path("/a;jsessionid=", "jsessionid"), None);
        assert_eq!(session_id_from_path("/a/b", "jsessionid"), None);
    }

    #[test]
    fn cookies_and_precedence() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; JSESSIONID=XYZ.s1; b=2"));
        h.append(COOKIE, HeaderValue::from_static("JSESSIONID=LATER.s3"));
        assert_eq!(session_id_from_cookies(&h, "JSESSIONID"), Some("XYZ.s1"));
        assert_eq!(route_of_request("/counter/", &h), Some("s1"));
        assert_eq!(route_of_request("/counter/;jsessionid=P.s2", &h), Some("s2"), "path parameter wins");
        let mut quoted = HeaderMap::new();
        quoted.insert(COOKIE, HeaderValue::from_static("JSESSIONID=\"Q.s4\""));
        assert_eq!(route_of_request("/", &quoted), Some("s4"));
        assert_eq!(route_of_request("/", &HeaderMap::new()), None);
    }

    #[test]
    fn sticky_failover_and_draining() {
        let ms = members(&[("s1", MemberState::Ready), ("s2", MemberState::Draining), ("s3", MemberState::Down)]);
        let r = Router::new(LbMethod::Byrequests, true);
        let (m, c) = r.choose(&ms, key("B.s2"), &[]).expect("draining keeps sticky");
        assert_eq!((m.route.as_str(), c), ("s2", Choice::Sticky));
        for _ in 0..5 {
            let (m, c) = r.choose(&ms, None, &[]).expect("new");
            assert_eq!((m.route.as_str(), c), ("s1", Choice::Balanced), "only ready members get new sessions");
        }
        let (m, c) = r.choose(&ms, key("B.s3"), &[]).expect("failover");
        assert_eq!((m.route.as_str(), c), ("s1", Choice::Failover));
        let (m, c) = r.choose(&ms, key("B.gone"), &[]).expect("a gone member's session moves");
        assert_eq!((m.route.as_str(), c), ("s1", Choice::Failover));

        let strict = Router::new(LbMethod::Byrequests, false);
        assert_eq!(strict.choose(&ms, key("B.s3"), &[]).unwrap_err(), NoMember::StickyMemberUnusable);
        let (m, c) = strict.choose(&ms, key("B.gone"), &[]).expect("unknown route without failover: a new session");
        assert_eq!((m.route.as_str(), c), ("s1", Choice::Balanced));
        ms[0].set_healthy(false);
        assert_eq!(r.choose(&ms, None, &[]).unwrap_err(), NoMember::NoneUsable);
        assert_eq!(r.choose(&ms, key("B.s2"), &[]).expect("sticky").0.route, "s2");
    }

    #[test]
    fn drained_member_fails_over_but_is_the_last_resort() {
        let metrics = Metrics::new();
        let table = MemberTable::new(4, Duration::ZERO);
        let spec = |route: &str, port: u16, state, terminating| MemberSpec {
            route: route.into(),
            address: ([127, 0, 0, 1], port).into(),
            state,
            terminating,
            ready_since: None,
        };
        table.apply(&[spec("s1", 1, MemberState::Draining, true), spec("s2", 2, MemberState::Ready, false)], &metrics);
        let ms = table.snapshot();
        assert_eq!(ms[0].routing_state(Instant::now()), "drained");
        let r = Router::new(LbMethod::Byrequests, true);
        let (m, c) = r.choose(&ms, key("B.s1"), &[]).expect("failover");
        assert_eq!((m.route.as_str(), c), ("s2", Choice::Failover), "a drained member's sessions move");
        assert_eq!(r.choose(&ms, None, &[]).expect("new").0.route, "s2");

        // Nowhere to move to: the drained (still running) member serves its own.
        ms[1].set_healthy(false);
        let (m, c) = r.choose(&ms, key("B.s1"), &[]).expect("last resort");
        assert_eq!((m.route.as_str(), c), ("s1", Choice::Sticky));
        assert_eq!(r.choose(&ms, None, &[]).unwrap_err(), NoMember::NoneUsable, "but takes no new sessions");
        assert_eq!(r.choose(&ms, key("B.s1"), &[member_key(&ms[0])]).unwrap_err(), NoMember::NoneUsable, "nor a retry");
        ms[1].set_healthy(true);
        let strict = Router::new(LbMethod::Byrequests, false);
        assert_eq!(strict.choose(&ms, key("B.s1"), &[]).expect("no failover: stays").0.route, "s1");
        ms[0].set_healthy(false);
        assert_eq!(strict.choose(&ms, key("B.s1"), &[]).unwrap_err(), NoMember::StickyMemberUnusable);
    }

    #[test]
    fn tried_members_are_skipped() {
        let ms = members(&[("s1", MemberState::Ready), ("s2", MemberState::Ready)]);
        let r = Router::new(LbMethod::Byrequests, true);
        let tried = [member_key(&ms[0])];
        for _ in 0..4 {
            assert_eq!(r.choose(&ms, key("B.s1"), &tried).expect("moves").0.route, "s2");
            assert_eq!(r.choose(&ms, None, &tried).expect("other").0.route, "s2");
        }
    }

    #[test]
    fn methods_spread_load() {
        let ms = members(&[("s1", MemberState::Ready), ("s2", MemberState::Ready), ("s3", MemberState::Ready)]);
        let r = Router::new(LbMethod::Byrequests, true);
        let mut seen: Vec<String> = (0..6).map(|_| r.choose(&ms, None, &[]).expect("m").0.route.clone()).collect();
        seen.sort();
        assert_eq!(seen, ["s1", "s1", "s2", "s2", "s3", "s3"]);

        let busy = Router::new(LbMethod::Bybusyness, true);
        ms[0].metrics.in_flight.set(3);
        ms[2].metrics.in_flight.set(1);
        assert_eq!(busy.choose(&ms, None, &[]).expect("m").0.route, "s2");

        let traffic = Router::new(LbMethod::Bytraffic, true);
        ms[0].traffic_bytes.store(10, Ordering::Relaxed);
        ms[1].traffic_bytes.store(5, Ordering::Relaxed);
        ms[2].traffic_bytes.store(7, Ordering::Relaxed);
        assert_eq!(traffic.choose(&ms, None, &[]).expect("m").0.route, "s2");
    }

    fn ready(routes: &[&str]) -> Vec<Arc<Member>> {
        members(&routes.iter().map(|r| (*r, MemberState::Ready)).collect::<Vec<_>>())
    }

    /// Session bases as Tomcat makes them (32 upper-case hex digits).
    fn bases(n: usize) -> Vec<String> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|_| {
                x = avalanche(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
                let y = avalanche(x ^ 0x5555);
                format!("{x:016X}{y:016X}")
            })
            .collect()
    }

    fn failover_of(r: &Router, ms: &[Arc<Member>], base: &str, gone_route: &str) -> String {
        let id = format!("{base}.{gone_route}");
        let (m, c) = r.choose(ms, key(&id), &[]).expect("a member");
        assert_eq!(c, Choice::Failover);
        m.route.clone()
    }

    /// The weights are part of the balancer's contract with itself across
    /// processes and releases: replicas of different versions during a
    /// rolling upgrade must send a session's requests to the same member.
    /// A change here splits sessions during such an upgrade. (The values
    /// were computed by a separate implementation of the definition:
    /// FNV-1a 64 of base, 0xff, route; then MurmurHash3's fmix64.)
    #[test]
    fn weights_are_pinned_across_processes_and_releases() {
        let w = SessionWeigher::new("5E1FA27C0D6B4C4E9A3B2F8D7C6E5A41");
        assert_eq!(w.weight("shop-0"), 6_229_938_034_493_520_127);
        assert_eq!(w.weight("shop-1"), 7_196_291_125_881_694_404);
        assert_eq!(SessionWeigher::new("").weight(""), 1_998_855_519_756_462_295);
        // base and route do not run together
        assert_ne!(SessionWeigher::new("ab").weight("c"), SessionWeigher::new("a").weight("bc"));
    }

    #[test]
    fn every_request_of_a_session_fails_over_to_the_same_member_whatever_the_order() {
        let routes = ["shop-0", "shop-1", "shop-2", "shop-3", "shop-4"];
        let ms = ready(&routes);
        ms[1].set_healthy(false);
        let mut reversed = ms.clone();
        reversed.reverse();
        // two replicas: separate routers (own counters), members listed in another order
        let (a, b) = (Router::new(LbMethod::Byrequests, true), Router::new(LbMethod::Bybusyness, true));
        for base in bases(300) {
            let first = failover_of(&a, &ms, &base, "shop-1");
            assert_ne!(first, "shop-1");
            for _ in 0..3 {
                assert_eq!(failover_of(&a, &ms, &base, "shop-1"), first, "{base}: same replica, again");
                assert_eq!(failover_of(&b, &reversed, &base, "shop-1"), first, "{base}: other replica");
            }
            // the home is gone from the member list altogether (scale-down)
            let without: Vec<_> = ms.iter().filter(|m| m.route != "shop-1").cloned().collect();
            assert_eq!(failover_of(&a, &without, &base, "shop-1"), first, "{base}: home removed");
        }
    }

    #[test]
    fn only_the_sessions_of_a_leaving_member_move_and_a_joining_member_takes_a_fair_share() {
        let five = ["n0", "n1", "n2", "n3", "n4"];
        let sessions = bases(2000);
        let weigh = |routes: &[&str], base: &str| {
            let ms = ready(routes);
            SessionWeigher::new(base).choose(ms.iter()).map(|m| m.route.clone()).expect("member")
        };
        let mut per_member = std::collections::BTreeMap::<String, usize>::new();
        for base in &sessions {
            let before = weigh(&five, base);
            *per_member.entry(before.clone()).or_default() += 1;
            let after_leave = weigh(&["n0", "n1", "n3", "n4"], base);
            if before != "n2" {
                assert_eq!(after_leave, before, "{base}: only n2's sessions move when n2 leaves");
            }
            let after_join = weigh(&["n0", "n1", "n2", "n3", "n4", "n5"], base);
            assert!(after_join == before || after_join == "n5", "{base}: a join moves sessions only to the newcomer");
        }
        for (route, n) in &per_member {
            assert!((320..=480).contains(n), "{route} weighs most for {n} of 2000 sessions (expected ~400)");
        }
    }

    #[test]
    fn failover_never_picks_a_draining_or_tried_member() {
        let ms = members(&[
            ("s1", MemberState::Down),
            ("s2", MemberState::Draining),
            ("s3", MemberState::Ready),
            ("s4", MemberState::Ready),
        ]);
        let r = Router::new(LbMethod::Byrequests, true);
        for base in bases(100) {
            let first = failover_of(&r, &ms, &base, "s1");
            assert!(first == "s3" || first == "s4", "{base}: {first}");
            let chosen = ms.iter().find(|m| m.route == first).expect("chosen");
            let id = format!("{base}.s1");
            let (next, _) = r.choose(&ms, key(&id), &[member_key(chosen)]).expect("the other one");
            assert_ne!(next.route, first, "a member that failed to connect is not tried again");
        }
    }

    /// A scale-down 5 -> 2: s2..s4 are marked leaving before any of them
    /// terminates. Sessions of the member that goes first move straight to
    /// a member that stays; the marked ones keep their own sessions.
    #[test]
    fn a_leaving_member_keeps_its_sessions_but_takes_no_new_or_failing_over_one() {
        let table = MemberTable::new(4, Duration::from_secs(10));
        let specs: Vec<MemberSpec> = ["s0", "s1", "s2", "s3", "s4"]
            .iter()
            .enumerate()
            .map(|(i, route)| MemberSpec {
                route: route.to_string(),
                address: ([127, 0, 0, 1], 9100 + i as u16).into(),
                state: MemberState::Ready,
                terminating: false,
                ready_since: None,
            })
            .collect();
        let metrics = Metrics::new();
        table.apply(&specs, &metrics);
        for route in ["s2", "s3", "s4"] {
            table.set_pod(route, Some(PodFacts { leaving: true, ..PodFacts::default() }));
        }
        // The first one goes; a later member set keeps the marks.
        table.apply(&specs[..4], &metrics);
        let ms = table.snapshot();
        let r = Router::new(LbMethod::Byrequests, true);
        let mut moved_to = std::collections::BTreeSet::new();
        for base in bases(300) {
            moved_to.insert(failover_of(&r, &ms, &base, "s4"));
            let own = format!("{base}.s3");
            let (m, c) = r.choose(&ms, key(&own), &[]).expect("sticky");
            assert_eq!((m.route.as_str(), c), ("s3", Choice::Sticky), "a leaving member keeps its sessions");
            let (m, _) = r.choose(&ms, None, &[]).expect("new session");
            assert!(m.route == "s0" || m.route == "s1", "a new session on {}", m.route);
        }
        assert_eq!(moved_to, ["s0".to_string(), "s1".to_string()].into(), "failover only to members that stay");
        assert_eq!(ms[3].routing_state(Instant::now()), "leaving");
        // Scaled back up before it went: s3 takes sessions again.
        table.set_pod("s3", Some(PodFacts::default()));
        let taken: std::collections::BTreeSet<String> =
            bases(300).iter().map(|b| failover_of(&r, &table.snapshot(), b, "s4")).collect();
        assert!(taken.contains("s3"), "unmarked s3 takes failing-over sessions again: {taken:?}");
    }

    #[test]
    fn odd_session_ids_are_routed_without_panic() {
        let ms = ready(&["s1", "s2"]);
        let r = Router::new(LbMethod::Byrequests, true);
        let long = format!("{}.{}", "A".repeat(8000), "x".repeat(8000));
        for id in [long.as_str(), "A.B.C.D.E", "ÄÖ.ü", "..", ".", "A.", "A", "🙂.🙂"] {
            let result = r.choose(&ms, key(id), &[]);
            assert!(result.is_ok(), "{id:?} routes somewhere");
        }
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_bytes(b"JSESSIONID=\xc3\xa4.s1").expect("opaque bytes are a valid value"));
        assert_eq!(session_of_request("/", &h, "JSESSIONID", "jsessionid"), None, "not text: no session");
    }

    fn ready_at(routes: &[(&str, u64)]) -> Vec<Arc<Member>> {
        members_since(&routes.iter().map(|(r, ms)| (*r, MemberState::Ready, Some(*ms))).collect::<Vec<_>>())
    }

    #[test]
    fn rebalancing_moves_the_newcomers_share_spread_over_the_ramp() {
        const JOINED: u64 = 1_000_000_000;
        let ramp = Duration::from_secs(30);
        let r = Router::new(LbMethod::Byrequests, true).with_rebalancing(ramp, 0);
        let ms = ready_at(&[("n0", 1), ("n1", 1), ("n2", 1), ("n3", JOINED), ("n4", JOINED)]);
        let lead = millis(REBALANCE_LEAD);
        let sessions: Vec<String> =
            bases(3000).into_iter().enumerate().map(|(i, b)| format!("{b}.n{}", i % 3)).collect();
        let moved_at = |now: u64| {
            let mut to = std::collections::BTreeMap::<String, usize>::new();
            for id in &sessions {
                let (m, c) = r.choose_at(&ms, key(id), &[], now).expect("member");
                match c {
                    Choice::Rebalanced => *to.entry(m.route.clone()).or_default() += 1,
                    Choice::Sticky => assert_eq!(Some(m.route.as_str()), key(id).map(|k| k.route)),
                    other => panic!("{id}: {other:?}"),
                }
            }
            to
        };
        assert!(moved_at(JOINED + lead - 1).is_empty(), "nothing moves before the lead is over");
        let half = moved_at(JOINED + lead + millis(ramp) / 2);
        let all = moved_at(JOINED + lead + millis(ramp));
        assert_eq!(all.keys().map(String::as_str).collect::<Vec<_>>(), ["n3", "n4"], "only newcomers take sessions");
        for (route, n) in &all {
            assert!((500..=700).contains(n), "{route} takes {n} of 3000 sessions (a fifth: 600)");
            let h = half[route];
            assert!((n * 35 / 100..=n * 65 / 100).contains(&h), "{route}: {h} of {n} moved by mid-ramp");
        }
        let hold_over = JOINED + lead + millis(ramp) + millis(REBALANCE_HOLD);
        assert!(moved_at(hold_over).is_empty(), "after the hold, sessions stay where they are");

        // A moved session is renamed by its new member and then stays there.
        let id = sessions
            .iter()
            .find(|id| r.choose_at(&ms, key(id), &[], hold_over - 1).expect("m").1 == Choice::Rebalanced)
            .expect("a moved one");
        let (newcomer, _) = r.choose_at(&ms, key(id), &[], hold_over - 1).expect("m");
        let renamed = format!("{}.{}", key(id).expect("key").base, newcomer.route);
        let (m, c) = r.choose_at(&ms, key(&renamed), &[], hold_over - 1).expect("m");
        assert_eq!((m.route.as_str(), c), (newcomer.route.as_str(), Choice::Sticky), "moved once, then sticky");

        // Another replica (own router, members in another order) moves the
        // same sessions at the same instants.
        let other = Router::new(LbMethod::Bybusyness, true).with_rebalancing(ramp, 0);
        let mut reversed = ms.clone();
        reversed.reverse();
        for id in sessions.iter().take(500) {
            for now in [JOINED + lead + 3_000, JOINED + lead + 17_000, JOINED + lead + 29_999] {
                let a = r.choose_at(&ms, key(id), &[], now).expect("a");
                let b = other.choose_at(&reversed, key(id), &[], now).expect("b");
                assert_eq!((a.0.route.as_str(), a.1), (b.0.route.as_str(), b.1), "{id} at {now}");
            }
        }
    }

    #[test]
    fn rebalancing_leaves_draining_homes_unhealthy_newcomers_and_routers_without_it_alone() {
        const JOINED: u64 = 1_000_000_000;
        let ramp = Duration::from_secs(10);
        let after_ramp = JOINED + millis(REBALANCE_LEAD) + millis(ramp);
        let ms = ready_at(&[("n0", 1), ("n1", JOINED)]);
        let r = Router::new(LbMethod::Byrequests, true).with_rebalancing(ramp, 0);
        let movers: Vec<String> = bases(200)
            .into_iter()
            .map(|b| format!("{b}.n0"))
            .filter(|id| r.choose_at(&ms, key(id), &[], after_ramp).expect("m").1 == Choice::Rebalanced)
            .collect();
        assert!(movers.len() > 60, "about half of n0's sessions weigh most for n1: {}", movers.len());
        let off = Router::new(LbMethod::Byrequests, true);
        for id in &movers {
            assert_eq!(off.choose_at(&ms, key(id), &[], after_ramp).expect("m").1, Choice::Sticky, "off: no moves");
            let tried = [member_key(&ms[1])];
            assert_eq!(
                r.choose_at(&ms, key(id), &tried, after_ramp).expect("m").0.route,
                "n0",
                "a failed move stays home"
            );
        }
        ms[1].set_healthy(false);
        for id in &movers {
            let (m, c) = r.choose_at(&ms, key(id), &[], after_ramp).expect("m");
            assert_eq!((m.route.as_str(), c), ("n0", Choice::MoveDeferred), "newcomer unhealthy: stays, counted");
        }
        ms[1].set_healthy(true);
        for id in &movers {
            assert_eq!(r.choose_at(&ms, key(id), &[], after_ramp).expect("m").1, Choice::Rebalanced, "healthy again");
        }
        ms[0].set_state(MemberState::Draining);
        for id in &movers {
            assert_eq!(
                r.choose_at(&ms, key(id), &[], after_ramp).expect("m").1,
                Choice::Sticky,
                "draining keeps its own"
            );
        }
    }

    #[test]
    fn members_of_a_starting_app_are_no_newcomers() {
        const JOINED: u64 = 1_000_000_000;
        let ms = ready_at(&[("n0", JOINED - 20_000), ("n1", JOINED)]);
        let after_ramp = JOINED + millis(REBALANCE_LEAD) + 10_000;
        let sessions: Vec<String> = bases(100).into_iter().map(|b| format!("{b}.n0")).collect();
        let moved = |r: &Router| {
            sessions
                .iter()
                .filter(|id| r.choose_at(&ms, key(id), &[], after_ramp).expect("m").1 == Choice::Rebalanced)
                .count()
        };
        let ramp = Duration::from_secs(10);
        assert!(
            moved(&Router::new(LbMethod::Byrequests, true).with_rebalancing(ramp, JOINED)) > 20,
            "n1 joined at the start time: a newcomer"
        );
        assert_eq!(
            moved(&Router::new(LbMethod::Byrequests, true).with_rebalancing(ramp, JOINED + 1)),
            0,
            "before it: part of the start"
        );
    }

    #[test]
    fn ramp_fraction_is_pinned_and_spread() {
        let f = SessionWeigher::new("5E1FA27C0D6B4C4E9A3B2F8D7C6E5A41").ramp_fraction();
        assert!((0.0..1.0).contains(&f));
        let fractions: Vec<f64> = bases(1000).iter().map(|b| SessionWeigher::new(b).ramp_fraction()).collect();
        let below_half = fractions.iter().filter(|f| **f < 0.5).count();
        assert!((430..=570).contains(&below_half), "{below_half} of 1000 below 0.5");
    }
}
