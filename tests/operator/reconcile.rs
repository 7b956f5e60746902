//! The operator against the real API server and controller manager, running
//! in-process under its own ServiceAccount (deploy/operator-rbac.yaml).

use crate::common;
use crate::support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::{TestNamespace, wait_until};
use clusterapp::crd::ClusterApp;

const WAIT: Duration = Duration::from_secs(30);

/// Every child of app `name`: (kind/name, metadata), or None while one is missing.
async fn children(ns: &TestNamespace, name: &str) -> Option<BTreeMap<String, ObjectMeta>> {
    macro_rules! get {
        ($map:ident, $kind:ty, $object:expr) => {{
            let object_name: String = $object;
            let object = ns.api::<$kind>().get_opt(&object_name).await.ok()??;
            $map.insert(format!("{}/{}", stringify!($kind), object_name), object.metadata);
        }};
    }
    let mut map = BTreeMap::new();
    get!(map, Secret, format!("{name}-secrets"));
    get!(map, ConfigMap, format!("{name}-tomcat"));
    get!(map, Service, format!("{name}-peers"));
    get!(map, Service, format!("{name}-nodes"));
    get!(map, Service, name.to_string());
    get!(map, ServiceAccount, format!("{name}-node"));
    get!(map, Role, format!("{name}-node"));
    get!(map, RoleBinding, format!("{name}-node"));
    get!(map, StatefulSet, name.to_string());
    get!(map, ServiceAccount, format!("{name}-balancer"));
    get!(map, Role, format!("{name}-balancer"));
    get!(map, RoleBinding, format!("{name}-balancer"));
    get!(map, Deployment, format!("{name}-balancer"));
    get!(map, PodDisruptionBudget, format!("{name}-nodes"));
    get!(map, NetworkPolicy, format!("{name}-nodes"));
    Some(map)
}

fn resource_versions(children: &BTreeMap<String, ObjectMeta>) -> BTreeMap<String, String> {
    children.iter().map(|(k, m)| (k.clone(), m.resource_version.clone().unwrap_or_default())).collect()
}

async fn create_app(ns: &TestNamespace, name: &str, spec: serde_json::Value) -> ClusterApp {
    let app: ClusterApp = serde_json::from_value(json!({
        "apiVersion": "clusterapp.io/v1alpha1", "kind": "ClusterApp",
        "metadata": {"name": name}, "spec": spec
    }))
    .expect("app");
    ns.api::<ClusterApp>().create(&PostParams::default(), &app).await.expect("creating the ClusterApp")
}

async fn wait_for_children(ns: &TestNamespace, name: &str) -> BTreeMap<String, ObjectMeta> {
    wait_until(WAIT, "every child to exist", || async { children(ns, name).await.is_some() }).await;
    children(ns, name).await.expect("children")
}

/// Waits until the app's status describes its current generation.
async fn wait_for_status(
    ns: &TestNamespace,
    name: &str,
    what: &str,
    check: impl Fn(&ClusterApp) -> bool,
) -> ClusterApp {
    let apps = ns.api::<ClusterApp>();
    let mut last = None;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if let Ok(app) = apps.get(name).await {
            let current = app.status.as_ref().and_then(|s| s.observed_generation) == app.metadata.generation;
            if current && check(&app) {
                return app;
            }
            last = Some(app);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}; last status: {:#?}", last.and_then(|a| a.status));
}

fn condition(app: &ClusterApp, type_: &str) -> Option<(String, String, String)> {
    app.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Plays the kubelet: marks pod `name` Running and Ready with `ip`.
async fn make_pod_ready(ns: &TestNamespace, name: &str, ip: &str) {
    let pods = ns.api::<Pod>();
    wait_until(WAIT, &format!("pod {name} to be created"), || async {
        pods.get_opt(name).await.ok().flatten().is_some()
    })
    .await;
    let now = "2025-01-01T00:00:00Z";
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now}
        ]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("setting pod status");
}

/// Plays the kubelet for the balancer: marks its `count` pods (made by the
/// ReplicaSet controller) Running and Ready.
async fn make_balancer_pods_ready(ns: &TestNamespace, app: &str, count: usize) {
    let pods = ns.api::<Pod>();
    let selector = format!("app.kubernetes.io/instance={app},app.kubernetes.io/component=balancer");
    let list = ListParams::default().labels(&selector);
    wait_until(WAIT, &format!("{count} balancer pods"), || async {
        pods.list(&list).await.map(|l| l.items.len() >= count).unwrap_or(false)
    })
    .await;
    let names: Vec<String> =
        pods.list(&list).await.expect("balancer pods").items.into_iter().filter_map(|p| p.metadata.name).collect();
    for (i, name) in names.iter().enumerate() {
        make_pod_ready(ns, name, &format!("10.0.1.{}", i + 10)).await;
    }
}

/// Events about ClusterApp `name` (not its StatefulSet, which has the same
/// name): (reason, note); only the Warning ones when `warnings` is set.
async fn app_events(ns: &TestNamespace, name: &str, warnings: bool) -> Vec<(String, String)> {
    let events: Api<Event> = ns.api();
    events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            let regarding = e.regarding.as_ref();
            regarding.and_then(|r| r.name.as_deref()) == Some(name)
                && regarding.and_then(|r| r.kind.as_deref()) == Some("ClusterApp")
                && (!warnings || e.type_.as_deref() == Some("Warning"))
        })
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

async fn warnings_of(ns: &TestNamespace, name: &str) -> Vec<(String, String)> {
    app_events(ns, name, true).await
}

async fn events_of(ns: &TestNamespace, name: &str) -> Vec<(String, String)> {
    app_events(ns, name, false).await
}

#[tokio::test]
async fn apply_creates_every_child_owned_and_labelled() {
    let ns = common::OperatorNamespace::new("capp-apply").await;
    let _operator = common::operator_in(&ns).await;
    let app = create_app(&ns, "shop", json!({"replicas": 3, "image": "registry.example/shop:1.4"})).await;
    let uid = app.metadata.uid.clone().expect("uid");
    let children = wait_for_children(&ns, "shop").await;
    assert_eq!(children.len(), 15);
    for (key, meta) in &children {
        let owner =
            meta.owner_references.as_ref().and_then(|o| o.first()).unwrap_or_else(|| panic!("{key} has no owner"));
        assert_eq!(
            (owner.uid.as_str(), owner.kind.as_str(), owner.controller),
            (uid.as_str(), "ClusterApp", Some(true)),
            "{key}"
        );
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("app.kubernetes.io/instance").map(String::as_str), Some("shop"), "{key}");
        assert_eq!(
            labels.get("app.kubernetes.io/managed-by").map(String::as_str),
            Some("clusterapp-operator"),
            "{key}"
        );
    }
    // Generated keys: 64 hex characters each, and never in the status.
    let secret = ns.api::<Secret>().get("shop-secrets").await.expect("secret");
    let data = secret.data.expect("data");
    let key = String::from_utf8(data["tribes-encryption-key"].0.clone()).expect("utf8");
    assert!(key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()), "tribes key is 64 hex chars");
    let ajp = String::from_utf8(data["ajp-secret"].0.clone()).expect("utf8");
    let app = wait_for_status(&ns, "shop", "a status", |a| a.status.is_some()).await;
    let status_text = serde_json::to_string(&app.status).expect("json");
    assert!(!status_text.contains(&key) && !status_text.contains(&ajp));
    let status = app.status.expect("status");
    assert_eq!(
        status.selector,
        "app.kubernetes.io/component=session-node,app.kubernetes.io/instance=shop,app.kubernetes.io/name=clusterapp"
    );
    assert_eq!(condition(&app_get(&ns, "shop").await, "Degraded").map(|c| c.0), Some("False".to_string()));
    wait_until(WAIT, "a Created event", || async {
        events_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "Created")
    })
    .await;
    for (_, note) in events_of(&ns, "shop").await {
        assert!(!note.contains(&key) && !note.contains(&ajp), "secret in an event");
    }
    // The keys are kept across reconciles: touch the app, compare.
    ns.api::<ClusterApp>()
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})))
        .await
        .expect("touch");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = ns.api::<Secret>().get("shop-secrets").await.expect("secret").data.expect("data");
    assert_eq!(again["tribes-encryption-key"].0, key.as_bytes());
    assert_eq!(again["ajp-secret"].0, ajp.as_bytes());
}

async fn app_get(ns: &TestNamespace, name: &str) -> ClusterApp {
    ns.api::<ClusterApp>().get(name).await.expect("app")
}

#[tokio::test]
async fn scale_subresource_drives_replicas_and_members_follow_pods() {
    let ns = common::OperatorNamespace::new("capp-scale").await;
    let _operator = common::operator_in(&ns).await;
    create_app(&ns, "shop", json!({"replicas": 1, "image": "registry.example/shop:1.4"})).await;
    wait_for_children(&ns, "shop").await;
    make_pod_ready(&ns, "shop-0", "10.0.0.10").await;
    wait_for_status(&ns, "shop", "1/1 ready", |a| a.status.as_ref().is_some_and(|s| s.ready == "1/1")).await;

    support::run_ok(support::kubectl().args(["-n", &ns.name, "scale", "clusterapp/shop", "--replicas=3"]));
    let sts = ns.api::<StatefulSet>();
    wait_until(WAIT, "StatefulSet replicas 3", || async {
        sts.get("shop").await.ok().and_then(|s| s.spec.replicas) == Some(3)
    })
    .await;
    // OrderedReady: the controller manager creates shop-1 once shop-0 is ready.
    make_pod_ready(&ns, "shop-1", "10.0.0.11").await;
    make_pod_ready(&ns, "shop-2", "10.0.0.12").await;
    // Every node is ready, but no balancer pod is (there is no kubelet):
    // users cannot reach the nodes, so the app is not Ready.
    let app = wait_for_status(&ns, "shop", "3/3 ready", |a| a.status.as_ref().is_some_and(|s| s.ready == "3/3")).await;
    let (ready, reason, message) = condition(&app, "Ready").expect("Ready");
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "BalancerUnavailable"), "{message}");
    assert!(
        message.contains("shop-balancer has no available replica") && message.contains("0 of 2 available"),
        "{message}"
    );
    // The balancer's pods become ready: the Deployment's availableReplicas
    // follow (controller manager), and Ready follows them.
    make_balancer_pods_ready(&ns, "shop", 2).await;
    let app = wait_for_status(&ns, "shop", "Ready", |a| condition(a, "Ready").is_some_and(|c| c.0 == "True")).await;
    let status = app.status.clone().expect("status");
    assert_eq!((status.replicas, status.ready_replicas), (3, 3));
    assert_eq!(status.routes, "shop-0,shop-1,shop-2");
    let members: Vec<_> = status
        .members
        .iter()
        .map(|m| (m.pod.as_str(), m.route.as_str(), m.pod_ip.as_deref(), m.ready, m.draining))
        .collect();
    assert_eq!(
        members,
        [
            ("shop-0", "shop-0", Some("10.0.0.10"), true, false),
            ("shop-1", "shop-1", Some("10.0.0.11"), true, false),
            ("shop-2", "shop-2", Some("10.0.0.12"), true, false)
        ]
    );
    assert_eq!(condition(&app, "Ready").map(|c| c.0), Some("True".to_string()));
    // kubectl shows the printer columns.
    let table = support::run_ok(support::kubectl().args(["-n", &ns.name, "get", "capp", "shop"]));
    assert!(
        table.contains("READY")
            && table.contains("3/3")
            && table.contains("shop-0,shop-1,shop-2")
            && table.contains("all"),
        "{table}"
    );
    // The scale subresource reads status.replicas and the selector.
    let scale = support::run_ok(support::kubectl().args([
        "-n",
        &ns.name,
        "get",
        "--subresource=scale",
        "clusterapp/shop",
        "-o",
        "json",
    ]));
    let scale: serde_json::Value = serde_json::from_str(&scale).expect("scale json");
    assert_eq!(scale["status"]["replicas"], 3);
    assert!(scale["status"]["selector"].as_str().unwrap_or_default().contains("app.kubernetes.io/instance=shop"));
    wait_until(WAIT, "a Scaled event", || async {
        events_of(&ns, "shop").await.iter().any(|(reason, note)| reason == "Scaled" && note.contains("from 1 to 3"))
    })
    .await;

    // Scale down: the leaving pod shows as draining while it terminates.
    support::run_ok(support::kubectl().args(["-n", &ns.name, "scale", "clusterapp/shop", "--replicas=2"]));
    wait_until(WAIT, "StatefulSet replicas 2", || async {
        sts.get("shop").await.ok().and_then(|s| s.spec.replicas) == Some(2)
    })
    .await;
    let app = wait_for_status(&ns, "shop", "shop-2 draining or gone", |a| {
        a.status.as_ref().is_some_and(|s| s.routes == "shop-0,shop-1" && s.replicas == 2)
    })
    .await;
    assert!(app.status.expect("status").members.iter().all(|m| m.pod != "shop-2" || m.draining));
}

#[tokio::test]
async fn image_change_rolls_only_the_stateful_set_and_steady_state_is_quiet() {
    let ns = common::OperatorNamespace::new("capp-steady").await;
    let operator = common::operator_in(&ns).await;
    create_app(&ns, "shop", json!({"replicas": 2, "image": "registry.example/shop:1.4"})).await;
    wait_for_children(&ns, "shop").await;
    wait_for_status(&ns, "shop", "a status", |a| a.status.is_some()).await;

    // Steady state: nothing changes, and the operator stops reconciling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = resource_versions(&children(&ns, "shop").await.expect("children"));
    let app_version = app_get(&ns, "shop").await.metadata.resource_version;
    let reconciles = operator.state.reconcile_count();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(resource_versions(&children(&ns, "shop").await.expect("children")), before, "children churned");
    assert_eq!(app_get(&ns, "shop").await.metadata.resource_version, app_version, "the ClusterApp churned");
    assert_eq!(operator.state.reconcile_count(), reconciles, "the operator kept reconciling a converged app");

    // A reconcile of a converged app (what the periodic requeue runs) sends
    // no request at all: every child is checked against the caches. Touch
    // the app (a label: no spec change) to make one happen now.
    let requests = operator.state.api_requests.get();
    let writes = operator.state.api_writes.get();
    ns.api::<ClusterApp>()
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"touched": "1"}}})))
        .await
        .expect("touch");
    wait_until(WAIT, "a reconcile of the touched app", || async { operator.state.reconcile_count() > reconciles })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(operator.state.api_writes.get(), writes, "a steady-state reconcile wrote");
    assert_eq!(operator.state.api_requests.get(), requests, "a steady-state reconcile sent requests");
    assert_eq!(resource_versions(&children(&ns, "shop").await.expect("children")), before, "children churned");

    // New image: only the StatefulSet changes (its template: a rolling update).
    ns.api::<ClusterApp>()
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {"image": "registry.example/shop:1.5"}})))
        .await
        .expect("patching the image");
    let sts = ns.api::<StatefulSet>();
    wait_until(WAIT, "the new image in the StatefulSet", || async {
        sts.get("shop").await.ok().is_some_and(|s| {
            s.spec
                .template
                .spec
                .as_ref()
                .is_some_and(|p| p.containers[0].image.as_deref() == Some("registry.example/shop:1.5"))
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resource_versions(&children(&ns, "shop").await.expect("children"));
    let changed: Vec<_> = before.keys().filter(|k| before[*k] != after[*k]).cloned().collect();
    assert_eq!(changed, ["StatefulSet/shop"], "only the StatefulSet may change");

    // A session setting: server.xml and the StatefulSet template change.
    let template_hash = |s: StatefulSet| {
        s.spec
            .template
            .metadata
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("clusterapp.io/server-xml-sha256").cloned())
    };
    let old_hash = template_hash(sts.get("shop").await.expect("sts"));
    assert!(old_hash.is_some());
    ns.api::<ClusterApp>()
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sessions": {"sendMode": "async"}}})))
        .await
        .expect("patching sendMode");
    let config_maps = ns.api::<ConfigMap>();
    wait_until(WAIT, "async send mode in server.xml", || async {
        config_maps
            .get("shop-tomcat")
            .await
            .ok()
            .and_then(|c| c.data)
            .is_some_and(|d| d["server.xml"].contains(r#"channelSendOptions="8""#))
    })
    .await;
    wait_until(WAIT, "a new server.xml hash on the pod template", || async {
        template_hash(sts.get("shop").await.expect("sts")) != old_hash
    })
    .await;
}

#[tokio::test]
async fn deleted_or_edited_children_are_restored() {
    let ns = common::OperatorNamespace::new("capp-restore").await;
    let _operator = common::operator_in(&ns).await;
    create_app(&ns, "shop", json!({"replicas": 2, "image": "registry.example/shop:1.4"})).await;
    let first = wait_for_children(&ns, "shop").await;
    let secret_before = ns.api::<Secret>().get("shop-secrets").await.expect("secret").data;

    // Deleted: the ConfigMap and the balancer Deployment come back.
    ns.api::<ConfigMap>().delete("shop-tomcat", &DeleteParams::default()).await.expect("delete cm");
    ns.api::<Deployment>().delete("shop-balancer", &DeleteParams::default()).await.expect("delete deployment");
    wait_until(WAIT, "the ConfigMap and Deployment to be recreated", || async {
        let cm = ns.api::<ConfigMap>().get_opt("shop-tomcat").await.ok().flatten();
        let dep = ns.api::<Deployment>().get_opt("shop-balancer").await.ok().flatten();
        cm.is_some_and(|c| c.metadata.uid != first["ConfigMap/shop-tomcat"].uid)
            && dep.is_some_and(|d| d.metadata.uid != first["Deployment/shop-balancer"].uid)
    })
    .await;

    // Edited: replicas and a Service port are put back.
    ns.api::<StatefulSet>()
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 7}})))
        .await
        .expect("edit sts");
    ns.api::<Service>()
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {"type": "NodePort"}})))
        .await
        .expect("edit service");
    wait_until(WAIT, "the edits to be undone", || async {
        let sts = ns.api::<StatefulSet>().get("shop").await.ok();
        let svc = ns.api::<Service>().get("shop").await.ok();
        sts.and_then(|s| s.spec.replicas) == Some(2)
            && svc.and_then(|s| s.spec).and_then(|s| s.type_).as_deref() == Some("ClusterIP")
    })
    .await;

    // The keys survive a deleted Secret? No: a deleted Secret is recreated
    // with new keys (there is nothing to keep); an edit that drops one key
    // regenerates only that key.
    ns.api::<Secret>()
        .patch(
            "shop-secrets",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([
                    {"op": "remove", "path": "/data/ajp-secret"}
                ]))
                .expect("json patch"),
            ),
        )
        .await
        .expect("drop a key");
    wait_until(WAIT, "the dropped key to be regenerated", || async {
        ns.api::<Secret>()
            .get("shop-secrets")
            .await
            .ok()
            .and_then(|s| s.data)
            .is_some_and(|d| d.contains_key("ajp-secret"))
    })
    .await;
    let secret_after = ns.api::<Secret>().get("shop-secrets").await.expect("secret").data.expect("data");
    let before = secret_before.expect("data");
    assert_eq!(secret_after["tribes-encryption-key"], before["tribes-encryption-key"], "the other key is kept");
}

#[tokio::test]
async fn deleting_the_app_garbage_collects_every_child() {
    let ns = common::OperatorNamespace::new("capp-gc").await;
    let _operator = common::operator_in(&ns).await;
    create_app(&ns, "shop", json!({"replicas": 1, "image": "registry.example/shop:1.4"})).await;
    wait_for_children(&ns, "shop").await;
    ns.api::<ClusterApp>().delete("shop", &DeleteParams::foreground()).await.expect("delete app");
    wait_until(Duration::from_secs(60), "every child to be garbage collected", || async {
        let left = [
            ns.api::<Secret>().get_opt("shop-secrets").await.ok().flatten().is_some(),
            ns.api::<ConfigMap>().get_opt("shop-tomcat").await.ok().flatten().is_some(),
            ns.api::<StatefulSet>().get_opt("shop").await.ok().flatten().is_some(),
            ns.api::<Deployment>().get_opt("shop-balancer").await.ok().flatten().is_some(),
            ns.api::<Service>().get_opt("shop").await.ok().flatten().is_some(),
            ns.api::<Service>().get_opt("shop-nodes").await.ok().flatten().is_some(),
            ns.api::<Role>().get_opt("shop-node").await.ok().flatten().is_some(),
            ns.api::<PodDisruptionBudget>().get_opt("shop-nodes").await.ok().flatten().is_some(),
            ns.api::<NetworkPolicy>().get_opt("shop-nodes").await.ok().flatten().is_some(),
        ];
        left.iter().all(|present| !present)
    })
    .await;
}

/// A terminating session node is labelled `clusterapp.io/leaving`, which the
/// nodes' Tomcat membership selector excludes: its peers stop replicating to
/// it before it stops (see `src/operator/reconcile/leaving.rs`). Under the
/// operator's own RBAC, so the chart grants what this needs.
#[tokio::test]
async fn a_terminating_session_node_is_labelled_leaving_and_left_out_of_the_membership_selector() {
    let ns = common::OperatorNamespace::new("capp-leaving").await;
    let _operator = common::operator_in(&ns).await;
    create_app(&ns, "shop", json!({"replicas": 1, "image": "registry.example/shop:1.4"})).await;
    wait_for_children(&ns, "shop").await;
    make_pod_ready(&ns, "shop-0", "10.0.0.10").await;
    let pods = ns.api::<Pod>();
    // The membership selector Tomcat lists its peers with leaves it out.
    let sts = ns.api::<StatefulSet>().get("shop").await.expect("StatefulSet");
    let template = sts.spec.template.spec.expect("pod spec");
    let selector = template.containers[0]
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "KUBERNETES_LABELS")
        .and_then(|e| e.value)
        .expect("KUBERNETES_LABELS");
    assert!(selector.ends_with(",clusterapp.io/leaving!=true"), "{selector}");
    let members = |pods: Vec<Pod>| pods.into_iter().filter_map(|p| p.metadata.name).collect::<Vec<_>>();
    let listed = pods.list(&ListParams::default().labels(&selector)).await.expect("list");
    assert_eq!(members(listed.items), ["shop-0"]);
    // A finalizer keeps the pod terminating (there is no kubelet to stop it).
    let hold = json!({"metadata": {"finalizers": ["clusterapp.io/test-hold"]}});
    pods.patch("shop-0", &PatchParams::default(), &Patch::Merge(&hold)).await.expect("finalizer");
    pods.delete("shop-0", &DeleteParams::default()).await.expect("delete");
    wait_until(WAIT, "shop-0 labelled leaving", || async {
        let pod = pods.get("shop-0").await.expect("pod");
        pod.metadata.labels.as_ref().and_then(|l| l.get("clusterapp.io/leaving")).map(String::as_str) == Some("true")
    })
    .await;
    let listed = pods.list(&ListParams::default().labels(&selector)).await.expect("list");
    assert_eq!(members(listed.items), Vec::<String>::new(), "a leaving node is no member");
    let release = json!({"metadata": {"finalizers": null}});
    pods.patch("shop-0", &PatchParams::default(), &Patch::Merge(&release)).await.expect("release");
}

#[tokio::test]
async fn missing_secret_ref_degrades_and_creating_it_heals() {
    let ns = common::OperatorNamespace::new("capp-secret").await;
    let _operator = common::operator_in(&ns).await;
    create_app(
        &ns,
        "shop",
        json!({"replicas": 1, "image": "registry.example/shop:1.4", "ajp": {"secretRef": {"name": "shop-ajp", "key": "secret"}}}),
    )
    .await;
    let app = wait_for_status(&ns, "shop", "Degraded SecretNotFound", |a| {
        condition(a, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "SecretNotFound")
    })
    .await;
    let (_, _, message) = condition(&app, "Degraded").expect("degraded");
    assert!(message.contains(&format!("Secret {}/shop-ajp", ns.name)) && message.contains("key secret"), "{message}");
    assert_eq!(condition(&app, "Ready").map(|c| c.0), Some("False".to_string()));
    wait_until(WAIT, "a SecretNotFound warning event", || async {
        events_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "SecretNotFound")
    })
    .await;

    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "shop-ajp"}, "stringData": {"secret": "user-chosen-ajp-secret"}
    }))
    .expect("secret");
    ns.api::<Secret>().create(&PostParams::default(), &secret).await.expect("creating the Secret");
    // Healed by the Secret's watch event, not by a retry: the retry of a
    // Degraded app is a minute away, the heal must come within seconds.
    wait_healed_within(&ns, Duration::from_secs(5)).await;
    let children = wait_for_children(&ns, "shop").await;
    assert_eq!(children.len(), 15);
    // The nodes (as a file of their bindings volume) and the balancer read
    // the user's Secret.
    let sts = ns.api::<StatefulSet>().get("shop").await.expect("sts");
    let pod = sts.spec.template.spec.expect("pod");
    let bindings = pod.volumes.iter().flatten().find(|v| v.name == "bindings").expect("bindings volume");
    let ajp = bindings
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.secret.as_ref())
        .find(|s| s.items.iter().flatten().any(|i| i.path == "ajp/secret"))
        .map(|s| (s.name.clone(), s.items.iter().flatten().map(|i| i.key.clone()).next().unwrap_or_default()))
        .expect("the AJP secret file's source");
    assert_eq!((ajp.0.as_str(), ajp.1.as_str()), ("shop-ajp", "secret"));
    let text = serde_json::to_string(&app_get(&ns, "shop").await).expect("json");
    assert!(!text.contains("user-chosen-ajp-secret"));
    wait_until(WAIT, "a Recovered event", || async {
        events_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "Recovered")
    })
    .await;
}

/// Waits for `shop` to be no longer Degraded and fails when that took longer
/// than `limit` (a heal driven by a watch event, not by the minute's retry).
async fn wait_healed_within(ns: &TestNamespace, limit: Duration) {
    let started = std::time::Instant::now();
    wait_for_status(ns, "shop", "Degraded False", |a| condition(a, "Degraded").is_some_and(|c| c.0 == "False")).await;
    assert!(started.elapsed() < limit, "healing took {:?}", started.elapsed());
}

/// A Degraded condition with reason TLSSecretMissing whose message contains
/// every one of `words`.
async fn wait_for_tls_problem(ns: &TestNamespace, words: &[&str]) -> String {
    let what = format!("Degraded TLSSecretMissing saying {words:?}");
    let app = wait_for_status(ns, "shop", &what, |a| {
        condition(a, "Degraded").is_some_and(|(status, reason, message)| {
            status == "True" && reason == "TLSSecretMissing" && words.iter().all(|w| message.contains(w))
        })
    })
    .await;
    assert_eq!(condition(&app, "Ready").map(|c| c.0), Some("False".to_string()));
    condition(&app, "Degraded").expect("degraded").2
}

#[tokio::test]
async fn missing_tls_secret_degrades_and_creating_it_turns_on_https() {
    let ns = common::OperatorNamespace::new("capp-tls").await;
    let operator = common::operator_in(&ns).await;
    create_app(
        &ns,
        "shop",
        json!({"replicas": 1, "image": "registry.example/shop:1.4",
               "balancer": {"tls": {"secretName": "shop-tls", "clientCASecretName": "shop-ca", "requireClientCertificate": true}}}),
    )
    .await;
    let secrets = ns.api::<Secret>();
    let tls_secret = |certificate: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "shop-tls"}, "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": certificate, "tls.key": "PRIVATE-KEY-NEVER-IN-STATUS"}
        }))
        .expect("secret")
    };

    // No Secret at all: the first one is named, with the keys it needs and how to make it.
    let named = format!("Secret {}/shop-tls", ns.name);
    let message =
        wait_for_tls_problem(&ns, &[&named, "spec.balancer.tls.secretName", "does not exist", "tls.crt and tls.key"])
            .await;
    assert!(message.contains("kubectl create secret tls shop-tls"), "{message}");
    // Nothing was applied while the balancer could not start.
    assert!(ns.api::<Deployment>().get_opt("shop-balancer").await.expect("get").is_none());
    wait_until(WAIT, "a TLSSecretMissing warning event", || async {
        warnings_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "TLSSecretMissing")
    })
    .await;

    // The TLS Secret: now the client CA Secret is what is missing.
    secrets.create(&PostParams::default(), &tls_secret("CERTIFICATE-ONE")).await.expect("creating the TLS Secret");
    let named = format!("Secret {}/shop-ca", ns.name);
    wait_for_tls_problem(&ns, &[&named, "spec.balancer.tls.clientCASecretName", "does not exist", "ca.crt"]).await;

    // A CA Secret with the wrong key: the missing key is named.
    let ca: Secret =
        serde_json::from_value(json!({"metadata": {"name": "shop-ca"}, "stringData": {"ca.pem": "CA-BUNDLE"}}))
            .expect("secret");
    secrets.create(&PostParams::default(), &ca).await.expect("creating the CA Secret");
    wait_for_tls_problem(&ns, &[&named, "has no non-empty key ca.crt"]).await;

    // The right key: healed by the Secret's watch event, within seconds.
    let fixed = json!({"stringData": {"ca.crt": "CA-BUNDLE"}});
    secrets.patch("shop-ca", &PatchParams::default(), &Patch::Merge(&fixed)).await.expect("adding ca.crt");
    wait_healed_within(&ns, Duration::from_secs(5)).await;
    assert_eq!(wait_for_children(&ns, "shop").await.len(), 15);

    // The balancer serves HTTPS from the mounted Secrets.
    let deployment = ns.api::<Deployment>().get("shop-balancer").await.expect("deployment");
    let pod = deployment.spec.template.spec.clone().expect("pod spec");
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default().join(" ");
    assert!(
        args.contains(
            "--tls-listen 0.0.0.0:8443 --tls-cert-file /etc/clusterapp/tls/tls.crt --tls-key-file /etc/clusterapp/tls/tls.key \
             --tls-client-ca-file /etc/clusterapp/tls-client-ca/ca.crt --tls-require-client-cert"
        ),
        "{args}"
    );
    let https = container
        .ports
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("https"))
        .expect("https port");
    assert_eq!(https.container_port, 8443);
    let volumes: BTreeMap<String, String> = pod
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| Some((v.name, v.secret?.secret_name?)))
        .collect();
    assert_eq!(volumes.get("tls").map(String::as_str), Some("shop-tls"));
    assert_eq!(volumes.get("tls-client-ca").map(String::as_str), Some("shop-ca"));
    let mounts: BTreeMap<String, (String, Option<bool>)> = container
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.name, (m.mount_path, m.read_only)))
        .collect();
    assert_eq!(mounts.get("tls"), Some(&("/etc/clusterapp/tls".to_string(), Some(true))));
    assert_eq!(mounts.get("tls-client-ca"), Some(&("/etc/clusterapp/tls-client-ca".to_string(), Some(true))));
    let service = ns.api::<Service>().get("shop").await.expect("service");
    let ports = service.spec.and_then(|s| s.ports).unwrap_or_default();
    let https = ports.into_iter().find(|p| p.name.as_deref() == Some("https")).expect("https service port");
    assert_eq!((https.port, https.target_port), (8443, Some(IntOrString::String("https".to_string()))));
    // Secret contents stay out of the status and the events.
    let text = serde_json::to_string(&app_get(&ns, "shop").await).expect("json");
    assert!(!text.contains("PRIVATE-KEY") && !text.contains("CA-BUNDLE") && !text.contains("CERTIFICATE-ONE"));
    let notes = format!("{:?}", events_of(&ns, "shop").await);
    assert!(!notes.contains("PRIVATE-KEY") && !notes.contains("CA-BUNDLE"), "{notes}");

    // A renewed certificate does not roll the balancer (it reloads the
    // files); its check is one read of the changed Secret, after which a
    // reconcile sends nothing again.
    wait_for_status(&ns, "shop", "a converged status", |a| condition(a, "Degraded").is_some_and(|c| c.0 == "False"))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = resource_versions(&children(&ns, "shop").await.expect("children"));
    let reconciles = operator.state.reconcile_count();
    let renewed = json!({"stringData": {"tls.crt": "CERTIFICATE-TWO"}});
    secrets
        .patch("shop-tls", &PatchParams::default(), &Patch::Merge(&renewed))
        .await
        .expect("renewing the certificate");
    wait_until(WAIT, "a reconcile after the renewal", || async { operator.state.reconcile_count() > reconciles }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        resource_versions(&children(&ns, "shop").await.expect("children")),
        before,
        "a renewed certificate changed a child"
    );
    let requests = operator.state.api_requests.get();
    let reconciles = operator.state.reconcile_count();
    ns.api::<ClusterApp>()
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"touched": "1"}}})))
        .await
        .expect("touch");
    wait_until(WAIT, "a reconcile of the touched app", || async { operator.state.reconcile_count() > reconciles })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        operator.state.api_requests.get(),
        requests,
        "a steady-state reconcile of an app with TLS sent requests"
    );

    // Turning client certificates off changes the balancer's template (a rollout).
    let generation = ns.api::<Deployment>().get("shop-balancer").await.expect("deployment").metadata.generation;
    let off = json!({"spec": {"balancer": {"tls": {"secretName": "shop-tls", "clientCASecretName": null, "requireClientCertificate": false}}}});
    ns.api::<ClusterApp>()
        .patch("shop", &PatchParams::default(), &Patch::Merge(off))
        .await
        .expect("turning client certificates off");
    wait_until(WAIT, "the balancer without client certificates", || async {
        ns.api::<Deployment>().get("shop-balancer").await.ok().is_some_and(|d| {
            let args =
                d.spec.template.spec.map(|p| p.containers[0].args.clone().unwrap_or_default()).unwrap_or_default();
            args.contains(&"--tls-listen".to_string()) && !args.contains(&"--tls-client-ca-file".to_string())
        })
    })
    .await;
    assert!(ns.api::<Deployment>().get("shop-balancer").await.expect("deployment").metadata.generation > generation);
}

fn rules_of(role: &Role) -> Vec<(Vec<String>, Vec<String>)> {
    role.rules.clone().unwrap_or_default().into_iter().map(|r| (r.resources.unwrap_or_default(), r.verbs)).collect()
}

fn list_pods() -> Vec<(Vec<String>, Vec<String>)> {
    vec![(vec!["pods".to_string()], vec!["list".to_string()])]
}

#[tokio::test]
async fn node_rbac_edits_are_restored_with_a_warning_event() {
    let ns = common::OperatorNamespace::new("capp-rbac").await;
    let _operator = common::operator_in(&ns).await;
    create_app(&ns, "shop", json!({"replicas": 1, "image": "registry.example/shop:1.4"})).await;
    wait_for_children(&ns, "shop").await;
    wait_for_status(&ns, "shop", "Degraded False", |a| condition(a, "Degraded").is_some_and(|c| c.0 == "False")).await;
    // Creating the Role and RoleBinding is no restore, and the check after
    // it passed.
    let early = warnings_of(&ns, "shop").await;
    assert!(
        !early.iter().any(|(reason, _)| reason.starts_with("Membership")),
        "membership warnings before any edit: {early:?}"
    );

    // A user takes `list pods` away from the node Role.
    let roles = ns.api::<Role>();
    roles
        .patch(
            "shop-node",
            &PatchParams::default(),
            &Patch::Merge(json!({"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]})),
        )
        .await
        .expect("editing the node Role");
    wait_until(WAIT, "the node Role restored", || async {
        roles.get("shop-node").await.is_ok_and(|r| rules_of(&r) == list_pods())
    })
    .await;
    let restored = |kind: &'static str, what: &'static str| {
        let ns = &ns;
        move || async move {
            warnings_of(ns, "shop").await.iter().any(|(reason, note)| {
                reason == "MembershipRBACRestored" && note.starts_with(&format!("{kind} {}/shop-node {what}", ns.name))
            })
        }
    };
    wait_until(
        WAIT,
        "a MembershipRBACRestored warning about the Role",
        restored("Role", "was changed (it allowed get pods)"),
    )
    .await;
    let warnings = warnings_of(&ns, "shop").await;
    let (_, note) = warnings.iter().find(|(reason, _)| reason == "MembershipRBACRestored").expect("the warning");
    assert!(
        note.contains(&format!("session nodes need `list pods` in namespace {} to find their peers", ns.name)),
        "{note}"
    );
    assert!(note.contains("The operator restored it"), "{note}");

    // The RoleBinding deleted: recreated, and said so.
    ns.api::<RoleBinding>().delete("shop-node", &DeleteParams::default()).await.expect("deleting the node RoleBinding");
    wait_until(WAIT, "a MembershipRBACRestored warning about the RoleBinding", restored("RoleBinding", "was deleted"))
        .await;
    assert!(ns.api::<RoleBinding>().get_opt("shop-node").await.expect("get").is_some(), "the RoleBinding is back");

    // Restored in time: the permission check after the restores passed, so
    // the app never became Degraded, and nothing else was warned about.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let app = app_get(&ns, "shop").await;
    assert_eq!(condition(&app, "Degraded").map(|c| c.0), Some("False".to_string()));
    let reasons: Vec<String> = warnings_of(&ns, "shop").await.into_iter().map(|(reason, _)| reason).collect();
    assert!(reasons.iter().all(|r| r == "MembershipRBACRestored"), "{reasons:?}");
}

/// A cluster-wide MutatingAdmissionPolicy (and its binding) limited to one
/// test namespace; deleted on drop (also while a test unwinds).
struct AdmissionPolicy {
    name: String,
}

impl AdmissionPolicy {
    /// Rewrites the verbs of Role `shop-node` in `ns` to `watch` on every
    /// write: a policy engine that breaks what the operator applies. The
    /// operator holds `watch pods`, so the rewritten Role is no escalation.
    async fn strip_list_pods(ns: &TestNamespace) -> AdmissionPolicy {
        use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
        let name = format!("clusterapp-test-{}", ns.name);
        let gvk = |kind: &str| GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
        let policies: Api<DynamicObject> = Api::all_with(
            ns.client.clone(),
            &ApiResource::from_gvk_with_plural(&gvk("MutatingAdmissionPolicy"), "mutatingadmissionpolicies"),
        );
        let bindings: Api<DynamicObject> = Api::all_with(
            ns.client.clone(),
            &ApiResource::from_gvk_with_plural(
                &gvk("MutatingAdmissionPolicyBinding"),
                "mutatingadmissionpolicybindings",
            ),
        );
        let guard = AdmissionPolicy { name: name.clone() };
        let policy: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": ["rbac.authorization.k8s.io"], "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["roles"]
                }]},
                "matchConditions": [{"name": "node-role", "expression": "object.metadata.name == 'shop-node'"}],
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "mutations": [{"patchType": "JSONPatch", "jsonPatch": {
                    "expression": "[JSONPatch{op: \"replace\", path: \"/rules/0/verbs\", value: [\"watch\"]}]"
                }}]
            }
        }))
        .expect("policy");
        policies.create(&PostParams::default(), &policy).await.expect("creating the MutatingAdmissionPolicy");
        let binding: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}}}}
        }))
        .expect("binding");
        bindings.create(&PostParams::default(), &binding).await.expect("creating the MutatingAdmissionPolicyBinding");
        // Policies take effect when the API server has loaded them: probe
        // with a Role of that name until it comes out rewritten.
        let roles = ns.api::<Role>();
        let probe: Role = serde_json::from_value(json!({
            "metadata": {"name": "shop-node"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
        }))
        .expect("role");
        wait_until(WAIT, "the admission policy to take effect", || async {
            let stored = roles.create(&PostParams::default(), &probe).await;
            let _ = roles.delete("shop-node", &DeleteParams::default()).await;
            stored.is_ok_and(|r| rules_of(&r) == vec![(vec!["pods".to_string()], vec!["watch".to_string()])])
        })
        .await;
        wait_until(WAIT, "the probe Role to be gone", || async {
            roles.get_opt("shop-node").await.ok().flatten().is_none()
        })
        .await;
        guard
    }

    fn remove(&self) {
        for kind in ["mutatingadmissionpolicybinding", "mutatingadmissionpolicy"] {
            let _ = support::kubectl().args(["delete", kind, &self.name, "--ignore-not-found"]).output();
        }
    }
}

impl Drop for AdmissionPolicy {
    fn drop(&mut self) {
        self.remove();
    }
}

#[tokio::test]
async fn membership_permission_that_cannot_be_restored_degrades_the_app() {
    let ns = common::OperatorNamespace::new("capp-forbid").await;
    let policy = AdmissionPolicy::strip_list_pods(&ns).await;
    let _operator = common::operator_in(&ns).await;
    create_app(&ns, "shop", json!({"replicas": 1, "image": "registry.example/shop:1.4"})).await;

    // The operator applies `list pods`, the policy turns it into `watch`:
    // the SubjectAccessReview after the apply says no.
    let app = wait_for_status(&ns, "shop", "Degraded MembershipForbidden", |a| {
        condition(a, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "MembershipForbidden")
    })
    .await;
    let (_, _, message) = condition(&app, "Degraded").expect("degraded");
    let account = format!("{}/shop-node", ns.name);
    assert!(
        message.contains(&format!("ServiceAccount {account} may not list pods in namespace {}", ns.name)),
        "{message}"
    );
    assert!(message.contains("find their peers") && message.contains("kubectl auth can-i"), "{message}");
    assert_eq!(condition(&app, "Ready").map(|c| c.0), Some("False".to_string()));
    wait_until(WAIT, "a MembershipForbidden warning event", || async {
        warnings_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "MembershipForbidden")
    })
    .await;
    // The rewrite is not mistaken for a user's edit (no restore loop).
    assert!(
        !warnings_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "MembershipRBACRestored"),
        "{:?}",
        warnings_of(&ns, "shop").await
    );

    // The policy goes: the operator's retry re-applies the Role, the check
    // passes and the app recovers, without a restart or an edit.
    policy.remove();
    let removed = std::time::Instant::now();
    wait_for_status(&ns, "shop", "Degraded False", |a| condition(a, "Degraded").is_some_and(|c| c.0 == "False")).await;
    let roles = ns.api::<Role>();
    assert_eq!(rules_of(&roles.get("shop-node").await.expect("role")), list_pods());
    println!("membership: recovered {} ms after the policy was removed", removed.elapsed().as_millis());
    wait_until(WAIT, "a Recovered event", || async {
        events_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "Recovered")
    })
    .await;
}

/// Plays the kubelet of session node `name` whose Tomcat container is in
/// `container_state`, after `restarts` restarts, the last of which ended
/// with `last_lines` (what FallbackToLogsOnError keeps of its log).
async fn set_node_container(
    ns: &TestNamespace,
    name: &str,
    ready: bool,
    restarts: i32,
    container_state: serde_json::Value,
    last_lines: &str,
) {
    let status = json!({"status": {"containerStatuses": [{
        "name": "tomcat", "image": "registry.example/shop:1.4", "imageID": "", "ready": ready,
        "restartCount": restarts, "state": container_state,
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": last_lines,
            "startedAt": "2025-01-01T00:00:00Z", "finishedAt": "2025-01-01T00:00:09Z"}}
    }]}});
    ns.api::<Pod>()
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("setting the container status");
}

#[tokio::test]
async fn a_crash_looping_node_degrades_the_app_with_its_last_lines_and_a_warning() {
    let ns = common::OperatorNamespace::new("capp-crash").await;
    let _operator = common::operator_in(&ns).await;
    create_app(&ns, "shop", json!({"replicas": 1, "image": "registry.example/shop:1.4"})).await;
    wait_for_children(&ns, "shop").await;
    // The kubelet keeps the last lines of a failed Tomcat's log only when asked.
    let sts = ns.api::<StatefulSet>().get("shop").await.expect("sts");
    let container = &sts.spec.template.spec.expect("pod").containers[0];
    assert_eq!(container.termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));

    make_pod_ready(&ns, "shop-0", "10.0.0.1").await;
    let output = "INFO [main] Starting Servlet engine\nSEVERE [main] The required Server component failed to start\n";
    let back_off =
        json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}});
    set_node_container(&ns, "shop-0", false, 3, back_off, output).await;
    let app = wait_for_status(&ns, "shop", "Degraded NodesCrashLooping", |a| {
        condition(a, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "NodesCrashLooping")
    })
    .await;
    let (_, _, message) = condition(&app, "Degraded").expect("degraded");
    assert!(
        message.contains("pod shop-0 (container tomcat) restarted 3 times, last exit code 1 (Error)")
            && message.ends_with("SEVERE [main] The required Server component failed to start"),
        "{message}"
    );
    wait_until(WAIT, "a NodesCrashLooping warning event naming the pod", || async {
        warnings_of(&ns, "shop")
            .await
            .iter()
            .any(|(reason, note)| reason == "NodesCrashLooping" && note.contains("shop-0"))
    })
    .await;

    // Tomcat starts cleanly at last: no longer degraded, and a Recovered event.
    set_node_container(&ns, "shop-0", true, 3, json!({"running": {"startedAt": "2025-01-01T00:05:00Z"}}), output).await;
    wait_for_status(&ns, "shop", "Degraded False", |a| condition(a, "Degraded").is_some_and(|c| c.0 == "False")).await;
    wait_until(WAIT, "a Recovered event", || async {
        events_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "Recovered")
    })
    .await;
}

/// A stand-in for one balancer replica's admin server: answers every request
/// with `body` (swappable), on `address`.
struct FakeBalancerAdmin {
    body: std::sync::Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeBalancerAdmin {
    async fn start(address: &str, body: String) -> FakeBalancerAdmin {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .unwrap_or_else(|e| panic!("binding {address} for a fake balancer admin server: {e}"));
        let body = std::sync::Arc::new(std::sync::Mutex::new(body));
        let served = body.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let text = served.lock().expect("body").clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        FakeBalancerAdmin { body, task }
    }

    fn answer(&self, body: String) {
        *self.body.lock().expect("body") = body;
    }
}

impl Drop for FakeBalancerAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `/sessions.json` whose node `route` saw the sessions numbered `ids`.
fn sessions_report(routes: &[(&str, std::ops::Range<u64>)], moved: u64, rebalancing: &[&str]) -> String {
    use clusterapp::balancer::routing::SessionWeigher;
    use clusterapp::balancer::sessions::{SessionSketch, SessionsReport, encode};
    let now_ms = 10 * 60_000;
    let report = SessionsReport {
        precision: clusterapp::balancer::sessions::PRECISION,
        window_seconds: clusterapp::balancer::sessions::ACTIVE_WINDOWS * clusterapp::balancer::sessions::WINDOW_MS
            / 1000,
        members: routes
            .iter()
            .map(|(route, ids)| {
                let sketch = SessionSketch::default();
                for i in ids.clone() {
                    sketch.record(SessionWeigher::new(&format!("{i:032X}")).sketch_hash(), now_ms);
                }
                (route.to_string(), encode(&sketch.registers(now_ms)))
            })
            .collect(),
        sessions_moved: moved,
        rebalancing: rebalancing.iter().map(|r| r.to_string()).collect(),
    };
    serde_json::to_string(&report).expect("report")
}

/// The operator merges the balancer replicas' session sketches into
/// `status.members[].sessions` and the SESSIONS column (`status.sessions`),
/// skips a replica that does not answer or answers garbage, tells of a
/// rebalancing in events with the sessions moved over every replica, and
/// writes nothing while the estimates stay put.
#[tokio::test]
async fn session_estimates_from_the_balancers_reach_the_status_and_rebalancing_makes_events() {
    let ns = common::OperatorNamespace::new("capp-sessions").await;
    let operator = common::operator_in(&ns).await;
    create_app(
        &ns,
        "shop",
        json!({
            "replicas": 2, "image": "registry.example/shop:1.4",
            "balancer": {"replicas": 3, "rebalance": {"enabled": true, "rampSeconds": 10}}
        }),
    )
    .await;
    wait_for_children(&ns, "shop").await;
    make_pod_ready(&ns, "shop-0", "10.0.0.10").await;
    make_pod_ready(&ns, "shop-1", "10.0.0.11").await;

    // Two replicas saw overlapping sessions: 90 distinct on shop-0, 60 on
    // shop-1. A third replica does not listen at all.
    let a = FakeBalancerAdmin::start(
        "127.77.0.10:9090",
        sessions_report(&[("shop-0", 0..60), ("shop-1", 100..140)], 5, &[]),
    )
    .await;
    let b = FakeBalancerAdmin::start(
        "127.77.0.11:9090",
        sessions_report(&[("shop-0", 30..90), ("shop-1", 120..160)], 7, &[]),
    )
    .await;
    let pods = ns.api::<Pod>();
    let selector = "app.kubernetes.io/instance=shop,app.kubernetes.io/component=balancer";
    let list = ListParams::default().labels(selector);
    wait_until(WAIT, "3 balancer pods", || async { pods.list(&list).await.is_ok_and(|l| l.items.len() >= 3) }).await;
    let names: Vec<String> =
        pods.list(&list).await.expect("balancer pods").items.into_iter().filter_map(|p| p.metadata.name).collect();
    for (name, ip) in names.iter().zip(["127.77.0.10", "127.77.0.11", "127.77.0.12"]) {
        make_pod_ready(&ns, name, ip).await;
    }

    let near = |estimate: Option<i64>, truth: i64| estimate.is_some_and(|e| (e - truth).abs() * 100 <= truth * 6);
    let merged = |app: &ClusterApp| {
        app.status
            .as_ref()
            .is_some_and(|s| s.members.len() == 2 && near(s.members[0].sessions, 90) && near(s.members[1].sessions, 60))
    };
    // A round every 15 s; a write that meets a reconcile's waits a round.
    wait_until(Duration::from_secs(60), "merged session estimates", || async { merged(&app_get(&ns, "shop").await) })
        .await;
    let app = wait_for_status(&ns, "shop", "merged session estimates", merged).await;
    let status = app.status.expect("status");
    let column = format!("{}/{}", status.members[0].sessions.expect("0"), status.members[1].sessions.expect("1"));
    assert_eq!(status.sessions.as_deref(), Some(column.as_str()), "the SESSIONS column in member order");

    // A rebalancing onto shop-1 begins (moves since the last round count);
    // replica b answers garbage meanwhile and is left out.
    a.answer(sessions_report(&[("shop-0", 0..60), ("shop-1", 100..140)], 15, &["shop-1"]));
    b.answer("{\"precision\": \"garbage\"".to_string());
    wait_until(Duration::from_secs(40), "a RebalanceStarted event", || async {
        events_of(&ns, "shop")
            .await
            .iter()
            .any(|(reason, note)| reason == "RebalanceStarted" && note.contains("shop-1"))
    })
    .await;
    // It ends: 10 + 10 moves on a, 3 on b since its last good answer.
    a.answer(sessions_report(&[("shop-0", 0..60), ("shop-1", 100..140)], 25, &[]));
    b.answer(sessions_report(&[("shop-0", 30..90), ("shop-1", 120..160)], 10, &[]));
    wait_until(Duration::from_secs(40), "a RebalanceFinished event", || async {
        events_of(&ns, "shop").await.iter().any(|(reason, _)| reason == "RebalanceFinished")
    })
    .await;
    let events = events_of(&ns, "shop").await;
    let finished: Vec<_> = events.iter().filter(|(reason, _)| reason == "RebalanceFinished").collect();
    assert_eq!(finished.len(), 1, "{events:?}");
    assert!(finished[0].1.contains("23 sessions moved"), "{events:?}");
    assert!(!events.iter().any(|(reason, _)| reason.starts_with("Degraded")), "{events:?}");

    // Steady estimates: no status write, no reconcile, over two rounds.
    wait_until(Duration::from_secs(60), "merged session estimates again", || async {
        merged(&app_get(&ns, "shop").await)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let version = app_get(&ns, "shop").await.metadata.resource_version;
    let reconciles = operator.state.reconcile_count();
    tokio::time::sleep(Duration::from_secs(32)).await;
    assert_eq!(app_get(&ns, "shop").await.metadata.resource_version, version, "the status churned");
    assert_eq!(operator.state.reconcile_count(), reconciles, "the operator reacted to its own writes");
}
