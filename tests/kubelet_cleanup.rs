//! Stopping the process kubelet leaves nothing behind: no Pod process (also
//! none that left its process group), no network namespace, veth or bridge,
//! no Node object.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use support::TestNamespace;
use support::kubelet::KubeletProcess;

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purpose; /proc/<pid>/stat shows its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn stopping_the_kubelet_stops_every_pod_process_and_removes_its_network_and_node() {
    // A private kubelet: this test stops it.
    let kubelet = KubeletProcess::start("kubelet_cleanup", &[]);
    let ns = TestNamespace::new("kubelet-cleanup").await;
    let pods: Api<Pod> = ns.api();
    // Main process, a child in its group, and a grandchild that escapes the
    // group with setsid: all three must be gone after the kubelet stops.
    let script = "sleep 3600 & child=$$!; setsid sleep 3601 & escaped=$$!; echo PIDS $$$$ $child $escaped; wait";
    for name in ["one", "two"] {
        let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 30,
                     "containers": [{"name": "main", "image": "local/busybox", "command": ["sh", "-c", script]}]}}))
        .expect("pod json");
        pods.create(&PostParams::default(), &pod).await.expect("create pod");
    }
    let mut pids: Vec<u32> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in ["one", "two"] {
        loop {
            let log = kubelet.container_log(&ns.name, name, "main");
            if let Some(line) = log.lines().find(|l| l.starts_with("PIDS ")) {
                pids.extend(line.split_whitespace().skip(1).map(|p| p.parse::<u32>().expect("pid")));
                break;
            }
            assert!(Instant::now() < deadline, "pod {name} did not start:\n{}", kubelet.log_tail(30));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(pids.len(), 6);
    assert!(pids.iter().all(|p| alive(*p)), "pod processes running before the stop");
    // Each pod's network namespace is there (named after its IP's last octet;
    // other test binaries' leftover pods may add more on a shared cluster).
    let namespaces_before = ip(&["netns", "list"]);
    for name in ["one", "two"] {
        let pod = pods.get(name).await.expect("pod");
        let pod_ip: std::net::Ipv4Addr =
            pod.status.and_then(|s| s.pod_ip).and_then(|ip| ip.parse().ok()).expect("pod IP");
        let netns = format!("cabr0-{}", pod_ip.octets()[3]);
        assert!(
            namespaces_before.lines().any(|l| l.split_whitespace().next() == Some(netns.as_str())),
            "{netns} missing: {namespaces_before}"
        );
    }
    assert!(ip(&["-o", "link", "show", "cabr0"]).contains("cabr0"));

    let stopped_at = Instant::now();
    let status = kubelet.stop(Duration::from_secs(60));
    println!("kubelet stopped in {} ms with two pods running", stopped_at.elapsed().as_millis());
    assert!(status.success(), "kubelet exit status {status}:\n{}", kubelet.log_tail(30));

    for pid in &pids {
        assert!(!alive(*pid), "process {pid} of a pod survived the kubelet");
    }
    let namespaces = ip(&["netns", "list"]);
    assert!(!namespaces.lines().any(|l| l.starts_with("cabr0-")), "network namespaces left: {namespaces}");
    let links = ip(&["-o", "link", "show"]);
    assert!(!links.contains("cabr0"), "bridge or veths left:\n{links}");
    let addresses = ip(&["-o", "addr", "show"]);
    assert!(!addresses.contains("10.96.0.1") && !addresses.contains("10.244.0."), "addresses left:\n{addresses}");

    let nodes: Api<Node> = Api::all(ns.client.clone());
    assert!(nodes.get_opt("clusterapp-node").await.expect("get node").is_none(), "the Node object is still there");
    // Like a graceful node shutdown: the pods are reported as terminated.
    let pod = pods.get("one").await.expect("pod one");
    let status = pod.status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.reason.as_deref(), Some("Terminated"));
}
