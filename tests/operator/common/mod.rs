//! Helpers shared by the operator's integration tests (tests/operator/) and
//! the end-to-end tests (tests/e2e/).
#![allow(dead_code)]

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, CustomResourceExt};

use clusterapp::crd::ClusterApp;

use crate::support;

/// Installs (or updates) the ClusterApp CRD from `crds/clusterapp.yaml` —
/// the shipped file, not the Rust value, so the tests prove the file — and
/// waits until the API server serves it.
pub async fn install_crd(client: &Client) {
    let text = std::fs::read_to_string(support::repo_root().join("crds/clusterapp.yaml"))
        .expect("reading crds/clusterapp.yaml");
    let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).expect("parsing crds/clusterapp.yaml");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = ClusterApp::crd_name();
    crds.patch(name, &PatchParams::apply("clusterapp-tests").force(), &Patch::Apply(&crd))
        .await
        .expect("applying the CRD");
    support::wait_until(Duration::from_secs(30), "the ClusterApp CRD to be established", || {
        let crds = crds.clone();
        async move {
            let Ok(crd) = crds.get(name).await else { return false };
            crd.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        }
    })
    .await;
    // Established can precede the resource showing up in discovery for the
    // aggregated handler; wait until a list works.
    let apps: Api<ClusterApp> = Api::all(client.clone());
    support::wait_until(Duration::from_secs(30), "ClusterApps to be served", || {
        let apps = apps.clone();
        async move { apps.list(&Default::default()).await.is_ok() }
    })
    .await;
}

/// A small valid ClusterApp.
pub fn valid_app(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "clusterapp.io/v1alpha1",
        "kind": "ClusterApp",
        "metadata": {"name": name},
        "spec": {"replicas": 3, "image": "registry.example/shop:1.4"}
    })
}

/// An operator running in-process (a tokio task) under its own
/// ServiceAccount, bound to the ClusterRole of `deploy/operator-rbac.yaml`.
pub struct RunningOperator {
    pub state: std::sync::Arc<clusterapp::operator::metrics::OperatorState>,
    pub task: tokio::task::JoinHandle<Result<(), clusterapp::operator::leader::LeaderError>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningOperator {
    /// Graceful stop: the Lease is released.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
    /// A crash: the task is dropped mid-flight, the Lease is not released.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test namespace for operator tests. Besides the namespace (deleted by
/// the inner guard), it removes the cluster-wide ClusterRoleBinding
/// `clusterapp-operator-<ns>` that [`operator_client`] makes: namespace
/// deletion does not remove cluster-scoped objects, and a long `make test`
/// would otherwise pile them up.
pub struct OperatorNamespace {
    pub ns: support::TestNamespace,
}

impl OperatorNamespace {
    pub async fn new(prefix: &str) -> OperatorNamespace {
        OperatorNamespace { ns: support::TestNamespace::new(prefix).await }
    }
}

impl std::ops::Deref for OperatorNamespace {
    type Target = support::TestNamespace;
    fn deref(&self) -> &support::TestNamespace {
        &self.ns
    }
}

impl Drop for OperatorNamespace {
    fn drop(&mut self) {
        // Synchronous, as the namespace guard's: Drop cannot await, and this
        // must also run while a test unwinds. The namespace goes right after
        // (the inner guard's drop).
        let _ = support::kubectl()
            .args([
                "delete",
                "clusterrolebinding",
                &cluster_role_binding_name(&self.ns.name),
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

fn cluster_role_binding_name(namespace: &str) -> String {
    format!("clusterapp-operator-{namespace}")
}

/// Deletes test ClusterRoleBindings whose namespace is gone or going (left
/// by a test binary that was killed before its guards ran).
async fn sweep_stale_cluster_role_bindings(admin: &Client) {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let Ok(list) = bindings.list(&kube::api::ListParams::default().labels("clusterapp.io/test=true")).await else {
        return;
    };
    for binding in list.items {
        let Some(name) = binding.metadata.name.clone() else { continue };
        let Some(namespace) = binding.subjects.as_ref().and_then(|s| s.first()).and_then(|s| s.namespace.clone())
        else {
            continue;
        };
        let alive = match namespaces.get_opt(&namespace).await {
            Ok(Some(ns)) => ns.metadata.deletion_timestamp.is_none(),
            Ok(None) => false,
            Err(_) => true,
        };
        if !alive {
            let _ = bindings.delete(&name, &Default::default()).await;
        }
    }
}

/// Reads the documents of deploy/operator-rbac.yaml.
fn operator_rbac() -> (k8s_openapi::api::rbac::v1::ClusterRole, k8s_openapi::api::rbac::v1::Role) {
    use serde::Deserialize;
    let text = std::fs::read_to_string(support::repo_root().join("deploy/operator-rbac.yaml"))
        .expect("reading deploy/operator-rbac.yaml");
    let mut cluster_role = None;
    let mut role = None;
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_yaml_ng::Value::deserialize(document).expect("yaml document");
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("ClusterRole") => cluster_role = Some(serde_yaml_ng::from_value(value).expect("ClusterRole")),
            Some("Role") => role = Some(serde_yaml_ng::from_value(value).expect("Role")),
            other => panic!("unexpected document {other:?} in deploy/operator-rbac.yaml"),
        }
    }
    (cluster_role.expect("a ClusterRole"), role.expect("a Role"))
}

/// A client authenticated as ServiceAccount `clusterapp-operator` of `ns`,
/// bound to the shipped ClusterRole (cluster-wide) and leader-election Role.
/// Takes an [`OperatorNamespace`], whose drop removes the ClusterRoleBinding.
pub async fn operator_client(ns: &OperatorNamespace) -> Client {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let apply = PatchParams::apply("clusterapp-tests").force();
    let admin = ns.client.clone();
    sweep_stale_cluster_role_bindings(&admin).await;
    let (cluster_role, mut role) = operator_rbac();
    let cluster_role_name = cluster_role.metadata.name.clone().expect("ClusterRole name");
    Api::<ClusterRole>::all(admin.clone())
        .patch(&cluster_role_name, &apply, &Patch::Apply(&cluster_role))
        .await
        .expect("applying the ClusterRole");
    role.metadata.namespace = Some(ns.name.clone());
    let role_name = role.metadata.name.clone().expect("Role name");
    Api::<Role>::namespaced(admin.clone(), &ns.name)
        .patch(&role_name, &apply, &Patch::Apply(&role))
        .await
        .expect("applying the Role");

    let sa_name = "clusterapp-operator";
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": sa_name}})).expect("sa");
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns.name)
        .patch(sa_name, &apply, &Patch::Apply(&sa))
        .await
        .expect("creating the ServiceAccount");
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": sa_name, "namespace": ns.name}]);
    let crb: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": cluster_role_binding_name(&ns.name), "labels": {"clusterapp.io/test": "true"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role_name},
        "subjects": subject
    }))
    .expect("crb");
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(&cluster_role_binding_name(&ns.name), &apply, &Patch::Apply(&crb))
        .await
        .expect("binding the ClusterRole");
    let rb: RoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": subject
    }))
    .expect("rb");
    Api::<RoleBinding>::namespaced(admin.clone(), &ns.name)
        .patch(&role_name, &apply, &Patch::Apply(&rb))
        .await
        .expect("binding the Role");

    // A token of the ServiceAccount from the TokenRequest API.
    let body = serde_json::to_vec(&serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}
    }))
    .expect("json");
    let request = http::Request::post(format!("/api/v1/namespaces/{}/serviceaccounts/{sa_name}/token", ns.name))
        .header("content-type", "application/json")
        .body(body)
        .expect("request");
    let token: serde_json::Value = admin.request(request).await.expect("TokenRequest");
    let token = token["status"]["token"].as_str().expect("a token").to_string();

    // The admin kubeconfig's server and CA, with the token instead of the
    // admin credentials.
    let kubeconfig = kube::config::Kubeconfig::read_from(&support::cluster().kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("config");
    config.auth_info = serde_json::from_value(serde_json::json!({"token": token})).expect("auth info");
    let client = Client::try_from(config).expect("operator client");
    // RBAC is evaluated per request; wait until the bindings are in effect.
    let apps: Api<ClusterApp> = Api::namespaced(client.clone(), &ns.name);
    support::wait_until(Duration::from_secs(20), "the operator's RBAC to apply", || {
        let apps = apps.clone();
        async move { apps.list(&Default::default()).await.is_ok() }
    })
    .await;
    client
}

/// Lease timing short enough for a takeover test.
pub fn fast_lease() -> clusterapp::operator::leader::LeaseTiming {
    clusterapp::operator::leader::LeaseTiming {
        lease_duration: Duration::from_secs(4),
        retry_period: Duration::from_millis(500),
        renew_deadline: Duration::from_secs(3),
    }
}

/// Starts an operator watching `ns` only, under the client `client`, with
/// the Lease timing `lease_timing` (the production one unless a test is
/// about takeovers: a 3 s renew deadline is lost on a loaded machine, and a
/// leader that loses its Lease stops).
pub fn start_operator(
    client: Client,
    ns: &str,
    identity: &str,
    lease_timing: clusterapp::operator::leader::LeaseTiming,
) -> RunningOperator {
    // Operator logs in the test output (shown for failing tests); RUST_LOG to tune.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "clusterapp=info".into()),
        )
        .with_test_writer()
        .try_init();
    let state = clusterapp::operator::metrics::OperatorState::new();
    let config = clusterapp::operator::OperatorConfig {
        // the image `make images` builds from this tree (tests/bed/nodes/images.sh)
        balancer_image: clusterapp::operator::DEFAULT_BALANCER_IMAGE.to_string(),
        watch_namespace: Some(ns.to_string()),
        lease_namespace: ns.to_string(),
        lease_name: "clusterapp-operator".to_string(),
        identity: identity.to_string(),
        lease_timing,
        tuning: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(clusterapp::operator::run(client, config, state.clone(), async move {
        let _ = stopped.await;
    }));
    RunningOperator { state, task, stop: Some(stop) }
}

/// CRD installed, operator running under its ServiceAccount in `ns`.
pub async fn operator_in(ns: &OperatorNamespace) -> RunningOperator {
    install_crd(&ns.client).await;
    let client = operator_client(ns).await;
    start_operator(client, &ns.name, "operator-a", clusterapp::operator::leader::LeaseTiming::default())
}
