//! Issue 5, end-to-end tests 1 and 5, the way a user meets them: a
//! ClusterApp of 3 real Tomcat session nodes (the counter app) and the
//! balancer, run by the operator (under its own ServiceAccount) on the
//! process kubelet; real HTTP clients talk to the balancer's NodePort on
//! 127.0.0.1.
//!
//! 1. The seed scenario: a client increments its session counter 20 times
//!    on one route, that node's Tomcat is killed with SIGKILL, and the next
//!    20 requests continue at 21..40 on another node, with the session id's
//!    route rewritten — and no request fails.
//! 5. kill -9 under load: 20 clients; no acknowledged increment is lost, and
//!    the requests that fail are at most those in flight on the killed node.

mod e2e_common;
mod operator_common;
mod support;

use std::time::{Duration, Instant};

use e2e_common::{App, Load, get_counter, route_of_session_id, serial, summary};

#[tokio::test]
async fn seed_scenario_session_survives_a_kill_9_of_its_node() {
    let _serial = serial();
    let app = App::start("e2e-seed", "shop", 3, serde_json::json!({})).await;
    let port = app.port;

    // 20 increments on one session: 1..20, one route.
    let first = get_counter(port, None).await.expect("first request");
    assert_eq!((first.status, first.counter), (200, Some(1)), "{first:?}");
    let mut session = first.session.expect("a session cookie");
    let route = first.route.expect("X-Route");
    assert_eq!(route_of_session_id(&session), Some(route.as_str()), "the new session's id names its node");
    for expected in 2..=20 {
        let r = get_counter(port, Some(&session)).await.unwrap_or_else(|e| panic!("request {expected}: {e}"));
        assert_eq!((r.status, r.counter, r.route.as_deref()), (200, Some(expected), Some(route.as_str())), "request {expected} of the sticky session");
    }

    let pid = app.kill_node(&route);
    let killed_at = Instant::now();
    let mut failures = 0;
    let mut errors = Vec::new();
    let mut new_route = None;
    let mut expected = 21;
    let mut first_ok_after = None;
    for _ in 0..20 {
        match get_counter(port, Some(&session)).await {
            Ok(r) if r.status == 200 => {
                assert_eq!(r.counter, Some(expected), "increment lost or repeated after the kill (route {:?})", r.route);
                assert_ne!(r.route.as_deref(), Some(route.as_str()), "served by the killed node");
                if let Some(id) = r.session {
                    session = id;
                }
                first_ok_after.get_or_insert(killed_at.elapsed());
                new_route = r.route;
                expected += 1;
            }
            Ok(r) => {
                failures += 1;
                errors.push(format!("HTTP {}", r.status));
            }
            Err(e) => {
                failures += 1;
                errors.push(e);
            }
        }
    }
    let new_route = new_route.expect("a route after the failover");
    let failover = first_ok_after.unwrap_or_default();
    println!(
        "seed scenario: Ready 3/3 {} ms after create; 40 requests, {failures} failed {errors:?}, last counter {}; \
         after kill -9 of {route} (pid {pid}) the session continued on {new_route} after {} ms",
        app.ready_after.as_millis(),
        expected - 1,
        failover.as_millis()
    );
    summary("1 seed: kill -9 of the sticky node", 40, failures, 0, failover, &format!("{route} -> {new_route}, counter {}", expected - 1));
    assert_eq!(failures, 0, "requests failed after the kill -9: {errors:?}");
    assert_eq!(expected - 1, 40, "the counter went on to 40");
    assert_eq!(route_of_session_id(&session), Some(new_route.as_str()), "the session id's route was rewritten (JvmRouteBinderValve)");
    app.operator.stop().await;
}

#[tokio::test]
async fn kill_9_under_load_loses_no_acknowledged_increment() {
    let _serial = serial();
    let app = App::start("e2e-kill", "shop", 3, serde_json::json!({})).await;
    const CLIENTS: usize = 20;
    let load = Load::start(app.port, CLIENTS, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The victim: shop-1 (never the oldest member, which answers state transfers).
    let victim = "shop-1";
    app.kill_node(victim);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (total, each) = load.finish().await;
    // A client whose session lived on the victim had at most one request in flight there.
    let on_victim = each.iter().filter(|s| s.routes.contains(victim)).count() as u64;
    println!(
        "kill -9 under load: {CLIENTS} clients, {} requests, {} ok, {} failed, {} lost, {} skipped; {on_victim} clients had sessions on {victim}; errors: {:?}",
        total.requests, total.ok, total.failures, total.lost, total.skipped, total.errors
    );
    summary(
        "5 kill -9 under load",
        total.requests,
        total.failures,
        total.lost,
        killed_at.elapsed(),
        &format!("{CLIENTS} clients, {on_victim} on {victim}, {} skipped", total.skipped),
    );
    assert_eq!(total.lost, 0, "acknowledged increments lost: {:?}", total.errors);
    assert!(total.failures <= on_victim, "{} failed requests, but only {on_victim} could have been in flight on {victim}: {:?}", total.failures, total.errors);
    assert!(total.ok > 1000, "the load ran: {} ok", total.ok);
    app.operator.stop().await;
}
