//! The Node object: registration, status and the heartbeat Lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{info, warn};

/// How long the Lease holds; renewed every quarter of it (as a kubelet does).
const LEASE_SECONDS: i32 = 40;

pub struct NodeInfo {
    pub name: String,
    pub internal_ip: String,
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
}

pub fn now_time() -> Time {
    Time(Timestamp::now())
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn status_json(info: &NodeInfo, transition: &Time, ready: bool) -> serde_json::Value {
    let now = now_time();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": transition})
    };
    let resources = json!({"cpu": info.cpu, "memory": info.memory, "pods": info.max_pods.to_string()});
    json!({
        "capacity": resources,
        "allocatable": resources,
        "addresses": [
            {"type": "InternalIP", "address": info.internal_ip},
            {"type": "Hostname", "address": info.name},
        ],
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "process kubelet: not measured"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "process kubelet: not measured"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "process kubelet: not measured"),
            if ready {
                condition("Ready", "True", "KubeletReady", "clusterapp process kubelet is posting ready status")
            } else {
                condition("Ready", "False", "KubeletNotReady", "clusterapp process kubelet is stopping")
            },
        ],
        "nodeInfo": {
            "machineID": read_trimmed("/etc/machine-id"),
            "systemUUID": read_trimmed("/etc/machine-id"),
            "bootID": read_trimmed("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": read_trimmed("/proc/sys/kernel/osrelease"),
            "osImage": "clusterapp process kubelet (local processes, network namespace per Pod)",
            "containerRuntimeVersion": "process://0.1",
            "kubeletVersion": "v1.37.2-clusterapp",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        },
    })
}

/// Creates (or takes over) the Node and marks it Ready.
pub async fn register(client: &Client, info: &NodeInfo) -> anyhow::Result<Time> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": info.name, "labels": {
            "kubernetes.io/hostname": info.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "node.clusterapp.io/process-kubelet": "true",
        }},
        // Ready from the start, so the node lifecycle controller does not
        // taint it not-ready first (the scheduler would then back off).
        "status": status_json(info, &now_time(), true),
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => info!(node = info.name, "registered the Node"),
        Err(kube::Error::Api(e)) if e.code == 409 => info!(node = info.name, "the Node exists; taking it over"),
        Err(e) => return Err(e.into()),
    }
    let transition = now_time();
    update_status(client, info, &transition, true).await?;
    Ok(transition)
}

pub async fn update_status(client: &Client, info: &NodeInfo, transition: &Time, ready: bool) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = json!({"status": status_json(info, transition, ready)});
    nodes.patch_status(&info.name, &PatchParams::default(), &Patch::Strategic(&patch)).await?;
    Ok(())
}

/// Waits (up to `timeout`) until no `node.kubernetes.io/not-ready` or
/// `unreachable` taint is left on the Node, so Pods created next schedule at once.
pub async fn wait_schedulable(client: &Client, name: &str, timeout: Duration) {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        match nodes.get(name).await {
            Ok(node) => {
                let blocked = node
                    .spec
                    .and_then(|s| s.taints)
                    .unwrap_or_default()
                    .iter()
                    .any(|t| t.key == "node.kubernetes.io/not-ready" || t.key == "node.kubernetes.io/unreachable");
                if !blocked {
                    return;
                }
            }
            Err(e) => warn!(node = name, "reading the Node: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    warn!(node = name, "the Node still has a not-ready taint after {timeout:?}");
}

/// Renews the Lease every LEASE_SECONDS/4 and refreshes the Ready condition's
/// heartbeat every few renewals; runs until cancelled.
pub async fn heartbeat(client: Client, info: NodeInfo, transition: Time) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client.clone());
    let mut tick = tokio::time::interval(Duration::from_secs((LEASE_SECONDS / 4) as u64));
    let mut round: u64 = 0;
    loop {
        tick.tick().await;
        if let Err(e) = renew_lease(&leases, &nodes, &info.name).await {
            warn!(node = info.name, "renewing the node Lease: {e:#}");
        }
        round += 1;
        if round.is_multiple_of(2)
            && let Err(e) = update_status(&client, &info, &transition, true).await
        {
            warn!(node = info.name, "updating the Node status: {e:#}");
        }
    }
}

async fn renew_lease(leases: &Api<Lease>, nodes: &Api<Node>, name: &str) -> anyhow::Result<()> {
    let now = MicroTime(Timestamp::now());
    if leases.get_opt(name).await?.is_some() {
        let patch = json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now}});
        leases.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        return Ok(());
    }
    // The Lease is owned by the Node so it goes away with it.
    let uid = nodes.get(name).await?.metadata.uid.unwrap_or_default();
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease",
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
    }))?;
    leases.create(&PostParams::default(), &lease).await?;
    Ok(())
}

/// At exit: delete the Node with `admin` when given (the node identity may
/// not delete its own Node object), else leave it NotReady.
pub async fn deregister(node_client: &Client, admin: Option<&Client>, info: &NodeInfo, transition: &Time) {
    if let Some(admin) = admin {
        let nodes: Api<Node> = Api::all(admin.clone());
        match nodes.delete(&info.name, &DeleteParams::default()).await {
            Ok(_) => {
                info!(node = info.name, "deleted the Node");
                return;
            }
            Err(e) => warn!(node = info.name, "deleting the Node: {e:#}"),
        }
    }
    if let Err(e) = update_status(node_client, info, transition, false).await {
        warn!(node = info.name, "marking the Node NotReady: {e:#}");
    }
}
