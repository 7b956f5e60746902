//! Golden-file tests of the builders: each fixture in `src/operator/testdata`
//! is built and compared with `<fixture>.children.yaml` and
//! `<fixture>.server.xml`. `UPDATE_GOLDEN=1 cargo test --lib` rewrites them
//! (review the diff!).

use std::path::PathBuf;

use super::*;
use crate::crd::{ClusterApp, Replication};

const AJP_SECRET: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const TRIBES_KEY: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/operator/testdata")
}

fn fixture(name: &str) -> ClusterApp {
    let text = std::fs::read_to_string(testdata().join(format!("{name}.yaml"))).expect("reading fixture");
    serde_yaml_ng::from_str(&text).expect("fixture is a ClusterApp")
}

fn material() -> SecretMaterial {
    SecretMaterial { ajp_secret: AJP_SECRET.to_string(), tribes_key: TRIBES_KEY.to_string() }
}

fn context() -> BuildContext {
    BuildContext { balancer_image: "ghcr.io/clusterapp/clusterapp:0.1.0".to_string() }
}

fn children_yaml(children: &Children) -> String {
    children
        .to_values()
        .expect("children serialize")
        .iter()
        .map(|value| serde_yaml_ng::to_string(value).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn check_golden(file: &str, actual: &str) {
    let path = testdata().join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("writing golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        let first_difference = expected.lines().zip(actual.lines()).position(|(e, a)| e != a);
        panic!(
            "{file} differs from the builder's output (first different line: {first_difference:?}); \
             rerun with UPDATE_GOLDEN=1 and review the diff.\n--- actual ---\n{actual}"
        );
    }
}

fn golden(name: &str) {
    let app = fixture(name);
    let children = build_children(&app, &material(), &context()).expect("builds");
    check_golden(&format!("{name}.children.yaml"), &children_yaml(&children));
    let xml = children.config_map.data.as_ref().and_then(|d| d.get("server.xml")).expect("server.xml in the ConfigMap");
    check_golden(&format!("{name}.server.xml"), xml);
}

#[test]
fn golden_default() {
    golden("default");
}

#[test]
fn golden_every_option() {
    golden("every-option");
}

#[test]
fn golden_no_replication() {
    golden("no-replication");
}

#[test]
fn golden_http_backend() {
    golden("http-backend");
}

/// `backendProtocol: http`: the nodes open an HTTP connector for the
/// balancer on their Pod IP with the forwarding valves and no AJP
/// connector; only the balancer Pods may reach it; the balancer is told the
/// protocol and the port's name, and gets no AJP secret (nor do the nodes).
#[test]
fn http_backend_wiring() {
    let app = fixture("http-backend");
    let children = build_children(&app, &material(), &context()).expect("builds");
    let xml = children.config_map.data.as_ref().and_then(|d| d.get("server.xml")).expect("server.xml");
    let doc = roxmltree::Document::parse(xml).expect("XML");
    let connectors: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("Connector")).collect();
    assert!(connectors.iter().all(|c| c.attribute("protocol") == Some("HTTP/1.1")), "no AJP connector: {xml}");
    let backend = connectors.iter().find(|c| c.attribute("port") == Some("8090")).expect("the balancer's connector");
    assert_eq!(backend.attribute("address"), Some("${POD_IP}"));
    let engine_valves: Vec<&str> = doc
        .descendants()
        .find(|n| n.has_tag_name("Engine"))
        .expect("Engine")
        .children()
        .filter(|n| n.has_tag_name("Valve"))
        .filter_map(|n| n.attribute("className"))
        .collect();
    assert_eq!(
        engine_valves[..2],
        ["org.apache.catalina.valves.RemoteIpValve", "org.apache.catalina.valves.SSLValve"],
        "forwarding valves first, so every later valve sees the client's facts"
    );
    assert!(!xml.contains("AJP_SECRET"), "{xml}");

    let node_pod = children.stateful_set.spec.template.spec.as_ref().expect("pod spec");
    let tomcat = &node_pod.containers[0];
    let port_names: Vec<(&str, i32)> =
        tomcat.ports.iter().flatten().map(|p| (p.name.as_deref().unwrap_or(""), p.container_port)).collect();
    assert_eq!(port_names, [("http", 8080), ("http-backend", 8090), ("tribes", 4000)]);
    assert!(tomcat.env.iter().flatten().all(|e| e.name != "AJP_SECRET"), "no AJP secret in the node");

    let nodes_ports: Vec<&str> = children
        .nodes_service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .expect("ports")
        .iter()
        .filter_map(|p| p.name.as_deref())
        .collect();
    assert_eq!(nodes_ports, ["http-backend"], "the balancer's member list carries the HTTP port");

    let balancer_pod = children.balancer_deployment.spec.template.spec.as_ref().expect("pod");
    let args = balancer_pod.containers[0].args.as_ref().expect("args").join(" ");
    assert!(args.contains("--backend-protocol http --kubernetes-port-name http-backend"), "{args}");
    assert!(!args.contains("--ajp-secret-file") && !args.contains("--packet-size"), "{args}");
    assert!(balancer_pod.volumes.iter().flatten().all(|v| v.name != "ajp-secret"), "the balancer mounts no AJP secret");

    let ingress = children.network_policy.spec.as_ref().and_then(|s| s.ingress.as_ref()).expect("ingress");
    let backend_rule = ingress
        .iter()
        .find(|rule| rule.ports.iter().flatten().any(|p| p.port == Some(IntOrString::Int(8090))))
        .expect("a rule for the backend port");
    let peers: Vec<_> = backend_rule
        .from
        .iter()
        .flatten()
        .filter_map(|peer| peer.pod_selector.as_ref()?.match_labels.as_ref())
        .collect();
    assert_eq!(peers.len(), 1, "one peer: the balancer Pods");
    assert!(peers[0].values().any(|v| v == "balancer"), "{peers:?}");
    assert!(
        ingress.iter().flat_map(|rule| rule.ports.iter().flatten()).all(|p| p.port != Some(IntOrString::Int(8009))),
        "the AJP port is not opened"
    );
}

fn server_xml_of(name: &str) -> String {
    let app = fixture(name);
    server_xml::server_xml(app.metadata.name.as_deref().unwrap_or_default(), &app.spec)
}

/// Class names of the `Interceptor` elements, in document order.
fn interceptors(doc: &roxmltree::Document) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("Interceptor"))
        .filter_map(|n| n.attribute("className"))
        .map(|c| c.rsplit('.').next().unwrap_or(c).to_string())
        .collect()
}

#[test]
fn server_xml_parses_and_has_what_tomcat_needs() {
    for name in ["default", "every-option", "no-replication"] {
        let xml = server_xml_of(name);
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{name}: server.xml is not XML: {e}"));
        let engine = doc.descendants().find(|n| n.has_tag_name("Engine")).expect("an Engine");
        assert_eq!(engine.attribute("jvmRoute"), Some("${POD_NAME}"), "{name}: route from the pod name");
        let ajp = doc
            .descendants()
            .find(|n| n.has_tag_name("Connector") && n.attribute("protocol") == Some("AJP/1.3"))
            .expect("an AJP connector");
        assert_eq!(ajp.attribute("secretRequired"), Some("true"), "{name}");
        assert_eq!(ajp.attribute("secret"), Some("${chomp:ajp.secret}"), "{name}: the secret from its file");
        assert_eq!(ajp.attribute("address"), Some("${POD_IP}"), "{name}: not loopback");
        assert!(
            doc.descendants().any(|n| n.attribute("className") == Some("org.apache.catalina.valves.HealthCheckValve")),
            "{name}: HealthCheckValve for the probes"
        );
        assert_eq!(doc.root_element().attribute("port"), Some("-1"), "{name}: no shutdown port");
    }
}

/// Tomcat does not start on a server.xml that is not well-formed XML. Valid
/// ClusterApp names (`^[a-z]([-a-z0-9]*[a-z0-9])?$`) may contain `--`, which
/// an XML comment cannot hold; the server.xml of every fixture is built with
/// its own name and with such names, as the ConfigMap carries it.
#[test]
fn server_xml_is_well_formed_for_every_fixture_and_valid_name() {
    for fixture_name in ["default", "every-option", "no-replication"] {
        let app = fixture(fixture_name);
        let own_name = app.metadata.name.clone().unwrap_or_default();
        for app_name in [own_name.as_str(), "shop--eu", "a---b", "a-b--c9", "x"] {
            let mut app = app.clone();
            app.metadata.name = Some(app_name.to_string());
            let children = build_children(&app, &material(), &context()).expect("builds");
            let xml = children.config_map.data.as_ref().and_then(|d| d.get("server.xml")).expect("server.xml");
            if let Err(error) = roxmltree::Document::parse(xml) {
                panic!("{fixture_name} named {app_name}: server.xml is not well-formed XML: {error}\n{xml}");
            }
        }
    }
}

#[test]
fn server_xml_default_cluster_is_sync_delta_encrypted() {
    let xml = server_xml_of("default");
    let doc = roxmltree::Document::parse(&xml).expect("XML");
    let cluster = doc.descendants().find(|n| n.has_tag_name("Cluster")).expect("a Cluster");
    assert_eq!(cluster.attribute("channelSendOptions"), Some("6"), "use_ack,sync");
    let manager = doc.descendants().find(|n| n.has_tag_name("Manager")).expect("a Manager");
    assert_eq!(manager.attribute("className"), Some("org.apache.catalina.ha.session.DeltaManager"));
    assert_eq!(manager.attribute("stateTransferTimeout"), Some("60"));
    let membership = doc.descendants().find(|n| n.has_tag_name("Membership")).expect("a Membership");
    assert_eq!(membership.attribute("membershipProviderClassName"), Some("kubernetes"));
    let receiver = doc.descendants().find(|n| n.has_tag_name("Receiver")).expect("a Receiver");
    assert_eq!(receiver.attribute("port"), Some("4000"));
    assert_eq!(receiver.attribute("autoBind"), Some("1"), "exactly the assigned port");
    // Encrypt first, and Tomcat's defaults listed again because any
    // interceptor replaces them.
    assert_eq!(interceptors(&doc), ["EncryptInterceptor", "TcpFailureDetector", "MessageDispatchInterceptor"]);
    let encrypt = doc.descendants().find(|n| n.has_tag_name("Interceptor")).expect("interceptor");
    assert_eq!(encrypt.attribute("encryptionAlgorithm"), Some("AES/GCM/NoPadding"), "explicit algorithm");
    assert_eq!(encrypt.attribute("encryptionKey"), Some("${chomp:tribes.key}"), "the key from its file");
    for valve in ["ReplicationValve", "JvmRouteBinderValve"] {
        assert!(xml.contains(valve), "{valve}");
    }
    assert!(xml.contains("org.apache.catalina.ha.session.ClusterSessionListener"));
}

#[test]
fn server_xml_every_option() {
    let xml = server_xml_of("every-option");
    let doc = roxmltree::Document::parse(&xml).expect("XML");
    let cluster = doc.descendants().find(|n| n.has_tag_name("Cluster")).expect("a Cluster");
    assert_eq!(cluster.attribute("channelSendOptions"), Some("8"), "async");
    let manager = doc.descendants().find(|n| n.has_tag_name("Manager")).expect("a Manager");
    assert_eq!(manager.attribute("className"), Some("org.apache.catalina.ha.session.BackupManager"));
    let membership = doc.descendants().find(|n| n.has_tag_name("Membership")).expect("a Membership");
    assert_eq!(membership.attribute("membershipProviderClassName"), Some("dns"));
    assert_eq!(interceptors(&doc), ["TcpFailureDetector", "MessageDispatchInterceptor"], "no encryption");
    let ajp = doc.descendants().find(|n| n.attribute("protocol") == Some("AJP/1.3")).expect("AJP");
    assert_eq!(ajp.attribute("port"), Some("8010"));
    assert_eq!(ajp.attribute("packetSize"), Some("65536"));
}

#[test]
fn server_xml_without_replication_has_no_cluster() {
    let xml = server_xml_of("no-replication");
    let doc = roxmltree::Document::parse(&xml).expect("XML");
    assert!(!doc.descendants().any(|n| n.has_tag_name("Cluster")));
}

#[test]
fn key_material_only_in_the_secret() {
    for name in ["default", "every-option", "no-replication"] {
        let children = build_children(&fixture(name), &material(), &context()).expect("builds");
        let values = children.to_values().expect("json");
        for value in &values[1..] {
            let text = value.to_string();
            assert!(
                !text.contains(AJP_SECRET) && !text.contains(TRIBES_KEY),
                "{name}: key material in {}",
                value["kind"]
            );
        }
        assert_eq!(values[0]["kind"], "Secret");
        assert!(!format!("{:?}", material()).contains(AJP_SECRET), "Debug redacts");
    }
}

/// Secrets reach Tomcat as files of a projected volume, never as environment
/// variables (which `kubectl describe`, `/proc/<pid>/environ` and crash
/// reports show): no env var of any container refers to a Secret, and the
/// files the server.xml names are the ones the volume holds.
#[test]
fn secrets_reach_tomcat_as_files_not_environment_variables() {
    for name in ["default", "every-option", "no-replication", "http-backend"] {
        let app = fixture(name);
        let children = build_children(&app, &material(), &context()).expect("builds");
        let pod = children.stateful_set.spec.template.spec.as_ref().expect("pod spec");
        for container in &pod.containers {
            for var in container.env.iter().flatten() {
                let from_secret = var.value_from.as_ref().is_some_and(|v| v.secret_key_ref.is_some());
                assert!(!from_secret, "{name}: env {} of {} comes from a Secret", var.name, container.name);
            }
            assert!(container.env_from.is_none(), "{name}: envFrom");
        }
        let tomcat = &pod.containers[0];
        let env = |key: &str| tomcat.env.iter().flatten().find(|v| v.name == key).and_then(|v| v.value.clone());
        assert_eq!(env("SERVICE_BINDING_ROOT").as_deref(), Some(SESSION_NODE_BINDINGS_DIR), "{name}");
        let opts = env("CATALINA_OPTS").expect("CATALINA_OPTS");
        assert!(
            opts.contains("PROPERTY_SOURCE=org.apache.tomcat.util.digester.EnvironmentPropertySource,org.apache.tomcat.util.digester.ServiceBindingPropertySource"),
            "{name}: {opts}"
        );
        let mount = tomcat.volume_mounts.iter().flatten().find(|m| m.name == "bindings").expect("bindings mount");
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (SESSION_NODE_BINDINGS_DIR, Some(true)));
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "bindings").expect("bindings volume");
        let projected = volume.projected.as_ref().expect("projected");
        let files: Vec<(String, String, String)> = projected
            .sources
            .iter()
            .flatten()
            .filter_map(|s| s.secret.as_ref())
            .flat_map(|s| s.items.iter().flatten().map(|i| (s.name.clone(), i.key.clone(), i.path.clone())))
            .collect();
        let xml = server_xml_of(name);
        // each file exactly where the server.xml names it
        assert_eq!(
            files.iter().any(|(_, _, path)| path == "ajp/secret"),
            xml.contains("${chomp:ajp.secret}"),
            "{name}: the AJP secret file exactly when server.xml uses it: {files:?}"
        );
        assert_eq!(
            files.iter().any(|(_, _, path)| path == "tribes/key"),
            xml.contains("${chomp:tribes.key}"),
            "{name}: the Tribes key file exactly when server.xml uses it: {files:?}"
        );
        assert_eq!(projected.default_mode, Some(0o440), "{name}: read-only, owner and group");
    }
}

#[test]
fn every_child_is_owned_and_labelled() {
    let app = fixture("default");
    let children = build_children(&app, &material(), &context()).expect("builds");
    for value in children.to_values().expect("json") {
        let owners = &value["metadata"]["ownerReferences"];
        assert_eq!(owners[0]["uid"], "6f1c9a52-0d7e-4b8e-9b51-3f0f2a6c1d10", "{}", value["kind"]);
        assert_eq!(owners[0]["controller"], true);
        assert_eq!(value["metadata"]["labels"]["app.kubernetes.io/instance"], "shop");
        assert_eq!(value["metadata"]["labels"]["app.kubernetes.io/managed-by"], "clusterapp-operator");
        assert_eq!(value["metadata"]["namespace"], "store");
    }
}

/// The session nodes' selector of the fixtures' app `shop`.
const SHOP_NODE_SELECTOR: &str =
    "app.kubernetes.io/component=session-node,app.kubernetes.io/instance=shop,app.kubernetes.io/name=clusterapp";

/// The balancer container's arguments for `app`, joined by spaces.
fn balancer_args(app: &ClusterApp) -> String {
    let children = build_children(app, &material(), &context()).expect("builds");
    let container = &children.balancer_deployment.spec.template.spec.as_ref().expect("pod spec").containers[0];
    container.args.clone().unwrap_or_default().join(" ")
}

#[test]
fn balancer_runs_with_the_agreed_flags() {
    let app = fixture("every-option");
    let children = build_children(&app, &material(), &context()).expect("builds");
    let container = &children.balancer_deployment.spec.template.spec.as_ref().expect("pod spec").containers[0];
    let args = container.args.clone().unwrap_or_default().join(" ");
    assert_eq!(
        args,
        "balancer --kubernetes-service store/cart-nodes --listen 0.0.0.0:80 --admin-listen 0.0.0.0:9090 \
         --ajp-secret-file /etc/clusterapp/ajp/secret --packet-size 65536 --sticky-cookie CARTSESSION \
         --sticky-path-param cartsession --method bybusyness --drain-timeout 0s --no-failover --access-log \
         --kubernetes-peer-selector app.kubernetes.io/component=balancer,app.kubernetes.io/instance=cart,app.kubernetes.io/name=clusterapp \
         --move-follower-pause 2s \
         --kubernetes-pod-selector app.kubernetes.io/component=session-node,app.kubernetes.io/instance=cart,app.kubernetes.io/name=clusterapp \
         --rebalance-ramp 0s --tls-listen 0.0.0.0:443 --tls-cert-file /etc/clusterapp/tls/tls.crt --tls-key-file /etc/clusterapp/tls/tls.key \
         --tls-client-ca-file /etc/clusterapp/tls-client-ca/ca.crt --tls-require-client-cert"
    );
    assert_eq!(container.image.as_deref(), Some("registry.example/clusterapp:dev"));
    let default = build_children(&fixture("default"), &material(), &context()).expect("builds");
    let container = &default.balancer_deployment.spec.template.spec.as_ref().expect("pod spec").containers[0];
    assert_eq!(container.image.as_deref(), Some("ghcr.io/clusterapp/clusterapp:0.1.0"));
    assert!(!container.args.clone().unwrap_or_default().contains(&"--no-failover".to_string()));
    assert!(
        !container.args.clone().unwrap_or_default().contains(&"--access-log".to_string()),
        "access log off by default"
    );
    let args = container.args.clone().unwrap_or_default().join(" ");
    assert!(
        args.contains(&format!("--kubernetes-pod-selector {SHOP_NODE_SELECTOR} --rebalance-ramp 30s")),
        "rebalancing on by default, over 30 s; the Pod watch for leaving marks: {args}"
    );
    assert!(!args.contains("--move-follower-pause"), "DeltaManager renames atomically: no pause: {args}");
    assert!(
        args.contains(
            "--kubernetes-peer-selector app.kubernetes.io/component=balancer,app.kubernetes.io/instance=shop,app.kubernetes.io/name=clusterapp"
        ),
        "the replicas know each other: {args}"
    );
    let env = container.env.clone().unwrap_or_default();
    assert!(
        env.iter().any(|e| e.name == "POD_NAME"
            && e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str())
                == Some("metadata.name")),
        "the replica's own name: {env:?}"
    );
    let mut slow = fixture("default");
    slow.spec.balancer.rebalance.enabled = true;
    slow.spec.balancer.rebalance.ramp_seconds = 90;
    let args = balancer_args(&slow);
    assert!(args.contains(&format!("--kubernetes-pod-selector {SHOP_NODE_SELECTOR} --rebalance-ramp 90s")), "{args}");
    let mut dated = fixture("default");
    dated.spec.balancer.rebalance.enabled = true;
    dated.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("time"),
    ));
    let args = balancer_args(&dated);
    assert!(args.contains("--rebalance-after 1800000120"), "nodes of a starting app are no newcomers: {args}");
    let mut off = fixture("default");
    off.spec.balancer.rebalance.enabled = false;
    let args = balancer_args(&off);
    assert!(args.contains("--rebalance-ramp 0s"), "off: {args}");
    let mut unordered = fixture("default");
    unordered.spec.sessions.ordered_requests = false;
    let args = balancer_args(&unordered);
    assert!(args.contains("--rebalance-ramp 0s"), "parallel requests' writes could be lost in a move: {args}");
    let mut backup = fixture("default");
    backup.spec.sessions.replication = Replication::Backup;
    let args = balancer_args(&backup);
    assert!(args.contains("--rebalance-ramp 30s"), "backup: the new node fetches a moved session: {args}");
    let mut none = fixture("default");
    none.spec.sessions.replication = Replication::None;
    let args = balancer_args(&none);
    assert!(args.contains("--rebalance-ramp 0s"), "none: no copy to move to: {args}");
    let args = balancer_args(&off);
    assert!(args.contains("--drain-timeout 5s"), "half of the default drainSeconds (10): {args}");
    assert_eq!(
        [0, 1, 10, 15, 600].map(balancer_drain_timeout),
        ["0s", "500ms", "5s", "7500ms", "300s"].map(String::from),
        "the balancer lets go of a terminating node's sessions halfway through its preStop wait"
    );
}

/// The balancer's own command line, to check that what the operator
/// passes is something the balancer accepts.
#[derive(clap::Parser, Debug)]
struct BalancerCommandLine {
    #[command(flatten)]
    args: crate::balancer::BalancerArgs,
}

fn parse_balancer_args(children: &Children) -> crate::balancer::BalancerArgs {
    use clap::Parser;
    let container = &children.balancer_deployment.spec.template.spec.as_ref().expect("pod spec").containers[0];
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("balancer"));
    match BalancerCommandLine::try_parse_from(&args) {
        Ok(line) => line.args,
        Err(error) => panic!("the balancer rejects the operator's arguments {args:?}: {error}"),
    }
}

#[test]
fn the_balancer_accepts_the_operators_arguments() {
    for name in ["default", "every-option", "no-replication"] {
        parse_balancer_args(&build_children(&fixture(name), &material(), &context()).expect("builds"));
    }
    let every =
        parse_balancer_args(&build_children(&fixture("every-option"), &material(), &context()).expect("builds"));
    assert_eq!(every.tls_listen, Some("0.0.0.0:443".parse().expect("address")));
    assert!(every.tls_require_client_cert);
    assert_eq!(every.tls_client_ca_file.as_deref(), Some(std::path::Path::new("/etc/clusterapp/tls-client-ca/ca.crt")));
}

/// A child's JSON by kind (the first of that kind).
fn child<'a>(values: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    values
        .iter()
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn tls_adds_the_https_port_and_mounts_only_the_named_secrets() {
    let mut app = fixture("default");
    let plain = build_children(&app, &material(), &context()).expect("builds").to_values().expect("json");
    app.spec.balancer.tls = Some(crate::crd::BalancerTls {
        secret_name: "shop-tls".to_string(),
        port: 8443,
        client_ca_secret_name: None,
        require_client_certificate: false,
    });
    let children = build_children(&app, &material(), &context()).expect("builds");
    let args = parse_balancer_args(&children);
    assert_eq!(args.tls_cert_file.as_deref(), Some(std::path::Path::new("/etc/clusterapp/tls/tls.crt")));
    assert_eq!(args.tls_key_file.as_deref(), Some(std::path::Path::new("/etc/clusterapp/tls/tls.key")));
    assert!(args.tls_client_ca_file.is_none() && !args.tls_require_client_cert);
    let with_tls = children.to_values().expect("json");
    // Only the balancer's Deployment, Service and NetworkPolicy (which lets
    // the HTTPS port in) change; the session nodes (and their NetworkPolicy,
    // which does not select balancer pods) do not.
    let differing: Vec<_> = plain
        .iter()
        .zip(&with_tls)
        .filter(|(p, t)| p != t)
        .map(|(p, _)| format!("{} {}", p["kind"].as_str().unwrap_or(""), p["metadata"]["name"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(differing, ["Deployment shop-balancer", "Service shop", "NetworkPolicy shop-balancer"]);
    let policy = &child(&with_tls, "NetworkPolicy", "shop-balancer")["spec"]["ingress"][0]["ports"];
    let open: Vec<i64> = policy.as_array().expect("ports").iter().filter_map(|p| p["port"].as_i64()).collect();
    assert_eq!(open, [8080, 9090, 8443], "the balancer's ports, HTTPS included");
    let pod = &child(&with_tls, "Deployment", "shop-balancer")["spec"]["template"]["spec"];
    let ports = pod["containers"][0]["ports"].as_array().expect("ports");
    let ports: Vec<_> = ports.iter().map(|p| (p["name"].clone(), p["containerPort"].clone())).collect();
    assert_eq!(ports, [("http".into(), 8080.into()), ("https".into(), 8443.into()), ("admin".into(), 9090.into())]);
    let volumes: Vec<_> =
        pod["volumes"].as_array().expect("volumes").iter().map(|v| v["secret"]["secretName"].clone()).collect();
    assert_eq!(volumes, ["shop-secrets", "shop-tls"]);
    let service = child(&with_tls, "Service", "shop");
    let https = &service["spec"]["ports"][1];
    assert_eq!(
        (&https["name"], &https["port"], &https["targetPort"]),
        (&"https".into(), &8443.into(), &"https".into())
    );
}

#[test]
fn image_change_only_changes_the_stateful_set_template() {
    let app = fixture("default");
    let before = build_children(&app, &material(), &context()).expect("builds").to_values().expect("json");
    let mut changed = app.clone();
    changed.spec.image = "registry.example/shop:1.5".to_string();
    let after = build_children(&changed, &material(), &context()).expect("builds").to_values().expect("json");
    let differing: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).map(|(b, _)| b["kind"].clone()).collect();
    assert_eq!(differing, ["StatefulSet"]);
}

#[test]
fn missing_uid_is_an_error_not_a_panic() {
    let mut app = fixture("default");
    app.metadata.uid = None;
    assert_eq!(build_children(&app, &material(), &context()).err(), Some(BuildError::MissingUid));
    app.metadata.namespace = None;
    assert_eq!(build_children(&app, &material(), &context()).err(), Some(BuildError::MissingNamespace));
}
