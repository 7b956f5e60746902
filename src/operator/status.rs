//! The ClusterApp's status, computed from what was observed. Pure, and
//! deterministic: the same observation gives the same status, and a
//! condition's `lastTransitionTime` moves only when its `status` changes.

use std::fmt::Write as _;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{ClusterApp, ClusterAppStatus, Member};
use crate::operator::names::AppNames;
use crate::operator::sessions;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

// Condition reasons: users, alerts and tests match on them.
/// `Degraded=False`.
pub const AS_EXPECTED: &str = "AsExpected";
/// `Degraded=True`: a session node container keeps crashing.
pub const NODES_CRASH_LOOPING: &str = "NodesCrashLooping";
/// `Ready=False`: fewer ready session nodes than `spec.replicas`.
pub const NODES_NOT_READY: &str = "NodesNotReady";
/// `Ready=False`: the nodes are ready, but the app is degraded.
pub const READY_BUT_DEGRADED: &str = "Degraded";
/// `Ready=False`: no balancer replica is available.
pub const BALANCER_UNAVAILABLE: &str = "BalancerUnavailable";
/// `Ready=True`.
pub const NODES_READY: &str = "NodesReady";
/// `Progressing=True`: the StatefulSet is not there yet.
pub const CREATING: &str = "Creating";
/// `Progressing=True`: nodes are being added or removed.
pub const SCALING: &str = "Scaling";
/// `Progressing=True`: nodes are being replaced by the current template.
pub const ROLLING_UPDATE: &str = "RollingUpdate";
/// `Progressing=False`.
pub const STABLE: &str = "Stable";

/// Restarts after which a node container that is not ready counts as
/// crash-looping even while it runs: between its back-offs the kubelet
/// starts it again (`running`, not ready, for Tomcat's whole start), and
/// counting that as recovered would flip `Degraded` (and send an event) at
/// every attempt.
pub const CRASH_LOOP_MIN_RESTARTS: i32 = 2;
/// Of Tomcat's last output (the kubelet keeps it in
/// `lastState.terminated.message`: `terminationMessagePolicy:
/// FallbackToLogsOnError`), at most this many lines are quoted per pod…
pub const CRASH_LOG_LINES: usize = 10;
/// …and at most this many bytes of them, from the end: the last line is
/// usually the one that explains. Keeps the Warning event's note (at most
/// 1024 bytes) whole for one pod.
pub const CRASH_LOG_BYTES: usize = 600;
/// Crash-looping pods described one by one; more are only named.
pub const CRASH_PODS_DESCRIBED: usize = 3;

/// A problem the user can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: String,
    pub message: String,
}

/// The session node ordinal of `pod` (`shop-12` -> 12), for sorting.
fn ordinal(pod: &str) -> u64 {
    pod.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX)
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Members from the session node pods of the app.
pub fn members(pods: &[Pod]) -> Vec<Member> {
    let mut members: Vec<Member> = pods
        .iter()
        .filter_map(|pod| {
            let name = pod.metadata.name.clone()?;
            Some(Member {
                // jvmRoute is the pod name (server.xml: jvmRoute="${POD_NAME}").
                route: name.clone(),
                pod: name,
                pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()),
                ready: pod_is_ready(pod),
                draining: pod.metadata.deletion_timestamp.is_some(),
                sessions: None,
            })
        })
        .collect();
    members.sort_by(|a, b| ordinal(&a.pod).cmp(&ordinal(&b.pod)).then_with(|| a.pod.cmp(&b.pod)));
    members
}

/// Why the StatefulSet is still moving, if it is: (reason, message).
fn progress(
    app: &ClusterApp,
    stateful_set: Option<&StatefulSet>,
    members: &[Member],
) -> Option<(&'static str, String)> {
    let desired = app.spec.replicas;
    let Some(sts) = stateful_set else {
        return Some((CREATING, "the session node StatefulSet does not exist yet".to_string()));
    };
    let live = members.iter().filter(|m| !m.draining).count();
    if live != usize::try_from(desired).unwrap_or(0) || members.iter().any(|m| m.draining) {
        return Some((SCALING, format!("{live} session nodes, {desired} wanted")));
    }
    let status = sts.status.clone().unwrap_or_default();
    let rolled = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0)
        && status.updated_replicas.unwrap_or(0) >= desired
        && (status.update_revision.is_none() || status.current_revision == status.update_revision);
    if !rolled {
        return Some((
            ROLLING_UPDATE,
            format!("{} of {desired} session nodes run the current template", status.updated_replicas.unwrap_or(0)),
        ));
    }
    None
}

fn condition(type_: &str, status: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        // Replaced by `carry_transition_times` or `now`.
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// Keeps `lastTransitionTime` of conditions whose status did not change;
/// stamps `now` on the others.
fn carry_transition_times(conditions: &mut [Condition], previous: &[Condition], now: &Time) {
    for c in conditions {
        match previous.iter().find(|p| p.type_ == c.type_) {
            Some(p) if p.status == c.status => c.last_transition_time = p.last_transition_time.clone(),
            _ => c.last_transition_time = now.clone(),
        }
    }
}

/// Why the balancer cannot serve yet, if it cannot: it serves once one of
/// its replicas is available (ready for `minReadySeconds`).
fn balancer_unavailable(names: &AppNames, balancer: Option<&Deployment>) -> Option<String> {
    let name = names.balancer();
    let Some(deployment) = balancer else {
        return Some(format!("the balancer Deployment {name} does not exist yet"));
    };
    let status = deployment.status.clone().unwrap_or_default();
    let available = status.available_replicas.unwrap_or(0);
    if available >= 1 {
        return None;
    }
    let wanted = deployment.spec.replicas.unwrap_or(1);
    let ready = status.ready_replicas.unwrap_or(0);
    Some(format!(
        "the balancer Deployment {name} has no available replica ({available} of {wanted} available, {ready} ready): requests cannot reach the session nodes"
    ))
}

/// One crash-looping container of a session node pod.
struct CrashLoop<'a> {
    pod: &'a str,
    container: &'a ContainerStatus,
}

/// A container keeps crashing: the kubelet holds it in `CrashLoopBackOff`,
/// or runs it again (not ready yet) after [`CRASH_LOOP_MIN_RESTARTS`] or
/// more crashes.
fn is_crash_looping(container: &ContainerStatus) -> bool {
    if container.ready {
        return false;
    }
    let waiting_reason = container.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref());
    let crashed_before = container.last_state.as_ref().is_some_and(|s| s.terminated.is_some());
    waiting_reason == Some("CrashLoopBackOff") || (crashed_before && container.restart_count >= CRASH_LOOP_MIN_RESTARTS)
}

/// The last lines of `text`: at most [`CRASH_LOG_LINES`] lines and
/// [`CRASH_LOG_BYTES`] bytes, cut at a line (or, for one overlong line, a
/// character) boundary.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let mut start = lines.len().saturating_sub(CRASH_LOG_LINES);
    while start + 1 < lines.len() && lines[start..].iter().map(|l| l.len() + 1).sum::<usize>() > CRASH_LOG_BYTES {
        start += 1;
    }
    let kept = lines[start..].join("\n");
    if kept.len() <= CRASH_LOG_BYTES {
        return kept;
    }
    let mut cut = kept.len() - CRASH_LOG_BYTES;
    while !kept.is_char_boundary(cut) {
        cut += 1;
    }
    format!("…{}", &kept[cut..])
}

/// One crash-looping container, for the condition's message.
fn describe(crash: &CrashLoop<'_>, namespace: &str) -> String {
    let container = crash.container;
    let mut text = format!(
        "pod {} (container {}) restarted {} time{}",
        crash.pod,
        container.name,
        container.restart_count,
        if container.restart_count == 1 { "" } else { "s" }
    );
    let terminated = container.last_state.as_ref().and_then(|s| s.terminated.as_ref());
    if let Some(terminated) = terminated {
        let _ = write!(text, ", last exit code {}", terminated.exit_code);
        if let Some(reason) = terminated.reason.as_deref().filter(|r| !r.is_empty()) {
            let _ = write!(text, " ({reason})");
        }
    }
    match terminated.and_then(|t| t.message.as_deref()).map(last_lines).filter(|l| !l.is_empty()) {
        Some(lines) => {
            let _ = write!(text, "; its last lines:\n{lines}");
        }
        None => {
            let _ = write!(
                text,
                "; it left no output: `kubectl logs -n {namespace} {} -c {} --previous`",
                crash.pod, container.name
            );
        }
    }
    text
}

/// `Degraded` when session node containers keep crashing (a wrong image,
/// a web application that fails at start, too little memory): names the
/// pods, their restart counts and Tomcat's last lines, which a user would
/// otherwise have to find with `kubectl logs --previous`. Pods being
/// deleted are leaving on purpose and are not judged.
pub fn crash_looping_nodes(pods: &[Pod]) -> Option<Problem> {
    let mut sorted: Vec<&Pod> = pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    sorted.sort_by_key(|p| {
        let name = p.metadata.name.as_deref().unwrap_or_default();
        (ordinal(name), name)
    });
    let crashes: Vec<CrashLoop<'_>> = sorted
        .iter()
        .flat_map(|pod| {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let containers = pod.status.as_ref().and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
            containers.iter().filter(|c| is_crash_looping(c)).map(move |container| CrashLoop { pod: name, container })
        })
        .collect();
    let first = crashes.first()?;
    let namespace = sorted.first().and_then(|p| p.metadata.namespace.as_deref()).unwrap_or_default();
    let mut pods_named: Vec<&str> = crashes.iter().map(|c| c.pod).collect();
    pods_named.dedup();
    let mut message = format!(
        "session node{} {} crash-looping: {}",
        if pods_named.len() == 1 { "" } else { "s" },
        if pods_named.len() == 1 { "is" } else { "are" },
        describe(first, namespace)
    );
    for crash in crashes.iter().skip(1).take(CRASH_PODS_DESCRIBED - 1) {
        let _ = write!(message, "\n{}", describe(crash, namespace));
    }
    if crashes.len() > CRASH_PODS_DESCRIBED {
        let rest: Vec<&str> = crashes[CRASH_PODS_DESCRIBED..].iter().map(|c| c.pod).collect();
        let _ = write!(message, "\nand {} more: {}", rest.len(), rest.join(", "));
    }
    Some(Problem { reason: NODES_CRASH_LOOPING.to_string(), message })
}

/// What the cluster observed about one ClusterApp: its session node pods and
/// the StatefulSet and balancer Deployment as last cached.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed<'a> {
    pub pods: &'a [Pod],
    pub stateful_set: Option<&'a StatefulSet>,
    pub balancer: Option<&'a Deployment>,
}

/// The status to write. `problem` is what validation, apply or the
/// membership check found wrong; without one, crash-looping session nodes
/// make the app degraded.
pub fn compute_status(
    app: &ClusterApp,
    observed: Observed<'_>,
    problem: Option<&Problem>,
    now: Time,
) -> ClusterAppStatus {
    let Observed { pods, stateful_set, balancer } = observed;
    let names = AppNames::new(app.metadata.name.as_deref().unwrap_or_default());
    let generation = app.metadata.generation;
    let mut members = members(pods);
    // The estimates are the session watch's to write; a reconcile keeps them.
    sessions::carry_estimates(&mut members, app.status.as_ref());
    let replicas = members.iter().filter(|m| !m.draining).count();
    let ready_replicas = members.iter().filter(|m| m.ready && !m.draining).count();
    let desired = app.spec.replicas;
    let replicas = i32::try_from(replicas).unwrap_or(i32::MAX);
    let ready_replicas = i32::try_from(ready_replicas).unwrap_or(i32::MAX);

    let crash_loop = if problem.is_none() { crash_looping_nodes(pods) } else { None };
    let problem = problem.or(crash_loop.as_ref());
    let degraded = match problem {
        Some(p) => condition(DEGRADED, true, &p.reason, p.message.clone(), generation),
        None => {
            condition(DEGRADED, false, AS_EXPECTED, "every object of the ClusterApp is applied".to_string(), generation)
        }
    };
    let nodes = format!("{ready_replicas} of {desired} session nodes are ready");
    let ready = if ready_replicas < desired {
        condition(READY, false, NODES_NOT_READY, nodes, generation)
    } else if let Some(p) = problem {
        condition(
            READY,
            false,
            READY_BUT_DEGRADED,
            format!("{nodes}, but the ClusterApp is degraded: {}", p.message),
            generation,
        )
    } else if let Some(why) = balancer_unavailable(&names, balancer) {
        condition(READY, false, BALANCER_UNAVAILABLE, format!("{nodes}, but {why}"), generation)
    } else {
        condition(READY, true, NODES_READY, format!("{nodes} and the balancer is available"), generation)
    };
    let progressing = match progress(app, stateful_set, &members) {
        Some((reason, message)) => condition(PROGRESSING, true, reason, message, generation),
        None => condition(PROGRESSING, false, STABLE, "the session nodes match the spec".to_string(), generation),
    };
    let mut conditions = vec![ready, progressing, degraded];
    let previous = app.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    carry_transition_times(&mut conditions, previous, &now);

    ClusterAppStatus {
        observed_generation: generation,
        replicas,
        ready_replicas,
        ready: format!("{ready_replicas}/{desired}"),
        routes: members.iter().filter(|m| !m.draining).map(|m| m.route.as_str()).collect::<Vec<_>>().join(","),
        selector: names.session_node_selector(),
        sessions: sessions::spread(&members),
        members,
        conditions,
    }
}

/// The condition `type_` of a status, if present.
pub fn find_condition<'a>(status: Option<&'a ClusterAppStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(yaml: &str) -> ClusterApp {
        serde_yaml_ng::from_str(yaml).expect("app")
    }

    fn pod(name: &str, ready: bool, deleting: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "deletionTimestamp": if deleting { Some("2025-01-01T00:00:00Z") } else { None }},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .expect("pod")
    }

    fn balancer(available: i32) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "shop-balancer"},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": {"replicas": 2, "readyReplicas": available, "availableReplicas": available}
        }))
        .expect("deployment")
    }

    /// Pods with an available balancer.
    fn seen<'a>(pods: &'a [Pod], balancer: &'a Deployment) -> Observed<'a> {
        Observed { pods, stateful_set: None, balancer: Some(balancer) }
    }

    const APP: &str = "metadata: {name: shop, namespace: store, generation: 3}\nspec: {image: x, replicas: 3}";

    fn t(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("time"))
    }

    #[test]
    fn members_sorted_by_ordinal_with_routes() {
        let pods = vec![pod("shop-10", true, false), pod("shop-2", false, false), pod("shop-0", true, true)];
        let m = members(&pods);
        assert_eq!(m.iter().map(|m| m.pod.as_str()).collect::<Vec<_>>(), ["shop-0", "shop-2", "shop-10"]);
        assert_eq!(m[0].route, "shop-0");
        assert!(m[0].draining && m[0].ready);
        assert!(!m[1].ready);
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut app = app(APP);
        let up = balancer(2);
        let pods = vec![pod("shop-0", true, false), pod("shop-1", true, false)];
        let first = compute_status(&app, seen(&pods, &up), None, t(100));
        assert_eq!(first.ready, "2/3");
        assert_eq!(find_condition(Some(&first), READY).map(|c| c.status.as_str()), Some("False"));
        app.status = Some(first.clone());
        // Same observation later: identical status (no churn).
        assert_eq!(compute_status(&app, seen(&pods, &up), None, t(200)), first);
        // Ready flips: only Ready's time moves.
        let pods = vec![pod("shop-0", true, false), pod("shop-1", true, false), pod("shop-2", true, false)];
        let second = compute_status(&app, seen(&pods, &up), None, t(300));
        let ready = find_condition(Some(&second), READY).expect("ready");
        assert_eq!((ready.status.as_str(), ready.last_transition_time.clone()), ("True", t(300)));
        let degraded = find_condition(Some(&second), DEGRADED).expect("degraded");
        assert_eq!(degraded.last_transition_time, t(100));
        assert_eq!(second.routes, "shop-0,shop-1,shop-2");
        assert_eq!(second.observed_generation, Some(3));
    }

    #[test]
    fn problem_makes_degraded_and_not_ready() {
        let app = app(APP);
        let problem =
            Problem { reason: "SecretNotFound".to_string(), message: "Secret store/ajp does not exist".to_string() };
        let pods = vec![pod("shop-0", true, false), pod("shop-1", true, false), pod("shop-2", true, false)];
        let up = balancer(2);
        let status = compute_status(&app, seen(&pods, &up), Some(&problem), t(1));
        let degraded = find_condition(Some(&status), DEGRADED).expect("degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "SecretNotFound"));
        let ready = find_condition(Some(&status), READY).expect("ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Degraded"));
        assert!(ready.message.contains("Secret store/ajp does not exist"), "{}", ready.message);
    }

    #[test]
    fn ready_waits_for_an_available_balancer() {
        let app = app(APP);
        let pods = vec![pod("shop-0", true, false), pod("shop-1", true, false), pod("shop-2", true, false)];
        let reason = |observed: Observed<'_>| {
            let status = compute_status(&app, observed, None, t(1));
            let ready = find_condition(Some(&status), READY).expect("ready").clone();
            (ready.status, ready.reason, ready.message)
        };
        // No Deployment in the cache yet.
        let (status, why, message) = reason(Observed { pods: &pods, stateful_set: None, balancer: None });
        assert_eq!((status.as_str(), why.as_str()), ("False", "BalancerUnavailable"));
        assert!(message.contains("shop-balancer does not exist yet"), "{message}");
        // Created, nothing available (no kubelet, image pull, crash loop).
        let down = balancer(0);
        let (status, why, message) = reason(seen(&pods, &down));
        assert_eq!((status.as_str(), why.as_str()), ("False", "BalancerUnavailable"));
        assert!(
            message.contains("3 of 3 session nodes are ready") && message.contains("0 of 2 available"),
            "{message}"
        );
        // One available replica serves.
        let one = balancer(1);
        let (status, why, _) = reason(seen(&pods, &one));
        assert_eq!((status.as_str(), why.as_str()), ("True", "NodesReady"));
        // Nodes not ready say so first, whatever the balancer does.
        let (status, why, _) = reason(seen(&pods[..2], &down));
        assert_eq!((status.as_str(), why.as_str()), ("False", "NodesNotReady"));
    }

    /// A session node pod as the API returns it after its Tomcat crashed
    /// `restarts` times: in `waiting` (e.g. CrashLoopBackOff) or `running`
    /// again, with Tomcat's last lines in `lastState.terminated.message`
    /// (terminationMessagePolicy: FallbackToLogsOnError).
    fn crashed_pod(name: &str, restarts: i32, waiting: Option<&str>, last_lines: Option<&str>) -> Pod {
        let state = match waiting {
            Some(reason) => {
                serde_json::json!({"waiting": {"reason": reason, "message": "back-off 2m40s restarting failed container=tomcat"}})
            }
            None => serde_json::json!({"running": {"startedAt": "2026-12-01T09:00:00Z"}}),
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "store"},
            "status": {
                "podIP": "10.0.0.2",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{
                    "name": "tomcat", "image": "registry.example/shop:1.4", "imageID": "", "ready": false,
                    "restartCount": restarts,
                    "state": state,
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": last_lines}}
                }]
            }
        }))
        .expect("pod")
    }

    /// Tomcat's output of a start that failed: 15 lines, the cause last.
    fn tomcat_output() -> String {
        let mut lines: Vec<String> = (1..=14).map(|n| format!("INFO [main] startup line {n}")).collect();
        lines.push(
            "SEVERE [main] org.apache.catalina.startup.Catalina.start The required Server component failed to start"
                .to_string(),
        );
        lines.join("\n") + "\n"
    }

    fn degraded_of(status: &ClusterAppStatus) -> (String, String, String) {
        let degraded = find_condition(Some(status), DEGRADED).expect("degraded");
        (degraded.status.clone(), degraded.reason.clone(), degraded.message.clone())
    }

    #[test]
    fn crash_looping_node_degrades_with_pod_restarts_and_last_lines() {
        let app = app(APP);
        let output = tomcat_output();
        let pods = vec![
            pod("shop-0", true, false),
            crashed_pod("shop-1", 5, Some("CrashLoopBackOff"), Some(&output)),
            pod("shop-2", true, false),
        ];
        let up = balancer(2);
        let status = compute_status(&app, seen(&pods, &up), None, t(1));
        let (degraded, reason, message) = degraded_of(&status);
        assert_eq!((degraded.as_str(), reason.as_str()), ("True", NODES_CRASH_LOOPING));
        assert!(
            message.starts_with("session node is crash-looping: pod shop-1 (container tomcat) restarted 5 times, last exit code 1 (Error); its last lines:\n"),
            "{message}"
        );
        assert!(message.ends_with("The required Server component failed to start"), "the cause, last: {message}");
        assert!(
            message.contains("startup line 6\n") && !message.contains("startup line 5\n"),
            "the last 10 lines: {message}"
        );
        let ready = find_condition(Some(&status), READY).expect("ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", NODES_NOT_READY));
        // The same observation later: the same status (no write, no event).
        let mut app = app;
        app.status = Some(status.clone());
        assert_eq!(compute_status(&app, seen(&pods, &up), None, t(50)), status);
        // The node recovers: Degraded clears.
        let pods = vec![pod("shop-0", true, false), pod("shop-1", true, false), pod("shop-2", true, false)];
        let (degraded, reason, _) = degraded_of(&compute_status(&app, seen(&pods, &up), None, t(100)));
        assert_eq!((degraded.as_str(), reason.as_str()), ("False", AS_EXPECTED));
    }

    #[test]
    fn a_restart_between_back_offs_is_still_a_crash_loop_but_one_restart_is_not() {
        let output = tomcat_output();
        let judged = |pod: Pod| crash_looping_nodes(&[pod]).map(|p| p.reason);
        let looping = Some(NODES_CRASH_LOOPING.to_string());
        // Started again by the kubelet after its back-off, not ready yet.
        assert_eq!(judged(crashed_pod("shop-1", CRASH_LOOP_MIN_RESTARTS, None, Some(&output))), looping);
        // In its first back-off.
        assert_eq!(judged(crashed_pod("shop-1", 1, Some("CrashLoopBackOff"), Some(&output))), looping);
        // One restart (a liveness kill, an OOM), starting again: not yet.
        assert_eq!(judged(crashed_pod("shop-1", 1, None, Some(&output))), None);
        // Waiting for another reason (an image pull) is not a crash loop.
        assert_eq!(judged(crashed_pod("shop-1", 0, Some("ImagePullBackOff"), None)), None);
        // Ready again after many restarts: recovered.
        let mut recovered = crashed_pod("shop-1", 7, None, Some(&output));
        if let Some(c) = recovered.status.as_mut().and_then(|s| s.container_statuses.as_mut()) {
            c[0].ready = true;
        }
        assert_eq!(judged(recovered), None);
        // Being deleted (scale-down, rolling update): leaving on purpose.
        let mut leaving = crashed_pod("shop-1", 5, Some("CrashLoopBackOff"), Some(&output));
        leaving.metadata.deletion_timestamp = Some(t(1));
        assert_eq!(judged(leaving), None);
    }

    #[test]
    fn crash_loop_without_output_says_where_to_look() {
        let problem =
            crash_looping_nodes(&[crashed_pod("shop-0", 3, Some("CrashLoopBackOff"), None)]).expect("crash loop");
        assert!(
            problem.message.ends_with("it left no output: `kubectl logs -n store shop-0 -c tomcat --previous`"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn many_crash_looping_nodes_are_described_in_order_and_the_rest_named() {
        let pods: Vec<Pod> = [10, 2, 0, 3, 1]
            .map(|n| crashed_pod(&format!("shop-{n}"), 4, Some("CrashLoopBackOff"), Some("SEVERE boom")))
            .into();
        let problem = crash_looping_nodes(&pods).expect("crash loop");
        let described: Vec<&str> = problem.message.lines().filter(|l| l.contains("restarted")).collect();
        assert_eq!(described.len(), CRASH_PODS_DESCRIBED);
        assert!(problem.message.starts_with("session nodes are crash-looping: pod shop-0 "), "{}", problem.message);
        assert!(
            described[1].starts_with("pod shop-1 ") && described[2].starts_with("pod shop-2 "),
            "{}",
            problem.message
        );
        assert!(problem.message.ends_with("\nand 2 more: shop-3, shop-10"), "{}", problem.message);
    }

    #[test]
    fn a_validation_problem_is_reported_before_a_crash_loop() {
        let app = app(APP);
        let problem =
            Problem { reason: "SecretNotFound".to_string(), message: "Secret store/ajp does not exist".to_string() };
        let pods = vec![crashed_pod("shop-0", 3, Some("CrashLoopBackOff"), Some("SEVERE boom"))];
        let up = balancer(2);
        let (_, reason, _) = degraded_of(&compute_status(&app, seen(&pods, &up), Some(&problem), t(1)));
        assert_eq!(reason, "SecretNotFound");
    }

    #[test]
    fn quoted_lines_are_bounded_in_bytes_from_the_end() {
        let long_line = "x".repeat(CRASH_LOG_BYTES * 2);
        // Whole lines from the end while they fit.
        assert_eq!(
            last_lines(&format!("first\n{long_line}\nat Catalina.load\nSEVERE the cause\n")),
            "at Catalina.load\nSEVERE the cause"
        );
        // One overlong last line: its end.
        let quoted = last_lines(&format!("first\n{long_line}the cause\n"));
        assert!(quoted.len() <= CRASH_LOG_BYTES + "…".len(), "{} bytes", quoted.len());
        assert!(quoted.starts_with("…x") && quoted.ends_with("xthe cause"), "{quoted}");
        let multibyte = last_lines(&"é".repeat(CRASH_LOG_BYTES));
        assert!(multibyte.starts_with('…') && multibyte.len() <= CRASH_LOG_BYTES + "…".len());
    }
}
