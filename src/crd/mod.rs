//! The `ClusterApp` API (`clusterapp.io/v1alpha1`).
//!
//! The CRD in `crds/clusterapp.yaml` is generated from these types
//! (`clusterapp crd`); a test fails when the two differ. Every field carries a
//! description so that `kubectl explain clusterapp.spec.sessions` helps, and
//! every rule a user can break is a CEL rule with a message of our own, so the
//! API server rejects a bad object before the operator ever sees it.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every clusterapp resource.
pub const GROUP: &str = "clusterapp.io";

/// Container port of the balancer's admin server (metrics, health); the
/// balancer's traffic port must differ from it.
pub const BALANCER_ADMIN_PORT: i32 = 9090;

/// Label the operator sets to `true` on a session node pod that is leaving:
/// it terminates, or the replica count the operator applied removes it. The
/// nodes' Tomcat membership selector leaves such pods out, and the balancers
/// send them no new and no failing-over sessions (their own sessions stay
/// until they terminate). The operator owns it: it also removes it from a
/// pod that a larger count keeps again.
pub const LABEL_LEAVING: &str = "clusterapp.io/leaving";

/// Whether `pod` carries the leaving mark ([`LABEL_LEAVING`]`=true`): what
/// the operator sets and the balancers read.
pub fn pod_is_leaving(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata.labels.as_ref().and_then(|l| l.get(LABEL_LEAVING)).map(String::as_str) == Some("true")
}

/// The rule every port field carries.
const PORT_RULE: &str = "self >= 1 && self <= 65535";
const PORT_MESSAGE: &str = "must be a TCP port between 1 and 65535";

/// A Secret's name: a lowercase DNS subdomain (with a 253 character limit
/// on the field).
const SECRET_NAME_RULE: &str = "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";

/// RFC 9110 `token`: what a cookie name or a path parameter name may contain.
const HTTP_TOKEN_RULE: &str = "self.matches('^[!#$%&*+.^_`|~0-9A-Za-z-]+$')";

/// A Tomcat web application run as a cluster of session nodes with sticky,
/// replicated HTTP sessions behind clusterapp's AJP load balancer.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "clusterapp.io",
    version = "v1alpha1",
    kind = "ClusterApp",
    namespaced,
    shortname = "capp",
    status = "ClusterAppStatus",
    derive = "PartialEq",
    doc = "A Tomcat web application run as a cluster with sticky, replicated HTTP sessions behind an AJP load balancer.",
    scale(spec_replicas_path = ".spec.replicas", status_replicas_path = ".status.replicas", label_selector_path = ".status.selector"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready", description = "Ready session nodes out of the desired number"),
    printcolumn(name = "Routes", type_ = "string", json_path = ".status.routes", description = "Routes (jvmRoute) of the session nodes"),
    printcolumn(name = "Sessions", type_ = "string", json_path = ".status.sessions", description = "Sessions per session node over the last 2 minutes, in node order (balancer estimates)"),
    printcolumn(name = "Replication", type_ = "string", json_path = ".spec.sessions.replication", description = "How sessions are replicated"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 40").message("metadata.name must be a DNS label of at most 40 characters (lowercase letters, digits and '-', starting with a letter): it names the StatefulSet, its pods and the Services"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.httpPort != self.ajp.port && self.httpPort != self.sessions.receiverPort && self.ajp.port != self.sessions.receiverPort").message("httpPort, ajp.port and sessions.receiverPort must be three different ports: every session node binds all of them"))]
#[x_kube(validation = Rule::new("self.balancer.backendProtocol != 'http' || (self.balancer.backendHttpPort != self.httpPort && self.balancer.backendHttpPort != self.sessions.receiverPort)").message("balancer.backendHttpPort must differ from httpPort and sessions.receiverPort: with backendProtocol http every session node binds all of them"))]
pub struct ClusterAppSpec {
    /// Number of session nodes (Tomcat pods). Each node `<name>-N` gets the
    /// route (jvmRoute) `<name>-N`. Served by the scale subresource, so
    /// `kubectl scale` and a HorizontalPodAutoscaler work.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must be 0 or more"))]
    pub replicas: i32,

    /// Container image of the session nodes: a Tomcat (10.1 or later) image
    /// that holds the application, which must be marked `<distributable/>`.
    #[x_kube(validation = Rule::new("size(self) > 0").message("image must name a Tomcat-based container image"))]
    #[schemars(length(max = 512))]
    pub image: String,

    /// `CATALINA_BASE` inside the image: the generated server.xml is mounted
    /// at `<catalinaBase>/conf/server.xml`, and `logs`, `temp` and `work`
    /// below it are writable scratch space. `/usr/local/tomcat` in the
    /// official tomcat image, `/var/lib/tomcat10` in Debian's tomcat10.
    #[serde(default = "default_catalina_base")]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.contains('..')").message("catalinaBase must be an absolute path without '..'"))]
    #[schemars(length(max = 256))]
    pub catalina_base: String,

    /// Port of Tomcat's HTTP connector on every session node. It serves the
    /// health endpoint the probes use; user traffic goes through the balancer.
    #[serde(default = "default_http_port")]
    #[x_kube(validation = Rule::new(PORT_RULE).message(PORT_MESSAGE))]
    pub http_port: i32,

    /// Extra JVM options for the session nodes, appended to `CATALINA_OPTS`
    /// (for example `-Xmx512m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub java_opts: Option<String>,

    /// Seconds a leaving session node keeps serving after Kubernetes asks it
    /// to stop (a `preStop` wait), so that the balancer sees it draining and
    /// stops sending it new sessions before it goes away. It serves its own
    /// sessions for the first half of this time; then the balancer moves
    /// them to other nodes (they are replicated), so the node is idle when
    /// Tomcat stops. 0: no wait, its sessions move at once.
    #[serde(default = "default_drain_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 600").message("drainSeconds must be between 0 and 600"))]
    pub drain_seconds: i32,

    /// CPU and memory for each session node container. Unset: requests of
    /// 250m CPU and 768Mi memory and no limits (a JVM sizes its heap from
    /// the memory limit, so set one together with your -Xmx or
    /// -XX:MaxRAMPercentage in `javaOpts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// How HTTP sessions are shared between the session nodes.
    #[serde(default)]
    pub sessions: Sessions,

    /// The AJP/1.3 connection between the balancer and the session nodes.
    #[serde(default)]
    pub ajp: Ajp,

    /// The HTTP -> AJP load balancer in front of the session nodes.
    #[serde(default)]
    pub balancer: Balancer,
}

/// How HTTP sessions are shared between the session nodes (Tomcat's
/// `SimpleTcpCluster`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sessions {
    /// `all`: every node holds every session (DeltaManager); `backup`: each
    /// session has one backup node (BackupManager; it renames a moving
    /// session in steps, so the balancers hold back a moving session's
    /// parallel requests until its first one was answered, up to 2 s
    /// across balancer replicas, and after a node crash its sessions' first
    /// requests wait until it has been down 2 s, 4 s on the other replicas);
    /// `none`: no replication, a session is lost with its node.
    #[serde(default)]
    pub replication: Replication,

    /// `sync`: a request completes only after the peers acknowledged the
    /// session change (`use_ack,sync`), so a crash loses no acknowledged
    /// write; `async`: faster, but a crash can lose the last writes.
    #[serde(default)]
    pub send_mode: SendMode,

    /// How a node finds its peers: `kubernetes` lists the app's pods through
    /// the Kubernetes API; `dns` resolves the app's headless peer Service.
    #[serde(default)]
    pub membership: Membership,

    /// Port of the session replication receiver (Tribes). Every node of this
    /// app uses the same port, because a node assumes its peers listen on its
    /// own port.
    #[serde(default = "default_receiver_port")]
    #[x_kube(validation = Rule::new(PORT_RULE).message(PORT_MESSAGE))]
    pub receiver_port: i32,

    /// Name of the session cookie. It must match the cookie name the
    /// application uses; the balancer reads the route from it.
    #[serde(default = "default_cookie_name")]
    #[x_kube(validation = Rule::new(HTTP_TOKEN_RULE).message("cookieName must be an HTTP token: letters, digits and !#$%&*+.^_`|~- only"))]
    #[schemars(length(max = 64))]
    pub cookie_name: String,

    /// Name of the URL path parameter that carries the session id when
    /// cookies are off (`;jsessionid=...`). It wins over the cookie.
    #[serde(default = "default_path_parameter")]
    #[x_kube(validation = Rule::new(HTTP_TOKEN_RULE).message("pathParameter must be an HTTP token: letters, digits and !#$%&*+.^_`|~- only"))]
    #[schemars(length(max = 64))]
    pub path_parameter: String,

    /// Encrypt session replication traffic (Tribes EncryptInterceptor) with
    /// a key the operator generates once into the app's Secret.
    #[serde(default = "default_true")]
    pub encryption: bool,

    /// Cipher of the EncryptInterceptor. Always written explicitly into
    /// server.xml: Tomcat changed its default between releases, and nodes
    /// with different ciphers cannot read each other.
    #[serde(default)]
    pub encryption_algorithm: EncryptionAlgorithm,

    /// Seconds a starting node waits to receive all sessions from the
    /// oldest member (DeltaManager `stateTransferTimeout`). The startup
    /// probe allows for it.
    #[serde(default = "default_state_transfer_timeout")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600").message("stateTransferTimeoutSeconds must be between 1 and 3600"))]
    pub state_transfer_timeout_seconds: i32,

    /// `true`: a node runs the requests of one session one at a time, each
    /// together with the replication of its changes (the per-session
    /// semaphore of Tomcat's `PersistentValve`, used for that alone), so the
    /// other nodes apply a session's changes in the order they were made.
    /// Tomcat sends a request's changes after the request, outside the
    /// session's lock: changes of parallel requests can arrive in reverse
    /// order, and a session that moves (failover, drain, rebalancing) then
    /// continues from an older copy than its user already saw. `false`: a
    /// session's parallel requests run in parallel (faster for pages that
    /// load many session-bound resources at once), and a move can lose the
    /// last writes of parallel requests (and the balancers do not
    /// rebalance). Every request that names the session (its cookie or
    /// path parameter) waits for the one before it on its node, static
    /// files too, and a long one (a large download, a synchronous long
    /// poll) holds the session's other requests until it ends; an
    /// asynchronous servlet holds them only until it goes async. Applies
    /// when sessions are replicated.
    #[serde(default = "default_true")]
    pub ordered_requests: bool,
}

/// How sessions are replicated: `all` (DeltaManager), `backup` (BackupManager) or `none`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Replication {
    #[default]
    All,
    Backup,
    None,
}

/// When a session change counts as done: `sync` (peers acknowledged) or `async`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum SendMode {
    #[default]
    Sync,
    Async,
}

/// How session nodes find each other: `kubernetes` (pod list from the API) or `dns` (headless Service).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Membership {
    #[default]
    Kubernetes,
    Dns,
}

/// Cipher of the Tribes EncryptInterceptor.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EncryptionAlgorithm {
    #[default]
    #[serde(rename = "AES/GCM/NoPadding")]
    AesGcm,
    #[serde(rename = "AES/CBC/PKCS5Padding")]
    AesCbc,
}

/// The AJP/1.3 connection between the balancer and the session nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Ajp {
    /// Port of the AJP connector on every session node.
    #[serde(default = "default_ajp_port")]
    #[x_kube(validation = Rule::new(PORT_RULE).message(PORT_MESSAGE))]
    pub port: i32,

    /// Largest AJP packet in bytes (Tomcat's `packetSize`). The balancer
    /// and Tomcat are configured with the same value; raise it for very
    /// large request headers.
    #[serde(default = "default_packet_size")]
    #[x_kube(validation = Rule::new("self >= 8192 && self <= 65536").message("ajp.packetSize must be between 8192 and 65536 bytes"))]
    pub packet_size: i32,

    /// Secret key holding the AJP shared secret. When absent the operator
    /// generates one into the app's own Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in the ClusterApp's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[x_kube(validation = Rule::new(SECRET_NAME_RULE).message("ajp.secretRef.name must be a Secret name (lowercase DNS subdomain)"))]
    #[schemars(length(max = 253))]
    pub name: String,

    /// Key inside the Secret.
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')").message("ajp.secretRef.key must be a Secret key: letters, digits, '-', '_' and '.' only"))]
    #[schemars(length(max = 253))]
    pub key: String,
}

/// The HTTP -> AJP load balancer in front of the session nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.port != 9090").message("balancer.port must not be 9090: the balancer's admin server listens there"))]
#[x_kube(validation = Rule::new("!has(self.tls) || self.tls.port != self.port").message("balancer.tls.port must differ from balancer.port: the balancer serves HTTP and HTTPS on two ports"))]
#[x_kube(validation = Rule::new("!has(self.tls) || self.tls.port != 9090").message("balancer.tls.port must not be 9090: the balancer's admin server listens there"))]
pub struct Balancer {
    /// Number of balancer pods. Any balancer can serve any request: routing
    /// state lives in the session id.
    #[serde(default = "default_balancer_replicas")]
    #[x_kube(validation = Rule::new("self >= 1").message("balancer.replicas must be 1 or more: without a balancer the app is unreachable"))]
    pub replicas: i32,

    /// HTTP port of the balancer, on its pods and on its Service.
    #[serde(default = "default_balancer_port")]
    #[x_kube(validation = Rule::new(PORT_RULE).message(PORT_MESSAGE))]
    pub port: i32,

    /// How a new session picks its node: `byrequests` (fewest requests),
    /// `bybusyness` (fewest requests in flight) or `bytraffic` (fewest bytes).
    #[serde(default)]
    pub method: BalancerMethod,

    /// When the node a session is routed to is gone: `true` sends the request
    /// to another node (the session was replicated); `false` answers 503
    /// (httpd's `nofailover`).
    #[serde(default = "default_true")]
    pub failover: bool,

    /// Write an access log line per request to the balancer's log (client,
    /// method, URI, status, bytes, duration, node, failover; no cookies or
    /// credentials), as JSON like its other lines.
    #[serde(default)]
    pub access_log: bool,

    /// Moving existing sessions onto a node that joins (after a scale-up, a
    /// rolling update, or a node's return), so the load evens out without
    /// losing a session.
    #[serde(default)]
    pub rebalance: Rebalance,

    /// Balancer image; by default the operator's own release of clusterapp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,

    /// CPU and memory for each balancer container. Unset: requests of 100m
    /// CPU and 64Mi memory, and a memory limit of 256Mi (the balancer holds
    /// no sessions; its memory grows with open connections, about 13 MB at
    /// 1000 idle ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// The Service in front of the balancer pods.
    #[serde(default)]
    pub service: BalancerService,

    /// What the balancer speaks to the session nodes. `ajp` (the default):
    /// AJP/1.3 to the nodes' AJP connector, authenticated by the shared
    /// secret (see `ajp.secretRef`). `http`: HTTP/1.1 to an HTTP connector on
    /// `backendHttpPort` instead, the AJP connector is not opened; the
    /// client's address, scheme, port and TLS facts travel as
    /// `X-Forwarded-*` and `SSL_*` headers that Tomcat's `RemoteIpValve` and
    /// `SSLValve` believe from any caller, so only the app's NetworkPolicy
    /// keeps other Pods off that port: use `http` only where the cluster's
    /// network enforces NetworkPolicy.
    #[serde(default)]
    pub backend_protocol: BackendProtocol,

    /// Port of the session nodes' HTTP connector for the balancer, with
    /// `backendProtocol: http` (it trusts forwarded headers, so it is a
    /// port of its own, reachable from the balancer Pods only).
    #[serde(default = "default_backend_http_port")]
    #[x_kube(validation = Rule::new(PORT_RULE).message(PORT_MESSAGE))]
    pub backend_http_port: i32,

    /// HTTPS on the balancer, next to plain HTTP on `port`: the balancer
    /// terminates TLS with the certificate of a Secret and Tomcat sees the
    /// requests as secure (`https`). Without it the balancer serves HTTP
    /// only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BalancerTls>,
}

/// HTTPS on the balancer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.requireClientCertificate || has(self.clientCASecretName)").message("balancer.tls.requireClientCertificate needs balancer.tls.clientCASecretName: the CA certificates client certificates are checked against"))]
pub struct BalancerTls {
    /// Name of a `kubernetes.io/tls` Secret in the ClusterApp's namespace
    /// with the balancer's certificate chain in `tls.crt` and its private
    /// key in `tls.key` (PEM), e.g. made by `kubectl create secret tls` or
    /// cert-manager. A renewed Secret is served without restarting the
    /// balancer pods, once Kubernetes has updated their mounted copy of it.
    #[x_kube(validation = Rule::new(SECRET_NAME_RULE).message("balancer.tls.secretName must be a Secret name (lowercase DNS subdomain)"))]
    #[schemars(length(max = 253))]
    pub secret_name: String,

    /// HTTPS port of the balancer, on its pods and on its Service. It must
    /// differ from `balancer.port`.
    #[serde(default = "default_balancer_tls_port")]
    #[x_kube(validation = Rule::new(PORT_RULE).message(PORT_MESSAGE))]
    pub port: i32,

    /// Name of a Secret in the ClusterApp's namespace whose key `ca.crt`
    /// holds PEM CA certificates. When set, the balancer asks HTTPS clients
    /// for a certificate issued by one of them and hands it to Tomcat
    /// (`jakarta.servlet.request.X509Certificate`); clients without one are
    /// still served unless `requireClientCertificate` is set.
    #[serde(default, rename = "clientCASecretName", skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(SECRET_NAME_RULE).message("balancer.tls.clientCASecretName must be a Secret name (lowercase DNS subdomain)"))]
    #[schemars(length(max = 253))]
    pub client_ca_secret_name: Option<String>,

    /// Refuse HTTPS clients without a certificate issued by the CAs of
    /// `clientCASecretName` (which it requires).
    #[serde(default)]
    pub require_client_certificate: bool,
}

/// What the balancer speaks to the session nodes: `ajp` or `http`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    #[default]
    Ajp,
    Http,
}

impl BackendProtocol {
    /// The value of the balancer's `--backend-protocol` flag.
    pub fn as_flag(self) -> &'static str {
        match self {
            BackendProtocol::Ajp => "ajp",
            BackendProtocol::Http => "http",
        }
    }
}

/// Load-balancing method for new sessions.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BalancerMethod {
    #[default]
    Byrequests,
    Bybusyness,
    Bytraffic,
}

impl BalancerMethod {
    /// The value of the balancer's `--method` flag.
    pub fn as_flag(self) -> &'static str {
        match self {
            BalancerMethod::Byrequests => "byrequests",
            BalancerMethod::Bybusyness => "bybusyness",
            BalancerMethod::Bytraffic => "bytraffic",
        }
    }
}

/// The Service in front of the balancer pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BalancerService {
    /// Service type: `ClusterIP`, `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
}

/// Kubernetes Service type of the balancer's Service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// What the operator observed, written by the operator only.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAppStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Session node pods that exist.
    #[serde(default)]
    pub replicas: i32,

    /// Session node pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Ready session nodes out of the desired number, e.g. `3/3`.
    #[serde(default)]
    pub ready: String,

    /// Routes of the session nodes, comma-separated.
    #[serde(default)]
    pub routes: String,

    /// Label selector of the session node pods (for the scale subresource
    /// and HorizontalPodAutoscalers).
    #[serde(default)]
    pub selector: String,

    /// Every session node with its route, as the balancer sees it.
    #[serde(default)]
    pub members: Vec<Member>,

    /// The spread of sessions over the session nodes, `members[].sessions`
    /// in member order joined by `/` (e.g. `41/40/39/38/42`; `-` for a node
    /// without an estimate): what `kubectl get clusterapp` shows as
    /// SESSIONS. Absent while no balancer replica answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<String>,

    /// `Ready`, `Progressing` and `Degraded`, with a reason and a message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One session node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Pod name.
    pub pod: String,
    /// Tomcat jvmRoute: the suffix of session ids this node created.
    pub route: String,
    /// Pod IP, once assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// The pod is ready: the balancer sends it new sessions.
    pub ready: bool,
    /// The pod is stopping: the balancer sends it only its own sessions.
    pub draining: bool,
    /// Distinct session ids the balancers saw on this node over the last 2
    /// minutes: a HyperLogLog estimate (about 3 % standard error), merged
    /// across the balancer replicas so a session served by several counts
    /// once. A session that moved to another node counts on both until its
    /// requests here are 2 minutes old. Read every 15 seconds, written when
    /// it moved by 2 sessions and 5 % (else once a minute); absent when no
    /// balancer replica answered for a minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<i64>,
}

fn default_replicas() -> i32 {
    3
}
fn default_catalina_base() -> String {
    "/usr/local/tomcat".to_string()
}
fn default_http_port() -> i32 {
    8080
}
fn default_drain_seconds() -> i32 {
    10
}
fn default_receiver_port() -> i32 {
    4000
}
fn default_cookie_name() -> String {
    "JSESSIONID".to_string()
}
fn default_path_parameter() -> String {
    "jsessionid".to_string()
}
fn default_true() -> bool {
    true
}
fn default_state_transfer_timeout() -> i32 {
    60
}
fn default_ajp_port() -> i32 {
    8009
}
fn default_packet_size() -> i32 {
    8192
}
fn default_balancer_replicas() -> i32 {
    2
}
fn default_balancer_port() -> i32 {
    8080
}
fn default_balancer_tls_port() -> i32 {
    8443
}
fn default_backend_http_port() -> i32 {
    8081
}

impl Sessions {
    /// Whether every node applies a session's changes in the order its
    /// requests made them (replicated, with `orderedRequests`): the one
    /// condition for the ordering valve in server.xml and for moving
    /// sessions on purpose (rebalancing).
    pub fn replicates_in_order(&self) -> bool {
        self.replication != Replication::None && self.ordered_requests
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            replication: Replication::default(),
            send_mode: SendMode::default(),
            membership: Membership::default(),
            receiver_port: default_receiver_port(),
            cookie_name: default_cookie_name(),
            path_parameter: default_path_parameter(),
            encryption: true,
            encryption_algorithm: EncryptionAlgorithm::default(),
            state_transfer_timeout_seconds: default_state_transfer_timeout(),
            ordered_requests: true,
        }
    }
}

impl Default for Ajp {
    fn default() -> Self {
        Ajp { port: default_ajp_port(), packet_size: default_packet_size(), secret_ref: None }
    }
}

/// Rebalancing of existing sessions after a node joins.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rebalance {
    /// `true`: a node that becomes ready takes over, from
    /// every balancer at the same moments, the existing sessions that the
    /// balancer's failover rule (rendezvous hashing of the session id)
    /// places on it — about 1/N of them with N ready nodes. It renames each
    /// moved session for itself; the session's data is already there
    /// (`all`) or fetched from the session's backup node at its first
    /// request there (`backup`). Nodes that become ready within two minutes of the
    /// app's creation are not newcomers (a new app's first sessions stay
    /// where they were born). `false`: existing sessions stay on their
    /// node; only new sessions reach it. Applies with replicated sessions
    /// (`all` or `backup`) and `sessions.orderedRequests: true` (with
    /// `none` the new node has no copy; without ordered requests a move can
    /// lose the last writes of a session's parallel requests, so the
    /// balancers move nothing on their own).
    #[serde(default = "default_rebalance_enabled")]
    pub enabled: bool,

    /// The moves onto a joined node are spread evenly over this many
    /// seconds, starting 5 seconds after it became ready (so a new node is
    /// not flooded, and every balancer replica has seen it first).
    #[serde(default = "default_rebalance_ramp_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600").message("balancer.rebalance.rampSeconds must be between 1 and 3600"))]
    pub ramp_seconds: i32,
}

fn default_rebalance_enabled() -> bool {
    true
}

fn default_rebalance_ramp_seconds() -> i32 {
    30
}

impl Default for Rebalance {
    fn default() -> Self {
        Rebalance { enabled: default_rebalance_enabled(), ramp_seconds: default_rebalance_ramp_seconds() }
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            replicas: default_balancer_replicas(),
            port: default_balancer_port(),
            method: BalancerMethod::default(),
            failover: true,
            access_log: false,
            rebalance: Rebalance::default(),
            image: None,
            resources: None,
            service: BalancerService::default(),
            backend_protocol: BackendProtocol::default(),
            backend_http_port: default_backend_http_port(),
            tls: None,
        }
    }
}

impl EncryptionAlgorithm {
    /// The JCE transformation name Tomcat expects.
    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionAlgorithm::AesGcm => "AES/GCM/NoPadding",
            EncryptionAlgorithm::AesCbc => "AES/CBC/PKCS5Padding",
        }
    }
}

/// The CRD as YAML, exactly the text of `crds/clusterapp.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt;
    serde_yaml_ng::to_string(&ClusterApp::crd())
}
