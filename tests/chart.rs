//! The Helm chart and the plain manifests generated from it, against the
//! real API server. This binary installs and upgrades the cluster-wide
//! ClusterApp CRD, so it runs on a control plane of its own
//! (`support::private_cluster`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use serde_json::Value;
use support::{TestNamespace, helm, kubectl, run_ok, wait_until};

const CRD_NAME: &str = "clusterapps.clusterapp.io";

fn chart_dir() -> PathBuf {
    support::repo_root().join("charts/clusterapp")
}

/// The documents of a multi-document YAML text, as JSON values.
fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn render(release: &str, namespace: &str, extra: &[&str]) -> Vec<Value> {
    let out = run_ok(helm().arg("template").arg(release).arg(chart_dir()).args(["--namespace", namespace]).args(extra));
    yaml_documents(&out)
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn chart_lints_strictly() {
    let out = helm().args(["lint", "--strict"]).arg(chart_dir()).output().expect("helm lint");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "helm lint --strict failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1 chart(s) linted, 0 chart(s) failed"), "{text}");
}

#[test]
fn values_outside_the_schema_are_rejected_with_a_message() {
    for (set, expected) in [
        ("operator.replicas=0", "replicas"),
        ("metrics.port=70000", "port"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.noSuchValue=1", "noSuchValue"),
    ] {
        let out =
            helm().arg("template").arg("x").arg(chart_dir()).args(["--set", set]).output().expect("helm template");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(err.contains("values don't meet the specifications of the schema"), "--set {set}: {err}");
        assert!(err.contains(expected), "--set {set}: message does not name {expected}: {err}");
    }
}

#[test]
fn operator_deployment_is_secure_by_default() {
    let docs = render("capp", "clusterapp-system", &[]);
    let deploy = find(&docs, "Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2, "two replicas with leader election");
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(c["resources"]["requests"]["memory"].is_string() && c["resources"]["limits"]["memory"].is_string());
    assert_eq!(c["image"], "ghcr.io/clusterapp/clusterapp:0.1.0");
    let env: Vec<&str> = c["env"].as_array().expect("env").iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(
        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
        "leader election needs the pod's name and namespace: {env:?}"
    );
    assert_eq!(c["args"][0], "operator");
    // the CRD template carries the keep policy
    let crd = find(&docs, "CustomResourceDefinition");
    assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    assert_eq!(crd["metadata"]["name"], CRD_NAME);
    // no ServiceMonitor unless asked for; with it, one that scrapes the admin port
    assert!(!docs.iter().any(|d| d["kind"] == "ServiceMonitor"));
    let with_monitor = render("capp", "clusterapp-system", &["--set", "metrics.serviceMonitor.enabled=true"]);
    assert_eq!(find(&with_monitor, "ServiceMonitor")["spec"]["endpoints"][0]["port"], "admin");
    // a NetworkPolicy lets in only the metrics port, to the operator Pods
    let policy = find(&docs, "NetworkPolicy");
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "operator");
    assert_eq!(policy["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    assert_eq!(policy["spec"]["ingress"], serde_json::json!([{"ports": [{"port": 9090, "protocol": "TCP"}]}]));
    let without = render("capp", "clusterapp-system", &["--set", "networkPolicy.enabled=false"]);
    assert!(!without.iter().any(|d| d["kind"] == "NetworkPolicy"));
}

#[test]
fn chart_rbac_is_the_rbac_the_operator_tests_run_under() {
    let docs = render("capp", "clusterapp-system", &[]);
    let from_chart: Vec<PolicyRule> =
        serde_json::from_value(find(&docs, "ClusterRole")["rules"].clone()).expect("rules");
    let reference = std::fs::read_to_string(support::repo_root().join("deploy/operator-rbac.yaml"))
        .expect("deploy/operator-rbac.yaml");
    let reference = yaml_documents(&reference);
    let from_tests: Vec<PolicyRule> =
        serde_json::from_value(find(&reference, "ClusterRole")["rules"].clone()).expect("rules");
    assert_eq!(from_chart, from_tests);
    let lease_chart: Vec<PolicyRule> = serde_json::from_value(find(&docs, "Role")["rules"].clone()).expect("rules");
    let lease_tests: Vec<PolicyRule> =
        serde_json::from_value(find(&reference, "Role")["rules"].clone()).expect("rules");
    assert_eq!(lease_chart, lease_tests);
}

#[test]
fn deploy_manifests_and_the_charts_crd_are_in_step_with_the_sources() {
    let out = Command::new("bash")
        .arg(support::repo_root().join("tests/bed/gen-deploy.sh"))
        .arg("--check")
        .output()
        .expect("gen-deploy.sh");
    assert!(
        out.status.success(),
        "deploy/ is stale (run tests/bed/gen-deploy.sh):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kubectl_apply_stdin(args: &[&str], input: &str) -> std::process::Output {
    let mut child = kubectl()
        .arg("apply")
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl apply");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write manifests");
    child.wait_with_output().expect("kubectl apply")
}

#[tokio::test]
async fn rendered_chart_and_deploy_manifests_pass_a_server_side_dry_run() {
    support::private_cluster();
    let ns = TestNamespace::new("chart-dry").await;
    let rendered = run_ok(helm().arg("template").arg("dry").arg(chart_dir()).args(["--namespace", &ns.name]));
    // Server-side apply: create-or-update in one request, so the CRD that
    // the lifecycle test installs at the same time is no race.
    let out = kubectl_apply_stdin(&["--dry-run=server", "--server-side", "--force-conflicts"], &rendered);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "server dry run failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for kind in [
        "deployment.apps/dry-clusterapp",
        "clusterrole.rbac.authorization.k8s.io/dry-clusterapp",
        "customresourcedefinition",
    ] {
        assert!(stdout.contains(kind) && stdout.contains("(server dry run)"), "{kind} missing in:\n{stdout}");
    }
    // deploy/clusterapp.yaml, the Namespace first so its objects have a home
    let manifests =
        std::fs::read_to_string(support::repo_root().join("deploy/clusterapp.yaml")).expect("deploy/clusterapp.yaml");
    // (the chart-lifecycle test may own the CRD at the same time: force)
    let out = kubectl_apply_stdin(&["--dry-run=server", "--server-side", "--force-conflicts"], &manifests);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A dry run does not create the Namespace, so its objects may only fail
    // for that reason.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.contains("namespaces \"clusterapp-system\" not found"), "deploy/clusterapp.yaml rejected: {line}");
    }
}

/// A copy of the chart whose CRD has one more field, like a new release's.
fn chart_with_a_new_crd_field(dir: &Path) -> PathBuf {
    let copy = dir.join("clusterapp");
    run_ok(Command::new("cp").arg("-r").arg(chart_dir()).arg(&copy));
    let crd_file = copy.join("files/clusterapp.yaml");
    let mut crd: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&crd_file).expect("crd")).expect("crd yaml");
    let props = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    props["upgradeProbe"] = serde_json::json!({"type": "string", "description": "Added by the chart upgrade test."});
    std::fs::write(&crd_file, serde_yaml_ng::to_string(&crd).expect("yaml")).expect("write crd");
    copy
}

async fn crd_has_upgrade_probe(crds: &Api<CustomResourceDefinition>) -> bool {
    let Some(crd) = crds.get_opt(CRD_NAME).await.expect("get crd") else { return false };
    let json = serde_json::to_value(&crd).expect("crd json");
    !json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["upgradeProbe"]
        .is_null()
}

#[tokio::test]
async fn helm_upgrade_updates_the_crd_and_uninstall_keeps_only_the_crd() {
    support::private_cluster();
    let ns = TestNamespace::new("chart-life").await;
    let release = "life";
    let full = "life-clusterapp";
    run_ok(helm().args(["install", release]).arg(chart_dir()).args(["--namespace", &ns.name]));

    let crds: Api<CustomResourceDefinition> = Api::all(ns.client.clone());
    let crd = crds.get(CRD_NAME).await.expect("CRD installed by the chart");
    let annotations = crd.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("helm.sh/resource-policy").map(String::as_str), Some("keep"));
    assert!(!crd_has_upgrade_probe(&crds).await);
    // The commented sample in deploy/examples is a valid ClusterApp.
    run_ok(
        kubectl()
            .args(["apply", "--dry-run=server", "-n", &ns.name, "-f"])
            .arg(support::repo_root().join("deploy/examples/clusterapp.yaml")),
    );
    let deployments: Api<Deployment> = ns.api();
    assert_eq!(deployments.get(full).await.expect("operator deployment").spec.replicas, Some(2));

    let tmp = support::repo_root().join(format!("target/test-scripts/chart-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("tmp");
    let upgraded = chart_with_a_new_crd_field(&tmp);
    run_ok(helm().args(["upgrade", release]).arg(&upgraded).args(["--namespace", &ns.name]));
    wait_until(Duration::from_secs(20), "the CRD to carry the new field", || {
        let crds = crds.clone();
        async move { crd_has_upgrade_probe(&crds).await }
    })
    .await;

    run_ok(helm().args(["uninstall", release, "--namespace", &ns.name, "--wait"]));
    assert!(crds.get_opt(CRD_NAME).await.expect("get").is_some(), "the CRD must be kept");
    let client = ns.client.clone();
    assert!(deployments.get_opt(full).await.expect("get").is_none());
    assert!(ns.api::<ServiceAccount>().get_opt(full).await.expect("get").is_none());
    assert!(ns.api::<Service>().get_opt(&format!("{full}-metrics")).await.expect("get").is_none());
    assert!(ns.api::<Role>().get_opt(&format!("{full}-leader-election")).await.expect("get").is_none());
    assert!(ns.api::<RoleBinding>().get_opt(&format!("{full}-leader-election")).await.expect("get").is_none());
    assert!(Api::<ClusterRole>::all(client.clone()).get_opt(full).await.expect("get").is_none());
    assert!(Api::<ClusterRoleBinding>::all(client).get_opt(full).await.expect("get").is_none());
}
