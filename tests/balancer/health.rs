//! Health and lifecycle against real Tomcat: a member marked failed comes
//! back into rotation after its node restarts (no balancer restart); pooled
//! AJP connections that died with a restarted node are replaced without a
//! client error; after SIGTERM `/readyz` answers 503 while the request in
//! flight finishes.

use std::time::{Duration, Instant};

use crate::common;

use crate::common::http::{Conn, get, read_reply};
use crate::common::tomcat::{TomcatOptions, start_cluster};
use crate::common::{Balancer, BalancerOptions};
use http_body_util::BodyExt;

const SECRET: &str = "health-secret";

async fn member_json(b: &Balancer, route: &str) -> serde_json::Value {
    let status = get(b.admin, "/status.json", None).await.json();
    status["members"].as_array().expect("members").iter().find(|m| m["route"] == route).cloned().expect("member listed")
}

/// Waits until `check` holds for `route`'s status entry.
async fn wait_member(
    b: &Balancer,
    route: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let m = member_json(b, route).await;
        if check(&m) {
            return;
        }
        assert!(Instant::now() < deadline, "{route} not {what} within {timeout:?}: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path`, or None when the connection fails (the process exited).
async fn try_get(addr: std::net::SocketAddr, path: &str) -> Option<common::http::Reply> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let resp = sender.send_request(request(path)).await.ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(common::http::Reply { status: parts.status.as_u16(), headers: parts.headers, body })
}

fn request(path: &str) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    hyper::Request::get(path).header("host", "t").body(http_body_util::Full::new(bytes::Bytes::new())).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_member_returns_to_rotation_after_its_node_restarts() {
    let mut nodes = start_cluster(&["h1", "h2"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    let balancer = Balancer::start(
        BalancerOptions::new(SECRET).members(&[&nodes[0], &nodes[1]]).arg("--health-interval").arg("200ms"),
    );
    let routes: Vec<String> = futures::future::join_all((0..4).map(|_| get(balancer.listen, "/counter/", None)))
        .await
        .iter()
        .map(|r| r.header("x-route").unwrap_or("").to_string())
        .collect();
    assert!(routes.iter().any(|r| r == "h1"), "h1 in rotation at start: {routes:?}");

    nodes[0].kill9();
    // The health checks notice without any request.
    wait_member(&balancer, "h1", Duration::from_secs(3), "failed", |m| m["healthy"] == false).await;
    for _ in 0..6 {
        let r = get(balancer.listen, "/counter/", None).await;
        assert_eq!((r.status, r.header("x-route")), (200, Some("h2")), "only h2 while h1 is down: {}", r.text());
    }

    nodes[0].restart();
    let restarted = Instant::now();
    wait_member(&balancer, "h1", Duration::from_secs(3), "healthy again", |m| m["healthy"] == true).await;
    eprintln!("h1 healthy {:?} after its restart answered", restarted.elapsed());
    let mut on_h1 = 0;
    for _ in 0..6 {
        let r = get(balancer.listen, "/counter/", None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        on_h1 += usize::from(r.header("x-route") == Some("h1"));
    }
    assert_eq!(on_h1, 3, "round robin over both members again");
    let h1 = member_json(&balancer, "h1").await;
    assert_eq!(h1["state"], "ready");
    assert_eq!(h1["errors"], 0, "no request was sent to h1 while it was down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_that_died_with_a_restart_are_replaced() {
    let mut nodes = start_cluster(&["p1"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    // One member (nowhere to fail over to) and no health checks in the
    // test's time: only the request path sees the dead pooled connections.
    let balancer =
        Balancer::start(BalancerOptions::new(SECRET).members(&[&nodes[0]]).arg("--health-interval").arg("10m"));

    // Several connections in the pool, from concurrent requests.
    let replies = futures::future::join_all((0..8).map(|_| get(balancer.listen, "/counter/echo", None))).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let pooled = member_json(&balancer, "p1").await["pool_idle"].as_u64().expect("pool_idle");
    assert!(pooled >= 2, "connections pooled: {pooled}");

    nodes[0].restart();
    assert_eq!(
        member_json(&balancer, "p1").await["pool_idle"].as_u64(),
        Some(pooled),
        "the dead connections are still pooled"
    );

    // One keep-alive client connection, then a concurrent burst: every request succeeds.
    let mut conn: Conn = Conn::open(balancer.listen).await;
    let r = read_reply(conn.send(request("/counter/echo")).await.expect("send")).await;
    assert_eq!(r.status, 200, "first request after the restart: {}", r.text());
    let replies = futures::future::join_all((0..16).map(|_| get(balancer.listen, "/counter/", None))).await;
    let failed: Vec<_> = replies.iter().filter(|r| r.status != 200).map(|r| (r.status, r.text())).collect();
    assert!(failed.is_empty(), "client errors after the restart: {failed:?}");
    let metrics = get(balancer.admin, "/metrics", None).await.text();
    assert!(
        !metrics.lines().any(|l| l.starts_with("clusterapp_balancer_rejected_total") && !l.ends_with(" 0")),
        "nothing rejected:\n{metrics}"
    );
    let p1 = member_json(&balancer, "p1").await;
    assert_eq!((p1["healthy"].as_bool(), p1["errors"].as_u64()), (Some(true), Some(0)), "{p1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_during_shutdown_while_in_flight_requests_finish() {
    let nodes = start_cluster(&["r1"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    let mut balancer =
        Balancer::start(BalancerOptions::new(SECRET).members(&[&nodes[0]]).arg("--shutdown-grace").arg("20s"));
    assert_eq!(get(balancer.admin, "/readyz", None).await.status, 200);

    // A download of about 10 s (read at 4 MB/s) in flight across the
    // SIGTERM; the balancer is done with it once the last bytes are in the
    // kernel's socket buffers, a few MB before the client has read them.
    let listen = balancer.listen;
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let download = tokio::spawn(async move {
        let mut conn: Conn = Conn::open(listen).await;
        let resp = conn.send(request("/counter/download?bytes=40000000")).await.expect("download head");
        let _ = head_tx.send(resp.status().as_u16());
        let n = common::http::read_paced(resp, 4e6).await;
        (n, Instant::now())
    });
    assert_eq!(head_rx.await.expect("head"), 200);

    common::signal(balancer.pid(), "TERM");
    let signalled = Instant::now();
    let mut answers_503 = 0;
    // Until the balancer has handed the last byte to the kernel and exits.
    while tokio::net::TcpStream::connect(balancer.admin).await.is_ok() {
        let Some(r) = try_get(balancer.admin, "/readyz").await else { break };
        if r.status == 503 {
            assert!(r.text().contains("shutting down"), "{}", r.text());
            answers_503 += 1;
            // No new client connections once shutting down (the listener
            // closes a moment after the flag that /readyz reports is set).
            let deadline = Instant::now() + Duration::from_secs(2);
            while tokio::net::TcpStream::connect(balancer.listen).await.is_ok() {
                assert!(Instant::now() < deadline, "the front still accepts 2 s into the shutdown");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            assert!(signalled.elapsed() < Duration::from_millis(500), "/readyz still {} after SIGTERM", r.status);
        }
        if let Some(r) = try_get(balancer.admin, "/healthz").await {
            assert_eq!(r.status, 200, "alive while it drains");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited_after = signalled.elapsed();
    eprintln!("/readyz answered 503 {answers_503} times; the balancer exited {exited_after:?} after SIGTERM");
    let saw_503 = answers_503 >= 3;
    assert!(saw_503, "/readyz answered 503 while the download was in flight");
    let (bytes, finished) = download.await.expect("download task");
    assert_eq!(bytes, 40_000_000, "the request in flight finished completely");
    assert!(exited_after > Duration::from_secs(1), "the download really kept the balancer in its graceful shutdown");
    assert!(finished.duration_since(signalled) >= exited_after, "and the client got every byte");
    let status = balancer.terminate(Duration::from_secs(10)).expect("the balancer exits after the in-flight request");
    assert!(status.success(), "{status}");
}
