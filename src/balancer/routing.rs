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
//! Two replicas can still disagree while their views of the members differ:
//! for the time a membership change takes to reach both, or when only one
//! of them saw a member fail a health check. Both are as short as the
//! membership watch and the health checks make them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use http::header::COOKIE;

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
            if let Some((k, v)) = pair.trim().split_once('=')
                && k == name
            {
                let v = v.trim().trim_matches('"');
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
    }
    None
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
    /// No session id with a route (or an unknown route without failover):
    /// by the balancing method.
    Balanced,
}

/// Why no member was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoMember {
    /// The route's member is unusable and failover is off.
    StickyMemberUnusable,
    /// Nothing is usable.
    NoneUsable,
}

pub struct Router {
    pub method: LbMethod,
    pub failover: bool,
    next: AtomicUsize,
}

impl Router {
    pub fn new(method: LbMethod, failover: bool) -> Self {
        Router { method, failover, next: AtomicUsize::new(0) }
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
    use crate::balancer::member::{MemberSpec, MemberTable};
    use crate::balancer::metrics::Metrics;
    use http::HeaderValue;
    use std::time::{Duration, Instant};

    fn members(states: &[(&str, MemberState)]) -> Vec<Arc<Member>> {
        let metrics = Metrics::new();
        states
            .iter()
            .enumerate()
            .map(|(i, (route, state))| {
                let spec = MemberSpec {
                    route: route.to_string(),
                    address: ([127, 0, 0, 1], 9000 + i as u16).into(),
                    state: *state,
                    terminating: false,
                };
                Arc::new(Member::new(&spec, 4, &metrics))
            })
            .collect()
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
}
