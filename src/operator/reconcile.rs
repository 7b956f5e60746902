//! One reconcile of one ClusterApp: read -> validate -> build -> apply ->
//! status. Only `read`, `apply` and `write_status` talk to the API server.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, try_join_all};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::{ByteString, NamespaceResourceScope};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{ClusterApp, ClusterAppStatus};
use crate::operator::build::{BuildContext, Children, SecretMaterial, build_children};
use crate::operator::cache::{APPLIED_HASH_ANNOTATION, CachedMeta, Caches, ChangeTracking, SecretRefCheck, Written, desired_hash, needs_apply};
use crate::operator::error::Error;
use crate::operator::metrics::OperatorState;
use crate::operator::names::{AJP_SECRET_KEY, AppNames, FIELD_MANAGER, LABEL_INSTANCE, TRIBES_KEY_KEY};
use crate::operator::status::{DEGRADED, Problem, READY, compute_status, find_condition};

/// Requeue of a healthy app: a safety net, not how changes are found.
const REQUEUE_HEALTHY: Duration = Duration::from_secs(300);
/// Requeue while a user-fixable problem lasts. The Secrets a problem is
/// about are watched (their changes trigger a reconcile at once): this is
/// only a safety net.
const REQUEUE_PROBLEM: Duration = Duration::from_secs(60);
/// Retry after an error (API unreachable, conflict, ...).
const REQUEUE_ERROR: Duration = Duration::from_secs(5);

/// Everything a reconcile needs besides the ClusterApp.
pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub state: Arc<OperatorState>,
    /// Children, session node pods and referenced Secrets as last seen.
    pub caches: Arc<Caches>,
    pub recorder: Recorder,
}

pub async fn reconcile(app: Arc<ClusterApp>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_app(&app, &ctx).await;
    ctx.state.observe_reconcile(started.elapsed(), result.as_ref().err().map(Error::metric_label));
    result
}

pub fn error_policy(app: Arc<ClusterApp>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(app = %app.name_any(), namespace = ?app.namespace(), error = %error, "reconcile failed");
    Action::requeue(REQUEUE_ERROR)
}

async fn reconcile_app(app: &ClusterApp, ctx: &Context) -> Result<Action, Error> {
    let Some(namespace) = app.namespace() else {
        return Err(Error::Build(crate::operator::build::BuildError::MissingNamespace));
    };
    // Being deleted: the garbage collector removes the children; applying
    // them again would only fight it.
    if app.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Reads come from the caches: wait until they are filled (at start).
    ctx.caches.wait_until_ready().await;
    let names = AppNames::new(&app.name_any());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    // read
    let own_secret = own_secret(ctx, &secrets, &namespace, &names).await?;
    let pods = pods_of(&ctx.caches.pods, &namespace, &names.app);
    let stateful_set = ctx.caches.stateful_sets.get(&ObjectRef::new(&names.stateful_set()).within(&namespace));

    // validate
    let (material, mut problem) = key_material(own_secret.as_ref(), &namespace, &names)?;
    if problem.is_none() {
        problem = check_secret_ref(app, ctx, &secrets, &namespace).await?;
    }

    // build + apply (not while a problem would make the nodes unable to start)
    if problem.is_none() {
        let children = build_children(app, &material, &ctx.build)?;
        let applied = match apply_children(ctx, &namespace, &children).await {
            Ok(applied) => applied,
            // The namespace is being deleted (and the app with it): its
            // children are going on purpose; retrying would only load the
            // API server until the app is gone.
            Err(error) if error.is_namespace_terminating() => {
                tracing::debug!(app = %names.app, namespace = %namespace, "namespace terminating; not applying");
                return Ok(Action::await_change());
            }
            Err(error) => {
                let failure = Problem { reason: "ApplyFailed".to_string(), message: error.to_string() };
                write_status(app, ctx, &pods, stateful_set.as_deref(), Some(&failure)).await?;
                return Err(error);
            }
        };
        if applied.stateful_set
            && let Some(sts) = stateful_set.as_deref()
        {
            let (had, wanted) = (sts.spec.replicas.unwrap_or(1), app.spec.replicas);
            if had != wanted {
                publish(ctx, app, EventType::Normal, "Scaled", "Scale", format!("Scaling session nodes from {had} to {wanted}")).await;
            }
        }
        if app.status.is_none() && applied.any {
            publish(
                ctx,
                app,
                EventType::Normal,
                "Created",
                "Create",
                format!("Created {} session nodes, the balancer and their policies", app.spec.replicas),
            )
            .await;
        }
    }

    // status
    write_status(app, ctx, &pods, stateful_set.as_deref(), problem.as_ref()).await?;
    Ok(Action::requeue(if problem.is_some() { REQUEUE_PROBLEM } else { REQUEUE_HEALTHY }))
}

/// Session node pods of the app from the cache.
fn pods_of(store: &Store<Pod>, namespace: &str, app: &str) -> Vec<Pod> {
    store
        .state()
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| p.labels().get(LABEL_INSTANCE).map(String::as_str) == Some(app))
        .map(|p| (**p).clone())
        .collect()
}

/// The app's generated Secret: from the cache when it holds both keys;
/// read from the API server otherwise, because new keys are generated for
/// missing ones and a cache that lags behind must never rotate them.
async fn own_secret(ctx: &Context, secrets: &Api<Secret>, namespace: &str, names: &AppNames) -> Result<Option<Secret>, Error> {
    let cached = ctx.caches.secrets.get(&ObjectRef::new(&names.secret()).within(namespace));
    let cached = cached.as_deref();
    if secret_value(cached, AJP_SECRET_KEY).is_some() && secret_value(cached, TRIBES_KEY_KEY).is_some() {
        return Ok(cached.cloned());
    }
    ctx.state.api_requests.inc();
    secrets
        .get_opt(&names.secret())
        .await
        .map_err(|source| Error::Read { what: format!("Secret {namespace}/{}", names.secret()), source })
}

/// `n` random bytes as lowercase hex.
fn random_hex(bytes: usize) -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut buffer = vec![0u8; bytes];
    ring::rand::SystemRandom::new().fill(&mut buffer).map_err(|_| Error::Random)?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

fn secret_value(secret: Option<&Secret>, key: &str) -> Option<String> {
    let bytes: &ByteString = secret?.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok().filter(|v| !v.is_empty())
}

/// An EncryptInterceptor key: 32, 48 or 64 hex characters (AES-128/192/256).
pub fn is_valid_tribes_key(key: &str) -> bool {
    matches!(key.len(), 32 | 48 | 64) && key.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The app's key material: kept from its Secret when present (never rotated
/// by accident), generated when missing.
fn key_material(secret: Option<&Secret>, namespace: &str, names: &AppNames) -> Result<(SecretMaterial, Option<Problem>), Error> {
    let ajp_secret = match secret_value(secret, AJP_SECRET_KEY) {
        Some(value) => value,
        None => random_hex(32)?,
    };
    let (tribes_key, problem) = match secret_value(secret, TRIBES_KEY_KEY) {
        Some(value) if is_valid_tribes_key(&value) => (value, None),
        Some(value) => {
            let problem = Problem {
                reason: "InvalidEncryptionKey".to_string(),
                message: format!(
                    "key {TRIBES_KEY_KEY} of Secret {namespace}/{} must be 32, 48 or 64 hex characters; delete the key to have a new one generated",
                    names.secret()
                ),
            };
            (value, Some(problem))
        }
        // 32 random bytes: a 64 hex character AES-256 key.
        None => (random_hex(32)?, None),
    };
    Ok((SecretMaterial { ajp_secret, tribes_key }, problem))
}

/// A `spec.ajp.secretRef` must name an existing key of an existing Secret.
/// Existence comes from the metadata cache of Secrets (whose watch also
/// triggers this reconcile when the Secret appears or changes); the key is
/// checked by reading the Secret once per resourceVersion.
async fn check_secret_ref(app: &ClusterApp, ctx: &Context, secrets: &Api<Secret>, namespace: &str) -> Result<Option<Problem>, Error> {
    let Some(reference) = &app.spec.ajp.secret_ref else { return Ok(None) };
    let has_key = if let Some(ours) = ctx.caches.secrets.get(&ObjectRef::new(&reference.name).within(namespace)) {
        // One of our generated Secrets (its data is cached).
        Some(secret_value(Some(&ours), &reference.key).is_some())
    } else if let Some(meta) = ctx.caches.other_secrets.cached_meta(namespace, &reference.name) {
        let version = meta.resource_version.unwrap_or_default();
        match ctx.caches.secret_ref_check(namespace, &reference.name) {
            Some(check) if check.resource_version == version && check.key == reference.key => Some(check.has_key),
            _ => {
                ctx.state.api_requests.inc();
                let secret = secrets
                    .get_opt(&reference.name)
                    .await
                    .map_err(|source| Error::Read { what: format!("Secret {namespace}/{}", reference.name), source })?;
                secret.map(|secret| {
                    let has_key = secret_value(Some(&secret), &reference.key).is_some();
                    let resource_version = secret.metadata.resource_version.clone().unwrap_or_default();
                    let check = SecretRefCheck { resource_version, key: reference.key.clone(), has_key };
                    ctx.caches.remember_secret_ref_check(namespace, &reference.name, check);
                    has_key
                })
            }
        }
    } else {
        None
    };
    Ok(match has_key {
        None => Some(Problem {
            reason: "SecretNotFound".to_string(),
            message: format!(
                "Secret {namespace}/{} named by spec.ajp.secretRef does not exist; create it with the key {}",
                reference.name, reference.key
            ),
        }),
        Some(false) => Some(Problem {
            reason: "SecretKeyNotFound".to_string(),
            message: format!(
                "Secret {namespace}/{} named by spec.ajp.secretRef has no non-empty key {}",
                reference.name, reference.key
            ),
        }),
        Some(true) => None,
    })
}

/// Server-side apply of one object with our field manager, unless the
/// cached child shows it is already as built (see [`needs_apply`]). The
/// object carries a hash of itself in an annotation. Returns whether a
/// request was sent.
async fn apply<K>(
    ctx: Arc<ApplyContext>,
    namespace: String,
    mut object: K,
    cached: Option<ObjectMeta>,
    tracking: ChangeTracking,
) -> Result<bool, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug + Send + Sync,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let kind = kind_name::<K>();
    let hash = desired_hash(&object).map_err(|source| Error::Serialize { kind, name: name.clone(), source })?;
    object.meta_mut().annotations.get_or_insert_with(Default::default).insert(APPLIED_HASH_ANNOTATION.to_string(), hash.clone());
    let written = ctx.caches.written.get(kind, &namespace, &name);
    if !needs_apply(object.meta(), cached.as_ref(), written.as_ref(), tracking) {
        return Ok(false);
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    ctx.state.api_writes.inc();
    ctx.state.api_requests.inc();
    let stored = api
        .patch(&name, &params, &Patch::Apply(&object))
        .await
        .map_err(|source| Error::Apply { kind, name: name.clone(), source })?;
    let meta = stored.meta();
    let record = Written { hash, resource_version: meta.resource_version.clone(), generation: meta.generation };
    ctx.caches.written.record(kind, &namespace, &name, record);
    Ok(true)
}

pub(crate) fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    // Resource::kind returns a Cow; the k8s-openapi kinds are static.
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(kind) => kind,
        std::borrow::Cow::Owned(_) => "object",
    }
}

/// What the apply futures share (owned, so they can run concurrently).
struct ApplyContext {
    client: Client,
    state: Arc<OperatorState>,
    caches: Arc<Caches>,
}

/// Which children a pass actually wrote.
#[derive(Clone, Copy, Debug, Default)]
struct Applied {
    any: bool,
    stateful_set: bool,
}

async fn apply_children(ctx: &Context, namespace: &str, children: &Children) -> Result<Applied, Error> {
    type Pending = BoxFuture<'static, Result<bool, Error>>;
    let shared = Arc::new(ApplyContext { client: ctx.client.clone(), state: ctx.state.clone(), caches: ctx.caches.clone() });
    let caches = &ctx.caches;
    let one = |object: &dyn ChildObject, cached: &dyn CachedMeta, tracking: ChangeTracking| -> Pending {
        let name = object.name();
        object.apply(shared.clone(), namespace.to_string(), cached.cached_meta(namespace, &name), tracking)
    };
    use ChangeTracking::{Generation, ResourceVersion};
    let c = children;
    // Independent objects, applied concurrently: the pods wait for their
    // Secret/ConfigMap/ServiceAccount anyway. The StatefulSet first in the
    // list: its result decides the `Scaled` event.
    let first = try_join_all(vec![
        one(&c.stateful_set, &caches.stateful_sets, Generation),
        one(&c.secret, &caches.secrets, ResourceVersion),
        one(&c.config_map, &caches.config_maps, ResourceVersion),
        one(&c.peers_service, &caches.services, ResourceVersion),
        one(&c.nodes_service, &caches.services, ResourceVersion),
        one(&c.node_service_account, &caches.service_accounts, ResourceVersion),
        one(&c.node_role, &caches.roles, ResourceVersion),
        one(&c.balancer_service_account, &caches.service_accounts, ResourceVersion),
        one(&c.balancer_role, &caches.roles, ResourceVersion),
        one(&c.balancer_deployment, &caches.deployments, Generation),
        one(&c.balancer_service, &caches.services, ResourceVersion),
        one(&c.pod_disruption_budget, &caches.pod_disruption_budgets, Generation),
        one(&c.network_policy, &caches.network_policies, Generation),
    ])
    .await?;
    // RoleBindings after their Roles: the API server checks that we hold
    // every permission of the referenced Role, and a Role it cannot find yet
    // fails the binding (reported as the binding "not found").
    let second = try_join_all(vec![
        one(&c.node_role_binding, &caches.role_bindings, ResourceVersion),
        one(&c.balancer_role_binding, &caches.role_bindings, ResourceVersion),
    ])
    .await?;
    Ok(Applied { any: first.iter().chain(&second).any(|w| *w), stateful_set: first.first().copied().unwrap_or(false) })
}

/// A child object of any kind, applied by [`apply`].
trait ChildObject {
    fn name(&self) -> String;
    fn apply(&self, ctx: Arc<ApplyContext>, namespace: String, cached: Option<ObjectMeta>, tracking: ChangeTracking) -> BoxFuture<'static, Result<bool, Error>>;
}

impl<K> ChildObject for K
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static,
{
    fn name(&self) -> String {
        self.meta().name.clone().unwrap_or_default()
    }
    fn apply(&self, ctx: Arc<ApplyContext>, namespace: String, cached: Option<ObjectMeta>, tracking: ChangeTracking) -> BoxFuture<'static, Result<bool, Error>> {
        Box::pin(apply(ctx, namespace, self.clone(), cached, tracking))
    }
}

/// Computes the status and writes it when it differs from the stored one;
/// publishes events for condition changes a user wants to know about.
async fn write_status(
    app: &ClusterApp,
    ctx: &Context,
    pods: &[Pod],
    stateful_set: Option<&StatefulSet>,
    problem: Option<&Problem>,
) -> Result<(), Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = compute_status(app, pods, stateful_set, problem, now);
    if app.status.as_ref() == Some(&status) {
        return Ok(());
    }
    condition_events(app, ctx, &status).await;
    let apps: Api<ClusterApp> = Api::namespaced(ctx.client.clone(), app.metadata.namespace.as_deref().unwrap_or_default());
    let patch = StatusPatch { api_version: "clusterapp.io/v1alpha1", kind: "ClusterApp", status: &status };
    ctx.state.api_writes.inc();
    ctx.state.api_requests.inc();
    apps.patch_status(&app.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(Error::WriteStatus)?;
    Ok(())
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct StatusPatch<'a> {
    api_version: &'static str,
    kind: &'static str,
    status: &'a ClusterAppStatus,
}

async fn condition_events(app: &ClusterApp, ctx: &Context, new: &ClusterAppStatus) {
    let old = app.status.as_ref();
    let status_of = |s: Option<&ClusterAppStatus>, t: &str| find_condition(s, t).map(|c| c.status.clone());
    let was_degraded = status_of(old, DEGRADED).as_deref() == Some("True");
    if let Some(degraded) = find_condition(Some(new), DEGRADED) {
        let reason_changed = find_condition(old, DEGRADED).map(|c| c.reason.as_str()) != Some(degraded.reason.as_str());
        if degraded.status == "True" && (!was_degraded || reason_changed) {
            publish(ctx, app, EventType::Warning, &degraded.reason, "Reconcile", degraded.message.clone()).await;
        } else if degraded.status == "False" && was_degraded {
            publish(ctx, app, EventType::Normal, "Recovered", "Reconcile", "The ClusterApp is no longer degraded".to_string()).await;
        }
    }
    if let Some(ready) = find_condition(Some(new), READY)
        && ready.status == "True"
        && status_of(old, READY).as_deref() != Some("True")
    {
        publish(ctx, app, EventType::Normal, "Ready", "Reconcile", ready.message.clone()).await;
    }
}

/// Publishes an event about the app; failures are logged, never fatal.
async fn publish(ctx: &Context, app: &ClusterApp, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Event { type_, reason: reason.to_string(), note: Some(note), action: action.to_string(), secondary: None };
    ctx.state.api_writes.inc();
    ctx.state.api_requests.inc();
    if let Err(e) = ctx.recorder.publish(&event, &app.object_ref(&())).await {
        tracing::warn!(error = %e, app = %app.name_any(), "publishing an event failed");
    }
}

/// The labels selecting one app's session nodes (used by the pod mapper).
pub fn app_of_pod(pod: &Pod) -> Option<ObjectRef<ClusterApp>> {
    let labels: &BTreeMap<String, String> = pod.metadata.labels.as_ref()?;
    let app = labels.get(LABEL_INSTANCE)?;
    Some(ObjectRef::new(app).within(pod.metadata.namespace.as_deref()?))
}

