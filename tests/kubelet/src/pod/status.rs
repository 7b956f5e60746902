//! The Pod status a worker reports. Deterministic for a given state (times
//! change only at transitions), so an unchanged Pod causes no API write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

use super::{ContainerRun, ContainerState, PodWorker, Terminated};
use crate::node::now_time;

fn terminated_json(t: &Terminated) -> Value {
    let mut v = json!({
        "exitCode": t.exit_code, "reason": t.reason,
        "startedAt": t.started_at, "finishedAt": t.finished_at,
    });
    if let Some(signal) = t.signal {
        v["signal"] = json!(signal);
    }
    if let Some(m) = &t.message {
        v["message"] = json!(m);
    }
    if !t.container_id.is_empty() {
        v["containerID"] = json!(t.container_id);
    }
    v
}

fn state_json(state: &ContainerState) -> Value {
    match state {
        ContainerState::Waiting { reason, message } => {
            let mut w = json!({"reason": reason});
            if let Some(m) = message {
                w["message"] = json!(m);
            }
            json!({"waiting": w})
        }
        ContainerState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        ContainerState::Terminated(t) => json!({"terminated": terminated_json(t)}),
    }
}

fn container_json(c: &ContainerRun) -> Value {
    let image = c.spec.image.clone().unwrap_or_default();
    let mut v = json!({
        "name": c.spec.name,
        "image": image,
        "imageID": format!("process-kubelet://{image}"),
        "ready": c.ready,
        "started": c.is_running() && c.started,
        "restartCount": c.restart_count,
        "state": state_json(&c.state),
        "lastState": c.last_terminated.as_ref().map_or(json!({}), |t| json!({"terminated": terminated_json(t)})),
    });
    if let Some(id) = c.container_id() {
        v["containerID"] = json!(id);
    }
    v
}

pub fn phase(w: &PodWorker) -> &'static str {
    let finished =
        |c: &ContainerRun| matches!(c.state, ContainerState::Terminated(_)) && c.start_at.is_none() && c.pid.is_none();
    if w.init_containers.iter().any(|c| finished(c) && !c.succeeded()) {
        return "Failed";
    }
    if w.init_containers.iter().any(|c| !c.succeeded()) {
        return "Pending";
    }
    if w.containers.iter().any(|c| c.is_running() || (c.ever_started && !finished(c))) {
        return "Running";
    }
    if !w.containers.is_empty() && w.containers.iter().all(finished) {
        return if w.containers.iter().all(ContainerRun::succeeded) { "Succeeded" } else { "Failed" };
    }
    "Pending"
}

pub fn pod_status(w: &mut PodWorker) -> Value {
    let (phase, pod_reason, pod_message) = match &w.final_phase {
        Some((p, r, m)) => (p.clone(), Some(r.clone()), Some(m.clone())),
        None => (phase(w).to_string(), None, None),
    };
    let initialized = w.init_containers.iter().all(ContainerRun::succeeded);
    let containers_ready = !w.containers.is_empty() && w.containers.iter().all(|c| c.ready) && w.final_phase.is_none();
    let sandbox_ready = w.network.is_some();
    let wanted: [(&'static str, bool); 5] = [
        ("PodReadyToStartContainers", sandbox_ready),
        ("Initialized", initialized),
        ("ContainersReady", containers_ready),
        ("Ready", containers_ready),
        ("PodScheduled", true),
    ];
    let mut conditions = Vec::new();
    for (type_, status) in wanted {
        let entry = w.condition_times.entry(type_).or_insert_with(|| (status, now_time()));
        if entry.0 != status {
            *entry = (status, now_time());
        }
        let time: &Time = &entry.1;
        let mut c = json!({"type": type_, "status": if status { "True" } else { "False" }, "lastTransitionTime": time, "lastProbeTime": null});
        if !status && (type_ == "Ready" || type_ == "ContainersReady") {
            let not_ready: Vec<&str> = w.containers.iter().filter(|c| !c.ready).map(|c| c.spec.name.as_str()).collect();
            c["reason"] = json!("ContainersNotReady");
            c["message"] = json!(format!("containers with unready status: [{}]", not_ready.join(" ")));
        }
        conditions.push(c);
    }
    let ip = w.network.as_ref().map(|n| n.ip).or(w.released_ip);
    let host_ip = w.ctx_host_ip();
    let mut status = json!({
        "phase": phase,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "conditions": conditions,
        "containerStatuses": w.containers.iter().map(container_json).collect::<Vec<_>>(),
    });
    if !w.init_containers.is_empty() {
        status["initContainerStatuses"] = json!(w.init_containers.iter().map(container_json).collect::<Vec<_>>());
    }
    if let Some(ip) = ip {
        status["podIP"] = json!(ip.to_string());
        status["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if let Some(t) = &w.start_time {
        status["startTime"] = json!(t);
    }
    if let Some(r) = pod_reason {
        status["reason"] = json!(r);
    }
    if let Some(m) = pod_message {
        status["message"] = json!(m);
    }
    status
}
