//! Helpers shared by the operator's integration tests (tests/operator_*.rs).
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
    let text = std::fs::read_to_string(support::repo_root().join("crds/clusterapp.yaml")).expect("reading crds/clusterapp.yaml");
    let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).expect("parsing crds/clusterapp.yaml");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = ClusterApp::crd_name();
    crds.patch(name, &PatchParams::apply("clusterapp-tests").force(), &Patch::Apply(&crd)).await.expect("applying the CRD");
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
