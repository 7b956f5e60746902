//! What the operator knows about its children without asking the API
//! server: reflector stores fed by label-selected watches (metadata only
//! where the body is not needed, managedFields stripped everywhere), and a
//! record of what it last wrote. With both, a reconcile of a converged app
//! sends no request at all: an apply is skipped when the cached child
//! carries the hash of the desired object and nobody changed it since our
//! last write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::operator::children::ChildCaches;

/// Annotation on every applied child: a hash of the desired object as we
/// built it (before this annotation was added).
pub const APPLIED_HASH_ANNOTATION: &str = "clusterapp.io/applied-hash";

/// Hex SHA-256 of the JSON of the desired object. serde_json writes struct
/// fields in declaration order and maps in key order: stable across runs.
pub fn desired_hash<K: Serialize>(object: &K) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(object)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// What our last apply of one child returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub hash: String,
    pub resource_version: Option<String>,
    pub generation: Option<i64>,
}

/// Key of a written record: kind, namespace, name.
type ChildKey = (&'static str, String, String);

/// The records of our last writes. Forgotten when the child's watch reports
/// it deleted, so records do not outlive their objects.
#[derive(Default)]
pub struct WrittenRecords {
    records: Mutex<HashMap<ChildKey, Written>>,
}

impl WrittenRecords {
    pub fn get(&self, kind: &'static str, namespace: &str, name: &str) -> Option<Written> {
        let records = self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        records.get(&(kind, namespace.to_string(), name.to_string())).cloned()
    }

    pub fn record(&self, kind: &'static str, namespace: &str, name: &str, written: Written) {
        let mut records = self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        records.insert((kind, namespace.to_string(), name.to_string()), written);
    }

    pub fn forget(&self, kind: &'static str, namespace: &str, name: &str) {
        let mut records = self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        records.remove(&(kind, namespace.to_string(), name.to_string()));
    }

    pub fn len(&self) -> usize {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a kind reports changes by others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeTracking {
    /// `metadata.generation` moves on every spec change and only then
    /// (StatefulSet, Deployment, PodDisruptionBudget, NetworkPolicy): status
    /// updates by the controllers (new resourceVersion, same generation) are
    /// not edits.
    Generation,
    /// No generation: any new resourceVersion may be an edit.
    ResourceVersion,
}

/// Whether `desired` (carrying its hash annotation) must be applied, given
/// the cached child and our record of the last write. Errs on the side of
/// applying: a needless apply costs a request, a skipped one a wrong child.
pub fn needs_apply(
    desired: &ObjectMeta,
    cached: Option<&ObjectMeta>,
    written: Option<&Written>,
    tracking: ChangeTracking,
) -> bool {
    // Missing (deleted, or not created yet).
    let Some(cached) = cached else { return true };
    let hash = desired.annotations.as_ref().and_then(|a| a.get(APPLIED_HASH_ANNOTATION));
    // The cache has not seen our own write of this very object yet: the
    // watch event of that write will come and trigger another reconcile.
    if let Some(written) = written
        && hash == Some(&written.hash)
        && older(cached.resource_version.as_deref(), written.resource_version.as_deref())
    {
        return false;
    }
    let cached_hash = cached.annotations.as_ref().and_then(|a| a.get(APPLIED_HASH_ANNOTATION));
    // Built differently than what the cluster holds (new spec, operator upgrade).
    if hash.is_none() || hash != cached_hash {
        return true;
    }
    // Someone removed or changed one of our labels, annotations or owner references.
    if !contains_all(desired.labels.as_ref(), cached.labels.as_ref())
        || !contains_all(desired.annotations.as_ref(), cached.annotations.as_ref())
        || !owners_contained(desired.owner_references.as_deref(), cached.owner_references.as_deref())
    {
        return true;
    }
    // Without a record (the operator restarted) we cannot tell whether the
    // object was edited since it was applied: apply once.
    let Some(written) = written else { return true };
    if hash != Some(&written.hash) {
        return true;
    }
    if cached.resource_version.is_some() && cached.resource_version == written.resource_version {
        return false;
    }
    if tracking == ChangeTracking::Generation && cached.generation.is_some() && cached.generation == written.generation
    {
        return false;
    }
    true
}

/// `a` is an older resourceVersion than `b`. Since Kubernetes 1.34 resource
/// versions are documented as comparable integers; anything that does not
/// parse counts as "not older" (so the caller applies).
fn older(a: Option<&str>, b: Option<&str>) -> bool {
    match (a.and_then(|a| a.parse::<u64>().ok()), b.and_then(|b| b.parse::<u64>().ok())) {
        (Some(a), Some(b)) => a < b,
        _ => false,
    }
}

fn contains_all(wanted: Option<&BTreeMap<String, String>>, have: Option<&BTreeMap<String, String>>) -> bool {
    let Some(wanted) = wanted else { return true };
    let empty = BTreeMap::new();
    let have = have.unwrap_or(&empty);
    wanted.iter().all(|(k, v)| have.get(k) == Some(v))
}

fn owners_contained(wanted: Option<&[OwnerReference]>, have: Option<&[OwnerReference]>) -> bool {
    let have = have.unwrap_or_default();
    wanted.unwrap_or_default().iter().all(|w| have.iter().any(|h| h.uid == w.uid && h.controller == w.controller))
}

/// Metadata of a cached child, whether the store holds full objects or
/// metadata only.
pub trait CachedMeta: Sync {
    fn cached_meta(&self, namespace: &str, name: &str) -> Option<ObjectMeta>;
}

impl<K> CachedMeta for Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    fn cached_meta(&self, namespace: &str, name: &str) -> Option<ObjectMeta> {
        self.get(&ObjectRef::new(name).within(namespace)).map(|object| object.meta().clone())
    }
}

/// The caches a reconcile reads instead of the API server.
pub struct Caches {
    /// Our children, one store per kind of the registry
    /// (`operator::children`).
    pub children: ChildCaches,
    /// Every other Secret in scope, metadata only: whether a Secret the app
    /// names (`spec.ajp.secretRef`, `spec.balancer.tls`) exists, and a
    /// trigger when it appears or changes.
    pub other_secrets: Store<PartialObjectMeta<Secret>>,
    /// Session node pods (stripped to what `status.members` needs).
    pub pods: Store<Pod>,
    pub written: Arc<WrittenRecords>,
    /// Which keys of a referenced Secret (namespace, name) held a non-empty
    /// value, by the resourceVersion it was read at: a Secret is read again
    /// only when it changed. Key names only, never values.
    pub secret_keys: Mutex<HashMap<(String, String), SecretKeys>>,
    /// True once [`Caches::fill`] saw every store filled.
    pub filled: tokio::sync::watch::Sender<bool>,
}

/// The keys of one referenced Secret that hold a non-empty value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretKeys {
    pub resource_version: String,
    pub keys: BTreeSet<String>,
}

impl Caches {
    /// Waits until every store has been filled by its first list, then
    /// tells every [`Caches::wait_until_filled`] caller. Run by exactly one
    /// task: kube's `Store::wait_until_ready` wakes only the last task that
    /// polled it (its readiness is a oneshot channel, which keeps one
    /// waker), so two tasks waiting on one store lose a wakeup — which left
    /// the first reconciles after a start waiting forever, next to the
    /// readiness task. A store still empty after [`FILL_WARNING`] is named
    /// in a warning (a watch that cannot list, e.g. for want of RBAC, would
    /// otherwise stall every reconcile in silence).
    pub async fn fill(&self) {
        // No `..`: a new store does not compile until it is waited for here
        // too (the child kinds' stores are waited for by the registry).
        let Caches { children, other_secrets, pods, written: _, secret_keys: _, filled: filled_sender } = self;
        let _ = futures::join!(
            children.fill(),
            filled("secrets (referenced)", other_secrets.wait_until_ready()),
            filled("pods", pods.wait_until_ready()),
        );
        filled_sender.send_replace(true);
    }

    /// Waits until [`Caches::fill`] has seen every store filled; any number
    /// of tasks may wait at once.
    pub async fn wait_until_filled(&self) {
        let mut filled = self.filled.subscribe();
        // Err only when the sender is gone, and it lives in self.
        let _ = filled.wait_for(|filled| *filled).await;
    }

    pub fn secret_keys(&self, namespace: &str, name: &str) -> Option<SecretKeys> {
        let checks = self.secret_keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        checks.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    pub fn remember_secret_keys(&self, namespace: &str, name: &str, keys: SecretKeys) {
        let mut checks = self.secret_keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        checks.insert((namespace.to_string(), name.to_string()), keys);
    }
}

/// How long a cache may take to fill before a warning names it.
pub const FILL_WARNING: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for one store, warning once when it takes longer than [`FILL_WARNING`].
pub(crate) async fn filled<T>(what: &'static str, ready: impl Future<Output = T>) -> T {
    tokio::pin!(ready);
    tokio::select! {
        out = &mut ready => return out,
        () = tokio::time::sleep(FILL_WARNING) => {}
    }
    tracing::warn!(
        cache = what,
        waited_s = FILL_WARNING.as_secs(),
        "cache not filled yet: its watch has not listed; reconciles wait for it"
    );
    ready.await
}

// --- what the caches keep of each object -------------------------------------

/// Every cached object: no managedFields (often larger than the rest of the
/// metadata, and never read by the operator).
pub fn strip_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A cached session-node Pod keeps what `status.members` is made of: name,
/// labels, deletionTimestamp, podIP and conditions; and what the crash-loop
/// check reads of its containers (see [`strip_container_status`]).
pub fn strip_pod(pod: &mut Pod) {
    strip_managed_fields(pod);
    pod.spec = None;
    pod.metadata.annotations = None;
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            conditions: status.conditions.map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect()),
            container_statuses: status
                .container_statuses
                .map(|cs| cs.into_iter().map(strip_container_status).collect()),
            ..Default::default()
        });
    }
}

/// A container's name, readiness, restart count, why it waits, and how it
/// last ended (exit code, reason, and the last lines it wrote: at most 4 KiB,
/// kept by the kubelet only after a failure).
fn strip_container_status(status: ContainerStatus) -> ContainerStatus {
    ContainerStatus {
        name: status.name,
        ready: status.ready,
        restart_count: status.restart_count,
        state: status.state.map(|state| ContainerState {
            waiting: state.waiting.map(|waiting| ContainerStateWaiting { reason: waiting.reason, message: None }),
            ..Default::default()
        }),
        last_state: status
            .last_state
            .map(|state| ContainerState { terminated: state.terminated, ..Default::default() }),
        ..Default::default()
    }
}

/// A cached StatefulSet keeps metadata, replicas and status (for
/// `Progressing` and the `Scaled` event), not its pod template.
pub fn strip_stateful_set(sts: &mut StatefulSet) {
    strip_managed_fields(sts);
    sts.spec.template = Default::default();
    sts.spec.volume_claim_templates = None;
}

/// A cached Deployment keeps metadata, replicas and status (whether the
/// balancer is available), not its pod template.
pub fn strip_deployment(deployment: &mut Deployment) {
    strip_managed_fields(deployment);
    deployment.spec.template = Default::default();
}

/// A cached Secret of ours keeps its data: the generated keys are read from
/// it instead of the API server. Only label-selected Secrets are cached so.
pub fn strip_secret(secret: &mut Secret) {
    strip_managed_fields(secret);
    secret.string_data = None;
}

/// A cached metadata-only object.
pub fn strip_partial<K>(object: &mut PartialObjectMeta<K>) {
    object.metadata.managed_fields = None;
}

/// Namespace and name of an object, for records keyed by them.
pub fn namespace_and_name<K: Resource>(object: &K) -> (String, String) {
    (object.namespace().unwrap_or_default(), object.name_any())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;

    fn meta(hash: &str, rv: &str, generation: Option<i64>) -> ObjectMeta {
        ObjectMeta {
            name: Some("shop".to_string()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/instance".to_string(), "shop".to_string())])),
            annotations: Some(BTreeMap::from([(APPLIED_HASH_ANNOTATION.to_string(), hash.to_string())])),
            owner_references: Some(vec![OwnerReference {
                uid: "u1".to_string(),
                controller: Some(true),
                ..Default::default()
            }]),
            resource_version: Some(rv.to_string()),
            generation,
            ..Default::default()
        }
    }

    fn written(hash: &str, rv: &str, generation: Option<i64>) -> Written {
        Written { hash: hash.to_string(), resource_version: Some(rv.to_string()), generation }
    }

    const RV: ChangeTracking = ChangeTracking::ResourceVersion;
    const GEN: ChangeTracking = ChangeTracking::Generation;

    #[test]
    fn unchanged_child_with_our_hash_is_skipped() {
        let desired = meta("h1", "", None);
        assert!(!needs_apply(&desired, Some(&meta("h1", "10", None)), Some(&written("h1", "10", None)), RV));
    }

    #[test]
    fn missing_child_or_new_hash_is_applied() {
        let desired = meta("h2", "", None);
        assert!(needs_apply(&desired, None, Some(&written("h2", "10", None)), RV));
        assert!(needs_apply(&desired, Some(&meta("h1", "10", None)), Some(&written("h1", "10", None)), RV));
    }

    #[test]
    fn edit_by_someone_else_is_applied() {
        let desired = meta("h1", "", None);
        // A newer resourceVersion of a kind without a generation.
        assert!(needs_apply(&desired, Some(&meta("h1", "12", None)), Some(&written("h1", "10", None)), RV));
        // A spec edit of a kind with a generation.
        assert!(needs_apply(&desired, Some(&meta("h1", "12", Some(3))), Some(&written("h1", "10", Some(2))), GEN));
        // A removed label.
        let mut cached = meta("h1", "10", None);
        cached.labels = None;
        assert!(needs_apply(&desired, Some(&cached), Some(&written("h1", "10", None)), RV));
        // A removed owner reference.
        let mut cached = meta("h1", "10", None);
        cached.owner_references = None;
        assert!(needs_apply(&desired, Some(&cached), Some(&written("h1", "10", None)), RV));
    }

    #[test]
    fn status_update_by_a_controller_is_not_an_edit() {
        let desired = meta("h1", "", None);
        assert!(!needs_apply(&desired, Some(&meta("h1", "15", Some(2))), Some(&written("h1", "10", Some(2))), GEN));
    }

    #[test]
    fn cache_behind_our_own_write_waits_for_its_event() {
        let desired = meta("h1", "", None);
        assert!(!needs_apply(&desired, Some(&meta("h1", "8", None)), Some(&written("h1", "10", None)), RV));
    }

    #[test]
    fn no_record_after_a_restart_applies_once() {
        let desired = meta("h1", "", None);
        assert!(needs_apply(&desired, Some(&meta("h1", "10", None)), None, RV));
    }

    /// The hash is compared with what an earlier operator process (or
    /// release) wrote into the annotation: were it to change, every child of
    /// every app would be applied again at the next start, and a child whose
    /// rebuilt object differs only in serialization would look edited. So it
    /// must not depend on the process (hasher seeds, map order) nor change
    /// unnoticed with a serde_json or k8s-openapi upgrade: a literal pins it.
    /// If this fails after a deliberate change, say so in the release notes.
    #[test]
    fn hash_is_stable_across_runs_and_releases() {
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some("shop-config".to_string()),
                namespace: Some("store".to_string()),
                // A BTreeMap: serialized in key order whatever the insertion order.
                labels: Some(BTreeMap::from([("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("server.xml".to_string(), "<Server/>".to_string())])),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&config_map).expect("json"),
            r#"{"apiVersion":"v1","kind":"ConfigMap","data":{"server.xml":"<Server/>"},"metadata":{"labels":{"a":"1","b":"2"},"name":"shop-config","namespace":"store"}}"#,
            "the JSON the hash is taken of"
        );
        assert_eq!(
            desired_hash(&config_map).expect("hash"),
            "9ccf08cfb9db52f6ad3b8527fde26f72154daa50d8a187388db73063e4a18554"
        );
        let mut edited = config_map.clone();
        edited.data = Some(BTreeMap::from([("server.xml".to_string(), "<Server></Server>".to_string())]));
        assert_ne!(desired_hash(&edited).expect("hash"), desired_hash(&config_map).expect("hash"));
    }

    /// Caches whose stores are filled by calling the returned closures (the
    /// child kinds' stores at once, the others one each), as their watches'
    /// first lists would.
    fn unfilled_caches() -> (Caches, Vec<Box<dyn FnMut() + Send>>) {
        use kube::runtime::{reflector, watcher};
        let mut fillers: Vec<Box<dyn FnMut() + Send>> = Vec::new();
        let (children, mut children_writers) = ChildCaches::for_tests();
        fillers.push(Box::new(move || children_writers.list_done()));
        macro_rules! store {
            ($kind:ty) => {{
                let (store, mut writer) = reflector::store::<$kind>();
                fillers.push(Box::new(move || writer.apply_watcher_event(&watcher::Event::InitDone)));
                store
            }};
        }
        let caches = Caches {
            children,
            other_secrets: store!(PartialObjectMeta<Secret>),
            pods: store!(Pod),
            written: Default::default(),
            secret_keys: Default::default(),
            filled: tokio::sync::watch::Sender::new(false),
        };
        (caches, fillers)
    }

    /// Every reconcile that started before the caches were filled goes on
    /// once they are: many tasks wait at once (kube's own store readiness
    /// would wake only the last of them).
    #[tokio::test]
    async fn every_waiter_goes_on_once_the_caches_are_filled() {
        let (caches, mut fillers) = unfilled_caches();
        let caches = Arc::new(caches);
        let filler = tokio::spawn({
            let caches = caches.clone();
            async move { caches.fill().await }
        });
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let caches = caches.clone();
                tokio::spawn(async move { caches.wait_until_filled().await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "a waiter went on before the caches were filled");
        for fill in &mut fillers {
            fill();
        }
        for waiter in waiters.into_iter().chain([filler]) {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("a waiter was never woken")
                .expect("task");
        }
        // Later callers go on at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), caches.wait_until_filled()).await.expect("filled");
    }

    #[test]
    fn stripped_pod_keeps_what_members_need() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "shop-0", "labels": {"a": "b"}, "managedFields": [{"manager": "x"}]},
            "spec": {"containers": [{"name": "tomcat", "image": "x"}]},
            "status": {"podIP": "10.0.0.1", "hostIP": "1.2.3.4", "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}]}
        }))
        .expect("pod");
        strip_pod(&mut pod);
        assert!(pod.spec.is_none() && pod.metadata.managed_fields.is_none());
        let status = pod.status.expect("status");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(status.conditions.map(|c| c.len()), Some(1));
        assert!(status.host_ip.is_none());
    }

    /// The status judges crash loops from cached pods: the strip must keep
    /// what `status::crash_looping_nodes` reads.
    #[test]
    fn stripped_pod_keeps_what_the_crash_loop_check_needs() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "shop-1", "namespace": "store"},
            "status": {"containerStatuses": [{
                "name": "tomcat", "image": "registry.example/shop:1.4", "imageID": "sha256:abc", "ready": false,
                "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m20s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "SEVERE: no server.xml"}}
            }]}
        }))
        .expect("pod");
        let before = crate::operator::status::crash_looping_nodes(std::slice::from_ref(&pod));
        strip_pod(&mut pod);
        assert_eq!(crate::operator::status::crash_looping_nodes(std::slice::from_ref(&pod)), before);
        assert!(before.is_some_and(|p| p.message.contains("SEVERE: no server.xml")));
        let container = &pod.status.expect("status").container_statuses.expect("containers")[0];
        assert!(container.image.is_empty() && container.image_id.is_empty(), "no more than needed");
    }
}
