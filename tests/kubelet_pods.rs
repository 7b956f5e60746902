//! The process kubelet against the real control plane: Pods of the
//! `local/busybox` exec image run as local processes in their own network
//! namespace, with env, volumes, probes, restarts and graceful deletion.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use support::TestNamespace;
use support::kubelet::{create, kubelet};

/// Waits until `check` holds for the Pod; returns that Pod.
async fn wait_pod(pods: &Api<Pod>, name: &str, what: &str, timeout: Duration, check: impl Fn(&Pod) -> bool) -> Pod {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(pod)) = pods.get_opt(name).await
            && check(&pod)
        {
            return pod;
        }
        if Instant::now() > deadline {
            let pod = pods.get_opt(name).await.ok().flatten();
            panic!(
                "timed out after {timeout:?} waiting for pod {name} to be {what}; status: {}\nkubelet log:\n{}",
                serde_json::to_string_pretty(&pod.and_then(|p| p.status)).unwrap_or_default(),
                kubelet().log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn condition(pod: &Pod, type_: &str) -> bool {
    pod.status.iter().flat_map(|s| s.conditions.iter().flatten()).any(|c| c.type_ == type_ && c.status == "True")
}

fn ready(pod: &Pod) -> bool {
    condition(pod, "Ready")
}

fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status.iter().flat_map(|s| s.container_statuses.iter().flatten()).map(|c| c.restart_count).sum()
}

fn pod_ip(pod: &Pod) -> Ipv4Addr {
    pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok()).expect("pod has an IPv4 podIP")
}

async fn wait_log(ns: &str, pod: &str, container: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = kubelet().container_log(ns, pod, container);
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log of {ns}/{pod}/{container} after {timeout:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn exec_pod_runs_in_its_own_network_namespace_with_env_and_volumes() {
    kubelet();
    let ns = TestNamespace::new("kubelet-basic").await;
    create(
        &ns.api::<ConfigMap>(),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings"}, "data": {"greeting": "hello", "color": "blue"}}),
    )
    .await;
    create(
        &ns.api::<Secret>(),
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "creds"}, "stringData": {"password": "s3cret", "user": "admin"}}),
    )
    .await;
    let script = r#"
echo "HOSTNAME_IS=$(hostname)"
echo "ETC_HOSTS=$(grep -v '^#' /etc/hosts | tr '\t\n' ' |')"
echo "ETH0=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
for v in PLAIN POD_NAME POD_NS POD_IP NODE SA APP_LABEL FROM_SECRET FROM_CM COMPOSED CM_color CPU_LIMIT KUBERNETES_SERVICE_HOST KUBERNETES_SERVICE_PORT; do
  echo "ENV_$v=$(printenv $v)"
done
echo "CM_FILE=$(cat /etc/config/greeting)"
echo "SECRET_FILE=$(cat /etc/secret/pw)"
echo "SUBPATH_FILE=$(cat /opt/clusterapp-test/greeting.txt)"
echo "DOWNWARD_LABELS=$(tr '\n' ' ' < /etc/podinfo/labels)"
echo "DOWNWARD_NAME=$(cat /etc/podinfo/name)"
echo "SA_NAMESPACE=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"
echo "ARGS=$0 $1"
echo DONE
exec sleep 3600
"#;
    let pods = ns.api::<Pod>();
    let started = Instant::now();
    create(&pods, json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "facts", "labels": {"app": "facts"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": "local/busybox:1.36",
                "command": ["sh", "-c", script, "$(POD_NAME)", "$(PLAIN)"],
                "env": [
                    {"name": "PLAIN", "value": "plain-value"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                    {"name": "APP_LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "COMPOSED", "value": "$(POD_NAME)/$(FROM_CM)/$(UNDEFINED)/$$(PLAIN)"},
                    {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
                ],
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CM_"}],
                "resources": {"limits": {"cpu": "250m"}},
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/config"},
                    {"name": "secret", "mountPath": "/etc/secret", "readOnly": true},
                    {"name": "config", "mountPath": "/opt/clusterapp-test/greeting.txt", "subPath": "greeting"},
                    {"name": "podinfo", "mountPath": "/etc/podinfo"},
                ],
            }],
            "volumes": [
                {"name": "config", "configMap": {"name": "settings"}},
                {"name": "secret", "secret": {"secretName": "creds", "items": [{"key": "password", "path": "pw"}]}},
                {"name": "podinfo", "downwardAPI": {"items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                ]}},
            ],
        }})).await;
    let pod =
        wait_pod(&pods, "facts", "Running and Ready", Duration::from_secs(60), |p| phase(p) == "Running" && ready(p))
            .await;
    println!("busybox pod Running+Ready {} ms after create", started.elapsed().as_millis());

    let ip = pod_ip(&pod);
    assert!(!ip.is_loopback(), "pod IP must not be loopback: {ip}");
    assert_eq!(&ip.octets()[..3], &[10, 244, 0], "pod IP {ip} outside 10.244.0.0/24");
    let status = pod.status.clone().expect("status");
    assert_eq!(status.host_ip.as_deref(), Some("10.244.0.1"));
    assert!(status.start_time.is_some());
    for c in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert!(condition(&pod, c), "condition {c} not True");
    }
    let cs = &status.container_statuses.expect("container statuses")[0];
    assert!(cs.ready && cs.started == Some(true) && cs.restart_count == 0);
    assert!(cs.state.as_ref().and_then(|s| s.running.as_ref()).is_some());

    let log = wait_log(&ns.name, "facts", "main", "DONE", Duration::from_secs(10)).await;
    let expect =
        |line: &str| assert!(log.lines().any(|l| l == line), "missing line {line:?} in the container log:\n{log}");
    expect("HOSTNAME_IS=facts");
    expect(&format!("ETH0={ip}/24"));
    expect(&format!("ETC_HOSTS=127.0.0.1 localhost|::1 localhost ip6-localhost ip6-loopback|{ip} facts|"));
    expect("ENV_PLAIN=plain-value");
    expect("ENV_POD_NAME=facts");
    expect(&format!("ENV_POD_NS={}", ns.name));
    expect(&format!("ENV_POD_IP={ip}"));
    expect("ENV_NODE=clusterapp-node");
    expect("ENV_SA=default");
    expect("ENV_APP_LABEL=facts");
    expect("ENV_FROM_SECRET=s3cret");
    expect("ENV_FROM_CM=hello");
    expect("ENV_COMPOSED=facts/hello/$(UNDEFINED)/$(PLAIN)");
    expect("ENV_CM_color=blue");
    expect("ENV_CPU_LIMIT=250");
    expect("ENV_KUBERNETES_SERVICE_HOST=10.96.0.1");
    expect("ENV_KUBERNETES_SERVICE_PORT=443");
    expect("CM_FILE=hello");
    expect("SECRET_FILE=s3cret");
    expect("SUBPATH_FILE=hello");
    expect("DOWNWARD_LABELS=app=\"facts\"");
    expect("DOWNWARD_NAME=facts");
    expect(&format!("SA_NAMESPACE={}", ns.name));
    expect("ARGS=facts plain-value");
    // The mount point for the subPath file was made inside the Pod only.
    assert!(!std::path::Path::new("/opt/clusterapp-test").exists(), "the kubelet littered the host file system");
    // The host reaches nothing but what the pod listens on; the pod's own
    // hostname is not the host's.
    assert_ne!(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(), "facts");

    // The ServiceAccount token: projected by the API server's admission, no trailing newline.
    let volumes = kubelet().pod_dir(&ns.name, "facts").join("volumes");
    let token_dir = std::fs::read_dir(&volumes)
        .expect("volumes dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("token").exists())
        .expect("a projected token volume");
    let token = std::fs::read(token_dir.join("token")).expect("token");
    assert!(token.len() > 100 && !token.ends_with(b"\n"), "token must be non-empty and not end in a newline");
    let ca = std::fs::read_to_string(token_dir.join("ca.crt")).expect("ca.crt");
    assert!(ca.contains("BEGIN CERTIFICATE"));
}

#[tokio::test]
async fn service_account_token_authenticates_and_rbac_applies() {
    kubelet();
    let ns = TestNamespace::new("kubelet-rbac").await;
    let script = r#"
sa=/var/run/secrets/kubernetes.io/serviceaccount
while true; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert $sa/ca.crt \
    -H "Authorization: Bearer $(cat $sa/token)" \
    "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/$(cat $sa/namespace)/pods")
  echo "status=$code"
  sleep 0.3
done
"#;
    let pods = ns.api::<Pod>();
    create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
        "spec": {"terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", "image": "local/busybox", "command": ["sh", "-c", script]}]}}),
    )
    .await;
    wait_pod(&pods, "client", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;
    // Authenticated as system:serviceaccount:<ns>:default, which may not list pods.
    wait_log(&ns.name, "client", "main", "status=403", Duration::from_secs(20)).await;
    let before = kubelet().container_log(&ns.name, "client", "main");
    assert!(!before.contains("status=200"), "listing pods worked before any Role existed:\n{before}");

    create(
        &ns.api::<Role>(),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}),
    )
    .await;
    create(
        &ns.api::<RoleBinding>(),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns.name}]}),
    )
    .await;
    wait_log(&ns.name, "client", "main", "status=200", Duration::from_secs(20)).await;
}

#[tokio::test]
async fn http_readiness_probe_drives_the_ready_condition() {
    kubelet();
    let ns = TestNamespace::new("kubelet-ready").await;
    let pods = ns.api::<Pod>();
    create(&pods, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [{"name": "web", "image": "local/busybox",
                "command": ["/usr/bin/python3", "-m", "http.server", "8080", "--directory", "/www"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
                "volumeMounts": [{"name": "www", "mountPath": "/www"}]}],
            "volumes": [{"name": "www", "emptyDir": {}}]}}))
    .await;
    let pod = wait_pod(&pods, "web", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;
    let ip = pod_ip(&pod);
    // The server answers (404 for /ready), so the pod is up but not Ready.
    wait_for_http(ip, 8080, "/").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pod = pods.get("web").await.expect("pod");
    assert!(!ready(&pod), "Ready without /ready being served");
    assert!(!condition(&pod, "ContainersReady"));

    let ready_file = kubelet().pod_dir(&ns.name, "web").join("volumes/www/ready");
    std::fs::write(&ready_file, "ok").expect("writing into the emptyDir");
    wait_pod(&pods, "web", "Ready", Duration::from_secs(10), ready).await;
    std::fs::remove_file(&ready_file).expect("removing the ready file");
    wait_pod(&pods, "web", "not Ready again", Duration::from_secs(10), |p| !ready(p)).await;
}

async fn wait_for_http(ip: Ipv4Addr, port: u16, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                &format!("http://{ip}:{port}{path}"),
            ])
            .output()
            .expect("curl");
        if out.stdout != b"000" && !out.stdout.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "http://{ip}:{port}{path} not answering");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn liveness_failure_restarts_the_container() {
    kubelet();
    let ns = TestNamespace::new("kubelet-live").await;
    let pods = ns.api::<Pod>();
    // Healthy for 2 s after each start, then the liveness file disappears.
    let script = "date +%s >> /data/starts; touch /data/healthy; sleep 2; rm -f /data/healthy; exec sleep 3600";
    create(&pods, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "flaky"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "local/busybox", "command": ["sh", "-c", script],
                "livenessProbe": {"exec": {"command": ["cat", "/data/healthy"]}, "periodSeconds": 1, "failureThreshold": 2},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}]}}))
    .await;
    let pod = wait_pod(&pods, "flaky", "restarted twice", Duration::from_secs(60), |p| restart_count(p) >= 2).await;
    let cs = &pod.status.expect("status").container_statuses.expect("statuses")[0];
    let last =
        cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()).expect("lastState.terminated after a restart");
    assert_eq!(last.exit_code, 143, "killed by SIGTERM after the liveness failure: {last:?}");
    // restartCount is 2 as soon as the third run starts; its shell writes
    // its line a moment later.
    let starts_file = kubelet().pod_dir(&ns.name, "flaky").join("volumes/data/starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let starts = std::fs::read_to_string(&starts_file).expect("starts file");
        if starts.lines().count() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the emptyDir keeps data across restarts and shows each start:\n{starts}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn deletion_runs_pre_stop_then_sigterm_then_sigkill_after_the_grace_period() {
    kubelet();
    let ns = TestNamespace::new("kubelet-delete").await;
    let pods = ns.api::<Pod>();
    let shared = support::repo_root().join(format!("target/test-kubelets/hostpath-{}", ns.name));
    std::fs::create_dir_all(&shared).expect("hostPath folder");
    // Ignores SIGTERM (records it), so only SIGKILL ends it.
    // `$$$$`: Kubernetes turns `$$` into `$` in commands, the shell gets `$$`.
    let script = "echo $$$$ > /shared/pid; trap 'echo sigterm >> /shared/events' TERM; while true; do sleep 0.1; done";
    create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stubborn"},
        "spec": {"terminationGracePeriodSeconds": 3,
            "containers": [{"name": "main", "image": "local/busybox", "command": ["sh", "-c", script],
                "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo prestop >> /shared/events"]}}},
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}],
            "volumes": [{"name": "shared", "hostPath": {"path": shared.to_string_lossy()}}]}}),
    )
    .await;
    wait_pod(&pods, "stubborn", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;
    let pid_file = shared.join("pid");
    support::wait_until(Duration::from_secs(10), "pid file", || {
        let p = pid_file.clone();
        async move { std::fs::read_to_string(p).is_ok_and(|s| !s.trim().is_empty()) }
    })
    .await;
    let pid: u32 = std::fs::read_to_string(&pid_file).expect("pid").trim().parse().expect("pid number");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    let deleted_at = Instant::now();
    pods.delete("stubborn", &DeleteParams::default()).await.expect("delete");
    support::wait_until(Duration::from_secs(30), "pod object gone", || {
        let pods = pods.clone();
        async move { matches!(pods.get_opt("stubborn").await, Ok(None)) }
    })
    .await;
    let took = deleted_at.elapsed();
    println!("graceful deletion with a SIGTERM-ignoring process took {} ms (grace 3 s)", took.as_millis());
    assert!(took >= Duration::from_secs(3), "the pod went away before its grace period: {took:?}");
    assert!(took < Duration::from_secs(10), "deletion took too long: {took:?}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} survived the deletion");
    let events = std::fs::read_to_string(shared.join("events")).expect("events");
    let lines: Vec<&str> = events.lines().collect();
    assert_eq!(lines.first(), Some(&"prestop"), "preStop runs first: {events}");
    assert!(lines.contains(&"sigterm"), "SIGTERM reached the process: {events}");
    let _ = std::fs::remove_dir_all(&shared);
}

#[tokio::test]
async fn unknown_image_waits_like_a_failed_pull_and_run_to_completion_pods_finish() {
    kubelet();
    let ns = TestNamespace::new("kubelet-phase").await;
    let pods = ns.api::<Pod>();
    create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nopull"},
        "spec": {"containers": [{"name": "main", "image": "example.com/not-mapped:1"}]}}),
    )
    .await;
    create(&pods, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job-ok"},
        "spec": {"restartPolicy": "Never",
                 "initContainers": [{"name": "prepare", "image": "local/busybox", "command": ["sh", "-c", "echo init-ran"]}],
                 "containers": [{"name": "main", "image": "local/busybox", "command": ["sh", "-c", "exit 0"]}]}})).await;
    create(&pods, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job-fail"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "local/busybox", "command": ["sh", "-c", "exit 3"]}]}})).await;

    let pod = wait_pod(&pods, "nopull", "waiting on ErrImagePull", Duration::from_secs(30), |p| {
        p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()).any(|c| {
            c.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref()) == Some("ErrImagePull")
        })
    })
    .await;
    assert_eq!(phase(&pod), "Pending");
    let pod = wait_pod(&pods, "job-ok", "Succeeded", Duration::from_secs(30), |p| phase(p) == "Succeeded").await;
    assert!(kubelet().container_log(&ns.name, "job-ok", "prepare").contains("init-ran"));
    let init = &pod.status.expect("status").init_container_statuses.expect("init statuses")[0];
    assert_eq!(init.state.as_ref().and_then(|s| s.terminated.as_ref()).map(|t| t.exit_code), Some(0));
    let pod = wait_pod(&pods, "job-fail", "Failed", Duration::from_secs(30), |p| phase(p) == "Failed").await;
    let cs = &pod.status.expect("status").container_statuses.expect("statuses")[0];
    assert_eq!(cs.state.as_ref().and_then(|s| s.terminated.as_ref()).map(|t| t.exit_code), Some(3));
    assert_eq!(cs.restart_count, 0);
}

#[tokio::test]
async fn run_as_user_and_fs_group_apply_to_the_process_and_its_volumes() {
    kubelet();
    let ns = TestNamespace::new("kubelet-user").await;
    create(
        &ns.api::<Secret>(),
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "key"}, "stringData": {"key": "k3y"}}),
    )
    .await;
    let pods = ns.api::<Pod>();
    let script = "echo UID=$(id -u) GID=$(id -g) GROUPS=$(id -G); echo SECRET=$(cat /etc/secret/key); touch /data/written && echo WROTE; exec sleep 3600";
    create(&pods, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "user"},
        "spec": {"terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000, "runAsNonRoot": true},
            "containers": [{"name": "main", "image": "local/busybox", "command": ["sh", "-c", script],
                "volumeMounts": [{"name": "secret", "mountPath": "/etc/secret", "readOnly": true}, {"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "secret", "secret": {"secretName": "key", "defaultMode": 256}}, {"name": "data", "emptyDir": {}}]}}))
    .await;
    create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root-refused"},
        "spec": {"securityContext": {"runAsNonRoot": true},
            "containers": [{"name": "main", "image": "local/busybox", "command": ["sh", "-c", "sleep 3600"]}]}}),
    )
    .await;
    let log = wait_log(&ns.name, "user", "main", "WROTE", Duration::from_secs(30)).await;
    assert!(log.contains("UID=1000 GID=1000 GROUPS=1000 2000"), "{log}");
    assert!(log.contains("SECRET=k3y"), "a 0400 secret is readable through fsGroup: {log}");
    let pod = wait_pod(&pods, "root-refused", "refused", Duration::from_secs(30), |p| {
        p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()).any(|c| {
            c.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref())
                == Some("CreateContainerConfigError")
        })
    })
    .await;
    assert_eq!(phase(&pod), "Pending");
}

#[tokio::test]
async fn clusterapp_image_runs_the_binary_built_from_this_repository() {
    kubelet();
    let ns = TestNamespace::new("kubelet-bin").await;
    let pods = ns.api::<Pod>();
    // As the operator's balancer Deployment does it: args only, the image's
    // ENTRYPOINT is `clusterapp`.
    create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crd"},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "main", "image": "ghcr.io/clusterapp/clusterapp:0.1.0", "args": ["crd"]}]}}),
    )
    .await;
    wait_pod(&pods, "crd", "Succeeded", Duration::from_secs(30), |p| phase(p) == "Succeeded").await;
    let log = kubelet().container_log(&ns.name, "crd", "main");
    assert!(log.contains("kind: CustomResourceDefinition") && log.contains("clusterapp.io"), "{log}");
}

/// Waits until the container printed `line` (a whole line); returns how long it took.
async fn wait_log_line(ns: &str, pod: &str, container: &str, line: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let log = kubelet().container_log(ns, pod, container);
        if log.lines().any(|l| l == line) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "no line {line:?} in the log of {ns}/{pod}/{container} after {timeout:?}:\n{}\nkubelet log:\n{}",
            log.lines().rev().take(10).collect::<Vec<_>>().join("\n"),
            kubelet().log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (inode, mtime) of a file: a rewrite (write + rename) changes both.
fn file_identity(path: &std::path::Path) -> (u64, std::time::SystemTime) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.ino(), meta.modified().expect("mtime"))
}

#[tokio::test]
async fn changed_secrets_and_configmaps_reach_the_files_of_a_running_pod() {
    kubelet();
    let ns = TestNamespace::new("kubelet-volsync").await;
    let secrets = ns.api::<Secret>();
    let configmaps = ns.api::<ConfigMap>();
    create(
        &secrets,
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rotating"}, "stringData": {"pw": "v1", "stable": "same"}}),
    )
    .await;
    create(
        &configmaps,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "conf"}, "data": {"color": "blue", "extra": "x"}}),
    )
    .await;
    // What the container itself sees, five times a second.
    let script = r#"
while true; do
  echo "SECRET=$(cat /etc/secret/pw) STABLE=$(cat /etc/secret/stable)"
  echo "PROJECTED=$(cat /etc/projected/password)/$(cat /etc/projected/colour)"
  echo "CM=$(cat /etc/config/color) EXTRA=$(cat /etc/config/extra 2>/dev/null || echo gone)"
  sleep 0.2
done
"#;
    let pods = ns.api::<Pod>();
    create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "watcher"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": "local/busybox:1.36", "command": ["sh", "-c", script],
                "volumeMounts": [
                    {"name": "secret", "mountPath": "/etc/secret", "readOnly": true},
                    {"name": "config", "mountPath": "/etc/config"},
                    {"name": "both", "mountPath": "/etc/projected"},
                ],
            }],
            "volumes": [
                {"name": "secret", "secret": {"secretName": "rotating"}},
                {"name": "config", "configMap": {"name": "conf"}},
                {"name": "both", "projected": {"sources": [
                    {"secret": {"name": "rotating", "items": [{"key": "pw", "path": "password"}]}},
                    {"configMap": {"name": "conf", "items": [{"key": "color", "path": "colour"}]}},
                ]}},
            ],
        }}),
    )
    .await;
    wait_pod(&pods, "watcher", "Running and Ready", Duration::from_secs(60), |p| phase(p) == "Running" && ready(p))
        .await;
    let bound = Duration::from_secs(10);
    wait_log_line(&ns.name, "watcher", "main", "SECRET=v1 STABLE=same", bound).await;
    wait_log_line(&ns.name, "watcher", "main", "PROJECTED=v1/blue", bound).await;
    wait_log_line(&ns.name, "watcher", "main", "CM=blue EXTRA=x", bound).await;
    let volumes = kubelet().pod_dir(&ns.name, "watcher").join("volumes");
    let stable_before = file_identity(&volumes.join("secret/stable"));
    let config_before = file_identity(&volumes.join("config/color"));
    // Several sync periods without a change: nothing is rewritten.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        file_identity(&volumes.join("config/color")),
        config_before,
        "an unchanged ConfigMap's file was rewritten"
    );

    // A changed Secret key: both volumes that use it follow; the other key's file is left alone.
    secrets
        .replace("rotating", &Default::default(), &{
            let mut s = secrets.get("rotating").await.expect("secret");
            s.data = Some(
                [
                    ("pw".to_string(), k8s_openapi::ByteString(b"v2".to_vec())),
                    ("stable".to_string(), k8s_openapi::ByteString(b"same".to_vec())),
                ]
                .into(),
            );
            s
        })
        .await
        .expect("updating the secret");
    let secret_after = wait_log_line(&ns.name, "watcher", "main", "SECRET=v2 STABLE=same", bound).await;
    let projected_after = wait_log_line(&ns.name, "watcher", "main", "PROJECTED=v2/blue", bound).await;
    assert_eq!(file_identity(&volumes.join("secret/stable")), stable_before, "the unchanged key's file was rewritten");
    assert_eq!(file_identity(&volumes.join("config/color")), config_before, "an unrelated volume's file was rewritten");

    // A changed ConfigMap with a key removed: the value follows, the file goes.
    let patch = json!({"data": {"color": "green", "extra": null}});
    configmaps
        .patch("conf", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .expect("patching the configmap");
    let config_after = wait_log_line(&ns.name, "watcher", "main", "CM=green EXTRA=gone", bound).await;
    wait_log_line(&ns.name, "watcher", "main", "PROJECTED=v2/green", bound).await;
    assert_eq!(file_identity(&volumes.join("secret/stable")), stable_before);
    println!(
        "volume sync: secret change seen in the pod after {} ms (in the projected volume {} ms after that), configmap change after {} ms",
        secret_after.as_millis(),
        projected_after.as_millis(),
        config_after.as_millis()
    );
    pods.delete("watcher", &DeleteParams::default()).await.expect("deleting the pod");
}
