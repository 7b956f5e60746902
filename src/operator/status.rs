//! The ClusterApp's status, computed from what was observed. Pure, and
//! deterministic: the same observation gives the same status, and a
//! condition's `lastTransitionTime` moves only when its `status` changes.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{ClusterApp, ClusterAppStatus, Member};
use crate::operator::names::AppNames;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

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
            })
        })
        .collect();
    members.sort_by(|a, b| ordinal(&a.pod).cmp(&ordinal(&b.pod)).then_with(|| a.pod.cmp(&b.pod)));
    members
}

/// Why the StatefulSet is still moving, if it is.
fn progress(app: &ClusterApp, stateful_set: Option<&StatefulSet>, members: &[Member]) -> Option<(String, String)> {
    let desired = app.spec.replicas;
    let Some(sts) = stateful_set else {
        return Some(("Creating".to_string(), "the session node StatefulSet does not exist yet".to_string()));
    };
    let live = members.iter().filter(|m| !m.draining).count();
    if live != usize::try_from(desired).unwrap_or(0) || members.iter().any(|m| m.draining) {
        return Some(("Scaling".to_string(), format!("{live} session nodes, {desired} wanted")));
    }
    let status = sts.status.clone().unwrap_or_default();
    let rolled = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0)
        && status.updated_replicas.unwrap_or(0) >= desired
        && (status.update_revision.is_none() || status.current_revision == status.update_revision);
    if !rolled {
        return Some((
            "RollingUpdate".to_string(),
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

/// What the cluster observed about one ClusterApp: its session node pods and
/// the StatefulSet and balancer Deployment as last cached.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed<'a> {
    pub pods: &'a [Pod],
    pub stateful_set: Option<&'a StatefulSet>,
    pub balancer: Option<&'a Deployment>,
}

/// The status to write. `problem` is what validation, apply or the
/// membership check found wrong.
pub fn compute_status(
    app: &ClusterApp,
    observed: Observed<'_>,
    problem: Option<&Problem>,
    now: Time,
) -> ClusterAppStatus {
    let Observed { pods, stateful_set, balancer } = observed;
    let names = AppNames::new(app.metadata.name.as_deref().unwrap_or_default());
    let generation = app.metadata.generation;
    let members = members(pods);
    let replicas = members.iter().filter(|m| !m.draining).count();
    let ready_replicas = members.iter().filter(|m| m.ready && !m.draining).count();
    let desired = app.spec.replicas;
    let replicas = i32::try_from(replicas).unwrap_or(i32::MAX);
    let ready_replicas = i32::try_from(ready_replicas).unwrap_or(i32::MAX);

    let degraded = match problem {
        Some(p) => condition(DEGRADED, true, &p.reason, p.message.clone(), generation),
        None => condition(
            DEGRADED,
            false,
            "AsExpected",
            "every object of the ClusterApp is applied".to_string(),
            generation,
        ),
    };
    let nodes = format!("{ready_replicas} of {desired} session nodes are ready");
    let ready = if ready_replicas < desired {
        condition(READY, false, "NodesNotReady", nodes, generation)
    } else if let Some(p) = problem {
        condition(
            READY,
            false,
            "Degraded",
            format!("{nodes}, but the ClusterApp is degraded: {}", p.message),
            generation,
        )
    } else if let Some(why) = balancer_unavailable(&names, balancer) {
        condition(READY, false, "BalancerUnavailable", format!("{nodes}, but {why}"), generation)
    } else {
        condition(READY, true, "NodesReady", format!("{nodes} and the balancer is available"), generation)
    };
    let progressing = match progress(app, stateful_set, &members) {
        Some((reason, message)) => condition(PROGRESSING, true, &reason, message, generation),
        None => condition(PROGRESSING, false, "Stable", "the session nodes match the spec".to_string(), generation),
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
}
