//! Kubernetes membership against the real API server: the balancer follows
//! the EndpointSlices of a Service (route = Pod name) and re-routes within
//! 1 s of a change — ready, draining (serving + terminating), down, removed,
//! added — without dropping a request in flight.

mod balancer_common;
mod support;

use std::time::{Duration, Instant};

use balancer_common::http::{Conn, get, read_reply};
use balancer_common::tomcat::{TomcatNode, TomcatOptions, start_cluster};
use balancer_common::{Balancer, BalancerOptions};
use http_body_util::BodyExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

const SECRET: &str = "kubernetes-secret";

/// One slice per node (they listen on different ports of 127.0.0.1; a slice
/// has one port set). The API server refuses loopback IPs in slices, so the
/// test slices are `FQDN` slices naming `<pod>.localhost` (loopback by RFC 6761); the IP path of the same
/// code is covered by the unit tests of `members_from_slices`.
fn slice(node: &TomcatNode, ready: bool, serving: bool, terminating: bool) -> EndpointSlice {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("web-{}", node.route), "labels": {"kubernetes.io/service-name": "web"}},
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
    status["members"].as_array()?.iter().find(|m| m["route"] == route).and_then(|m| m["state"].as_str().map(str::to_string))
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

    let mut options = BalancerOptions::new(SECRET).arg("--kubernetes-service").arg(format!("{}/web", ns.name));
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
        assert_eq!(get(balancer.listen, "/counter/", None).await.header("x-route"), Some("web-1"), "no new sessions on a draining member");
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
    let routes: Vec<String> =
        futures::future::join_all((0..4).map(|_| get(balancer.listen, "/counter/", None))).await.iter().filter_map(|r| r.header("x-route").map(str::to_string)).collect();
    assert!(routes.iter().any(|r| r == "web-0") && routes.iter().any(|r| r == "web-1"), "both members take new sessions: {routes:?}");

    assert_eq!(download.await.expect("download task"), 30_000_000, "the request in flight was not dropped");
    let _ = read_reply;
}
