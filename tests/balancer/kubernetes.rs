//! Kubernetes membership against the real API server: the balancer follows
//! the EndpointSlices of a Service (route = Pod name) and re-routes within
//! 1 s of a change — ready, draining (serving + terminating), down, removed,
//! added — without dropping a request in flight; and a terminating member
//! keeps its sticky sessions only for `--drain-timeout`, after which they
//! fail over while its node is still up (the operator's choreography before
//! SIGTERM), without a failed request.

use crate::common;
use crate::support;

use std::time::{Duration, Instant};

use crate::common::http::{Conn, get, read_reply};
use crate::common::tomcat::{TomcatNode, TomcatOptions, start_cluster};
use crate::common::{Balancer, BalancerOptions};
use http_body_util::BodyExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

const SECRET: &str = "kubernetes-secret";

/// One slice per node (they listen on different ports of 127.0.0.1; a slice
/// has one port set). The API server refuses loopback IPs in slices, so the
/// test slices are `FQDN` slices naming `<pod>.localhost` (loopback by RFC 6761); the IP path of the same
/// code is covered by the unit tests of `members_from_slices`.
fn slice(node: &TomcatNode, ready: bool, serving: bool, terminating: bool) -> EndpointSlice {
    service_slice("web", node, ready, serving, terminating)
}

fn service_slice(service: &str, node: &TomcatNode, ready: bool, serving: bool, terminating: bool) -> EndpointSlice {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{}", node.route), "labels": {"kubernetes.io/service-name": service}},
        "addressType": "FQDN",
        "ports": [{"name": "http", "port": node.http_port, "protocol": "TCP"}, {"name": "ajp", "port": node.ajp_port, "protocol": "TCP"}],
        "endpoints": [{
            "addresses": [format!("{}.localhost", node.route)],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": node.route, "namespace": "ignored"}
        }]
    }))
    .expect("slice json")
}

async fn member_state(b: &Balancer, route: &str) -> Option<String> {
    let status = get(b.admin, "/status.json", None).await.json();
    status["members"]
        .as_array()?
        .iter()
        .find(|m| m["route"] == route)
        .and_then(|m| m["state"].as_str().map(str::to_string))
}

/// Waits (≤ 1 s from `since`) until the balancer shows `route` in `state` (None: absent).
async fn expect_within_1s(b: &Balancer, route: &str, state: Option<&str>, since: Instant) -> Duration {
    loop {
        if member_state(b, route).await.as_deref() == state {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(1), "{route} not {state:?} within 1 s of the API change");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slice_changes_reroute_within_one_second() {
    let ns = support::TestNamespace::new("balancer").await;
    let nodes = start_cluster(&["web-0", "web-1"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    let slices = ns.api::<EndpointSlice>();
    slices.create(&PostParams::default(), &slice(&nodes[0], true, true, false)).await.expect("slice web-0");
    slices.create(&PostParams::default(), &slice(&nodes[1], true, true, false)).await.expect("slice web-1");

    // A drain timeout longer than this test: draining here means sticky.
    let mut options = BalancerOptions::new(SECRET)
        .arg("--kubernetes-service")
        .arg(format!("{}/web", ns.name))
        .arg("--drain-timeout")
        .arg("10m");
    options.envs.push(("KUBECONFIG".into(), support::cluster().kubeconfig.to_string_lossy().into_owned()));
    let balancer = Balancer::start(options);
    assert_eq!(member_state(&balancer, "web-0").await.as_deref(), Some("ready"));
    assert_eq!(member_state(&balancer, "web-1").await.as_deref(), Some("ready"));

    // Sessions on both members; keep one on web-0.
    let mut on_web0 = None;
    for _ in 0..4 {
        let r = get(balancer.listen, "/counter/", None).await;
        assert_eq!(r.status, 200);
        let id = r.set_session_id().expect("session");
        if id.ends_with(".web-0") {
            on_web0 = Some(id);
        }
    }
    let session = on_web0.expect("round robin gave web-0 a session");

    // A download in flight across all the membership changes below.
    let listen = balancer.listen;
    let download = tokio::spawn(async move {
        let mut conn: Conn = Conn::open(listen).await;
        let req = hyper::Request::get("/counter/download?bytes=30000000")
            .header("host", "t")
            .header("cookie", "JSESSIONID=X.web-1")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        let resp = conn.send(req).await.expect("download head");
        let mut body = resp.into_body();
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            n += frame.expect("frame").into_data().map(|d| d.len()).unwrap_or(0);
            // Read slowly so the transfer spans the changes.
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        n
    });

    // web-0 terminating but serving: draining.
    let changed = Instant::now();
    slices
        .patch("web-web-0", &PatchParams::apply("test").force(), &Patch::Apply(slice(&nodes[0], false, true, true)))
        .await
        .expect("patch draining");
    let took = expect_within_1s(&balancer, "web-0", Some("draining"), changed).await;
    eprintln!("draining seen after {took:?}");
    let r = get(balancer.listen, "/counter/", Some(&session)).await;
    assert_eq!(r.header("x-route"), Some("web-0"), "draining keeps its sessions");
    for _ in 0..4 {
        assert_eq!(
            get(balancer.listen, "/counter/", None).await.header("x-route"),
            Some("web-1"),
            "no new sessions on a draining member"
        );
    }

    // Not serving: down; its sessions fail over.
    let changed = Instant::now();
    slices
        .patch("web-web-0", &PatchParams::apply("test").force(), &Patch::Apply(slice(&nodes[0], false, false, true)))
        .await
        .expect("patch down");
    expect_within_1s(&balancer, "web-0", Some("down"), changed).await;
    let r = get(balancer.listen, "/counter/", Some(&session)).await;
    assert_eq!((r.status, r.header("x-route")), (200, Some("web-1")));

    // Slice deleted: member gone. Re-created ready: back in rotation.
    let changed = Instant::now();
    slices.delete("web-web-0", &DeleteParams::default()).await.expect("delete");
    expect_within_1s(&balancer, "web-0", None, changed).await;
    let changed = Instant::now();
    slices.create(&PostParams::default(), &slice(&nodes[0], true, true, false)).await.expect("recreate");
    expect_within_1s(&balancer, "web-0", Some("ready"), changed).await;
    let routes: Vec<String> = futures::future::join_all((0..4).map(|_| get(balancer.listen, "/counter/", None)))
        .await
        .iter()
        .filter_map(|r| r.header("x-route").map(str::to_string))
        .collect();
    assert!(
        routes.iter().any(|r| r == "web-0") && routes.iter().any(|r| r == "web-1"),
        "both members take new sessions: {routes:?}"
    );

    assert_eq!(download.await.expect("download task"), 30_000_000, "the request in flight was not dropped");
    let _ = read_reply;
}

/// One sticky request of the load loop: when it started (since the slice
/// turned terminating), the route that answered, the counter it returned.
#[derive(Debug)]
struct Seen {
    at: Duration,
    status: u16,
    route: String,
    counter: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_member_keeps_sticky_sessions_for_the_drain_timeout_then_fails_over() {
    const DRAIN: Duration = Duration::from_secs(3);
    let ns = support::TestNamespace::new("balancer-drain").await;
    // Replicated sessions (DeltaManager, sync): failover keeps the counter.
    let nodes = start_cluster(&["shop-0", "shop-1"], &TomcatOptions::new(SECRET));
    let slices = ns.api::<EndpointSlice>();
    for node in &nodes {
        slices.create(&PostParams::default(), &service_slice("shop", node, true, true, false)).await.expect("slice");
    }
    let mut options = BalancerOptions::new(SECRET)
        .arg("--kubernetes-service")
        .arg(format!("{}/shop", ns.name))
        .arg("--drain-timeout")
        .arg(format!("{}ms", DRAIN.as_millis()));
    options.envs.push(("KUBECONFIG".into(), support::cluster().kubeconfig.to_string_lossy().into_owned()));
    let balancer = Balancer::start(options);

    // A session on shop-0, the node that will leave.
    let mut session = None;
    for _ in 0..6 {
        let r = get(balancer.listen, "/counter/", None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let id = r.set_session_id().expect("session");
        if id.ends_with(".shop-0") {
            session = Some(id);
            break;
        }
    }
    let mut session = session.expect("round robin gave shop-0 a session");
    let mut expected_counter = 2u32;
    let r = get(balancer.listen, "/counter/", Some(&session)).await;
    assert_eq!((r.status, r.header("x-route"), r.header("x-counter")), (200, Some("shop-0"), Some("2")));

    // shop-0's pod starts terminating: serving, not ready, terminating.
    let terminating_at = Instant::now();
    slices
        .patch(
            "shop-shop-0",
            &PatchParams::apply("test").force(),
            &Patch::Apply(service_slice("shop", &nodes[0], false, true, true)),
        )
        .await
        .expect("patch terminating");
    let took = expect_within_1s(&balancer, "shop-0", Some("draining"), terminating_at).await;
    eprintln!("terminating seen as draining after {took:?}");
    let status = get(balancer.admin, "/status.json", None).await.json();
    let shop0 = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["route"] == "shop-0")
        .cloned()
        .expect("shop-0");
    assert_eq!(shop0["terminating"], true);
    let left = shop0["drain_remaining_seconds"].as_f64().expect("remaining time shown");
    assert!(left > 1.5 && left <= 3.0, "drain time left {left}");

    // A download on shop-0 that starts before the timeout and ends after it.
    let listen = balancer.listen;
    let download = tokio::spawn(async move {
        let mut conn: Conn = Conn::open(listen).await;
        let req = hyper::Request::get("/counter/download?bytes=16000000")
            .header("host", "t")
            .header("cookie", "JSESSIONID=X.shop-0")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        let resp = conn.send(req).await.expect("download head");
        assert_eq!(resp.status(), 200);
        let route = resp.headers().get("x-route").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        // 4 MB/s: the 16 MB take about 4 s, past the drain timeout.
        let n = common::http::read_paced(resp, 4e6).await;
        (route, n, Instant::now())
    });

    // Sticky requests on one keep-alive connection across the timeout,
    // following the id when Tomcat rewrites its route.
    let mut seen: Vec<Seen> = Vec::new();
    let mut conn: Conn = Conn::open(balancer.listen).await;
    let mut sigterm_sent = false;
    let mut download = Some(download);
    let mut download_result = None;
    while terminating_at.elapsed() < DRAIN + Duration::from_secs(5) {
        let at = terminating_at.elapsed();
        let req = hyper::Request::get("/counter/")
            .header("host", "t")
            .header("cookie", format!("JSESSIONID={session}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        let r = read_reply(conn.send(req).await.expect("sticky request")).await;
        let route = r.header("x-route").unwrap_or("").to_string();
        let counter = r.header("x-counter").and_then(|c| c.parse().ok()).unwrap_or(0);
        if let Some(id) = r.set_session_id() {
            session = id;
        }
        seen.push(Seen { at, status: r.status, route, counter });
        // The choreography's last step: once shop-0 is idle its node stops
        // (SIGTERM: Tomcat pauses its connectors); nobody notices.
        if let Some(task) = download.take_if(|t| t.is_finished()) {
            download_result = Some(task.await.expect("download task"));
        }
        if !sigterm_sent && download_result.is_some() && at > DRAIN + Duration::from_millis(1500) {
            common::signal(nodes[0].pid().expect("shop-0 runs"), "TERM");
            sigterm_sent = true;
            eprintln!("SIGTERM to shop-0 at {at:?}");
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    if let Some(task) = download {
        download_result = Some(task.await.expect("download task"));
    }
    let (download_route, download_bytes, download_done) = download_result.expect("download finished");

    let failed: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "no request failed: {failed:?}");
    for s in &seen {
        assert_eq!(s.counter, expected_counter + 1, "the counter climbs by one, nothing lost: {s:?}");
        expected_counter = s.counter;
    }
    let last_on_0 =
        seen.iter().filter(|s| s.route == "shop-0").map(|s| s.at).max().expect("shop-0 kept the session for a while");
    let first_on_1 =
        seen.iter().filter(|s| s.route == "shop-1").map(|s| s.at).min().expect("the session moved to shop-1");
    eprintln!("{} sticky requests; last on shop-0 at {last_on_0:?}, first on shop-1 at {first_on_1:?}", seen.len());
    assert!(seen.iter().all(|s| s.route == "shop-0" || s.route == "shop-1"));
    assert!(
        seen.iter().filter(|s| s.at < DRAIN - Duration::from_millis(500)).all(|s| s.route == "shop-0"),
        "sticky to shop-0 during the drain timeout"
    );
    assert!(first_on_1 >= DRAIN - Duration::from_millis(500), "moved too early: {first_on_1:?}");
    assert!(last_on_0 < DRAIN + Duration::from_secs(1), "still sent to shop-0 at {last_on_0:?}, past the timeout");
    assert!(
        seen.iter().filter(|s| s.at > first_on_1).all(|s| s.route == "shop-1"),
        "once moved, the session stays on shop-1"
    );
    assert!(session.ends_with(".shop-1"), "JvmRouteBinderValve rewrote the id's route: {session}");
    assert!(sigterm_sent, "shop-0 got SIGTERM while the load ran");

    // The exchange in flight at the timeout finished normally.
    assert_eq!((download_route.as_str(), download_bytes), ("shop-0", 16_000_000));
    let download_end = download_done.duration_since(terminating_at);
    assert!(
        download_end > last_on_0 && download_end > DRAIN,
        "the download spanned the timeout (ended at {download_end:?})"
    );

    // Visible: drained in status and metrics until the member goes away (or fails its checks).
    let status = get(balancer.admin, "/status.json", None).await.json();
    let shop0 = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["route"] == "shop-0")
        .cloned()
        .expect("shop-0");
    assert!(shop0["state"] == "drained", "status: {shop0}");
    let metrics = get(balancer.admin, "/metrics", None).await.text();
    assert!(metrics.contains("clusterapp_balancer_member_state{member=\"shop-0\"} 0"), "{metrics}");
    assert!(balancer.log_text().contains("drain timeout passed"), "the timeout is logged");
}
