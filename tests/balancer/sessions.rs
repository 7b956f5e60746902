//! Sticky sessions through the balancer against real, clustered Tomcat
//! nodes: a counter climbs on one route, survives `kill -9` of its node with
//! the id's route rewritten, draining keeps old sessions and sends new ones
//! elsewhere, and `--no-failover` answers 503; a browser's parallel
//! requests over two balancer replicas keep one session through `kill -9`.

// The browser-like client of the e2e tests (its only file: no control plane needed).

use std::time::{Duration, Instant};

use crate::common::tomcat::{TomcatOptions, start_cluster};
use crate::common::{self, http::get};
use crate::common::{Balancer, BalancerOptions, TempDir};
use crate::support::browser::{BrowserSession, start_browsers};

const SECRET: &str = "sessions-secret";

fn route_of(id: &str) -> &str {
    id.split_once('.').map(|(_, r)| r).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_is_sticky_and_survives_kill_9_of_its_node() {
    let mut nodes = start_cluster(&["s1", "s2", "s3"], &TomcatOptions::new(SECRET));
    let balancer = Balancer::start(BalancerOptions::new(SECRET).members(&[&nodes[0], &nodes[1], &nodes[2]]));

    let first = get(balancer.listen, "/counter/", None).await;
    assert_eq!(first.status, 200);
    let mut session = first.set_session_id().expect("a new session");
    let home = route_of(&session).to_string();
    assert_eq!(first.header("x-route"), Some(home.as_str()));
    assert!(first.text().contains("Tambah = 1"));

    for expected in 2..=10 {
        let r = get(balancer.listen, "/counter/", Some(&session)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-counter"), Some(expected.to_string().as_str()), "counter climbs");
        assert_eq!(r.header("x-route"), Some(home.as_str()), "sticky to {home}");
    }

    // The same session named in the path parameter (which wins over a cookie naming another route).
    let other = ["s1", "s2", "s3"].into_iter().find(|r| *r != home).expect("another route");
    let bogus_cookie = format!("{}.{other}", session.split_once('.').expect("id").0);
    let r = get(balancer.listen, &format!("/counter/;jsessionid={session}"), Some(&bogus_cookie)).await;
    assert_eq!(r.header("x-route"), Some(home.as_str()), "path parameter wins");
    assert_eq!(r.header("x-counter"), Some("11"));

    let victim = nodes.iter_mut().find(|n| n.route == home).expect("home node");
    victim.kill9();

    let started = Instant::now();
    let r = get(balancer.listen, "/counter/", Some(&session)).await;
    let failover_took = started.elapsed();
    assert_eq!(r.status, 200, "failover answers: {}", r.text());
    assert_eq!(r.header("x-counter"), Some("12"), "no acknowledged write lost");
    let new_home = r.header("x-route").expect("route").to_string();
    assert_ne!(new_home, home);
    assert!(failover_took < Duration::from_secs(1), "a dead node cost {failover_took:?}");
    // JvmRouteBinderValve rewrote the id's route to the node that has it now.
    let rewritten = r.set_session_id().expect("the id is reissued with the new route");
    assert_eq!(route_of(&rewritten), new_home);
    assert_eq!(rewritten.split_once('.').map(|p| p.0), session.split_once('.').map(|p| p.0));
    session = rewritten;

    for expected in 13..=16 {
        let r = get(balancer.listen, "/counter/", Some(&session)).await;
        assert_eq!(r.header("x-counter"), Some(expected.to_string().as_str()));
        assert_eq!(r.header("x-route"), Some(new_home.as_str()), "sticky to the new home");
    }

    // New sessions avoid the dead node.
    for _ in 0..6 {
        let r = get(balancer.listen, "/counter/", None).await;
        assert_eq!(r.status, 200);
        assert_ne!(r.header("x-route"), Some(home.as_str()));
    }
    let status = common::http::get(balancer.admin, "/status.json", None).await.json();
    let dead =
        status["members"].as_array().expect("members").iter().find(|m| m["route"] == home.as_str()).expect("member");
    assert_eq!(dead["healthy"], false, "the killed node is marked failed");
}

fn write_members(path: &std::path::Path, members: &[(&str, u16, &str)]) {
    let mut text = String::from("members:\n");
    for (route, port, state) in members {
        text.push_str(&format!("  - route: {route}\n    address: 127.0.0.1:{port}\n    state: {state}\n"));
    }
    // Write-then-rename so the balancer never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write members");
    std::fs::rename(&tmp, path).expect("rename members");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_keeps_old_sessions_and_no_failover_gives_503() {
    let mut nodes = start_cluster(&["d1", "d2"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    let dir = TempDir::new("members");
    let members_file = dir.path().join("members.yaml");
    write_members(&members_file, &[("d1", nodes[0].ajp_port, "ready"), ("d2", nodes[1].ajp_port, "ready")]);
    let balancer =
        Balancer::start(BalancerOptions::new(SECRET).arg("--members-file").arg(members_file.to_string_lossy()));

    // Round robin spreads new sessions over both nodes.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let r = get(balancer.listen, "/counter/", None).await;
        assert_eq!(r.status, 200);
        sessions.push(r.set_session_id().expect("session"));
    }
    let on_d1: Vec<&String> = sessions.iter().filter(|s| route_of(s) == "d1").collect();
    assert!(!on_d1.is_empty() && on_d1.len() < 4, "byrequests spreads sessions: {sessions:?}");

    // Drain d1 by editing the file; applied within a second, without restart.
    let changed_at = Instant::now();
    write_members(&members_file, &[("d1", nodes[0].ajp_port, "draining"), ("d2", nodes[1].ajp_port, "ready")]);
    loop {
        let status = get(balancer.admin, "/status.json", None).await.json();
        let d1 =
            status["members"].as_array().expect("members").iter().find(|m| m["route"] == "d1").cloned().expect("d1");
        if d1["state"] == "draining" {
            break;
        }
        assert!(changed_at.elapsed() < Duration::from_secs(1), "drain not applied within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in &on_d1 {
        let r = get(balancer.listen, "/counter/", Some(s)).await;
        assert_eq!(r.header("x-route"), Some("d1"), "a draining member keeps its sessions");
        assert_eq!(r.header("x-counter"), Some("2"));
    }
    for _ in 0..6 {
        let r = get(balancer.listen, "/counter/", None).await;
        assert_eq!(r.header("x-route"), Some("d2"), "new sessions avoid the draining member");
    }

    // --no-failover: a session whose node is gone gets 503 (with Retry-After), others still work.
    let strict = Balancer::start(BalancerOptions::new(SECRET).members(&[&nodes[0], &nodes[1]]).arg("--no-failover"));
    let session = on_d1[0].clone();
    assert_eq!(get(strict.listen, "/counter/", Some(&session)).await.header("x-route"), Some("d1"));
    nodes[0].kill9();
    let r = get(strict.listen, "/counter/", Some(&session)).await;
    assert_eq!(r.status, 503, "no failover: {}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = get(strict.listen, "/counter/", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-route"), Some("d2"));
    // With failover on (the first balancer), the same session moves to d2 (not replicated here, so it restarts at 1).
    let r = get(balancer.listen, "/counter/", Some(&session)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-route"), Some("d2"));
}

/// A browser sends a session's requests in parallel over connections to
/// both balancer replicas. When the session's node dies, every one of those
/// requests must fail over to the same node: the first one there renames the
/// session for that node, and a parallel request on any other node would
/// find neither name and start a new, empty session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_requests_of_a_session_over_two_balancers_fail_over_to_one_node() {
    const SESSIONS: usize = 12;
    const WORKERS: usize = 4;
    let routes = ["p1", "p2", "p3", "p4"];
    let mut nodes = start_cluster(&routes, &TomcatOptions::new(SECRET));
    let members: Vec<_> = nodes.iter().collect();
    let replicas = [
        Balancer::start(BalancerOptions::new(SECRET).members(&members)),
        Balancer::start(BalancerOptions::new(SECRET).members(&members)),
    ];
    let addrs = [replicas[0].listen, replicas[1].listen];

    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let r = get(addrs[i % 2], "/counter/", None).await;
        assert_eq!(r.status, 200);
        sessions.push(BrowserSession::new(&r.set_session_id().expect("a new session")));
    }
    let victim_route = {
        let mut per_route: Vec<(usize, &str)> =
            routes.iter().map(|r| (sessions.iter().filter(|s| s.route() == *r).count(), *r)).collect();
        per_route.sort();
        per_route.last().expect("a route").1.to_string()
    };
    let on_victim: Vec<_> = sessions.iter().filter(|s| s.route() == victim_route).cloned().collect();
    assert!(on_victim.len() >= 2, "byrequests over 2 replicas puts several sessions on {victim_route}");

    let (stop, workers) = start_browsers(&addrs, &sessions, WORKERS, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: Vec<usize> = sessions.iter().map(|s| s.answered()).collect();
    assert!(before.iter().all(|n| *n >= WORKERS), "every session is busy before the kill: {before:?}");

    let victim = nodes.iter_mut().find(|n| n.route == victim_route).expect("victim");
    let killed_at = Instant::now();
    victim.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }

    let mut report = Vec::new();
    for s in &sessions {
        let lost = s.lost.lock().expect("lost").clone();
        let failed = s.failed.lock().expect("failed").clone();
        let after = s.routes_since(killed_at + Duration::from_millis(500));
        report.push(format!(
            "{}: answered {}, lost {:?}, failed {:?}, routes after the kill {:?}",
            s.base,
            s.answered(),
            lost,
            failed.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>(),
            after
        ));
    }
    let report = report.join("\n");
    let lost: usize = sessions.iter().map(|s| s.lost.lock().expect("lost").len()).sum();
    assert_eq!(lost, 0, "responses of a new session (the old one was lost):\n{report}");
    for s in &on_victim {
        let after = s.routes_since(killed_at + Duration::from_millis(500));
        assert_eq!(after.len(), 1, "all of a failed-over session's requests reach one node:\n{report}");
        assert_ne!(after[0], victim_route);
        assert_eq!(s.route(), after[0], "the cookie names the node that serves the session");
    }
    // Only requests in flight on the killed node may fail: at most one per
    // worker of a session that lived there, and none before the kill.
    let failed: usize = sessions.iter().map(|s| s.failed.lock().expect("failed").len()).sum();
    assert!(failed <= on_victim.len() * WORKERS, "{failed} failed requests:\n{report}");
    for s in &sessions {
        for (at, e) in s.failed.lock().expect("failed").iter() {
            assert!(*at >= killed_at, "a request failed before the kill: {e}");
        }
    }
    let total: usize = sessions.iter().map(|s| s.answered()).sum();
    eprintln!(
        "browser load: {total} answered, {failed} failed, 0 lost; {} sessions failed over from {victim_route}",
        on_victim.len()
    );
}
