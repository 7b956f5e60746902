//! Three Tomcat session nodes in containers on the real nodes find each other through
//! the Kubernetes API (Tomcat's CloudMembershipService, provider
//! `kubernetes`, with the Pod's projected ServiceAccount token and RBAC), and
//! replicate a session. The StatefulSet, Role and server.xml are written by
//! hand here; the operator builds the real ones.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::nodes::{create, pod_ready as ready, pods_report};
use crate::support::{self, TestNamespace};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

const SERVER_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Listener className="org.apache.catalina.startup.VersionLoggerListener" />
  <Service name="Catalina">
    <Connector port="8080" protocol="HTTP/1.1" connectionTimeout="20000" />
    <Engine name="Catalina" defaultHost="localhost">
      <Cluster className="org.apache.catalina.ha.tcp.SimpleTcpCluster" channelSendOptions="6">
        <Manager className="org.apache.catalina.ha.session.DeltaManager" expireSessionsOnShutdown="false" notifyListenersOnReplication="true" />
        <Channel className="org.apache.catalina.tribes.group.GroupChannel">
          <Membership className="org.apache.catalina.tribes.membership.cloud.CloudMembershipService" membershipProviderClassName="kubernetes" />
          <Receiver className="org.apache.catalina.tribes.transport.nio.NioReceiver" port="4000" autoBind="1" selectorTimeout="5000" maxThreads="6" />
          <Sender className="org.apache.catalina.tribes.transport.ReplicationTransmitter">
            <Transport className="org.apache.catalina.tribes.transport.nio.PooledParallelSender" />
          </Sender>
          <Interceptor className="org.apache.catalina.tribes.group.interceptors.TcpFailureDetector" />
          <Interceptor className="org.apache.catalina.tribes.group.interceptors.MessageDispatchInterceptor" />
        </Channel>
        <Valve className="org.apache.catalina.ha.tcp.ReplicationValve" filter="" />
        <Valve className="org.apache.catalina.ha.session.JvmRouteBinderValve" />
        <ClusterListener className="org.apache.catalina.ha.session.ClusterSessionListener" />
      </Cluster>
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false" />
    </Engine>
  </Service>
</Server>
"#;

/// How Tribes names a member in "Replication member added:[…MemberImpl[tcp://10.244.0.7:4000,…".
fn tribes_address(ip: Ipv4Addr) -> String {
    format!("tcp://{ip}:4000,")
}

/// GET /counter/ with the session cookie (sent by hand: a cookie jar would
/// keep it to the host that set it); returns X-Counter and X-Session-Id.
fn counter(ip: Ipv4Addr, session: Option<&str>) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-f", "--max-time", "10", "-D", "-", "-o", "/dev/null"]);
    if let Some(id) = session {
        cmd.arg("-H").arg(format!("Cookie: JSESSIONID={id}"));
    }
    let out = cmd.arg(format!("http://{ip}:8080/counter/")).output().expect("curl");
    let headers = String::from_utf8_lossy(&out.stdout);
    let header = |name: &str| {
        headers
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} from {ip}:\n{headers}"))
    };
    (header("X-Counter: "), header("X-Session-Id: "))
}

#[tokio::test]
async fn three_tomcats_find_each_other_through_the_kubernetes_api_and_replicate_a_session() {
    let _serial = crate::common::serial().await;
    let bed = support::nodes::nodes();
    let ns = TestNamespace::new("tribes").await;
    create(
        &ns.api::<Role>(),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "members"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}),
    )
    .await;
    create(
        &ns.api::<RoleBinding>(),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "members"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "members"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns.name}]}),
    )
    .await;
    create(
        &ns.api::<ConfigMap>(),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tomcat"},
        "data": {"server.xml": SERVER_XML}}),
    )
    .await;
    create(
        &ns.api::<Service>(),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "tc"},
        "spec": {"clusterIP": "None", "selector": {"app": "tc"}, "ports": [{"name": "http", "port": 8080}]}}),
    )
    .await;
    let started = Instant::now();
    create(&ns.api::<StatefulSet>(), json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "tc"},
        "spec": {"serviceName": "tc", "replicas": 3, "selector": {"matchLabels": {"app": "tc"}},
            "template": {"metadata": {"labels": {"app": "tc"}}, "spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [{"name": "tomcat", "image": "ghcr.io/clusterapp/counter-app:1.0",
                    "env": [
                        {"name": "KUBERNETES_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "KUBERNETES_LABELS", "value": "app=tc"},
                    ],
                    "ports": [{"name": "http", "containerPort": 8080}, {"name": "tribes", "containerPort": 4000}],
                    "readinessProbe": {"httpGet": {"path": "/counter/", "port": "http"}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "conf", "mountPath": "/usr/local/tomcat/conf/server.xml", "subPath": "server.xml"}]}],
                "volumes": [{"name": "conf", "configMap": {"name": "tomcat"}}]}}}})).await;

    let pods_api: Api<Pod> = ns.api();
    let deadline = Instant::now() + Duration::from_secs(240);
    let pods = loop {
        let list = pods_api.list(&ListParams::default().labels("app=tc")).await.expect("list pods");
        let mut ready_pods: Vec<Pod> = list.items.into_iter().filter(ready).collect();
        if ready_pods.len() == 3 {
            ready_pods.sort_by_key(|p| p.metadata.name.clone());
            break ready_pods;
        }
        assert!(Instant::now() < deadline, "3 Tomcats not ready after 240 s:\n{}", pods_report(&ns.name));
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("3 Tomcat session nodes (ordered StatefulSet) ready {} ms after create", started.elapsed().as_millis());
    let nodes: Vec<(String, Ipv4Addr)> = pods
        .iter()
        .map(|p| {
            let ip =
                p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok()).expect("pod IP");
            (p.metadata.name.clone().unwrap_or_default(), ip)
        })
        .collect();

    // Every node lists exactly the two others as members (polled every ~5 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    for (name, ip) in &nodes {
        loop {
            let log = bed.container_log(&ns.name, name, "tomcat");
            let added: Vec<&str> = log.lines().filter(|l| l.contains("Replication member added")).collect();
            let sees_peers = nodes
                .iter()
                .filter(|(n, _)| n != name)
                .all(|(_, peer)| added.iter().any(|l| l.contains(&tribes_address(*peer))));
            assert!(
                !added.iter().any(|l| l.contains(&tribes_address(*ip))),
                "{name} lists itself as a member (it must recognise its pod IP as its own):\n{}",
                added.join("\n")
            );
            if sees_peers {
                break;
            }
            assert!(Instant::now() < deadline, "{name} did not see both peers; its log:\n{log}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    // A session made on one node continues on the others.
    let (first, session) = counter(nodes[0].1, None);
    assert_eq!(first, "1");
    assert_eq!(counter(nodes[0].1, Some(&session)).0, "2");
    assert_eq!(counter(nodes[1].1, Some(&session)).0, "3", "the session was not replicated to {}", nodes[1].0);
    assert_eq!(counter(nodes[2].1, Some(&session)).0, "4", "the session was not replicated to {}", nodes[2].0);
    assert_eq!(counter(nodes[0].1, Some(&session)).0, "5", "the update made on {} did not come back", nodes[2].0);
}
