//! Two operators at once (only the Lease holder writes; the other takes over
//! when it dies) and the admin endpoints.

use crate::common;
use crate::support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{TestNamespace, wait_until};
use clusterapp::crd::ClusterApp;

async fn create_app(ns: &TestNamespace, name: &str) {
    let app: ClusterApp = serde_json::from_value(json!({
        "apiVersion": "clusterapp.io/v1alpha1", "kind": "ClusterApp",
        "metadata": {"name": name}, "spec": {"replicas": 1, "image": "registry.example/shop:1.4"}
    }))
    .expect("app");
    ns.api::<ClusterApp>().create(&PostParams::default(), &app).await.expect("creating the ClusterApp");
}

#[tokio::test]
async fn two_operators_only_the_leader_writes_and_the_standby_takes_over() {
    let ns = common::OperatorNamespace::new("capp-leader").await;
    common::install_crd(&ns.client).await;
    let client = common::operator_client(&ns).await;
    let a = common::start_operator(client.clone(), &ns.name, "operator-a", common::fast_lease());
    let b = common::start_operator(client.clone(), &ns.name, "operator-b", common::fast_lease());
    wait_until(Duration::from_secs(20), "one leader", || async { a.state.is_leader() || b.state.is_leader() }).await;
    let (leader, standby) = if a.state.is_leader() { (a, b) } else { (b, a) };

    create_app(&ns, "shop").await;
    let sts = ns.api::<StatefulSet>();
    wait_until(Duration::from_secs(30), "the StatefulSet", || async {
        sts.get_opt("shop").await.ok().flatten().is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!standby.state.is_leader(), "two leaders");
    assert!(leader.state.reconcile_count() > 0);
    assert_eq!(standby.state.reconcile_count(), 0, "the standby reconciled");
    assert_eq!(standby.state.api_writes.get(), 0, "the standby wrote");

    // The leader crashes (no release): the standby takes over after the
    // Lease expires and repairs what changed meanwhile.
    leader.kill();
    let configmaps = ns.api::<ConfigMap>();
    configmaps.delete("shop-tomcat", &DeleteParams::default()).await.expect("delete");
    wait_until(Duration::from_secs(30), "the standby to lead", || async { standby.state.is_leader() }).await;
    wait_until(Duration::from_secs(30), "the ConfigMap restored by the new leader", || async {
        configmaps.get_opt("shop-tomcat").await.ok().flatten().is_some()
    })
    .await;
    assert!(standby.state.api_writes.get() > 0);

    // A graceful stop releases the Lease at once.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = ns.api();
    standby.stop().await;
    let lease = leases.get("clusterapp-operator").await.expect("lease");
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), None, "lease released on stop");
}

async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, response)
}

#[tokio::test]
async fn admin_endpoints_report_health_and_metrics() {
    let ns = common::OperatorNamespace::new("capp-admin").await;
    let operator = common::operator_in(&ns).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(clusterapp::operator::admin::serve(listener, operator.state.clone()));
    create_app(&ns, "shop").await;
    wait_until(Duration::from_secs(30), "reconciles", || async { operator.state.reconcile_count() > 0 }).await;
    wait_until(Duration::from_secs(30), "readyz", || async { http_get(address, "/readyz").await.0 == 200 }).await;
    assert_eq!(http_get(address, "/healthz").await.0, 200);
    let (code, metrics) = http_get(address, "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "clusterapp_operator_reconciles_total",
        "clusterapp_operator_reconcile_duration_seconds_bucket",
        "clusterapp_operator_api_writes_total",
        "clusterapp_operator_leader 1",
    ] {
        assert!(metrics.contains(name), "{name} missing in:\n{metrics}");
    }
    assert_eq!(http_get(address, "/nope").await.0, 404);
    // Stopped: not live any more is reported as unhealthy only on lost
    // leadership; a graceful stop leaves the process to exit.
    operator.stop().await;
}

#[tokio::test]
async fn the_operators_cluster_role_binding_goes_with_the_test_namespace() {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let admin = support::admin_client().await;
    let bindings: kube::Api<ClusterRoleBinding> = kube::Api::all(admin);
    let ns = common::OperatorNamespace::new("capp-crb").await;
    common::install_crd(&ns.client).await;
    let _client = common::operator_client(&ns).await;
    let name = format!("clusterapp-operator-{}", ns.name);
    assert!(bindings.get_opt(&name).await.expect("get").is_some(), "the binding was made");
    drop(ns);
    wait_until(Duration::from_secs(10), "the ClusterRoleBinding to be deleted", || async {
        bindings.get_opt(&name).await.ok().flatten().is_none()
    })
    .await;
}
