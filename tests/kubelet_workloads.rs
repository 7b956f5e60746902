//! Workloads on the process kubelet: a StatefulSet run by the real
//! controller, its EndpointSlices, NodePort/ClusterIP Services, and Tomcat
//! (Debian's, laid out like the official image) serving the counter app.

mod support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;
use support::TestNamespace;
use support::kubelet::{create, kubelet, pod_ready as ready};

fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok())
}

/// `curl` from the host (or from inside a network namespace); body or None.
fn curl(netns: Option<&str>, url: &str, extra: &[&str]) -> Option<String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd.args(["-s", "-f", "--max-time", "3"]).args(extra).arg(url).output().expect("curl");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_ready_pods(pods: &Api<Pod>, selector: &str, count: usize, timeout: Duration) -> Vec<Pod> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = pods.list(&ListParams::default().labels(selector)).await.expect("list pods");
        let ready_pods: Vec<Pod> = list.items.into_iter().filter(ready).collect();
        if ready_pods.len() == count {
            return ready_pods;
        }
        assert!(
            Instant::now() < deadline,
            "{count} ready pods ({selector}) not there after {timeout:?}:\n{}",
            kubelet().log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn statefulset_pods_reach_each_other_and_services_reach_them() {
    kubelet();
    let ns = TestNamespace::new("kubelet-sts").await;
    let serve = "hostname > /www/name && exec /usr/bin/python3 -m http.server 8080 --directory /www";
    create(
        &ns.api::<Service>(),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 8080}]}}),
    )
    .await;
    let node_port_service = create(&ns.api::<Service>(), json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-public"},
        "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})).await;
    create(
        &ns.api::<StatefulSet>(),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
        "spec": {"serviceName": "web", "replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "web", "image": "local/busybox:1.36", "command": ["sh", "-c", serve],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "www", "mountPath": "/www"}]}],
                "volumes": [{"name": "www", "emptyDir": {}}]}}}}),
    )
    .await;

    let started = Instant::now();
    let pods = wait_ready_pods(&ns.api::<Pod>(), "app=web", 2, Duration::from_secs(90)).await;
    println!("StatefulSet of 2 ready {} ms after create", started.elapsed().as_millis());
    let mut by_name: Vec<(String, Ipv4Addr)> =
        pods.iter().map(|p| (p.metadata.name.clone().unwrap_or_default(), pod_ip(p).expect("pod IP"))).collect();
    by_name.sort();
    let names: Vec<&str> = by_name.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["web-0", "web-1"]);
    let (ip0, ip1) = (by_name[0].1, by_name[1].1);
    assert_ne!(ip0, ip1, "pods share an IP");
    for ip in [ip0, ip1] {
        assert_eq!(&ip.octets()[..3], &[10, 244, 0], "pod IP {ip} outside 10.244.0.0/24");
    }

    // Pod to pod, from inside web-0's network namespace (the kubelet names it
    // <bridge>-<last octet>), in both directions.
    let netns = |ip: Ipv4Addr| format!("cabr0-{}", ip.octets()[3]);
    assert_eq!(curl(Some(&netns(ip0)), &format!("http://{ip1}:8080/name"), &[]).as_deref(), Some("web-1\n"));
    assert_eq!(curl(Some(&netns(ip1)), &format!("http://{ip0}:8080/name"), &[]).as_deref(), Some("web-0\n"));

    // The EndpointSlice controller publishes both pods as ready.
    let slices: Api<EndpointSlice> = ns.api();
    let want: BTreeSet<String> = [ip0, ip1].iter().map(|ip| ip.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")).await.expect("slices");
        let got: BTreeSet<String> = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "EndpointSlice ready addresses {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // NodePort on 127.0.0.1 and the ClusterIP, both spread over the two pods.
    let spec = node_port_service.spec.expect("service spec");
    let node_port = spec.ports.as_ref().and_then(|p| p[0].node_port).expect("nodePort allocated");
    let cluster_ip = spec.cluster_ip.expect("clusterIP");
    for url in [format!("http://127.0.0.1:{node_port}/name"), format!("http://{cluster_ip}:80/name")] {
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < 2 {
            if let Some(body) = curl(None, &url, &[]) {
                seen.insert(body.trim().to_string());
            }
            assert!(Instant::now() < deadline, "{url} reached only {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seen, BTreeSet::from(["web-0".to_string(), "web-1".to_string()]));
    }
}

#[tokio::test]
async fn tomcat_pod_serves_the_counter_app_with_a_configmap_server_xml() {
    kubelet();
    let ns = TestNamespace::new("kubelet-tomcat").await;
    // Debian's server.xml with the HTTP connector moved, mounted with subPath
    // over CATALINA_BASE/conf/server.xml like the operator's ConfigMap.
    let server_xml = std::fs::read_to_string("/etc/tomcat10/server.xml")
        .expect("Debian's server.xml")
        .replace("port=\"8080\"", "port=\"8081\"");
    assert!(server_xml.contains("port=\"8081\""));
    create(
        &ns.api::<ConfigMap>(),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tomcat-conf"},
        "data": {"server.xml": server_xml}}),
    )
    .await;
    let pods = ns.api::<Pod>();
    let started = Instant::now();
    // The shape of the operator's session-node Pod: non-root with fsGroup,
    // emptyDirs over logs/temp/work, probes, a preStop sleep.
    create(
        &ns.api::<k8s_openapi::api::core::v1::Secret>(),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tomcat-secret"},
        "stringData": {"ajp-secret": "not-used-here"}}),
    )
    .await;
    let probe = |failures: i32| json!({"httpGet": {"path": "/counter/", "port": "http"}, "periodSeconds": 1, "timeoutSeconds": 2, "failureThreshold": failures});
    create(&pods, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tomcat", "labels": {"app": "tomcat"}},
        "spec": {"terminationGracePeriodSeconds": 5,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "runAsNonRoot": true},
            "containers": [{"name": "tomcat", "image": "ghcr.io/clusterapp/counter-app:1.0",
                "env": [{"name": "AJP_SECRET", "valueFrom": {"secretKeyRef": {"name": "tomcat-secret", "key": "ajp-secret"}}}],
                "ports": [{"name": "http", "containerPort": 8081}],
                "startupProbe": probe(60),
                "readinessProbe": probe(3),
                "livenessProbe": probe(6),
                "lifecycle": {"preStop": {"sleep": {"seconds": 1}}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [
                    {"name": "conf", "mountPath": "/usr/local/tomcat/conf/server.xml", "subPath": "server.xml", "readOnly": true},
                    {"name": "logs", "mountPath": "/usr/local/tomcat/logs"},
                    {"name": "temp", "mountPath": "/usr/local/tomcat/temp"},
                    {"name": "work", "mountPath": "/usr/local/tomcat/work"},
                    {"name": "conf-catalina", "mountPath": "/usr/local/tomcat/conf/Catalina"},
                ]}],
            "volumes": [{"name": "conf", "configMap": {"name": "tomcat-conf"}},
                        {"name": "logs", "emptyDir": {}}, {"name": "temp", "emptyDir": {}},
                        {"name": "work", "emptyDir": {}}, {"name": "conf-catalina", "emptyDir": {}}]}}))
    .await;
    let pod = wait_ready_pods(&pods, "app=tomcat", 1, Duration::from_secs(120)).await.remove(0);
    println!("Tomcat pod Ready {} ms after create", started.elapsed().as_millis());
    let ip = pod_ip(&pod).expect("pod IP");

    let cookies = support::repo_root().join(format!("target/test-kubelets/cookies-{}", ns.name));
    let jar = cookies.to_string_lossy().into_owned();
    let mut counters = Vec::new();
    for _ in 0..3 {
        let headers =
            curl(None, &format!("http://{ip}:8081/counter/"), &["-D", "-", "-o", "/dev/null", "-b", &jar, "-c", &jar])
                .expect("GET /counter/");
        let counter = headers
            .lines()
            .find_map(|l| l.strip_prefix("X-Counter: "))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no X-Counter header in:\n{headers}"));
        counters.push(counter);
    }
    // The readiness probe has no cookie, so it never touches our session.
    assert_eq!(counters, ["1", "2", "3"]);
    let _ = std::fs::remove_file(&cookies);

    let log = kubelet().container_log(&ns.name, "tomcat", "tomcat");
    assert!(log.contains("Server startup in"), "Tomcat's log:\n{log}");
    assert!(
        log.contains("CATALINA_BASE:") && log.contains("/usr/local/tomcat"),
        "Tomcat runs with CATALINA_BASE=/usr/local/tomcat:\n{log}"
    );
    assert!(log.contains("\"http-nio-8081\""), "the ConfigMap's server.xml is in effect:\n{log}");
    assert!(!std::path::Path::new("/usr/local/tomcat").exists(), "CATALINA_BASE must exist only inside the pod");
    // Tomcat runs as runAsUser 1000 with group 1000 (runAsGroup, fsGroup).
    let started_line = kubelet()
        .log_text()
        .lines()
        .find(|l| l.contains("container started") && l.contains(&format!("pod=\"{}/tomcat\"", ns.name)))
        .map(str::to_string)
        .expect("kubelet logged the container start");
    let pid = started_line.split_whitespace().find_map(|w| w.strip_prefix("pid=")).expect("pid in the log line");
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("Tomcat's /proc status");
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
    };
    assert_eq!(field("Uid:").as_deref(), Some("1000"), "{proc_status}");
    assert_eq!(field("Gid:").as_deref(), Some("1000"), "{proc_status}");
    // Its logs went into the emptyDir, written as uid 1000.
    let logs = kubelet().pod_dir(&ns.name, "tomcat").join("volumes/logs");
    assert!(std::fs::read_dir(&logs).expect("logs emptyDir").count() > 0, "Tomcat wrote no log file into the emptyDir");
}
