//! The ClusterApp CRD: the committed file is the generated one, and every
//! validation rule is enforced by the real API server with our message.

use crate::common;
use crate::support;

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};

use clusterapp::crd::ClusterApp;

#[test]
fn committed_crd_is_the_generated_one() {
    let committed = std::fs::read_to_string(support::repo_root().join("crds/clusterapp.yaml"))
        .expect("reading crds/clusterapp.yaml");
    let generated = clusterapp::crd::crd_yaml().expect("generating the CRD");
    assert!(committed == generated, "crds/clusterapp.yaml is stale: run `cargo run -- crd > crds/clusterapp.yaml`");
}

#[test]
fn crd_subcommand_prints_the_committed_file() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clusterapp"))
        .arg("crd")
        .output()
        .expect("running clusterapp crd");
    assert!(out.status.success(), "clusterapp crd failed: {}", String::from_utf8_lossy(&out.stderr));
    let committed = std::fs::read_to_string(support::repo_root().join("crds/clusterapp.yaml"))
        .expect("reading crds/clusterapp.yaml");
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
}

/// Sets `value` at the dotted `path` inside `object`, creating objects on the way.
fn set_path(object: &mut Value, path: &str, value: Value) {
    let mut cursor = object;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        if cursor.get(*part).is_none() {
            cursor[*part] = json!({});
        }
        cursor = &mut cursor[*part];
    }
    cursor[parts[parts.len() - 1]] = value;
}

/// Creates the valid app with one field changed and returns the API server's
/// rejection message (panics when the object is accepted).
async fn rejection(name: &str, path: &str, value: Value) -> String {
    let shown = value.to_string();
    let ns = support::TestNamespace::new("capp-cel").await;
    common::install_crd(&ns.client).await;
    let mut app = common::valid_app(name);
    set_path(&mut app, path, value);
    match create_raw(&ns, app).await {
        Ok(_) => panic!("the API server accepted {path} = {shown}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            status.message
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// Creates a ClusterApp from raw JSON, exactly as a user's manifest would be sent.
async fn create_raw(ns: &support::TestNamespace, object: Value) -> Result<DynamicObject, kube::Error> {
    let apps: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &ApiResource::erase::<ClusterApp>(&()));
    let object: DynamicObject = serde_json::from_value(object).expect("test object is a Kubernetes object");
    apps.create(&PostParams::default(), &object).await
}

/// One test per rule: the rejected field and the words of our message.
macro_rules! rejected {
    ($test:ident, $path:expr, $value:expr, $message:expr) => {
        #[tokio::test]
        async fn $test() {
            let message = rejection("shop", $path, $value).await;
            assert!(message.contains($message), "message {message:?} does not contain {:?}", $message);
        }
    };
}

rejected!(negative_replicas_rejected, "spec.replicas", json!(-1), "replicas must be 0 or more");
rejected!(empty_image_rejected, "spec.image", json!(""), "image must name a Tomcat-based container image");
rejected!(
    relative_catalina_base_rejected,
    "spec.catalinaBase",
    json!("tomcat"),
    "catalinaBase must be an absolute path without '..'"
);
rejected!(
    http_port_out_of_range_rejected,
    "spec.httpPort",
    json!(70000),
    "spec.httpPort: Invalid value: 70000: must be a TCP port between 1 and 65535"
);
rejected!(
    receiver_port_out_of_range_rejected,
    "spec.sessions.receiverPort",
    json!(0),
    "spec.sessions.receiverPort: Invalid value: 0: must be a TCP port between 1 and 65535"
);
rejected!(
    ajp_port_out_of_range_rejected,
    "spec.ajp.port",
    json!(65536),
    "spec.ajp.port: Invalid value: 65536: must be a TCP port between 1 and 65535"
);
rejected!(
    balancer_port_out_of_range_rejected,
    "spec.balancer.port",
    json!(-80),
    "spec.balancer.port: Invalid value: -80: must be a TCP port between 1 and 65535"
);
rejected!(
    node_ports_must_differ,
    "spec.ajp.port",
    json!(4000),
    "httpPort, ajp.port and sessions.receiverPort must be three different ports"
);
rejected!(balancer_port_must_not_be_admin_port, "spec.balancer.port", json!(9090), "balancer.port must not be 9090");
rejected!(
    packet_size_too_small_rejected,
    "spec.ajp.packetSize",
    json!(4096),
    "ajp.packetSize must be between 8192 and 65536 bytes"
);
rejected!(
    packet_size_too_large_rejected,
    "spec.ajp.packetSize",
    json!(65537),
    "ajp.packetSize must be between 8192 and 65536 bytes"
);
rejected!(zero_balancers_rejected, "spec.balancer.replicas", json!(0), "balancer.replicas must be 1 or more");
rejected!(
    cookie_name_must_be_token,
    "spec.sessions.cookieName",
    json!("JSESSION ID"),
    "cookieName must be an HTTP token"
);
rejected!(
    path_parameter_must_be_token,
    "spec.sessions.pathParameter",
    json!("jsession;id"),
    "pathParameter must be an HTTP token"
);
rejected!(
    state_transfer_timeout_in_range,
    "spec.sessions.stateTransferTimeoutSeconds",
    json!(0),
    "stateTransferTimeoutSeconds must be between 1 and 3600"
);
rejected!(drain_seconds_in_range, "spec.drainSeconds", json!(601), "drainSeconds must be between 0 and 600");
rejected!(
    secret_ref_name_must_be_secret_name,
    "spec.ajp.secretRef",
    json!({"name": "My_Secret", "key": "secret"}),
    "ajp.secretRef.name must be a Secret name"
);
rejected!(
    secret_ref_key_must_be_secret_key,
    "spec.ajp.secretRef",
    json!({"name": "ajp", "key": "a/b"}),
    "ajp.secretRef.key must be a Secret key"
);
rejected!(
    tls_secret_name_must_be_secret_name,
    "spec.balancer.tls",
    json!({"secretName": "Shop_TLS"}),
    "balancer.tls.secretName must be a Secret name"
);
rejected!(
    tls_secret_name_is_required,
    "spec.balancer.tls",
    json!({"port": 8443}),
    "spec.balancer.tls.secretName: Required value"
);
rejected!(
    tls_port_out_of_range_rejected,
    "spec.balancer.tls",
    json!({"secretName": "shop-tls", "port": 0}),
    "spec.balancer.tls.port: Invalid value: 0: must be a TCP port between 1 and 65535"
);
rejected!(
    tls_port_must_differ_from_balancer_port,
    "spec.balancer",
    json!({"port": 8443, "tls": {"secretName": "shop-tls"}}),
    "balancer.tls.port must differ from balancer.port"
);
rejected!(
    tls_port_must_not_be_admin_port,
    "spec.balancer.tls",
    json!({"secretName": "shop-tls", "port": 9090}),
    "balancer.tls.port must not be 9090"
);
rejected!(
    client_ca_secret_name_must_be_secret_name,
    "spec.balancer.tls",
    json!({"secretName": "shop-tls", "clientCASecretName": "CA!"}),
    "balancer.tls.clientCASecretName must be a Secret name"
);
rejected!(
    required_client_certificate_needs_a_ca,
    "spec.balancer.tls",
    json!({"secretName": "shop-tls", "requireClientCertificate": true}),
    "balancer.tls.requireClientCertificate needs balancer.tls.clientCASecretName"
);
rejected!(
    required_client_certificate_needs_a_non_null_ca,
    "spec.balancer.tls",
    json!({"secretName": "shop-tls", "clientCASecretName": null, "requireClientCertificate": true}),
    "balancer.tls.requireClientCertificate needs balancer.tls.clientCASecretName"
);

#[tokio::test]
async fn name_must_be_a_short_dns_label() {
    let message = rejection("shop-with-a-name-far-longer-than-forty-chars", "spec.replicas", json!(1)).await;
    assert!(message.contains("metadata.name must be a DNS label of at most 40 characters"), "{message}");
}

#[tokio::test]
async fn unknown_replication_mode_rejected() {
    // An enum: the API server's own wording lists the allowed values.
    let ns = support::TestNamespace::new("capp-cel").await;
    common::install_crd(&ns.client).await;
    let mut app = common::valid_app("shop");
    set_path(&mut app, "spec.sessions.replication", json!("everything"));
    let err = create_raw(&ns, app).await.expect_err("unknown replication accepted");
    let message = err.to_string();
    assert!(message.contains("supported values: \"all\", \"backup\", \"none\""), "{message}");
}

#[tokio::test]
async fn valid_app_is_accepted_and_defaulted() {
    let ns = support::TestNamespace::new("capp-cel").await;
    common::install_crd(&ns.client).await;
    // Send only what the user wrote, so the API server applies the defaults.
    let minimal = json!({"apiVersion": "clusterapp.io/v1alpha1", "kind": "ClusterApp", "metadata": {"name": "shop"}, "spec": {"image": "registry.example/shop:1.4"}});
    let created = create_raw(&ns, minimal).await.expect("a minimal app is valid");
    let created: ClusterApp =
        serde_json::from_value(serde_json::to_value(created).expect("json")).expect("reads back as a ClusterApp");
    let created = serde_json::to_value(&created).expect("json");
    assert_eq!(created["spec"]["replicas"], json!(3));
    assert_eq!(created["spec"]["sessions"]["sendMode"], json!("sync"));
    assert_eq!(created["spec"]["sessions"]["encryptionAlgorithm"], json!("AES/GCM/NoPadding"));
    assert_eq!(created["spec"]["ajp"]["packetSize"], json!(8192));
    assert_eq!(created["spec"]["balancer"]["replicas"], json!(2));
}

#[tokio::test]
async fn tls_is_accepted_and_defaulted() {
    let ns = support::TestNamespace::new("capp-cel").await;
    common::install_crd(&ns.client).await;
    let mut app = common::valid_app("shop");
    set_path(&mut app, "spec.balancer.tls", json!({"secretName": "shop.example-tls"}));
    let created = create_raw(&ns, app).await.expect("a tls block with only secretName is valid");
    let created: ClusterApp =
        serde_json::from_value(serde_json::to_value(created).expect("json")).expect("reads back as a ClusterApp");
    let tls = created.spec.balancer.tls.expect("tls kept");
    assert_eq!(
        (tls.secret_name.as_str(), tls.port, tls.client_ca_secret_name, tls.require_client_certificate),
        ("shop.example-tls", 8443, None, false)
    );
    // Client certificates asked for and required, on a port of its own.
    let mut app = common::valid_app("shop-mtls");
    set_path(
        &mut app,
        "spec.balancer",
        json!({"port": 80, "tls": {"secretName": "shop-tls", "port": 443, "clientCASecretName": "shop-ca", "requireClientCertificate": true}}),
    );
    create_raw(&ns, app).await.expect("client certificates with a CA are valid");
}
