//! Pure builders: one ClusterApp (plus the key material read from its
//! Secret) in, every desired child object out. No I/O here; each object is
//! built from scratch every reconcile and applied with server-side apply.

pub mod server_xml;

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecretProjection, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, SleepAction, TopologySpreadConstraint, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::{BALANCER_ADMIN_PORT, BackendProtocol, ClusterApp, Membership, Replication};
use crate::operator::children::{ApplyStage, ChildKind, ChildVisitor};
use crate::operator::names::{
    AJP_SECRET_KEY, AppNames, CLIENT_CA_KEY, COMPONENT_BALANCER, COMPONENT_SESSION_NODE, TLS_CERT_KEY,
    TLS_PRIVATE_KEY_KEY, TRIBES_KEY_KEY,
};
use server_xml::{BINDING_AJP_SECRET, BINDING_TRIBES_KEY, DEPLOY_DELAY_SECONDS, ENV_POD_IP, ENV_POD_NAME};

/// Time a session node's JVM may take from its start to the Engine's start
/// (server.xml parsed, cluster receiver open); see `stateful_set`.
const STARTUP_MARGIN_SECONDS: i32 = 20;

/// Annotation on the session node pod template: a hash of server.xml, so
/// that a changed server.xml rolls the nodes (Tomcat reads it at start only).
pub const CONFIG_HASH_ANNOTATION: &str = "clusterapp.io/server-xml-sha256";

/// Name of the session nodes' HTTP connector for the balancer
/// (`backendProtocol: http`) on the Pods and the Services (at most 15
/// characters, like every port name).
pub const BACKEND_HTTP_PORT_NAME: &str = "http-backend";

/// Where the balancer finds the AJP secret (`--ajp-secret-file`).
pub const BALANCER_AJP_SECRET_DIR: &str = "/etc/clusterapp/ajp";

/// Where the balancer finds its certificate and key (`spec.balancer.tls`):
/// the whole Secret volume, not a subPath, so that the kubelet's update of
/// a renewed Secret reaches the files (the balancer reloads them).
pub const BALANCER_TLS_DIR: &str = "/etc/clusterapp/tls";

/// How long a terminating balancer Pod keeps serving before SIGTERM (its
/// `preStop` sleep): longer than kube-proxy takes to drop its endpoint.
pub const BALANCER_PRE_STOP_SECONDS: i64 = 5;

/// Where the balancer finds the CA certificates of client certificates.
pub const BALANCER_TLS_CLIENT_CA_DIR: &str = "/etc/clusterapp/tls-client-ca";

/// Tomcat's system property that makes `${NAME}` in server.xml read
/// environment variables (the route, the pod IP) and then files under
/// `$SERVICE_BINDING_ROOT` (the secrets; see `server_xml`). Tomcat asks the
/// sources in this order.
const PROPERTY_SOURCES: &str = "-Dorg.apache.tomcat.util.digester.PROPERTY_SOURCE=\
    org.apache.tomcat.util.digester.EnvironmentPropertySource,\
    org.apache.tomcat.util.digester.ServiceBindingPropertySource";

/// Where a session node finds its secrets as files, one folder per binding
/// (`ajp/secret`, `tribes/key`): Tomcat's `SERVICE_BINDING_ROOT`.
pub const SESSION_NODE_BINDINGS_DIR: &str = "/etc/clusterapp/bindings";

/// uid/gid the containers run as: images such as the official tomcat one
/// default to root, so the user is set explicitly for `runAsNonRoot`.
const RUN_AS_USER: i64 = 1000;

/// What the operator is configured with (not part of the ClusterApp).
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// Image of the balancer when the ClusterApp names none.
    pub balancer_image: String,
}

/// Key material of the app's generated Secret. Values are hex text.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretMaterial {
    pub ajp_secret: String,
    pub tribes_key: String,
}

impl std::fmt::Debug for SecretMaterial {
    // Never print key material, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretMaterial(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("the ClusterApp has no namespace")]
    MissingNamespace,
    #[error("the ClusterApp has no uid yet (it was not read from the API server)")]
    MissingUid,
}

/// Every object one ClusterApp owns. A new field is listed in the registry,
/// [`Children::visit`](crate::operator::children), or nothing compiles.
#[derive(Clone, Debug)]
pub struct Children {
    pub secret: Secret,
    pub config_map: ConfigMap,
    pub peers_service: Service,
    pub nodes_service: Service,
    pub node_service_account: ServiceAccount,
    pub node_role: Role,
    pub node_role_binding: RoleBinding,
    pub stateful_set: StatefulSet,
    pub balancer_service_account: ServiceAccount,
    pub balancer_role: Role,
    pub balancer_role_binding: RoleBinding,
    pub balancer_deployment: Deployment,
    pub balancer_service: Service,
    pub pod_disruption_budget: PodDisruptionBudget,
    pub network_policy: NetworkPolicy,
    pub balancer_network_policy: NetworkPolicy,
}

impl Children {
    /// All children as JSON values (with `apiVersion` and `kind`, which
    /// k8s-openapi adds), in the registry's order (for golden files).
    pub fn to_values(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        struct Values(Vec<serde_json::Value>);
        impl ChildVisitor for Values {
            type Error = serde_json::Error;
            fn child<K: ChildKind>(&mut self, object: &K, _stage: ApplyStage) -> Result<(), Self::Error> {
                self.0.push(serde_json::to_value(object)?);
                Ok(())
            }
        }
        let mut values = Values(Vec::new());
        self.visit(&mut values)?;
        Ok(values.0)
    }
}

/// Hex SHA-256 of `text`.
pub fn sha256_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds every child of `app`.
pub fn build_children(
    app: &ClusterApp,
    material: &SecretMaterial,
    context: &BuildContext,
) -> Result<Children, BuildError> {
    let namespace = app.metadata.namespace.clone().ok_or(BuildError::MissingNamespace)?;
    let owner = app.controller_owner_ref(&()).ok_or(BuildError::MissingUid)?;
    let names = AppNames::new(&app.metadata.name.clone().unwrap_or_default());
    let parts = Parts { app, names, namespace, owner };
    let server_xml = server_xml::server_xml(&parts.names.app, &app.spec);
    Ok(Children {
        secret: parts.secret(material),
        config_map: parts.config_map(&server_xml),
        peers_service: parts.peers_service(),
        nodes_service: parts.nodes_service(),
        node_service_account: parts.service_account(&parts.names.node_account(), COMPONENT_SESSION_NODE),
        node_role: parts.role(&parts.names.node_account(), COMPONENT_SESSION_NODE, node_rules()),
        node_role_binding: parts.role_binding(&parts.names.node_account(), COMPONENT_SESSION_NODE),
        stateful_set: parts.stateful_set(&sha256_hex(&server_xml)),
        balancer_service_account: parts.service_account(&parts.names.balancer(), COMPONENT_BALANCER),
        balancer_role: parts.role(&parts.names.balancer(), COMPONENT_BALANCER, balancer_rules()),
        balancer_role_binding: parts.role_binding(&parts.names.balancer(), COMPONENT_BALANCER),
        balancer_deployment: parts.balancer_deployment(context),
        balancer_service: parts.balancer_service(),
        pod_disruption_budget: parts.pod_disruption_budget(),
        network_policy: parts.network_policy(),
        balancer_network_policy: parts.balancer_network_policy(),
    })
}

/// The session nodes' Role: Tomcat's Kubernetes membership lists the pods
/// of its namespace (filtered by KUBERNETES_LABELS), nothing else.
pub fn node_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["pods".to_string()]),
        verbs: vec!["list".to_string()],
        ..Default::default()
    }]
}

/// How long after a ClusterApp's creation its nodes count as starting up:
/// rebalancing moves sessions only to nodes that became ready later.
pub const REBALANCE_START_GRACE_SECONDS: i64 = 120;

/// How long a balancer replica that does not lead a moving session holds
/// its first request with `replication: backup` (`--move-follower-pause`):
/// BackupManager renames a session in steps across the cluster, and the
/// leading replica's first request should be answered by then (300-600 ms
/// at a kill -9 on the test bed).
pub const BACKUP_MOVE_FOLLOWER_PAUSE: &str = "2s";

/// The balancer's Role: it follows the EndpointSlices of the nodes' headless
/// Service (ready / serving / terminating) with a watch, the nodes' Pods
/// for the time each became ready (the clock every balancer replica shares
/// for rebalancing) and their leaving marks, and its own Pods (which
/// replicas are ready: they share out the lead of moving sessions);
/// read-only, its own namespace only.
pub fn balancer_rules() -> Vec<PolicyRule> {
    vec![
        PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".to_string()]),
            resources: Some(vec!["endpointslices".to_string()]),
            verbs: vec!["list".to_string(), "watch".to_string()],
            ..Default::default()
        },
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".to_string()]),
            verbs: vec!["list".to_string(), "watch".to_string()],
            ..Default::default()
        },
    ]
}

/// The AJP secret the nodes and the balancer use: the user's, or ours.
pub fn ajp_secret_selector(app: &ClusterApp) -> SecretKeySelector {
    let names = AppNames::new(app.metadata.name.as_deref().unwrap_or_default());
    match &app.spec.ajp.secret_ref {
        Some(reference) => {
            SecretKeySelector { name: reference.name.clone(), key: reference.key.clone(), optional: None }
        }
        None => SecretKeySelector { name: names.secret(), key: AJP_SECRET_KEY.to_string(), optional: None },
    }
}

struct Parts<'a> {
    app: &'a ClusterApp,
    names: AppNames,
    namespace: String,
    owner: OwnerReference,
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: number,
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

fn service_port(name: &str, number: i32, target: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port: number,
        target_port: Some(IntOrString::String(target.to_string())),
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.to_string()), ..Default::default() }
}

fn env_field(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field_path.to_string(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Key `key` of Secret `secret` as the file `<binding>/<name>` of a
/// projected bindings volume.
fn secret_projection(secret: &str, key: &str, (binding, name): (&str, &str)) -> VolumeProjection {
    VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.to_string(),
            items: Some(vec![KeyToPath {
                key: key.to_string(),
                path: format!("{binding}/{name}"),
                ..Default::default()
            }]),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume { name: name.to_string(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.to_string(), mount_path: path.to_string(), ..Default::default() }
}

fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { read_only: Some(true), ..mount(name, path) }
}

/// A volume of the given keys of Secret `secret`, each a file of its own
/// name, readable by the container's user only.
fn secret_volume(name: &str, secret: &str, keys: &[&str]) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            items: Some(
                keys.iter()
                    .map(|key| KeyToPath { key: key.to_string(), path: key.to_string(), ..Default::default() })
                    .collect(),
            ),
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How long the balancer keeps a terminating node's sticky sessions: half
/// its `preStop` wait (`drainSeconds`). The sessions then fail over while
/// the node still serves, so it is idle for the other half before SIGTERM
/// (once Tomcat pauses its connectors, a request arriving on a kept-alive
/// AJP connection is dropped unread, and a sent request is never replayed).
/// 0 without a wait.
pub fn balancer_drain_timeout(drain_seconds: i32) -> String {
    let millis = i64::from(drain_seconds.max(0)) * 500;
    if millis % 1000 == 0 { format!("{}s", millis / 1000) } else { format!("{millis}ms") }
}

fn http_probe(path: &str, port_name: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(port_name.to_string()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs.iter().map(|(k, v)| (k.to_string(), Quantity(v.to_string()))).collect()
}

/// A session node's resources when the ClusterApp names none (documented on
/// `spec.resources`): requests only, so the scheduler counts Tomcat and a
/// cluster admin's quota sees it; no limit, because a JVM sizes its heap
/// from the limit and a limit without matching `javaOpts` gets OOM-killed.
fn default_session_node_resources() -> ResourceRequirements {
    ResourceRequirements { requests: Some(quantities(&[("cpu", "250m"), ("memory", "768Mi")])), ..Default::default() }
}

/// The balancer's resources when the ClusterApp names none (documented on
/// `spec.balancer.resources`): it holds no sessions, so a memory limit is
/// safe and stops a leak from taking the node down with it.
fn default_balancer_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(quantities(&[("cpu", "100m"), ("memory", "64Mi")])),
        limits: Some(quantities(&[("memory", "256Mi")])),
        ..Default::default()
    }
}

/// Spread a component's Pods over the cluster's nodes (one per node while
/// there are enough), as a preference only, so a single-node cluster still
/// schedules all of them: a node that dies then takes one session node, not
/// several (with `replication: all` every other node still has the
/// sessions).
fn spread_over_nodes(labels: &BTreeMap<String, String>) -> Vec<TopologySpreadConstraint> {
    vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".to_string(),
        when_unsatisfiable: "ScheduleAnyway".to_string(),
        label_selector: Some(LabelSelector { match_labels: Some(labels.clone()), ..Default::default() }),
        ..Default::default()
    }]
}

/// Non-root, no privilege escalation, no capabilities, read-only root.
fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_string()]), ..Default::default() }),
        ..Default::default()
    }
}

fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_string(), ..Default::default() }),
        ..Default::default()
    }
}

impl Parts<'_> {
    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    fn secret(&self, material: &SecretMaterial) -> Secret {
        Secret {
            metadata: self.meta(self.names.secret(), self.names.common_labels()),
            type_: Some("Opaque".to_string()),
            data: Some(BTreeMap::from([
                (AJP_SECRET_KEY.to_string(), ByteString(material.ajp_secret.as_bytes().to_vec())),
                (TRIBES_KEY_KEY.to_string(), ByteString(material.tribes_key.as_bytes().to_vec())),
            ])),
            ..Default::default()
        }
    }

    fn config_map(&self, server_xml: &str) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(self.names.config_map(), self.names.component_labels(COMPONENT_SESSION_NODE)),
            data: Some(BTreeMap::from([("server.xml".to_string(), server_xml.to_string())])),
            ..Default::default()
        }
    }

    /// The session nodes' port the balancer talks to, by name and number:
    /// the AJP connector, or with `backendProtocol: http` the HTTP connector
    /// for the balancer. The balancer finds it by this name in the
    /// EndpointSlices (`--kubernetes-port-name`).
    fn backend_port(&self) -> (&'static str, i32) {
        let spec = &self.app.spec;
        match spec.balancer.backend_protocol {
            BackendProtocol::Ajp => ("ajp", spec.ajp.port),
            BackendProtocol::Http => (BACKEND_HTTP_PORT_NAME, spec.balancer.backend_http_port),
        }
    }

    fn node_ports(&self) -> Vec<ServicePort> {
        let spec = &self.app.spec;
        let (backend_name, backend_port) = self.backend_port();
        vec![
            service_port(backend_name, backend_port, backend_name),
            service_port("tribes", spec.sessions.receiver_port, "tribes"),
            service_port("http", spec.http_port, "http"),
        ]
    }

    fn peers_service(&self) -> Service {
        Service {
            metadata: self.meta(self.names.peers_service(), self.names.component_labels(COMPONENT_SESSION_NODE)),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".to_string()),
                // Peers must find a joining node before it is ready: it
                // receives replicated sessions during its state transfer.
                publish_not_ready_addresses: Some(true),
                selector: Some(self.names.selector_labels(COMPONENT_SESSION_NODE)),
                ports: Some(self.node_ports()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn nodes_service(&self) -> Service {
        Service {
            metadata: self.meta(self.names.nodes_service(), self.names.component_labels(COMPONENT_SESSION_NODE)),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".to_string()),
                // The balancer's member list: readiness matters here.
                publish_not_ready_addresses: Some(false),
                selector: Some(self.names.selector_labels(COMPONENT_SESSION_NODE)),
                ports: Some({
                    let (name, number) = self.backend_port();
                    vec![service_port(name, number, name)]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn service_account(&self, name: &str, component: &str) -> ServiceAccount {
        ServiceAccount {
            metadata: self.meta(name.to_string(), self.names.component_labels(component)),
            ..Default::default()
        }
    }

    fn role(&self, name: &str, component: &str, rules: Vec<PolicyRule>) -> Role {
        Role { metadata: self.meta(name.to_string(), self.names.component_labels(component)), rules: Some(rules) }
    }

    fn role_binding(&self, name: &str, component: &str) -> RoleBinding {
        RoleBinding {
            metadata: self.meta(name.to_string(), self.names.component_labels(component)),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".to_string()),
                kind: "Role".to_string(),
                name: name.to_string(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".to_string(),
                name: name.to_string(),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            }]),
        }
    }

    fn stateful_set(&self, server_xml_hash: &str) -> StatefulSet {
        let spec = &self.app.spec;
        let sessions = &spec.sessions;
        let base = spec.catalina_base.trim_end_matches('/');

        let mut catalina_opts = PROPERTY_SOURCES.to_string();
        if let Some(extra) = spec.java_opts.as_deref().filter(|o| !o.trim().is_empty()) {
            catalina_opts.push(' ');
            catalina_opts.push_str(extra.trim());
        }
        let mut env = vec![
            env_field(ENV_POD_NAME, "metadata.name"),
            env_field(ENV_POD_IP, "status.podIP"),
            // Tomcat's Kubernetes membership reads the namespace from here,
            // not from the ServiceAccount files.
            env_field("KUBERNETES_NAMESPACE", "metadata.namespace"),
            // The app's session nodes except those leaving (terminating).
            env_value("KUBERNETES_LABELS", &self.names.tribes_member_selector()),
            // Not a secret: where the secret files are.
            env_value("SERVICE_BINDING_ROOT", SESSION_NODE_BINDINGS_DIR),
            env_value("CATALINA_OPTS", &catalina_opts),
        ];
        if sessions.membership == Membership::Dns {
            env.push(env_value(
                "DNS_MEMBERSHIP_SERVICE_NAME",
                &format!("{}.{}.svc", self.names.peers_service(), self.namespace),
            ));
        }
        // The secrets as files, each only where the server.xml uses it (a
        // secret a pod does not need stays out of it): the AJP secret (the
        // user's Secret or ours) with the AJP backend, and the Tribes key
        // (always ours) where the cluster encrypts (only a replicating node
        // has a cluster).
        let mut binding_sources = Vec::new();
        if spec.balancer.backend_protocol == BackendProtocol::Ajp {
            let ajp_secret = ajp_secret_selector(self.app);
            binding_sources.push(secret_projection(&ajp_secret.name, &ajp_secret.key, BINDING_AJP_SECRET));
        }
        if sessions.encryption && sessions.replication != Replication::None {
            binding_sources.push(secret_projection(&self.names.secret(), TRIBES_KEY_KEY, BINDING_TRIBES_KEY));
        }

        // A starting node blocks until it has received every session (up to
        // stateTransferTimeout) before its application answers; the startup
        // probe waits that long plus two minutes of ordinary Tomcat start.
        let startup_budget = sessions.state_transfer_timeout_seconds + 120;
        let startup_period = 5;
        let startup_failures = (startup_budget + startup_period - 1) / startup_period;
        // With replication the applications are deployed only
        // DEPLOY_DELAY_SECONDS after the Engine started (server_xml: peers
        // must know the node before its state transfer). Before that the
        // connectors are open, the Host is empty and HealthCheckValve answers
        // UP, so the first startup probe waits the delay plus the JVM's start
        // up to the Engine; from the deployment on HealthCheckValve answers
        // DOWN until the application (and its state transfer) has started.
        let startup_delay = if spec.sessions.replication == Replication::None {
            0
        } else {
            DEPLOY_DELAY_SECONDS + STARTUP_MARGIN_SECONDS
        };

        let container = Container {
            name: "tomcat".to_string(),
            image: Some(spec.image.clone()),
            ports: Some({
                let (backend_name, backend_port) = self.backend_port();
                vec![
                    port("http", spec.http_port),
                    port(backend_name, backend_port),
                    port("tribes", sessions.receiver_port),
                ]
            }),
            env: Some(env),
            resources: Some(spec.resources.clone().unwrap_or_else(default_session_node_resources)),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "server-xml".to_string(),
                    mount_path: format!("{base}/conf/server.xml"),
                    sub_path: Some("server.xml".to_string()),
                    read_only: Some(true),
                    ..Default::default()
                },
                mount("logs", &format!("{base}/logs")),
                mount("temp", &format!("{base}/temp")),
                mount("work", &format!("{base}/work")),
                // Tomcat creates conf/Catalina/localhost at start.
                mount("conf-catalina", &format!("{base}/conf/Catalina")),
                read_only_mount("bindings", SESSION_NODE_BINDINGS_DIR),
            ]),
            startup_probe: Some(Probe {
                initial_delay_seconds: (startup_delay > 0).then_some(startup_delay),
                ..http_probe("/health", "http", startup_period, startup_failures)
            }),
            readiness_probe: Some(http_probe("/health", "http", 5, 3)),
            liveness_probe: Some(http_probe("/health", "http", 10, 6)),
            // The drain: the pod is already terminating (the balancer sees
            // its endpoint `serving` but `terminating` and stops sending it new
            // sessions) while Tomcat still serves the sticky ones — for the
            // first half of the wait; then the balancer moves them to other
            // nodes (`--drain-timeout`), so the node is idle at SIGTERM.
            lifecycle: (spec.drain_seconds > 0).then(|| Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction { seconds: i64::from(spec.drain_seconds) }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            security_context: Some(container_security_context()),
            // Tomcat writes no termination message file: after a failure the
            // kubelet keeps the last lines of its log instead, which the
            // status quotes when the node crash-loops (NodesCrashLooping).
            termination_message_policy: Some("FallbackToLogsOnError".to_string()),
            ..Default::default()
        };

        let mut template_labels = self.names.component_labels(COMPONENT_SESSION_NODE);
        template_labels.extend(self.names.selector_labels(COMPONENT_SESSION_NODE));
        StatefulSet {
            metadata: self.meta(self.names.stateful_set(), self.names.component_labels(COMPONENT_SESSION_NODE)),
            spec: StatefulSetSpec {
                replicas: Some(spec.replicas),
                service_name: Some(self.names.peers_service()),
                selector: LabelSelector {
                    match_labels: Some(self.names.selector_labels(COMPONENT_SESSION_NODE)),
                    ..Default::default()
                },
                // One node at a time: two nodes starting together can stall
                // each other's state transfer; scale-down also goes one by one.
                pod_management_policy: Some("OrderedReady".to_string()),
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some("RollingUpdate".to_string()),
                    rolling_update: Some(RollingUpdateStatefulSetStrategy { partition: Some(0), ..Default::default() }),
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(template_labels),
                        annotations: Some(BTreeMap::from([(
                            CONFIG_HASH_ANNOTATION.to_string(),
                            server_xml_hash.to_string(),
                        )])),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        service_account_name: Some(self.names.node_account()),
                        // Only Kubernetes membership talks to the API.
                        automount_service_account_token: Some(sessions.membership == Membership::Kubernetes),
                        termination_grace_period_seconds: Some(i64::from(spec.drain_seconds) + 30),
                        security_context: Some(pod_security_context()),
                        topology_spread_constraints: Some(spread_over_nodes(
                            &self.names.selector_labels(COMPONENT_SESSION_NODE),
                        )),
                        containers: vec![container],
                        volumes: Some(vec![
                            Volume {
                                name: "server-xml".to_string(),
                                config_map: Some(ConfigMapVolumeSource {
                                    name: self.names.config_map(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            },
                            empty_dir("logs"),
                            empty_dir("temp"),
                            empty_dir("work"),
                            empty_dir("conf-catalina"),
                            Volume {
                                name: "bindings".to_string(),
                                projected: Some(ProjectedVolumeSource {
                                    sources: Some(binding_sources),
                                    // owner and fsGroup may read, nobody writes
                                    default_mode: Some(0o440),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            },
                        ]),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn balancer_deployment(&self, context: &BuildContext) -> Deployment {
        let spec = &self.app.spec;
        let balancer = &spec.balancer;
        let mut args = vec![
            "balancer".to_string(),
            "--kubernetes-service".to_string(),
            format!("{}/{}", self.namespace, self.names.nodes_service()),
            "--listen".to_string(),
            format!("0.0.0.0:{}", balancer.port),
            "--admin-listen".to_string(),
            format!("0.0.0.0:{BALANCER_ADMIN_PORT}"),
        ];
        let mut volume_mounts = Vec::new();
        let mut volumes = Vec::new();
        match balancer.backend_protocol {
            BackendProtocol::Ajp => {
                let ajp_secret = ajp_secret_selector(self.app);
                args.extend([
                    "--ajp-secret-file".to_string(),
                    format!("{BALANCER_AJP_SECRET_DIR}/secret"),
                    "--packet-size".to_string(),
                    spec.ajp.packet_size.to_string(),
                ]);
                volume_mounts.push(read_only_mount("ajp-secret", BALANCER_AJP_SECRET_DIR));
                volumes.push(Volume {
                    name: "ajp-secret".to_string(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(ajp_secret.name),
                        items: Some(vec![KeyToPath {
                            key: ajp_secret.key,
                            path: "secret".to_string(),
                            ..Default::default()
                        }]),
                        default_mode: Some(0o400),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            BackendProtocol::Http => {
                args.extend([
                    "--backend-protocol".to_string(),
                    BackendProtocol::Http.as_flag().to_string(),
                    "--kubernetes-port-name".to_string(),
                    BACKEND_HTTP_PORT_NAME.to_string(),
                ]);
            }
        }
        args.extend([
            "--sticky-cookie".to_string(),
            spec.sessions.cookie_name.clone(),
            "--sticky-path-param".to_string(),
            spec.sessions.path_parameter.clone(),
            "--method".to_string(),
            balancer.method.as_flag().to_string(),
            "--drain-timeout".to_string(),
            balancer_drain_timeout(spec.drain_seconds),
        ]);
        if !balancer.failover {
            args.push("--no-failover".to_string());
        }
        if balancer.access_log {
            args.push("--access-log".to_string());
        }
        // Its own Pods: one ready replica leads each moving session, and
        // with BackupManager the others hold back its first request.
        args.extend(["--kubernetes-peer-selector".to_string(), self.names.balancer_selector()]);
        if spec.sessions.replication == Replication::Backup {
            args.extend(["--move-follower-pause".to_string(), BACKUP_MOVE_FOLLOWER_PAUSE.to_string()]);
        }
        // The nodes' Pods give the leaving marks (a node a scale-down removes
        // takes no failing-over session) and the Ready times every replica
        // shares (rebalancing).
        args.extend(["--kubernetes-pod-selector".to_string(), self.names.session_node_selector()]);
        // Moving a session needs its data on the new node: replicated
        // (`none`: the new node has no copy) with every acknowledged write
        // (`orderedRequests`: otherwise parallel requests' changes can reach
        // it in reverse order).
        if balancer.rebalance.enabled && spec.sessions.replicates_in_order() {
            args.extend(["--rebalance-ramp".to_string(), format!("{}s", balancer.rebalance.ramp_seconds)]);
            // The nodes of a new app start one after another: they are no
            // newcomers to each other, and its first sessions stay put.
            if let Some(created) = &self.app.metadata.creation_timestamp {
                let after = created.0.as_second().saturating_add(REBALANCE_START_GRACE_SECONDS).max(0);
                args.extend(["--rebalance-after".to_string(), after.to_string()]);
            }
        } else {
            args.extend(["--rebalance-ramp".to_string(), "0s".to_string()]);
        }
        let mut ports = vec![port("http", balancer.port)];
        // HTTPS: the Secrets are mounted, not copied into the template, so a
        // renewed certificate changes no template (the pods do not roll; the
        // balancer reloads the files) while a changed `tls` setting does.
        if let Some(tls) = &balancer.tls {
            args.extend([
                "--tls-listen".to_string(),
                format!("0.0.0.0:{}", tls.port),
                "--tls-cert-file".to_string(),
                format!("{BALANCER_TLS_DIR}/{TLS_CERT_KEY}"),
                "--tls-key-file".to_string(),
                format!("{BALANCER_TLS_DIR}/{TLS_PRIVATE_KEY_KEY}"),
            ]);
            ports.push(port("https", tls.port));
            volume_mounts.push(read_only_mount("tls", BALANCER_TLS_DIR));
            volumes.push(secret_volume("tls", &tls.secret_name, &[TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY]));
            if let Some(client_ca) = &tls.client_ca_secret_name {
                args.extend([
                    "--tls-client-ca-file".to_string(),
                    format!("{BALANCER_TLS_CLIENT_CA_DIR}/{CLIENT_CA_KEY}"),
                ]);
                if tls.require_client_certificate {
                    args.push("--tls-require-client-cert".to_string());
                }
                volume_mounts.push(read_only_mount("tls-client-ca", BALANCER_TLS_CLIENT_CA_DIR));
                volumes.push(secret_volume("tls-client-ca", client_ca, &[CLIENT_CA_KEY]));
            }
        }
        ports.push(port("admin", BALANCER_ADMIN_PORT));
        let container = Container {
            name: "balancer".to_string(),
            image: Some(balancer.image.clone().unwrap_or_else(|| context.balancer_image.clone())),
            args: Some(args),
            // POD_NAME: the replica's own name among its peers.
            env: Some(vec![env_value("LOG_FORMAT", "json"), env_field(ENV_POD_NAME, "metadata.name")]),
            ports: Some(ports),
            resources: Some(balancer.resources.clone().unwrap_or_else(default_balancer_resources)),
            volume_mounts: Some(volume_mounts),
            readiness_probe: Some(http_probe("/readyz", "admin", 5, 2)),
            liveness_probe: Some(http_probe("/healthz", "admin", 10, 3)),
            // The balancer closes its listener at SIGTERM. Until every
            // kube-proxy has dropped the terminating Pod from the Service
            // (a second or two after the Pod is marked terminating), new
            // connections still arrive: keep serving for that long first.
            // Seen on real nodes: a drain refused connections without it.
            lifecycle: Some(Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction { seconds: BALANCER_PRE_STOP_SECONDS }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            security_context: Some(container_security_context()),
            ..Default::default()
        };
        let mut template_labels = self.names.component_labels(COMPONENT_BALANCER);
        template_labels.extend(self.names.selector_labels(COMPONENT_BALANCER));
        Deployment {
            metadata: self.meta(self.names.balancer(), self.names.component_labels(COMPONENT_BALANCER)),
            spec: DeploymentSpec {
                replicas: Some(balancer.replicas),
                selector: LabelSelector {
                    match_labels: Some(self.names.selector_labels(COMPONENT_BALANCER)),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: Some(template_labels), ..Default::default() }),
                    spec: Some(PodSpec {
                        service_account_name: Some(self.names.balancer()),
                        automount_service_account_token: Some(true),
                        security_context: Some(pod_security_context()),
                        topology_spread_constraints: Some(spread_over_nodes(
                            &self.names.selector_labels(COMPONENT_BALANCER),
                        )),
                        containers: vec![container],
                        volumes: Some(volumes),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn balancer_service(&self) -> Service {
        let balancer = &self.app.spec.balancer;
        Service {
            metadata: self.meta(self.names.balancer_service(), self.names.component_labels(COMPONENT_BALANCER)),
            spec: Some(ServiceSpec {
                type_: Some(balancer.service.type_.as_str().to_string()),
                selector: Some(self.names.selector_labels(COMPONENT_BALANCER)),
                ports: Some(self.balancer_service_ports()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn balancer_service_ports(&self) -> Vec<ServicePort> {
        let balancer = &self.app.spec.balancer;
        let mut ports = vec![service_port("http", balancer.port, "http")];
        if let Some(tls) = &balancer.tls {
            ports.push(service_port("https", tls.port, "https"));
        }
        ports
    }

    fn pod_disruption_budget(&self) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: self.meta(self.names.node_policy(), self.names.component_labels(COMPONENT_SESSION_NODE)),
            spec: Some(PodDisruptionBudgetSpec {
                // A drain takes one node at a time; its sessions live on in
                // the others.
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(self.names.selector_labels(COMPONENT_SESSION_NODE)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn network_policy(&self) -> NetworkPolicy {
        let spec = &self.app.spec;
        let from = |component: &str| NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(self.names.selector_labels(component)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let tcp = |number: i32| NetworkPolicyPort {
            port: Some(IntOrString::Int(number)),
            protocol: Some("TCP".to_string()),
            ..Default::default()
        };
        NetworkPolicy {
            metadata: self.meta(self.names.node_policy(), self.names.component_labels(COMPONENT_SESSION_NODE)),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(self.names.selector_labels(COMPONENT_SESSION_NODE)),
                    ..Default::default()
                }),
                policy_types: Some(vec!["Ingress".to_string()]),
                ingress: Some(vec![
                    // AJP carries authenticated requests: only our balancer.
                    // With the HTTP backend this rule is all that keeps
                    // forged X-Forwarded-*/SSL_* headers away from the
                    // connector whose valves believe them.
                    NetworkPolicyIngressRule {
                        from: Some(vec![from(COMPONENT_BALANCER)]),
                        ports: Some(vec![tcp(self.backend_port().1)]),
                    },
                    // Session replication and HTTP (health) only among peers.
                    NetworkPolicyIngressRule {
                        from: Some(vec![from(COMPONENT_SESSION_NODE)]),
                        ports: Some(vec![tcp(spec.sessions.receiver_port), tcp(spec.http_port)]),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    /// The balancer Pods are the app's front door: anyone may reach the
    /// ports they serve (HTTP, HTTPS when on, the admin port with health,
    /// metrics and the status page), nothing else.
    fn balancer_network_policy(&self) -> NetworkPolicy {
        let balancer = &self.app.spec.balancer;
        let mut ports = vec![balancer.port, BALANCER_ADMIN_PORT];
        if let Some(tls) = &balancer.tls {
            ports.push(tls.port);
        }
        NetworkPolicy {
            metadata: self.meta(self.names.balancer_policy(), self.names.component_labels(COMPONENT_BALANCER)),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(self.names.selector_labels(COMPONENT_BALANCER)),
                    ..Default::default()
                }),
                policy_types: Some(vec!["Ingress".to_string()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(
                        ports
                            .into_iter()
                            .map(|number| NetworkPolicyPort {
                                port: Some(IntOrString::Int(number)),
                                protocol: Some("TCP".to_string()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }]),
                ..Default::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests;
