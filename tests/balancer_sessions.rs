//! Sticky sessions through the balancer against real, clustered Tomcat
//! nodes: a counter climbs on one route, survives `kill -9` of its node with
//! the id's route rewritten, draining keeps old sessions and sends new ones
//! elsewhere, and `--no-failover` answers 503.

mod balancer_common;

use std::time::{Duration, Instant};

use balancer_common::http::get;
use balancer_common::tomcat::{TomcatOptions, start_cluster};
use balancer_common::{Balancer, BalancerOptions, TempDir};

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
    let status = balancer_common::http::get(balancer.admin, "/status.json", None).await.json();
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
