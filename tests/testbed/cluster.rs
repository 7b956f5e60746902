//! The local control plane is a real Kubernetes: these tests check the parts
//! of it the rest of the suite relies on (StatefulSet controller, garbage
//! collector, RBAC, TokenRequest, helm), and the test bed's own scripts.

use std::process::Command;
use std::time::Duration;

use crate::support;

use crate::support::{TestNamespace, kubectl, run_ok, wait_until};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object json")
}

/// What a kubelet would write for a started, ready Pod.
async fn mark_pod_running_and_ready(pods: &Api<Pod>, name: &str) {
    let now = "2026-01-01T00:00:00Z";
    let status = json!({"status": {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now}
        ]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("patching pod status");
}

fn pod_names(list: &[Pod]) -> Vec<String> {
    let mut names: Vec<String> = list.iter().filter_map(|p| p.metadata.name.clone()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn statefulset_controller_creates_ordered_pods_and_scales_down_from_the_top() {
    let ns = TestNamespace::new("sts").await;
    let sets: Api<StatefulSet> = ns.api();
    let pods: Api<Pod> = ns.api();
    let sts: StatefulSet = from_json(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "serviceName": "web",
            "podManagementPolicy": "OrderedReady",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "example.invalid/none:1"}]}
            }
        }
    }));
    sets.create(&PostParams::default(), &sts).await.expect("creating statefulset");

    // OrderedReady: the controller creates web-N+1 only once web-N is
    // Running and Ready, so act as the kubelet for each Pod as it appears.
    for i in 0..3 {
        let name = format!("web-{i}");
        wait_until(Duration::from_secs(30), &format!("pod {name}"), || {
            let pods = pods.clone();
            let name = name.clone();
            async move { pods.get_opt(&name).await.ok().flatten().is_some() }
        })
        .await;
        let next_exists = pods.get_opt(&format!("web-{}", i + 1)).await.expect("get").is_some();
        assert!(!next_exists, "web-{} created before web-{i} was ready", i + 1);
        mark_pod_running_and_ready(&pods, &name).await;
    }
    let listed = pods.list(&Default::default()).await.expect("list pods").items;
    assert_eq!(pod_names(&listed), vec!["web-0", "web-1", "web-2"]);
    let web0 = &listed[0];
    let owner = &web0.metadata.owner_references.as_ref().expect("owner refs")[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("StatefulSet", "web"));

    // Watch deletions while scaling to 1.
    let deletions = {
        let pods = pods.clone();
        tokio::spawn(async move {
            let mut deleted = Vec::new();
            let stream = watcher::watcher(pods, watcher::Config::default()).boxed();
            let mut stream = stream;
            while let Some(ev) = stream.try_next().await.expect("watch pods") {
                if let Event::Delete(p) = ev {
                    deleted.push(p.metadata.name.unwrap_or_default());
                    if deleted.len() == 2 {
                        break;
                    }
                }
            }
            deleted
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sets.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 1}})))
        .await
        .expect("scaling to 1");
    let deleted = tokio::time::timeout(Duration::from_secs(60), deletions)
        .await
        .expect("pods deleted within 60 s")
        .expect("watch task");
    assert_eq!(deleted, vec!["web-2", "web-1"], "scale-down must remove the highest ordinal first");
    let left = pods.list(&Default::default()).await.expect("list pods").items;
    assert_eq!(pod_names(&left), vec!["web-0"]);
}

#[tokio::test]
async fn deleting_an_owner_lets_the_garbage_collector_delete_its_dependents() {
    let ns = TestNamespace::new("gc").await;
    let maps: Api<ConfigMap> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let owner = maps
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "owner"}, "data": {"a": "b"}})))
        .await
        .expect("owner");
    let uid = owner.metadata.uid.clone().expect("uid");
    let dependent: Secret = from_json(json!({
        "metadata": {"name": "dependent", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
        ]},
        "stringData": {"k": "v"}
    }));
    secrets.create(&PostParams::default(), &dependent).await.expect("dependent");
    // A second Secret without an owner must survive.
    secrets
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "bystander"}})))
        .await
        .expect("bystander");

    maps.delete("owner", &DeleteParams::background()).await.expect("delete owner");
    wait_until(Duration::from_secs(30), "garbage collection of the dependent", || {
        let secrets = secrets.clone();
        async move { secrets.get_opt("dependent").await.expect("get").is_none() }
    })
    .await;
    assert!(secrets.get_opt("bystander").await.expect("get").is_some(), "GC deleted an object it does not own");
}

fn can_i(ns: &str, sa: &str) -> String {
    let out = kubectl()
        .args(["auth", "can-i", "list", "pods", "-n", ns, &format!("--as=system:serviceaccount:{ns}:{sa}")])
        .output()
        .expect("kubectl auth can-i");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// GET the namespace's pods with a bearer token, as a Pod would; returns the
/// HTTP status code.
fn list_pods_with_token(ns: &str, token: &str) -> u16 {
    let kc = std::fs::read_to_string(&support::cluster().kubeconfig).expect("kubeconfig");
    let server = kc.lines().find_map(|l| l.trim().strip_prefix("server: ")).expect("server in kubeconfig").to_string();
    let ca_b64 = kc
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .expect("CA in kubeconfig")
        .to_string();
    let dir = std::env::temp_dir().join(format!("clusterapp-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let ca = dir.join("ca.crt");
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(ca_b64.as_bytes())?;
            c.wait_with_output()
        })
        .expect("base64 -d");
    std::fs::write(&ca, decoded.stdout).expect("write ca");
    // The token goes to curl through a header file, not the command line.
    let header = dir.join("auth-header");
    std::fs::write(&header, format!("Authorization: Bearer {token}\n")).expect("header file");
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .arg("-H")
        .arg(format!("@{}", header.display()))
        .arg(format!("{server}/api/v1/namespaces/{ns}/pods"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("http status code")
}

#[tokio::test]
async fn rbac_is_enforced_for_service_account_tokens() {
    let ns = TestNamespace::new("rbac").await;
    let sas: Api<ServiceAccount> = ns.api();
    sas.create(&PostParams::default(), &from_json(json!({"metadata": {"name": "member"}})))
        .await
        .expect("service account");

    assert_eq!(can_i(&ns.name, "member"), "no");
    let request: TokenRequest = from_json(json!({"spec": {"audiences": [], "expirationSeconds": 600}}));
    let token = sas
        .create_token_request("member", &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("token status")
        .token
        .expect("token");
    assert_eq!(list_pods_with_token(&ns.name, &token), 403, "a ServiceAccount without a Role must be forbidden");

    let roles: Api<Role> = ns.api();
    let bindings: Api<RoleBinding> = ns.api();
    roles
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "pod-lister"}, "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
            ]})),
        )
        .await
        .expect("role");
    bindings
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "member-lists-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
                "subjects": [{"kind": "ServiceAccount", "name": "member", "namespace": ns.name}]
            })),
        )
        .await
        .expect("role binding");

    // RBAC caches are updated from watches: allow a moment.
    wait_until(Duration::from_secs(10), "can-i to say yes", || {
        let ns = ns.name.clone();
        async move { can_i(&ns, "member") == "yes" }
    })
    .await;
    assert_eq!(list_pods_with_token(&ns.name, &token), 200);
    // The grant is for this namespace only.
    assert_eq!(list_pods_with_token("default", &token), 403);
}

#[test]
fn helm_runs_from_the_cache() {
    let paths = support::bed_paths();
    let out = run_ok(Command::new(paths.helm_bin.join("helm")).args(["version", "--short"]));
    assert!(out.starts_with(&paths.helm_version), "helm version {out:?} is not the pinned {}", paths.helm_version);
    assert!(
        paths.helm_bin.starts_with(std::env::var("HOME").expect("HOME"))
            || std::env::var_os("CLUSTERAPP_CACHE").is_some()
    );
}

#[test]
fn kubectl_matches_the_control_plane_version() {
    let paths = support::bed_paths();
    let out = run_ok(kubectl().args(["version", "-o", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("kubectl version json");
    assert_eq!(v["clientVersion"]["gitVersion"], paths.kubernetes_version.as_str());
    assert_eq!(v["serverVersion"]["gitVersion"], paths.kubernetes_version.as_str());
}
