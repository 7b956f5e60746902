//! Issue 5, end-to-end tests 1 and 5, the way a user meets them: a
//! ClusterApp of 3 real Tomcat session nodes (the counter app) and the
//! balancer, run by the operator (under its own ServiceAccount) in
//! containers on the real nodes; real HTTP clients talk to the balancer's
//! NodePort on a node's IP.
//!
//! 1. The seed scenario: a client increments its session counter 20 times
//!    on one route, that node's Tomcat is killed with SIGKILL, and the next
//!    20 requests continue at 21..40 on another node, with the session id's
//!    route rewritten — and no request fails.
//! 5. kill -9 under load: 20 clients; no acknowledged increment is lost, and
//!    the requests that fail are at most those in flight on the killed node.
//!
//! And HTTPS (`spec.balancer.tls`): Tomcat sees requests through the
//! balancer's HTTPS nodePort as secure, and a renewed certificate in the
//! Secret reaches new handshakes without a restart while sessions go on.

use std::time::{Duration, Instant};

use crate::common;
use crate::common::tls::{HttpsConn, SERVER_NAME, tls_secret};
use crate::common::{App, BrowserLoad, Load, NodeLogKeeper, get_counter, route_of_session_id, serial, summary};
use crate::support::pki::Pki;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

#[tokio::test]
async fn seed_scenario_session_survives_a_kill_9_of_its_node() {
    let _serial = serial().await;
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
        assert_eq!(
            (r.status, r.counter, r.route.as_deref()),
            (200, Some(expected), Some(route.as_str())),
            "request {expected} of the sticky session"
        );
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
                assert_eq!(
                    r.counter,
                    Some(expected),
                    "increment lost or repeated after the kill (route {:?})",
                    r.route
                );
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
    summary(
        "1 seed: kill -9 of the sticky node",
        40,
        failures,
        0,
        failover,
        &format!("{route} -> {new_route}, counter {}", expected - 1),
    );
    assert_eq!(failures, 0, "requests failed after the kill -9: {errors:?}");
    assert_eq!(expected - 1, 40, "the counter went on to 40");
    assert_eq!(
        route_of_session_id(&session),
        Some(new_route.as_str()),
        "the session id's route was rewritten (JvmRouteBinderValve)"
    );
    app.operator.stop().await;
}

#[tokio::test]
async fn kill_9_under_load_loses_no_acknowledged_increment() {
    kill_9_under_load("all").await;
}

// The same with `replication: backup` (BackupManager), which needs more of
// the balancer than `all` does. Tomcat 10.1's source says why:
// - `AbstractReplicatedMap.get` takes no lock, so parallel requests on a
//   node that holds only a proxy entry each fetch their own copy from the
//   backup node; and while the dead primary is still a map member, the
//   `MSG_PROXY` sent to it fails and `get` returns null for that request.
// - `JvmRouteBinderValve`'s rename is, under BackupManager, a cluster-wide
//   `remove(old)` and then `put(new)` with acknowledged sends in between;
//   the new id reaches the local map only at the end, so a parallel request
//   in that window finds neither id.
// `Request.doGetSession` turns each null into a new, empty session. With
// DeltaManager the same rename is a local map swap and every node already
// holds the session. So the balancer orders a moving session's requests
// (`balancer::moves`): on each replica its first request goes alone, also
// when a request moves the session at a retry; and one replica leads each
// move while the others hold the session's first request for 2 s (the
// operator's `--move-follower-pause` with `backup`). Sessions lost per
// run on 2026-12-02 (12 sessions x 4 parallel requests over 2 balancer
// replicas, 3-5 of them on the killed node):
// - the first request alone per replica: 0, 1, 1, 2;
// - and a retry taking the turn: 1, 2 (the failover node's log: requests
//   of the other replica inside the first one's rename);
// - and one replica leading each move: 0, 0, 0, 0, 0; in later runs 1 in a
//   CI run, and in 1 of 4 local runs one session answering 500 for good (a
//   fetch from the backup node while the failover node still counted the
//   dead one in left the session without its manager);
// - and the first request after a crash waiting until the member has been
//   down for the pause (`SessionMoves::turn`), requests with the old id going
//   with the new one: 0 in 6 runs, no request failed.
#[tokio::test]
async fn kill_9_under_load_with_backup_replication_loses_no_acknowledged_increment() {
    kill_9_under_load("backup").await;
}

async fn kill_9_under_load(replication: &str) {
    let _serial = serial().await;
    let app = App::start(
        &format!("e2e-kill-{replication}"),
        "shop",
        3,
        // The access log names each request's member and whether it failed
        // over: a lost session's reader needs it.
        serde_json::json!({"sessions": {"replication": replication}, "balancer": {"accessLog": true}}),
    )
    .await;
    let node_logs = app.keep_node_logs(3);
    const CLIENTS: usize = 20;
    const BROWSER_SESSIONS: usize = 12;
    const BROWSER_WORKERS: usize = 4;
    let load = Load::start(app.port, CLIENTS, Duration::from_millis(20));
    let browsers = BrowserLoad::start(app.port, BROWSER_SESSIONS, BROWSER_WORKERS, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The victim: shop-1 (never the oldest member, which answers state transfers).
    let victim = "shop-1";
    let browsers_on_victim = browsers.sessions.iter().filter(|s| s.route() == victim).count();
    app.kill_node(victim);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (total, each) = load.finish().await;
    let browsed = browsers.finish().await;
    println!(
        "kill -9 under browser load: {} answered, {} failed, {} sessions lost, {} answers missed an acknowledged increment; {browsers_on_victim} sessions on {victim}\n{}",
        browsed.answered,
        browsed.failures.len(),
        browsed.lost_sessions,
        browsed.lost_increments,
        browsed.report
    );
    summary(
        &format!("5b kill -9 {replication} (browsers)"),
        (browsed.answered + browsed.failures.len()) as u64,
        browsed.failures.len() as u64,
        browsed.lost_sessions as u64,
        killed_at.elapsed(),
        &format!(
            "{BROWSER_SESSIONS} sessions x {BROWSER_WORKERS} parallel, {browsers_on_victim} on {victim}; lost = sessions; {} answers missed an acknowledged increment",
            browsed.lost_increments
        ),
    );
    if browsed.lost_sessions > 0 || browsed.lost_increments > 0 || !browsed.failures.is_empty() || total.lost > 0 {
        // For the failure's reader: every node's and balancer's log.
        let dir = node_logs.save(&format!("e2e-kill-{replication}"));
        println!("nodes' logs in {}; what they say went wrong:\n{}", dir.display(), NodeLogKeeper::excerpt(&dir, 200));
    }
    assert_eq!(browsed.lost_sessions, 0, "browser sessions lost at the kill:\n{}", browsed.report);
    // Before `sessions.orderedRequests` a crash lost the last of two
    // parallel requests' writes in about one run of three: their
    // replications reached the other nodes in the other order.
    assert_eq!(
        browsed.lost_increments, 0,
        "answers that missed an increment acknowledged before they were sent:\n{}",
        browsed.report
    );
    assert!(
        browsed.failures.len() <= browsers_on_victim * BROWSER_WORKERS,
        "only requests in flight on {victim} may fail:\n{}",
        browsed.report
    );
    // A client whose session lived on the victim had at most one request in flight there.
    let on_victim = each.iter().filter(|s| s.routes.contains(victim)).count() as u64;
    println!(
        "kill -9 under load: {CLIENTS} clients, {} requests, {} ok, {} failed, {} lost, {} skipped; {on_victim} clients had sessions on {victim}; errors: {:?}",
        total.requests, total.ok, total.failures, total.lost, total.skipped, total.errors
    );
    summary(
        &format!("5 kill -9 {replication} under load"),
        total.requests,
        total.failures,
        total.lost,
        killed_at.elapsed(),
        &format!("{CLIENTS} clients, {on_victim} on {victim}, {} skipped", total.skipped),
    );
    assert_eq!(total.lost, 0, "acknowledged increments lost: {:?}", total.errors);
    assert!(
        total.failures <= on_victim,
        "{} failed requests, but only {on_victim} could have been in flight on {victim}: {:?}",
        total.failures,
        total.errors
    );
    assert!(total.ok > 1000, "the load ran: {} ok", total.ok);
    app.operator.stop().await;
}

#[tokio::test]
async fn https_front_is_secure_for_tomcat_and_serves_a_renewed_secret_without_restart() {
    let _serial = serial().await;
    let pki = Pki::new("clusterapp e2e CA");
    let first = pki.leaf("shop first", &[SERVER_NAME]);
    let tls = serde_json::json!({"balancer": {"tls": {"secretName": "shop-tls"}}});
    let app = App::start_with("e2e-tls", "shop", 2, tls, &[tls_secret("shop-tls", &first)]).await;
    let port = app.node_port("https").await;
    let client = pki.client(None, rustls::DEFAULT_VERSIONS);

    // Tomcat sees the request as secure, with what the handshake negotiated.
    let mut conn =
        HttpsConn::open(port, client.clone()).await.unwrap_or_else(|e| panic!("HTTPS on 127.0.0.1:{port}: {e}"));
    assert_eq!(conn.server_cert, first.der, "the Secret's certificate is served");
    let reply = conn.get("/counter/echo", None).await.expect("GET /counter/echo over HTTPS");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let echo: serde_json::Value =
        serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("echo JSON: {e}: {}", reply.body));
    assert_eq!(echo["scheme"], "https", "{echo}");
    assert_eq!(echo["secure"], true, "{echo}");
    // rustls says TLSv1_3 / TLS13_AES_256_GCM_SHA384; Java says TLSv1.3 / TLS_AES_256_GCM_SHA384.
    assert_eq!(echo["tlsProtocol"], conn.protocol.replace('_', "."), "{echo}");
    assert_eq!(echo["cipherSuite"], conn.cipher_suite.replace("TLS13_", "TLS_"), "{echo}");
    assert!(echo["keySize"].as_str().is_some_and(|k| k.parse::<u32>().is_ok_and(|bits| bits >= 128)), "{echo}");
    assert!(echo["clientCertSubject"].is_null(), "no client certificate was sent: {echo}");

    // A session over HTTPS climbs on one route (new connections: both balancer pods).
    let mut requests = 1u64;
    let mut session: Option<String> = None;
    let mut route: Option<String> = None;
    for expected in 1..=10u64 {
        let mut c = HttpsConn::open(port, client.clone()).await.unwrap_or_else(|e| panic!("request {expected}: {e}"));
        let r = c.get("/counter/", session.as_deref()).await.unwrap_or_else(|e| panic!("request {expected}: {e}"));
        requests += 1;
        assert_eq!((r.status, r.counter), (200, Some(expected)), "request {expected} of the HTTPS session: {r:?}");
        let here = r.route.clone().expect("X-Route");
        assert_eq!(route.get_or_insert(here.clone()), &here, "the HTTPS session stays on its route");
        if let Some(id) = r.session {
            session = Some(id);
        }
    }
    let route = route.expect("route");
    let mut counter = 10u64;

    // Renew: same Secret, a new certificate of the same CA. A connection
    // from before keeps serving; new handshakes get the new certificate.
    let renewed = pki.leaf("shop renewed", &[SERVER_NAME]);
    let mut kept = HttpsConn::open(port, client.clone()).await.expect("a connection from before the renewal");
    assert_eq!(kept.server_cert, first.der);
    let secrets: kube::Api<Secret> = app.ns.api();
    let mut secret = secrets.get("shop-tls").await.expect("the TLS Secret");
    secret.data = Some(
        [
            ("tls.crt".to_string(), ByteString(renewed.cert_pem.clone().into_bytes())),
            ("tls.key".to_string(), ByteString(renewed.key_pem.clone().into_bytes())),
        ]
        .into(),
    );
    secrets.replace("shop-tls", &Default::default(), &secret).await.expect("renewing the Secret");
    let renewed_at = Instant::now();
    // A kubelet writes a changed Secret into the Pod's volume at the Pod's
    // next sync: the nodes' `syncFrequency` (10 s, tests/bed/nodes/nodes.sh;
    // 1 min by default) plus its jitter (up to half of it), then the
    // balancer's file poll (1 s), plus slack.
    let bound = Duration::from_secs(25);
    // Every failed request or counter that is not the previous + 1 on the session's route.
    let mut errors: Vec<String> = Vec::new();
    let (mut first_new, mut consecutive_new, mut old_after) = (None, 0, 0u64);
    // Four new handshakes in a row with the new certificate: both balancer
    // pods (the nodePort alternates between them) serve it.
    while consecutive_new < 4 {
        assert!(
            renewed_at.elapsed() < bound,
            "the renewed certificate was not served by every balancer within {bound:?} (first seen after {first_new:?}); errors {errors:?}\n{}",
            app.pods_report()
        );
        match HttpsConn::open(port, client.clone()).await {
            Ok(mut fresh) => {
                if fresh.server_cert == renewed.der {
                    first_new.get_or_insert(renewed_at.elapsed());
                    consecutive_new += 1;
                } else {
                    assert_eq!(fresh.server_cert, first.der, "an unknown certificate was served");
                    consecutive_new = 0;
                    if first_new.is_some() {
                        old_after += 1;
                    }
                }
                let r = fresh.get("/counter/", session.as_deref()).await;
                expect_next(r, &mut counter, &route, &mut errors, "new connection");
            }
            Err(e) => errors.push(format!("new handshake: {e}")),
        }
        let r = kept.get("/counter/", session.as_deref()).await;
        expect_next(r, &mut counter, &route, &mut errors, "connection from before");
        requests += 2;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_new = renewed_at.elapsed();
    let failures = errors.len() as u64;
    let first_new = first_new.unwrap_or(all_new);
    println!(
        "HTTPS: Ready 2/2 {} ms after create; tlsProtocol {} cipherSuite {}; certificate renewal: first new handshake after {} ms, \
         every balancer after {} ms ({old_after} old handshakes in between); session on {route} at {counter}, {requests} requests, {failures} failed {errors:?}",
        app.ready_after.as_millis(),
        echo["tlsProtocol"],
        echo["cipherSuite"],
        first_new.as_millis(),
        all_new.as_millis(),
    );
    summary(
        "TLS: certificate renewal",
        requests,
        failures,
        0,
        all_new,
        &format!(
            "new cert after {:.1}/{:.1} s, session {counter} on {route}",
            first_new.as_secs_f64(),
            all_new.as_secs_f64()
        ),
    );
    assert_eq!(failures, 0, "requests failed or the session lost its count during the renewal: {errors:?}");
    assert!(counter > 10, "the session kept counting: {counter}");
    app.operator.stop().await;
}

/// Checks one counter reply of a session: 200, the previous counter + 1, on
/// `route`; anything else goes to `errors`.
fn expect_next(
    reply: Result<common::tls::HttpsReply, String>,
    counter: &mut u64,
    route: &str,
    errors: &mut Vec<String>,
    what: &str,
) {
    match reply {
        Ok(r) if r.status == 200 && r.counter == Some(*counter + 1) && r.route.as_deref() == Some(route) => {
            *counter += 1
        }
        Ok(r) => {
            errors.push(format!(
                "{what}: HTTP {} counter {:?} (expected {}) route {:?}",
                r.status,
                r.counter,
                *counter + 1,
                r.route
            ));
            if let Some(c) = r.counter {
                *counter = c;
            }
        }
        Err(e) => errors.push(format!("{what}: {e}")),
    }
}
