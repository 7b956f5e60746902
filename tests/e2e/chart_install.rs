//! `helm install` as a user runs it: the chart's operator runs as Pods (our
//! image, pulled from the local registry, on the real nodes) under the
//! chart's ServiceAccount, and reconciles a ClusterApp of real Tomcat nodes
//! to Ready.

use std::time::Duration;

use crate::support;

use crate::support::nodes::{PortForward, http_status, nodes, root_mount_options, uids};
use crate::support::{TestNamespace, helm, kubectl, run_ok, wait_until};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn helm_install_runs_the_operator_as_pods_that_reconcile_a_clusterapp_to_ready() {
    let _serial = crate::common::serial().await;
    nodes();
    let system = TestNamespace::new("chart-op").await;
    adopt_crd_into_the_release("op", &system.name);
    let apps_ns = TestNamespace::new("chart-app").await;
    run_ok(helm().args(["install", "op"]).arg(support::repo_root().join("charts/clusterapp")).args([
        "--namespace",
        &system.name,
        "--set",
        "operator.logFormat=pretty",
        "--wait",
        "--timeout",
        "4m",
    ]));

    // Both operator replicas run as Pods under the chart's ServiceAccount.
    let pods: Api<Pod> = system.api();
    let operator_pods =
        pods.list(&ListParams::default().labels("app.kubernetes.io/component=operator")).await.expect("list");
    assert_eq!(operator_pods.items.len(), 2);
    for p in &operator_pods.items {
        assert!(pod_ready(p), "operator pod {:?} not ready", p.metadata.name);
        assert_eq!(p.spec.as_ref().and_then(|s| s.service_account_name.as_deref()), Some("op-clusterapp"));
    }
    // What the runtime enforces for the operator, seen from the host: not
    // root, read-only root file system; and kubectl logs / exec /
    // port-forward work against it (its image has no shell: exec runs the
    // binary itself).
    let operator = operator_pods.items[0].metadata.name.clone().expect("operator pod name");
    let pid = nodes().container_pid(&system.name, &operator, "operator").expect("a running operator container");
    let ids = uids(pid);
    assert!(ids.iter().all(|&id| id != 0), "the operator runs as root: uids {ids:?}");
    let options = root_mount_options(pid);
    assert!(options.split(',').any(|o| o == "ro"), "the operator's / is mounted {options}");
    let logs = run_ok(kubectl().args(["logs", "-n", &system.name, &operator]));
    assert!(!logs.trim().is_empty(), "kubectl logs of the operator is empty");
    let version =
        run_ok(kubectl().args(["exec", "-n", &system.name, &operator, "--", "/usr/local/bin/clusterapp", "--version"]));
    assert!(version.starts_with("clusterapp "), "{version}");
    let admin = PortForward::open(&system.name, &operator, 9090);
    assert_eq!(http_status(admin.local_port, "/healthz"), "200", "the operator's admin port through port-forward");
    drop(admin);

    // A small ClusterApp of the sample app: 1 node, 1 balancer.
    let manifest = std::fs::read_to_string(support::repo_root().join("deploy/examples/clusterapp.yaml"))
        .expect("sample")
        .replace("  replicas: 3\n", "  replicas: 1\n")
        .replace("    replicas: 2\n", "    replicas: 1\n");
    let file = support::repo_root().join(format!("target/test-scripts/chart-install-{}.yaml", std::process::id()));
    std::fs::create_dir_all(file.parent().expect("dir")).expect("dir");
    std::fs::write(&file, manifest).expect("write sample");
    run_ok(kubectl().args(["apply", "-n", &apps_ns.name, "-f"]).arg(&file));
    let started = std::time::Instant::now();
    let ns = apps_ns.name.clone();
    wait_until(Duration::from_secs(240), "ClusterApp counter Ready through the Helm-installed operator", || {
        let ns = ns.clone();
        async move {
            let out = kubectl()
                .args([
                    "get",
                    "clusterapp",
                    "counter",
                    "-n",
                    &ns,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .output()
                .expect("kubectl");
            String::from_utf8_lossy(&out.stdout).trim() == "True"
        }
    })
    .await;
    let columns = run_ok(kubectl().args(["get", "clusterapp", "counter", "-n", &apps_ns.name]));
    assert!(columns.contains("1/1") && columns.contains("counter-0"), "{columns}");
    println!("chart install: ClusterApp Ready {:.1} s after apply", started.elapsed().as_secs_f64());

    // The writes came from the chart's ServiceAccount, not from the test.
    let managers = run_ok(kubectl().args([
        "get",
        "statefulset",
        "counter",
        "-n",
        &apps_ns.name,
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ]));
    assert!(managers.contains("clusterapp"), "StatefulSet not applied by the operator: {managers}");

    run_ok(kubectl().args(["delete", "clusterapp", "counter", "-n", &apps_ns.name, "--wait=true", "--timeout=120s"]));
    run_ok(helm().args(["uninstall", "op", "--namespace", &system.name, "--wait"]));
}

/// The nodes are shared by the whole suite, and the other test binaries
/// apply the ClusterApp CRD themselves. Helm refuses to install over an
/// object it does not own, so the CRD gets the release's ownership marks
/// first — what a user does who applied the CRD with kubectl before
/// installing the chart. Helm then adopts and updates it.
fn adopt_crd_into_the_release(release: &str, namespace: &str) {
    let exists =
        kubectl().args(["get", "crd", "clusterapps.clusterapp.io", "--ignore-not-found", "-o", "name"]).output();
    if !exists.is_ok_and(|o| !o.stdout.is_empty()) {
        return;
    }
    run_ok(kubectl().args([
        "label",
        "--overwrite",
        "crd",
        "clusterapps.clusterapp.io",
        "app.kubernetes.io/managed-by=Helm",
    ]));
    run_ok(kubectl().args([
        "annotate",
        "--overwrite",
        "crd",
        "clusterapps.clusterapp.io",
        &format!("meta.helm.sh/release-name={release}"),
        &format!("meta.helm.sh/release-namespace={namespace}"),
    ]));
}
