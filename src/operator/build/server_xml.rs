//! Tomcat's `server.xml` for the session nodes.
//!
//! Per-pod values (route, pod IP) and secrets are not written here: the file
//! is the same for every node and refers to them with `${NAME}`, which Tomcat
//! resolves through the property sources the pod names in
//! `org.apache.tomcat.util.digester.PROPERTY_SOURCE`: environment variables
//! (`EnvironmentPropertySource`) for the route and address, and files
//! (`ServiceBindingPropertySource`: `${chomp:BINDING.KEY}` is the file
//! `$SERVICE_BINDING_ROOT/BINDING/KEY` without its trailing newline) for the
//! secrets. So secrets never land in the ConfigMap, and never in an
//! environment variable, where `kubectl describe`, `/proc/*/environ` and
//! crash reports would show them.

use std::fmt::Write as _;

use crate::crd::{BackendProtocol, ClusterAppSpec, Membership, Replication, SendMode};

/// Environment variables the server.xml refers to (set by the StatefulSet).
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_IP: &str = "POD_IP";

/// Secret files the server.xml refers to: `(binding, key)`, the file
/// `<bindings folder>/<binding>/<key>` (mounted by the StatefulSet).
pub const BINDING_AJP_SECRET: (&str, &str) = ("ajp", "secret");
pub const BINDING_TRIBES_KEY: (&str, &str) = ("tribes", "key");

/// `${chomp:ajp.secret}`: the file's content without a trailing newline (a
/// Secret written with `kubectl create secret --from-file` often has one).
fn binding_property((binding, key): (&str, &str)) -> String {
    format!("${{chomp:{binding}.{key}}}")
}

/// Seconds between a node's cluster receiver opening and its web
/// applications starting (and so their state transfer): two membership
/// polls of every peer plus a failure detector re-add, with margin.
pub const DEPLOY_DELAY_SECONDS: i32 = 20;

/// The Engine valves of `backendProtocol: http`, in order: `RemoteIpValve`
/// makes the client's address, scheme (`isSecure()`) and server port those
/// of the balancer's `X-Forwarded-*` headers, then `SSLValve` turns its
/// `ssl_*` headers into the TLS request attributes (cipher, key size,
/// client certificate).
///
/// Whom they believe: `internalProxies=".*"`, any caller. The operator
/// cannot name the balancer Pods' addresses (they change with every
/// rollout), and a range would not be narrower in any way that matters:
/// Tomcat's default list (RFC 1918, 100.64/10, loopback, link-local,
/// IPv6 ULA) already holds every Pod of most clusters, and misses the pod
/// networks that are neither (public or IPv6 global ranges), where the
/// client's address would silently become the balancer's. `SSLValve` has no
/// such list at all. What keeps forged headers out is who can reach the
/// connectors: the balancer strips a client's own, the backend connector
/// port is open to the balancer Pods only and the probe port to the app's
/// own nodes only (the NetworkPolicy), and the connectors bind the Pod IP.
/// Both valves sit on the Engine, so they apply to the probe connector as
/// well, whose callers (kubelet, peers) send no such headers.
///
/// The test Tomcats of `tests/balancer/http_backend.rs` run with these very lines.
pub fn http_backend_valves() -> &'static str {
    concat!(
        r#"      <Valve className="org.apache.catalina.valves.RemoteIpValve" internalProxies=".*" remoteIpHeader="X-Forwarded-For" protocolHeader="X-Forwarded-Proto" protocolHeaderHttpsValue="https" portHeader="X-Forwarded-Port" proxiesHeader="X-Forwarded-By"/>"#,
        "\n",
        r#"      <Valve className="org.apache.catalina.valves.SSLValve"/>"#,
        "\n",
    )
}

/// The Engine valve of `sessions.orderedRequests`: one request of a session
/// at a time on a node, replication included. Tomcat's ReplicationValve
/// takes a request's session changes under the session's lock but sends them
/// after releasing it, and the receiver applies messages from its pool of
/// threads, so the changes of two parallel requests can be applied in
/// reverse order and the other nodes keep the older value. PersistentValve's
/// per-session semaphore (keyed by the requested session id; requests
/// without one pass) is held across the whole pipeline behind it, and it
/// stands before the Cluster's valves, which Tomcat appends to the Engine's
/// pipeline when the cluster starts: the next request of the session starts
/// only after the last one's changes were sent and, with `sendMode: sync`,
/// applied by every peer. With a manager that is not a `StoreManager` the
/// valve does nothing else (no store is read or written).
pub fn ordered_requests_valve() -> &'static str {
    concat!(r#"      <Valve className="org.apache.catalina.valves.PersistentValve"/>"#, "\n")
}

/// Tribes `channelSendOptions`: 8 = asynchronous; 6 = `use_ack` (2) +
/// `sync` (4): the request waits until every peer acknowledged the change.
fn channel_send_options(mode: SendMode) -> u32 {
    match mode {
        SendMode::Sync => 6,
        SendMode::Async => 8,
    }
}

/// The first line after the XML declaration: a comment naming the app when
/// a comment can hold its name. XML comments cannot contain `--` (nor end
/// in `-`) and have no escape, and a valid ClusterApp name may contain `--`
/// (`shop--eu`): such a name is left out rather than mangled. Names that fit
/// are written as they always were, so an operator upgrade does not change
/// (and so roll) the server.xml of existing apps.
fn header_comment(app_name: &str) -> String {
    let fits_in_a_comment = !app_name.contains("--") && !app_name.ends_with('-');
    if fits_in_a_comment {
        format!("<!-- Generated by the clusterapp operator for ClusterApp {app_name}; changes are overwritten. -->")
    } else {
        "<!-- Generated by the clusterapp operator for the ClusterApp that owns this ConfigMap; changes are overwritten. -->"
            .to_string()
    }
}

/// The server.xml of the session nodes of the app `app_name`. Apart from the
/// header comment nothing a user names is written into it (ports and enums
/// only), so it is well-formed XML for every valid ClusterApp.
pub fn server_xml(app_name: &str, spec: &ClusterAppSpec) -> String {
    let mut xml = String::new();
    // `write!` into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(xml, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(xml, "{}", header_comment(app_name));
    // port="-1": no shutdown port; Kubernetes stops Tomcat with SIGTERM.
    let _ = writeln!(xml, r#"<Server port="-1" shutdown="SHUTDOWN">"#);
    for listener in [
        "org.apache.catalina.startup.VersionLoggerListener",
        "org.apache.catalina.core.JreMemoryLeakPreventionListener",
        "org.apache.catalina.mbeans.GlobalResourcesLifecycleListener",
        "org.apache.catalina.core.ThreadLocalLeakPreventionListener",
    ] {
        let _ = writeln!(xml, r#"  <Listener className="{listener}"/>"#);
    }
    let _ = writeln!(xml, r#"  <Service name="Catalina">"#);
    // HTTP on every address of the pod (its IP and loopback: `kubectl
    // port-forward` connects to localhost inside the pod, and so do the
    // user's own tools there); the NetworkPolicy limits who reaches it.
    // AJP on the pod IP: the balancer connects from another pod, and
    // AJP's default address is loopback alone.
    let _ =
        writeln!(xml, r#"    <Connector protocol="HTTP/1.1" port="{}" connectionTimeout="20000"/>"#, spec.http_port);
    match spec.balancer.backend_protocol {
        BackendProtocol::Ajp => {
            let _ = writeln!(
                xml,
                r#"    <Connector protocol="AJP/1.3" address="${{{ENV_POD_IP}}}" port="{}" packetSize="{}" secretRequired="true" secret="{}"/>"#,
                spec.ajp.port,
                spec.ajp.packet_size,
                binding_property(BINDING_AJP_SECRET)
            );
        }
        // No AJP connector: an open port nobody uses is only a risk. The
        // balancer's connections are long-lived keep-alive ones (it probes
        // them before reuse), so Tomcat's limit of 100 requests per
        // connection is lifted.
        BackendProtocol::Http => {
            let _ = writeln!(
                xml,
                r#"    <Connector protocol="HTTP/1.1" address="${{{ENV_POD_IP}}}" port="{}" connectionTimeout="20000" maxKeepAliveRequests="-1"/>"#,
                spec.balancer.backend_http_port
            );
        }
    }
    // jvmRoute from the pod name: Tomcat 10.1+ ignores -DjvmRoute.
    let _ = writeln!(xml, r#"    <Engine name="Catalina" defaultHost="localhost" jvmRoute="${{{ENV_POD_NAME}}}">"#);
    if spec.balancer.backend_protocol == BackendProtocol::Http {
        xml.push_str(http_backend_valves());
    }
    // The probes' endpoint: answers 200 on /health while the engine runs.
    let _ = writeln!(xml, r#"      <Valve className="org.apache.catalina.valves.HealthCheckValve"/>"#);
    if spec.sessions.replicates_in_order() {
        xml.push_str(ordered_requests_valve());
    }
    if spec.sessions.replication != Replication::None {
        write_cluster(&mut xml, spec);
    }
    // The root filesystem is read-only: WARs run unpacked in memory.
    if spec.sessions.replication == Replication::None {
        let _ = writeln!(
            xml,
            r#"      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false" deployOnStartup="true">"#
        );
    } else {
        // Deferred deployment. A new node's session manager copies every
        // session from a peer when its web application starts (state
        // transfer); deltas that peers send before they have the node in
        // their membership are dropped for good, so sessions changed in that
        // gap would be stale on this node forever. Peers find the node only
        // by polling the API (every 5 s, GroupChannel's heartbeat); a peer
        // that added the pod before its receiver was open loses it on the
        // first failed send (TcpFailureDetector) and re-adds it only at a
        // later heartbeat (~10 s). So the cluster (and its receiver) starts
        // with the Engine, and the Host deploys the applications only from
        // its own background processor, whose first run is
        // DEPLOY_DELAY_SECONDS after the Host started: by then every peer
        // has the node in its membership. autoDeploy then only rechecks the
        // (read-only) appBase. The startup probe waits for that (see
        // stateful_set): until the first deployment the Host is empty and
        // HealthCheckValve would answer UP.
        let _ = writeln!(
            xml,
            r#"      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="true" deployOnStartup="false" backgroundProcessorDelay="{DEPLOY_DELAY_SECONDS}">"#
        );
    }
    let _ = writeln!(
        xml,
        r#"        <Valve className="org.apache.catalina.valves.ErrorReportValve" showReport="false" showServerInfo="false"/>"#
    );
    let _ = writeln!(xml, "      </Host>");
    let _ = writeln!(xml, "    </Engine>");
    let _ = writeln!(xml, "  </Service>");
    let _ = writeln!(xml, "</Server>");
    xml
}

fn write_cluster(xml: &mut String, spec: &ClusterAppSpec) {
    let sessions = &spec.sessions;
    let send_options = channel_send_options(sessions.send_mode);
    let _ = writeln!(
        xml,
        r#"      <Cluster className="org.apache.catalina.ha.tcp.SimpleTcpCluster" channelSendOptions="{send_options}">"#
    );
    match sessions.replication {
        // `none` writes no Cluster at all (see server_xml).
        Replication::All | Replication::None => {
            let _ = writeln!(
                xml,
                r#"        <Manager className="org.apache.catalina.ha.session.DeltaManager" stateTransferTimeout="{}" expireSessionsOnShutdown="false" notifyListenersOnReplication="true"/>"#,
                sessions.state_transfer_timeout_seconds
            );
        }
        Replication::Backup => {
            let _ = writeln!(
                xml,
                r#"        <Manager className="org.apache.catalina.ha.session.BackupManager" mapSendOptions="{send_options}" notifyListenersOnReplication="true"/>"#
            );
        }
    }
    let _ = writeln!(xml, r#"        <Channel className="org.apache.catalina.tribes.group.GroupChannel">"#);
    // Multicast does not work on most pod networks: members come from the
    // Kubernetes API (pods of this app, KUBERNETES_LABELS) or from DNS.
    let provider = match sessions.membership {
        Membership::Kubernetes => "kubernetes",
        Membership::Dns => "dns",
    };
    let _ = writeln!(
        xml,
        r#"          <Membership className="org.apache.catalina.tribes.membership.cloud.CloudMembershipService" membershipProviderClassName="{provider}"/>"#
    );
    // autoBind="1": bind exactly this port; by default Tomcat moves to the
    // next free one, where no peer would look (peers assume our port).
    let _ = writeln!(
        xml,
        r#"          <Receiver className="org.apache.catalina.tribes.transport.nio.NioReceiver" address="${{{ENV_POD_IP}}}" port="{}" autoBind="1" selectorTimeout="5000" maxThreads="6"/>"#,
        sessions.receiver_port
    );
    let _ =
        writeln!(xml, r#"          <Sender className="org.apache.catalina.tribes.transport.ReplicationTransmitter">"#);
    let _ = writeln!(
        xml,
        r#"            <Transport className="org.apache.catalina.tribes.transport.nio.PooledParallelSender"/>"#
    );
    let _ = writeln!(xml, "          </Sender>");
    // Declaring any interceptor drops Tomcat's defaults, so all are listed.
    // EncryptInterceptor must come before TcpFailureDetector (Tomcat refuses
    // to start otherwise); its algorithm is explicit because Tomcat's default
    // changed between releases and mixed nodes could not read each other.
    if sessions.encryption {
        let _ = writeln!(
            xml,
            r#"          <Interceptor className="org.apache.catalina.tribes.group.interceptors.EncryptInterceptor" encryptionAlgorithm="{}" encryptionKey="{}"/>"#,
            sessions.encryption_algorithm.as_str(),
            binding_property(BINDING_TRIBES_KEY)
        );
    }
    let _ = writeln!(
        xml,
        r#"          <Interceptor className="org.apache.catalina.tribes.group.interceptors.TcpFailureDetector"/>"#
    );
    let _ = writeln!(
        xml,
        r#"          <Interceptor className="org.apache.catalina.tribes.group.interceptors.MessageDispatchInterceptor"/>"#
    );
    let _ = writeln!(xml, "        </Channel>");
    let _ = writeln!(xml, r#"        <Valve className="org.apache.catalina.ha.tcp.ReplicationValve" filter=""/>"#);
    // After a failover the session id still names the dead node's route;
    // this valve rewrites it so the balancer sticks to the new node.
    let _ = writeln!(xml, r#"        <Valve className="org.apache.catalina.ha.session.JvmRouteBinderValve"/>"#);
    let _ = writeln!(
        xml,
        r#"        <ClusterListener className="org.apache.catalina.ha.session.ClusterSessionListener"/>"#
    );
    let _ = writeln!(xml, "      </Cluster>");
}
