//! What real nodes let us prove (issue 10): a ClusterApp run by the
//! operator on the three local nodes, checked from the outside — where the
//! scheduler put its Pods, what the container runtime enforces (user,
//! read-only root), where the secrets are (files, not environment), and that
//! `kubectl logs`, `exec` and `port-forward` work against every kind of Pod
//! we run.

use crate::common;
use crate::support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::ListParams;

use crate::common::{App, Load, serial, summary};
use crate::support::nodes::{PortForward, environment, http_status, nodes, root_mount_options, uids};
use crate::support::{kubectl, run_ok};

#[tokio::test]
async fn on_real_nodes_pods_spread_run_locked_down_keep_secrets_in_files_and_answer_kubectl() {
    let _serial = serial().await;
    let started = Instant::now();
    let app = App::start("e2e-nodes", "shop", 3, serde_json::json!({})).await;
    let ns = app.ns.name.clone();
    let pods: Api<Pod> = app.ns.api();
    let node_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=session-node"))
        .await
        .expect("session node pods");
    let balancer_pods =
        pods.list(&ListParams::default().labels("app.kubernetes.io/component=balancer")).await.expect("balancer pods");

    // 1. Spread: three session nodes on three different nodes.
    let nodes_used: BTreeSet<String> = node_pods.items.iter().map(node_of).collect();
    assert_eq!(nodes_used.len(), 3, "session nodes share nodes:\n{}", app.pods_report());
    let balancer_nodes: BTreeSet<String> = balancer_pods.items.iter().map(node_of).collect();
    assert_eq!(balancer_nodes.len(), 2, "both balancers on one node:\n{}", app.pods_report());

    // 2. What the runtime enforces, seen from the host: not root, and a
    // read-only root file system, for Tomcat and for the balancer.
    let balancer = balancer_pods.items[0].metadata.name.clone().expect("balancer name");
    let mut checked = Vec::new();
    for (pod, container) in [("shop-0", "tomcat"), (balancer.as_str(), "balancer")] {
        let pid = nodes().container_pid(&ns, pod, container).expect("a running container");
        let ids = uids(pid);
        assert!(ids.iter().all(|&id| id != 0), "{pod}/{container} runs as root: uids {ids:?}");
        let options = root_mount_options(pid);
        assert!(options.split(',').any(|o| o == "ro"), "{pod}/{container}: / is mounted {options}");
        checked.push(format!("{pod}/{container} pid {pid} uid {} root {options}", ids[0]));
    }
    // ... and what a process inside meets (exec into Tomcat, which has a shell).
    let write = kubectl().args(["exec", "-n", &ns, "shop-0", "-c", "tomcat", "--", "touch", "/probe"]).output();
    let write = write.expect("kubectl exec");
    assert!(!write.status.success(), "writing to / in a session node succeeded");
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&write.stderr)
    );

    // 3. Secrets as files: Tomcat answered through AJP (App::start waited for
    // a 200 through the balancer), so it read the secret from its file;
    // the value is in no container's environment and in no `kubectl
    // describe` of any Pod.
    let secrets: Api<Secret> = app.ns.api();
    let secret = secrets.get("shop-secrets").await.expect("the app's Secret");
    let data = secret.data.expect("Secret data");
    let values: Vec<String> = ["ajp-secret", "tribes-encryption-key"]
        .iter()
        .map(|k| String::from_utf8(data.get(*k).expect(k).0.clone()).expect("utf-8"))
        .collect();
    let file = run_ok(
        kubectl()
            .args(["exec", "-n", &ns, "shop-0", "-c", "tomcat", "--", "cat"])
            .arg("/etc/clusterapp/bindings/ajp/secret"),
    );
    assert_eq!(file.trim_end(), values[0], "the AJP secret file holds the Secret's value");
    for (pod, container) in [("shop-0", "tomcat"), ("shop-1", "tomcat"), (balancer.as_str(), "balancer")] {
        let pid = nodes().container_pid(&ns, pod, container).expect("a running container");
        let env = environment(pid);
        for value in &values {
            assert!(!env.contains(value.as_str()), "{pod}/{container}: a secret in its environment");
        }
    }
    let described = run_ok(kubectl().args(["describe", "pods", "-n", &ns]));
    for value in &values {
        assert!(!described.contains(value.as_str()), "a secret in `kubectl describe pods`");
    }

    // 4. kubectl logs / exec / port-forward against each kind of Pod.
    let tomcat_log = run_ok(kubectl().args(["logs", "-n", &ns, "shop-0", "-c", "tomcat"]));
    assert!(tomcat_log.contains("Server startup"), "kubectl logs of Tomcat:\n{tomcat_log}");
    let balancer_log = run_ok(kubectl().args(["logs", "-n", &ns, &balancer]));
    assert!(!balancer_log.trim().is_empty(), "kubectl logs of the balancer is empty");
    // The balancer image has no shell: exec runs the binary itself.
    let version =
        run_ok(kubectl().args(["exec", "-n", &ns, &balancer, "--", "/usr/local/bin/clusterapp", "--version"]));
    assert!(version.starts_with("clusterapp "), "{version}");
    let admin = PortForward::open(&ns, &balancer, 9090);
    assert_eq!(http_status(admin.local_port, "/healthz"), "200", "balancer admin port through port-forward");
    let tomcat = PortForward::open(&ns, "shop-0", 8080);
    assert_eq!(http_status(tomcat.local_port, "/health"), "200", "Tomcat through port-forward");
    drop((admin, tomcat));

    println!("nodes: session nodes on {nodes_used:?}, balancers on {balancer_nodes:?}; {}", checked.join("; "));
    summary(
        "10 real nodes: spread, locked down, secrets",
        1,
        0,
        0,
        started.elapsed(),
        "3 nodes, non-root, read-only /, secrets as files, logs/exec/port-forward",
    );
    app.operator.stop().await;
}

/// The node a Pod runs on.
fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

/// Where the Pods of the app `shop` run.
struct Placement {
    /// The balancer Pods and their nodes.
    balancers: Vec<(String, String)>,
    /// The session node Pods and their nodes.
    session_nodes: Vec<(String, String)>,
}

impl Placement {
    async fn of(pods: &Api<Pod>) -> Placement {
        let all = pods.list(&ListParams::default()).await.expect("pods");
        let (balancers, session_nodes) = all
            .items
            .iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), node_of(p)))
            .partition(|(name, _)| name.starts_with("shop-balancer-"));
        Placement { balancers, session_nodes }
    }

    fn balancer_nodes(&self) -> BTreeSet<String> {
        self.balancers.iter().map(|(_, node)| node.clone()).collect()
    }
}

/// Uncordons `node` when dropped: the nodes are shared by every later test,
/// also when this one fails.
struct Uncordon(String);

impl Drop for Uncordon {
    fn drop(&mut self) {
        let _ = kubectl().args(["uncordon", &self.0]).output();
    }
}

/// `kubectl drain` of a node that holds a session node and a balancer,
/// under 20 clients with sessions: the session node is evicted through the
/// PodDisruptionBudget (never two nodes down at once), made again on
/// another node, and no request fails and no increment is lost.
#[tokio::test]
async fn kubectl_drain_of_a_node_loses_no_request_and_no_increment() {
    let _serial = serial().await;
    let app = App::start("e2e-drain", "shop", 3, serde_json::json!({})).await;
    let ns = app.ns.name.clone();
    let pods: Api<Pod> = app.ns.api();
    // The node of shop-1 that also runs a balancer if one does (the harder case).
    let placement = Placement::of(&pods).await;
    let (balancer_nodes, session_nodes) = (placement.balancer_nodes(), placement.session_nodes);
    let (victim_pod, node) = session_nodes
        .iter()
        .find(|(_, n)| balancer_nodes.contains(n))
        .or(session_nodes.first())
        .cloned()
        .expect("a session node");
    let _uncordon = Uncordon(node.clone());

    let load = Load::start(app.port, 20, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let drained_at = Instant::now();
    let drain = {
        let node = node.clone();
        tokio::task::spawn_blocking(move || {
            kubectl()
                .args(["drain", &node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=300s"])
                .output()
                .expect("kubectl drain")
        })
    };
    // While it drains: how many session nodes are not ready at once.
    let mut most_unready = 0;
    while !drain.is_finished() {
        let list =
            pods.list(&ListParams::default().labels("app.kubernetes.io/component=session-node")).await.expect("pods");
        let ready = list.items.iter().filter(|p| support::nodes::pod_ready(p)).count();
        most_unready = most_unready.max(3usize.saturating_sub(ready));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = drain.await.expect("drain task");
    assert!(
        out.status.success(),
        "kubectl drain {node} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let drain_took = drained_at.elapsed();
    let converge = app.wait_ready(3, Duration::from_secs(300)).await + drain_took;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (total, _) = load.finish().await;

    let after = pods.list(&ListParams::default()).await.expect("pods");
    let on_drained: Vec<String> =
        after.items.iter().filter(|p| node_of(p) == node).filter_map(|p| p.metadata.name.clone()).collect();
    assert!(on_drained.is_empty(), "Pods still on the drained node {node}: {on_drained:?}");
    let evictions = run_ok(kubectl().args(["get", "events", "-n", &ns, "--field-selector", "reason=Killing"]));
    println!(
        "drain: {node} (had {victim_pod}) drained in {:.1} s, Ready 3/3 after {:.1} s; at most {most_unready} session node(s) unready; {} requests, {} failed, {} lost\n{evictions}",
        drain_took.as_secs_f64(),
        converge.as_secs_f64(),
        total.requests,
        total.failures,
        total.lost
    );
    summary(
        "10 kubectl drain (20 clients)",
        total.requests,
        total.failures,
        total.lost,
        converge,
        &format!("{victim_pod} on {node}; at most {most_unready} unready"),
    );
    app.operator.stop().await;
    assert_eq!(total.failures, 0, "requests failed during the drain: {:?}", total.errors);
    assert_eq!(total.lost, 0, "increments lost during the drain: {:?}", total.errors);
    assert!(most_unready <= 1, "{most_unready} session nodes were unready at once: the PodDisruptionBudget allows 1");
}

/// A node that dies under 20 clients with sessions: its Pods are cut off the
/// network first (no reset reaches anyone), then its kubelet, containerd and
/// containers are killed. The balancers learn of it from timeouts alone
/// (the endpoints stay ready until the control plane gives up on the node,
/// a minute later): the sessions of its session node wait out the slow
/// grace (5 s) and fail over, every acknowledged increment intact. Requests
/// that were on the dead node when it died get no answer: those may fail.
#[tokio::test]
async fn a_node_that_dies_loses_no_acknowledged_increment() {
    let _serial = serial().await;
    let app = App::start("e2e-node-death", "shop", 3, serde_json::json!({})).await;
    let ns = app.ns.name.clone();
    let pods: Api<Pod> = app.ns.api();
    // A node with a session node and no balancer: the clients' connections
    // reach the balancers through the NodePort, and this is about the nodes.
    let placement = Placement::of(&pods).await;
    let balancer_nodes = placement.balancer_nodes();
    let (victim_pod, node) =
        placement.session_nodes.iter().find(|(_, n)| !balancer_nodes.contains(n)).cloned().unwrap_or_else(|| {
            panic!("every node with a session node runs a balancer:\n{}", support::nodes::pods_report(&ns))
        });
    // A session of the victim to time its failover with.
    let mut probe = None;
    for _ in 0..60 {
        let r = common::get_counter(app.port, None).await.expect("new session");
        if r.route.as_deref() == Some(victim_pod.as_str()) {
            probe = r.session;
            break;
        }
    }
    let probe = probe.unwrap_or_else(|| panic!("no new session reached {victim_pod} in 60 tries"));
    let before = common::get_counter(app.port, Some(&probe)).await.expect("increment");
    assert_eq!((before.status, before.counter), (200, Some(2)), "{before:?}");

    let load = Load::start(app.port, 20, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let dead = nodes().kill_node(&node);
    let died_at = Instant::now();
    let after = loop {
        match common::get_counter(app.port, Some(&probe)).await {
            Ok(r) if r.status == 200 => break r,
            other => {
                assert!(
                    died_at.elapsed() < Duration::from_secs(60),
                    "the probe session is not served 60 s later: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let served_after = died_at.elapsed();
    assert_eq!(after.counter, Some(3), "the probe session goes on from its last acknowledged increment: {after:?}");
    assert_ne!(after.route.as_deref(), Some(victim_pod.as_str()), "served elsewhere: {after:?}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (total, _) = load.finish().await;
    // How the balancers learnt of it: their own log lines about the victim.
    let learnt: Vec<String> = placement
        .balancers
        .iter()
        .flat_map(|(b, _)| {
            nodes()
                .container_log(&ns, b, "balancer")
                .lines()
                .filter(|l| l.contains(&format!("\"route\":\"{victim_pod}\"")))
                // Since the death: timeouts (slow) and what followed.
                .skip_while(|l| !l.contains("member slow"))
                .filter(|l| {
                    l.contains("member slow")
                        || l.contains("member marked failed")
                        || l.contains("member state changed")
                })
                .map(|l| l.split("\"message\":\"").nth(1).unwrap_or(l).chars().take(160).collect::<String>())
                .collect::<Vec<_>>()
        })
        .collect();
    dead.revive();
    let converge = app.wait_ready(3, Duration::from_secs(300)).await;
    println!(
        "node death: {node} (had {victim_pod}); its session served elsewhere after {:.1} s ({} -> {:?}); {} requests, {} failed, {} lost, {} skipped; the app Ready 3/3 {:.1} s after the node came back; the balancers learnt: {learnt:?}; errors {:?}",
        served_after.as_secs_f64(),
        victim_pod,
        after.route,
        total.requests,
        total.failures,
        total.lost,
        total.skipped,
        converge.as_secs_f64(),
        total.errors
    );
    summary(
        "10 node dies (20 clients)",
        total.requests,
        total.failures,
        total.lost,
        served_after,
        &format!(
            "{victim_pod} on {node}; served elsewhere after {:.1} s; timeouts, slow grace",
            served_after.as_secs_f64()
        ),
    );
    app.operator.stop().await;
    assert_eq!(total.lost, 0, "acknowledged increments lost: {:?}", total.errors);
    // At most one request per client can have been on the dead node.
    assert!(total.failures <= 20, "{} requests failed: {:?}", total.failures, total.errors);
    assert!(total.skipped <= total.failures, "increments applied but not acknowledged beyond the failed ones");
    assert!(
        learnt.iter().any(|l| l.starts_with("member slow")),
        "the balancers did not log the victim slow (timeouts): {learnt:?}"
    );
}
