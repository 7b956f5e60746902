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

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};

use super::Context;
use crate::operator::names::{FIELD_MANAGER, LABEL_LEAVING};

/// The session node pods that are terminating and not yet labelled leaving.
pub fn leaving_unlabelled(pods: &[Pod]) -> impl Iterator<Item = &str> {
    pods.iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_some())
        .filter(|pod| {
            pod.metadata.labels.as_ref().and_then(|l| l.get(LABEL_LEAVING)).map(String::as_str) != Some("true")
        })
        .filter_map(|pod| pod.metadata.name.as_deref())
}

/// Labels each terminating, unlabelled pod. A failure is logged and does
/// not stop the reconcile: the label only spares the peers' replication the
/// wait for a stopping node, and everything else the reconcile does still
/// matters (the next pod event retries).
pub async fn label_leaving_nodes(ctx: &Context, namespace: &str, pods: &[Pod]) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({"metadata": {"labels": {LABEL_LEAVING: "true"}}});
    for pod in leaving_unlabelled(pods) {
        match api.patch(pod, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await {
            Ok(_) => tracing::info!(pod, namespace, "terminating session node leaves the cluster membership"),
            // Gone already: nothing left to leave.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(error) => tracing::warn!(pod, namespace, %error, "could not label a terminating session node leaving"),
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
    fn only_terminating_pods_without_the_label_are_labelled() {
        let pods = [
            pod("shop-0", false, None),
            pod("shop-1", true, None),
            pod("shop-2", true, Some("true")),
            pod("shop-3", true, Some("false")),
            // A pod that is not terminating keeps whatever a user set.
            pod("shop-4", false, Some("true")),
        ];
        assert_eq!(leaving_unlabelled(&pods).collect::<Vec<_>>(), ["shop-1", "shop-3"]);
    }
}
