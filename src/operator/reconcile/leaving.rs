//! Between observe and validate, an effect of its own: session nodes that
//! are terminating leave the Tribes cluster at once, before they stop.
//!
//! Why: Tomcat's Kubernetes membership lists every pod of the app whose
//! phase is `Running` — a terminating pod stays `Running` until its
//! container is gone, and a node that a peer has dropped after a failed send
//! is added back at the peer's next poll (every 5 s). Replication with
//! `sendMode: sync` waits for every member's acknowledgement; a member
//! that stopped answering (Tomcat stopped, then the pod's address gone, so
//! no reset either) holds each sender for the ack timeout (3 s), the
//! sender pool (25) runs dry within a fraction of a second under load, and
//! from then on a request's changes reach *no* peer ("Unable to retrieve a
//! data sender") — while the request is still answered 200. Measured in the
//! rebalancing e2e before this stage: for about 30 s after a scale-down 5 →
//! 2, 1400 sends failed on the three nodes left, and every session that had
//! lived on a removed node came back one increment short.
//!
//! So the operator labels a terminating session node `clusterapp.io/leaving`
//! and the nodes' `KUBERNETES_LABELS` selector excludes that label: peers
//! drop the node at their next poll, seconds into its drain, while it still
//! serves (and replicates out) the sessions the balancers keep on it for the
//! first half of the drain. Nothing is sent to it by then, so nothing waits
//! for it when it stops. (The StatefulSet's selector does not include the
//! label: the pod stays the StatefulSet's.)
//!
//! # Marked before the scale-down deletes them
//!
//! A scale-down 5 → 2 removes `shop-4`, then `shop-3`, then `shop-2`, one
//! after the other (the StatefulSet's `OrderedReady`). Marked only when it
//! terminates, `shop-3` was still a ready member when `shop-4`'s sessions
//! failed over, so a share of them moved to `shop-3` and moved again seconds
//! later — and `shop-3`'s own termination began at the same instant as
//! those moves (the StatefulSet deletes it as soon as `shop-4` is gone). A
//! balancer replica that had already seen `shop-3` terminating sent a
//! session's request elsewhere while another replica still sent the same
//! session to `shop-3`: the session split, and the browser got a new, empty
//! one (the likely cause of 2 of 12 browser sessions lost in one real-node
//! run, each renewed on `shop-3` by parallel requests). So every pod that
//! the desired replica count will remove is labelled at once, when the
//! reconcile applies the smaller count: the balancers stop choosing it for
//! new and failing-over sessions (it keeps its own until it terminates), and
//! each session of a removed node moves once, to a node that stays. A pod
//! the count keeps again (scaled back up before it was deleted) loses the
//! label.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};

use super::{Context, Observation};
use crate::operator::names::{FIELD_MANAGER, LABEL_LEAVING};

/// A change of one pod's leaving label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelChange<'a> {
    /// The pod terminates, or the desired count removes it.
    Mark(&'a str),
    /// The desired count keeps the pod again.
    Unmark(&'a str),
}

/// The ordinal of StatefulSet `stateful_set`'s pod `pod` (`shop-3` → 3).
fn ordinal(stateful_set: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(stateful_set)?.strip_prefix('-')?.parse().ok()
}

/// The label changes that make `pods` say which nodes leave. `replicas` is
/// the count just applied to the StatefulSet; `None` (nothing was applied,
/// e.g. the app is invalid) marks terminating pods only.
pub fn label_changes<'a>(pods: &'a [Pod], stateful_set: &str, replicas: Option<i32>) -> Vec<LabelChange<'a>> {
    let mut changes = Vec::new();
    for pod in pods {
        let Some(name) = pod.metadata.name.as_deref() else { continue };
        let marked = crate::crd::pod_is_leaving(pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let removed_by_count = replicas.zip(ordinal(stateful_set, name)).map(|(count, n)| n >= count);
        match (marked, terminating, removed_by_count) {
            (false, true, _) | (false, false, Some(true)) => changes.push(LabelChange::Mark(name)),
            (true, false, Some(false)) => changes.push(LabelChange::Unmark(name)),
            _ => {}
        }
    }
    changes
}

/// Applies the label changes. A failure is logged and does not stop the
/// reconcile: the label only spares the peers' replication the wait for a
/// stopping node and the balancers a second move, and everything else the
/// reconcile does still matters (the next pod event retries).
pub async fn label_leaving_nodes(ctx: &Context, observation: &Observation, replicas: Option<i32>) {
    let (namespace, stateful_set) = (observation.namespace.as_str(), observation.names.stateful_set());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    for change in label_changes(&observation.pods, &stateful_set, replicas) {
        let (pod, value) = match change {
            LabelChange::Mark(pod) => (pod, serde_json::json!("true")),
            LabelChange::Unmark(pod) => (pod, serde_json::Value::Null),
        };
        let patch = serde_json::json!({"metadata": {"labels": {LABEL_LEAVING: value}}});
        match api.patch(pod, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await {
            Ok(_) if value.is_null() => tracing::info!(pod, namespace, "session node stays: no longer leaving"),
            Ok(_) => tracing::info!(
                pod,
                namespace,
                "session node leaves: no new or failing-over sessions, out of the membership"
            ),
            // Gone already: nothing left to label.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(error) => tracing::warn!(pod, namespace, %error, "could not change a session node's leaving label"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(name: &str, terminating: bool, leaving: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                deletion_timestamp: terminating.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                labels: leaving.map(|v| [(LABEL_LEAVING.to_string(), v.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn terminating_pods_are_marked_whatever_the_count() {
        let pods = [
            pod("shop-0", false, None),
            pod("shop-1", true, None),
            pod("shop-2", true, Some("true")),
            pod("shop-3", true, Some("false")),
        ];
        let expected = [LabelChange::Mark("shop-1"), LabelChange::Mark("shop-3")];
        assert_eq!(label_changes(&pods, "shop", None), expected);
        assert_eq!(label_changes(&pods, "shop", Some(4)), expected);
    }

    #[test]
    fn the_count_marks_the_pods_it_removes_and_unmarks_those_it_keeps_again() {
        let pods = [
            pod("shop-0", false, None),
            pod("shop-1", false, Some("true")),
            pod("shop-2", false, None),
            pod("shop-3", false, Some("true")),
            pod("shop-4", false, None),
        ];
        assert_eq!(label_changes(&pods, "shop", Some(3)), [LabelChange::Unmark("shop-1"), LabelChange::Mark("shop-4")]);
        // Without a count applied, nothing but terminating pods changes.
        assert_eq!(label_changes(&pods, "shop", None), []);
        // A name that is not the StatefulSet's pod is left alone.
        let stranger = [pod("shop-canary", false, None), pod("shopx-9", false, None)];
        assert_eq!(label_changes(&stranger, "shop", Some(0)), []);
    }
}
