//! Sticky routing with httpd's semantics.
//!
//! The route is the part of the session id after the first `.`
//! (`A1B2C3.s1` → `s1`). The id comes from the `;jsessionid=` path
//! parameter when present (it wins, as in mod_proxy_balancer), else from the
//! session cookie.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use http::header::COOKIE;

use super::config::LbMethod;
use super::member::{Member, MemberState};

/// The route of a session id: after the first `.`, non-empty.
pub fn route_of_session_id(session_id: &str) -> Option<&str> {
    match session_id.split_once('.') {
        Some((_, route)) if !route.is_empty() => Some(route),
        _ => None,
    }
}

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

/// The route a request asks for, if any.
pub fn route_of_request<'a>(path: &'a str, headers: &'a HeaderMap, cookie: &str, param: &str) -> Option<&'a str> {
    session_id_from_path(path, param).or_else(|| session_id_from_cookies(headers, cookie)).and_then(route_of_session_id)
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
    /// Its route's member is unusable; moved (session replicated).
    Failover,
    /// No route (or an unknown one): by the balancing method.
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

    /// Chooses a member for a request with `route`, skipping members in
    /// `tried` (earlier attempts of the same request that failed to connect).
    pub fn choose(
        &self,
        members: &[Arc<Member>],
        route: Option<&str>,
        tried: &[usize],
    ) -> Result<(Arc<Member>, Choice), NoMember> {
        let untried = |m: &Arc<Member>| !tried.contains(&member_key(m));
        let mut failing_over = false;
        // A terminating member past its drain timeout still runs: it is the
        // last resort for its own sessions when they cannot move (failover
        // off, or no other member), rather than a certain 503.
        let mut last_resort = None;
        if let Some(route) = route
            && let Some(member) = members.iter().find(|m| m.route == route)
        {
            if member.takes_sticky() && untried(member) {
                return Ok((member.clone(), Choice::Sticky));
            }
            if member.is_healthy() && member.state() == MemberState::Draining && untried(member) {
                last_resort = Some(member);
            }
            if !self.failover {
                return last_resort.map(|m| (m.clone(), Choice::Sticky)).ok_or(NoMember::StickyMemberUnusable);
            }
            failing_over = true;
        }
        match self.balance(members, &untried) {
            Some(chosen) => Ok((chosen, if failing_over { Choice::Failover } else { Choice::Balanced })),
            None => last_resort.map(|m| (m.clone(), Choice::Sticky)).ok_or(NoMember::NoneUsable),
        }
    }

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

    #[test]
    fn routes_of_ids() {
        assert_eq!(route_of_session_id("ABC.s1"), Some("s1"));
        assert_eq!(route_of_session_id("ABC.shop-0"), Some("shop-0"));
        assert_eq!(route_of_session_id("ABC.s1.extra"), Some("s1.extra"), "everything after the first dot");
        assert_eq!(route_of_session_id("ABC"), None);
        assert_eq!(route_of_session_id("ABC."), None);
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
        assert_eq!(route_of_request("/counter/", &h, "JSESSIONID", "jsessionid"), Some("s1"));
        assert_eq!(
            route_of_request("/counter/;jsessionid=P.s2", &h, "JSESSIONID", "jsessionid"),
            Some("s2"),
            "path parameter wins"
        );
        let mut quoted = HeaderMap::new();
        quoted.insert(COOKIE, HeaderValue::from_static("JSESSIONID=\"Q.s4\""));
        assert_eq!(route_of_request("/", &quoted, "JSESSIONID", "jsessionid"), Some("s4"));
        assert_eq!(route_of_request("/", &HeaderMap::new(), "JSESSIONID", "jsessionid"), None);
    }

    #[test]
    fn sticky_failover_and_draining() {
        let ms = members(&[("s1", MemberState::Ready), ("s2", MemberState::Draining), ("s3", MemberState::Down)]);
        let r = Router::new(LbMethod::Byrequests, true);
        let (m, c) = r.choose(&ms, Some("s2"), &[]).expect("draining keeps sticky");
        assert_eq!((m.route.as_str(), c), ("s2", Choice::Sticky));
        for _ in 0..5 {
            let (m, c) = r.choose(&ms, None, &[]).expect("new");
            assert_eq!((m.route.as_str(), c), ("s1", Choice::Balanced), "only ready members get new sessions");
        }
        let (m, c) = r.choose(&ms, Some("s3"), &[]).expect("failover");
        assert_eq!((m.route.as_str(), c), ("s1", Choice::Failover));
        let (m, c) = r.choose(&ms, Some("gone"), &[]).expect("unknown route balances");
        assert_eq!((m.route.as_str(), c), ("s1", Choice::Balanced));

        let strict = Router::new(LbMethod::Byrequests, false);
        assert_eq!(strict.choose(&ms, Some("s3"), &[]).unwrap_err(), NoMember::StickyMemberUnusable);
        ms[0].set_healthy(false);
        assert_eq!(r.choose(&ms, None, &[]).unwrap_err(), NoMember::NoneUsable);
        assert_eq!(r.choose(&ms, Some("s2"), &[]).expect("sticky").0.route, "s2");
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
        let (m, c) = r.choose(&ms, Some("s1"), &[]).expect("failover");
        assert_eq!((m.route.as_str(), c), ("s2", Choice::Failover), "a drained member's sessions move");
        assert_eq!(r.choose(&ms, None, &[]).expect("new").0.route, "s2");

        // Nowhere to move to: the drained (still running) member serves its own.
        ms[1].set_healthy(false);
        let (m, c) = r.choose(&ms, Some("s1"), &[]).expect("last resort");
        assert_eq!((m.route.as_str(), c), ("s1", Choice::Sticky));
        assert_eq!(r.choose(&ms, None, &[]).unwrap_err(), NoMember::NoneUsable, "but takes no new sessions");
        assert_eq!(r.choose(&ms, Some("s1"), &[member_key(&ms[0])]).unwrap_err(), NoMember::NoneUsable, "nor a retry");
        ms[1].set_healthy(true);
        let strict = Router::new(LbMethod::Byrequests, false);
        assert_eq!(strict.choose(&ms, Some("s1"), &[]).expect("no failover: stays").0.route, "s1");
        ms[0].set_healthy(false);
        assert_eq!(strict.choose(&ms, Some("s1"), &[]).unwrap_err(), NoMember::StickyMemberUnusable);
    }

    #[test]
    fn tried_members_are_skipped() {
        let ms = members(&[("s1", MemberState::Ready), ("s2", MemberState::Ready)]);
        let r = Router::new(LbMethod::Byrequests, true);
        let tried = [member_key(&ms[0])];
        for _ in 0..4 {
            assert_eq!(r.choose(&ms, Some("s1"), &tried).expect("moves").0.route, "s2");
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
}
