//! One reconcile of one ClusterApp: read -> validate -> build -> apply ->
//! (membership check) -> status. Only the reads, the applies, the
//! membership check, the events and `write_status` talk to the API server;
//! a converged app sends nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, try_join_all};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::{ByteString, NamespaceResourceScope};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{ClusterApp, ClusterAppStatus};
use crate::operator::build::{BuildContext, Children, SecretMaterial, build_children};
use crate::operator::cache::{
    APPLIED_HASH_ANNOTATION, CachedMeta, Caches, ChangeTracking, SecretKeys, Written, desired_hash, needs_apply,
};
use crate::operator::error::Error;
use crate::operator::membership::{self, Change, MembershipChecks, Verdict};
use crate::operator::metrics::OperatorState;
use crate::operator::names::{
    AJP_SECRET_KEY, AppNames, CLIENT_CA_KEY, FIELD_MANAGER, LABEL_INSTANCE, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY,
    TRIBES_KEY_KEY,
};
use crate::operator::status::{DEGRADED, Observed, Problem, READY, compute_status, find_condition};

/// Requeue of a healthy app: a safety net, not how changes are found.
const REQUEUE_HEALTHY: Duration = Duration::from_secs(300);
/// Requeue while a user-fixable problem lasts. The Secrets a problem is
/// about are watched (their changes trigger a reconcile at once): this is
/// only a safety net.
const REQUEUE_PROBLEM: Duration = Duration::from_secs(60);
/// Retry after an error (API unreachable, conflict, ...).
const REQUEUE_ERROR: Duration = Duration::from_secs(5);

/// Reason of `Degraded` while a Secret named by `spec.balancer.tls` is
/// missing or lacks a key the balancer reads.
pub const TLS_SECRET_MISSING: &str = "TLSSecretMissing";
/// Reason of `Degraded` when the Secret named by `spec.ajp.secretRef` does
/// not exist.
pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
/// Reason of `Degraded` when that Secret lacks the named key.
pub const SECRET_KEY_NOT_FOUND: &str = "SecretKeyNotFound";
/// Reason of `Degraded` when applying a child failed.
pub const APPLY_FAILED: &str = "ApplyFailed";

/// The API server rejects an Event whose note is longer (events.k8s.io/v1).
const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// Everything a reconcile needs besides the ClusterApp.
pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub state: Arc<OperatorState>,
    /// Children, session node pods and referenced Secrets as last seen.
    pub caches: Arc<Caches>,
    pub recorder: Recorder,
    /// Apps whose node ServiceAccount was last found unable to list pods.
    pub membership: MembershipChecks,
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
    let names = AppNames::new(&app.name_any());
    // Being deleted: the garbage collector removes the children; applying
    // them again would only fight it.
    if app.metadata.deletion_timestamp.is_some() {
        ctx.membership.set(&namespace, &names.app, None);
        return Ok(Action::await_change());
    }
    // Reads come from the caches: wait until they are filled (at start).
    tracing::debug!(app = %names.app, namespace = %namespace, "reconciling");
    ctx.caches.wait_until_filled().await;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    // read
    let own_secret = own_secret(ctx, &secrets, &namespace, &names).await?;
    let pods = pods_of(&ctx.caches.pods, &namespace, &names.app);
    let stateful_set = ctx.caches.stateful_sets.get(&ObjectRef::new(&names.stateful_set()).within(&namespace));
    let balancer = ctx.caches.deployments.get(&ObjectRef::new(&names.balancer()).within(&namespace));
    let observed = Observed { pods: &pods, stateful_set: stateful_set.as_deref(), balancer: balancer.as_deref() };

    // validate
    let (material, mut problem) = key_material(own_secret.as_ref(), &namespace, &names)?;
    if problem.is_none() {
        problem = check_secret_ref(app, ctx, &secrets, &namespace).await?;
    }
    if problem.is_none() {
        problem = check_tls_secrets(app, ctx, &secrets, &namespace).await?;
    }

    // build + apply (not while a problem would make the nodes unable to start)
    let mut requeue = None;
    if problem.is_none() {
        let children = build_children(app, &material, &ctx.build)?;
        // A membership check that has not passed yet is retried with a
        // fresh apply of the node Role and RoleBinding.
        let recheck = membership::uses_api(app) && ctx.membership.get(&namespace, &names.app).is_some();
        let drift = node_rbac_drift(app, ctx, &namespace, &children)?;
        let applied = match apply_children(ctx, &namespace, &children, recheck).await {
            Ok(applied) => applied,
            // The namespace is being deleted (and the app with it): its
            // children are going on purpose; retrying would only load the
            // API server until the app is gone.
            Err(error) if error.is_namespace_terminating() => {
                tracing::debug!(app = %names.app, namespace = %namespace, "namespace terminating; not applying");
                return Ok(Action::await_change());
            }
            Err(error) => {
                let failure = Problem { reason: APPLY_FAILED.to_string(), message: error.to_string() };
                write_status(app, ctx, observed, Some(&failure)).await?;
                return Err(error);
            }
        };
        for (kind, change) in &drift {
            if applied.restored(kind, &names.node_account()) {
                let note = membership::restored_note(kind, &namespace, &names, change, membership::uses_api(app));
                // The object as the event's `related`: the recorder folds
                // events of one key (which ignores the note) into a series,
                // so each object and each kind of change gets its own.
                let related = ObjectReference {
                    api_version: Some("rbac.authorization.k8s.io/v1".to_string()),
                    kind: Some(kind.to_string()),
                    namespace: Some(namespace.clone()),
                    name: Some(names.node_account()),
                    ..Default::default()
                };
                let action = if *change == Change::Deleted { "Recreate" } else { "Restore" };
                let event = Event {
                    type_: EventType::Warning,
                    reason: membership::RESTORED_REASON.to_string(),
                    note: Some(note),
                    action: action.to_string(),
                    secondary: Some(related),
                };
                publish_event(ctx, app, event).await;
            }
        }
        if applied.wrote("StatefulSet", &names.stateful_set())
            && let Some(sts) = stateful_set.as_deref()
        {
            let (had, wanted) = (sts.spec.replicas.unwrap_or(1), app.spec.replicas);
            if had != wanted {
                publish(
                    ctx,
                    app,
                    EventType::Normal,
                    "Scaled",
                    "Scale",
                    format!("Scaling session nodes from {had} to {wanted}"),
                )
                .await;
            }
        }
        if app.status.is_none() && applied.any() {
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
        // After the node Role or RoleBinding was written (created, restored,
        // changed), or while an earlier check has not passed: may the nodes
        // list pods? A converged app skips this (no request).
        let wrote_rbac =
            applied.wrote("Role", &names.node_account()) || applied.wrote("RoleBinding", &names.node_account());
        if membership::uses_api(app) && (wrote_rbac || recheck) {
            match check_membership(ctx, &namespace, &names).await {
                Some(Verdict::Allowed) | None => {}
                Some(Verdict::Pending) => requeue = Some(membership::RETRY_PENDING),
                Some(Verdict::Forbidden(forbidden)) => {
                    problem = Some(forbidden);
                    requeue = Some(membership::RETRY_FORBIDDEN);
                }
            }
        } else if !membership::uses_api(app) {
            ctx.membership.set(&namespace, &names.app, None);
        }
    }

    // status
    write_status(app, ctx, observed, problem.as_ref()).await?;
    let requeue = requeue.unwrap_or(if problem.is_some() { REQUEUE_PROBLEM } else { REQUEUE_HEALTHY });
    tracing::debug!(app = %names.app, namespace = %namespace, requeue_s = requeue.as_secs_f64(), problem = ?problem.as_ref().map(|p| &p.reason), "reconciled");
    Ok(Action::requeue(requeue))
}

/// Changes by others of the node Role and RoleBinding, judged from the
/// caches before this pass applies (and so restores) them.
fn node_rbac_drift(
    app: &ClusterApp,
    ctx: &Context,
    namespace: &str,
    children: &Children,
) -> Result<Vec<(&'static str, Change)>, Error> {
    let name = children.node_role.meta().name.clone().unwrap_or_default();
    let converged = membership::was_converged(app);
    let role_hash = desired_hash(&children.node_role).map_err(|source| Error::Serialize {
        kind: "Role",
        name: name.clone(),
        source,
    })?;
    let binding_hash = desired_hash(&children.node_role_binding).map_err(|source| Error::Serialize {
        kind: "RoleBinding",
        name: name.clone(),
        source,
    })?;
    let cached_role = ctx.caches.roles.get(&ObjectRef::new(&name).within(namespace));
    let cached_binding = ctx.caches.role_bindings.get(&ObjectRef::new(&name).within(namespace));
    let written = &ctx.caches.written;
    let mut drift = Vec::new();
    if let Some(change) = membership::role_change(
        &children.node_role,
        &role_hash,
        cached_role.as_deref(),
        written.get("Role", namespace, &name).as_ref(),
        converged,
    ) {
        drift.push(("Role", change));
    }
    if let Some(change) = membership::role_binding_change(
        &children.node_role_binding,
        &binding_hash,
        cached_binding.as_deref(),
        written.get("RoleBinding", namespace, &name).as_ref(),
        converged,
    ) {
        drift.push(("RoleBinding", change));
    }
    Ok(drift)
}

/// Asks the API server whether the node ServiceAccount may list pods and
/// judges the answer against the earlier ones. None when the question
/// could not be asked (logged; asked again after the next write of the
/// Role or RoleBinding).
async fn check_membership(ctx: &Context, namespace: &str, names: &AppNames) -> Option<Verdict> {
    let reviews: Api<SubjectAccessReview> = Api::all(ctx.client.clone());
    ctx.state.api_requests.inc();
    let answer = match reviews.create(&PostParams::default(), &membership::review(namespace, names)).await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::warn!(app = %names.app, namespace = %namespace, error = %error, "cannot check whether the session nodes may list pods");
            ctx.membership.set(namespace, &names.app, None);
            return None;
        }
    };
    let (allowed, why) = membership::answer(&answer);
    let earlier = ctx.membership.get(namespace, &names.app);
    let (state, verdict) = membership::judge(earlier.as_ref(), allowed, &why, namespace, names, Instant::now());
    ctx.membership.set(namespace, &names.app, state);
    if verdict != Verdict::Allowed {
        tracing::info!(app = %names.app, namespace = %namespace, reason = %why, reported = matches!(verdict, Verdict::Forbidden(_)), "session nodes may not list pods");
    }
    Some(verdict)
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
async fn own_secret(
    ctx: &Context,
    secrets: &Api<Secret>,
    namespace: &str,
    names: &AppNames,
) -> Result<Option<Secret>, Error> {
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
fn key_material(
    secret: Option<&Secret>,
    namespace: &str,
    names: &AppNames,
) -> Result<(SecretMaterial, Option<Problem>), Error> {
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

/// The Secrets an app names besides its own: `spec.ajp.secretRef` and
/// `spec.balancer.tls` (a change of one triggers a reconcile of the app).
pub fn referenced_secrets(app: &ClusterApp) -> Vec<&str> {
    let spec = &app.spec;
    let mut names: Vec<&str> = spec.ajp.secret_ref.iter().map(|r| r.name.as_str()).collect();
    if let Some(tls) = &spec.balancer.tls {
        names.push(&tls.secret_name);
        names.extend(tls.client_ca_secret_name.as_deref());
    }
    names
}

/// The keys of Secret `name` that hold a non-empty value; None when the
/// Secret does not exist. Existence comes from the caches (whose watch of
/// other Secrets also triggers a reconcile when one appears or changes);
/// the keys of a Secret not ours are read from the API server once per
/// resourceVersion, so a converged app sends no request. Only key names
/// are kept, never values.
async fn secret_keys(
    ctx: &Context,
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeSet<String>>, Error> {
    // The rule of `secret_value`: non-empty UTF-8 text.
    let non_empty = |secret: &Secret| -> BTreeSet<String> {
        let data = secret.data.iter().flatten();
        data.filter(|(_, value)| std::str::from_utf8(&value.0).is_ok_and(|text| !text.is_empty()))
            .map(|(key, _)| key.clone())
            .collect()
    };
    if let Some(ours) = ctx.caches.secrets.get(&ObjectRef::new(name).within(namespace)) {
        // One of our generated Secrets (its data is cached).
        return Ok(Some(non_empty(&ours)));
    }
    let Some(meta) = ctx.caches.other_secrets.cached_meta(namespace, name) else { return Ok(None) };
    let version = meta.resource_version.unwrap_or_default();
    if let Some(known) = ctx.caches.secret_keys(namespace, name)
        && known.resource_version == version
    {
        return Ok(Some(known.keys));
    }
    ctx.state.api_requests.inc();
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|source| Error::Read { what: format!("Secret {namespace}/{name}"), source })?;
    Ok(secret.map(|secret| {
        let keys = non_empty(&secret);
        let resource_version = secret.metadata.resource_version.clone().unwrap_or_default();
        ctx.caches.remember_secret_keys(namespace, name, SecretKeys { resource_version, keys: keys.clone() });
        keys
    }))
}

/// A `spec.ajp.secretRef` must name an existing key of an existing Secret.
async fn check_secret_ref(
    app: &ClusterApp,
    ctx: &Context,
    secrets: &Api<Secret>,
    namespace: &str,
) -> Result<Option<Problem>, Error> {
    let Some(reference) = &app.spec.ajp.secret_ref else { return Ok(None) };
    let keys = secret_keys(ctx, secrets, namespace, &reference.name).await?;
    Ok(match keys {
        None => Some(Problem {
            reason: SECRET_NOT_FOUND.to_string(),
            message: format!(
                "Secret {namespace}/{} named by spec.ajp.secretRef does not exist; create it with the key {}",
                reference.name, reference.key
            ),
        }),
        Some(keys) if !keys.contains(&reference.key) => Some(Problem {
            reason: SECRET_KEY_NOT_FOUND.to_string(),
            message: format!(
                "Secret {namespace}/{} named by spec.ajp.secretRef has no non-empty key {}",
                reference.name, reference.key
            ),
        }),
        Some(_) => None,
    })
}

/// The Secrets of `spec.balancer.tls` must exist and hold the keys the
/// balancer reads (`tls.crt` and `tls.key`; `ca.crt` of the client CA
/// Secret): a balancer pod whose Secret volume cannot be mounted does not
/// start. Their contents are not checked here: the balancer reloads the
/// files and keeps the last good pair.
async fn check_tls_secrets(
    app: &ClusterApp,
    ctx: &Context,
    secrets: &Api<Secret>,
    namespace: &str,
) -> Result<Option<Problem>, Error> {
    let Some(tls) = &app.spec.balancer.tls else { return Ok(None) };
    const TLS_PAIR: &[&str] = &[TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY];
    const CA: &[&str] = &[CLIENT_CA_KEY];
    let wanted = [
        Some(("spec.balancer.tls.secretName", tls.secret_name.as_str(), TLS_PAIR)),
        tls.client_ca_secret_name.as_deref().map(|name| ("spec.balancer.tls.clientCASecretName", name, CA)),
    ];
    for (field, name, needed) in wanted.into_iter().flatten() {
        let message = match secret_keys(ctx, secrets, namespace, name).await? {
            None => {
                let how = if needed == TLS_PAIR {
                    format!("kubectl create secret tls {name} --cert=CERT.pem --key=KEY.pem -n {namespace}")
                } else {
                    format!("kubectl create secret generic {name} --from-file={CLIENT_CA_KEY}=CA.pem -n {namespace}")
                };
                format!(
                    "Secret {namespace}/{name} named by {field} does not exist; create it with the key{} {}, e.g. `{how}`",
                    if needed.len() > 1 { "s" } else { "" },
                    needed.join(" and ")
                )
            }
            Some(keys) => {
                let missing: Vec<&str> = needed.iter().copied().filter(|key| !keys.contains(*key)).collect();
                if missing.is_empty() {
                    continue;
                }
                format!(
                    "Secret {namespace}/{name} named by {field} has no non-empty key{} {}; the balancer reads {}",
                    if missing.len() > 1 { "s" } else { "" },
                    missing.join(" and "),
                    needed.join(" and ")
                )
            }
        };
        return Ok(Some(Problem { reason: TLS_SECRET_MISSING.to_string(), message }));
    }
    Ok(None)
}

/// A pending server-side apply of one child.
type Pending = BoxFuture<'static, Result<(), Error>>;

/// Prepares the server-side apply of one object with our field manager,
/// unless the cached child shows it is already as built (see
/// [`needs_apply`]) and `force` is off. The object carries a hash of itself
/// in an annotation. Returns the request (None: nothing to send) and
/// whether the cache alone called for it.
fn plan_apply<K>(
    ctx: &Arc<ApplyContext>,
    namespace: &str,
    mut object: K,
    cached: Option<ObjectMeta>,
    tracking: ChangeTracking,
    force: bool,
) -> Result<Option<(Pending, bool)>, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug
        + Send
        + Sync
        + 'static,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let kind = kind_name::<K>();
    let hash = desired_hash(&object).map_err(|source| Error::Serialize { kind, name: name.clone(), source })?;
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.to_string(), hash.clone());
    let written = ctx.caches.written.get(kind, namespace, &name);
    let needed = needs_apply(object.meta(), cached.as_ref(), written.as_ref(), tracking);
    if !needed && !force {
        return Ok(None);
    }
    let (ctx, namespace) = (ctx.clone(), namespace.to_string());
    let request = async move {
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        ctx.state.api_writes.inc();
        ctx.state.api_requests.inc();
        let stored = api.patch(&name, &params, &Patch::Apply(&object)).await.map_err(|source| Error::Apply {
            kind,
            name: name.clone(),
            source,
        })?;
        let meta = stored.meta();
        let record = Written { hash, resource_version: meta.resource_version.clone(), generation: meta.generation };
        ctx.caches.written.record(kind, &namespace, &name, record);
        Ok(())
    };
    Ok(Some((Box::pin(request), needed)))
}

pub(crate) fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    // Resource::kind returns a Cow; the k8s-openapi kinds are static.
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(kind) => kind,
        std::borrow::Cow::Owned(_) => "object",
    }
}

/// What the apply requests share (owned, so they can run concurrently).
struct ApplyContext {
    client: Client,
    state: Arc<OperatorState>,
    caches: Arc<Caches>,
}

/// The children one pass wrote: (kind, name, whether the cache called for
/// it rather than a forced re-apply).
#[derive(Clone, Debug, Default)]
struct Applied {
    written: Vec<(&'static str, String, bool)>,
}

impl Applied {
    fn any(&self) -> bool {
        !self.written.is_empty()
    }
    fn wrote(&self, kind: &str, name: &str) -> bool {
        self.written.iter().any(|(k, n, _)| *k == kind && n == name)
    }
    /// Written because the cache showed it missing or changed.
    fn restored(&self, kind: &str, name: &str) -> bool {
        self.written.iter().any(|(k, n, needed)| *k == kind && n == name && *needed)
    }
}

/// Applies every child that needs it, in two stages. `force_node_rbac`
/// re-applies the node Role and RoleBinding even when the cache shows them
/// as built (a membership check that has not passed).
async fn apply_children(
    ctx: &Context,
    namespace: &str,
    children: &Children,
    force_node_rbac: bool,
) -> Result<Applied, Error> {
    use ChangeTracking::{Generation, ResourceVersion};
    let shared =
        Arc::new(ApplyContext { client: ctx.client.clone(), state: ctx.state.clone(), caches: ctx.caches.clone() });
    let (c, caches) = (children, &ctx.caches);
    // Stage one: independent objects, applied concurrently (the pods wait
    // for their Secret/ConfigMap/ServiceAccount anyway). Stage two: the
    // RoleBindings after their Roles, because the API server checks that we
    // hold every permission of the referenced Role, and a Role it cannot
    // find yet fails the binding (reported as the binding "not found").
    let stages: [Vec<Step<'_>>; 2] = [
        vec![
            (&c.stateful_set, &caches.stateful_sets, Generation, false),
            (&c.secret, &caches.secrets, ResourceVersion, false),
            (&c.config_map, &caches.config_maps, ResourceVersion, false),
            (&c.peers_service, &caches.services, ResourceVersion, false),
            (&c.nodes_service, &caches.services, ResourceVersion, false),
            (&c.node_service_account, &caches.service_accounts, ResourceVersion, false),
            (&c.node_role, &caches.roles, ResourceVersion, force_node_rbac),
            (&c.balancer_service_account, &caches.service_accounts, ResourceVersion, false),
            (&c.balancer_role, &caches.roles, ResourceVersion, false),
            (&c.balancer_deployment, &caches.deployments, Generation, false),
            (&c.balancer_service, &caches.services, ResourceVersion, false),
            (&c.pod_disruption_budget, &caches.pod_disruption_budgets, Generation, false),
            (&c.network_policy, &caches.network_policies, Generation, false),
        ],
        vec![
            (&c.node_role_binding, &caches.role_bindings, ResourceVersion, force_node_rbac),
            (&c.balancer_role_binding, &caches.role_bindings, ResourceVersion, false),
        ],
    ];
    let mut applied = Applied::default();
    for stage in stages {
        let mut requests = Vec::new();
        for (object, cache, tracking, force) in stage {
            let name = object.name();
            if let Some((request, needed)) =
                object.plan(&shared, namespace, cache.cached_meta(namespace, &name), tracking, force)?
            {
                applied.written.push((object.kind(), name, needed));
                requests.push(request);
            }
        }
        try_join_all(requests).await?;
    }
    Ok(applied)
}

/// One child in an apply stage: the object, its cache, how it reports
/// changes, and whether to apply it even when the cache shows it as built.
type Step<'a> = (&'a dyn ChildObject, &'a dyn CachedMeta, ChangeTracking, bool);

/// A child object of any kind, applied by [`plan_apply`].
trait ChildObject: Sync {
    fn kind(&self) -> &'static str;
    fn name(&self) -> String;
    fn plan(
        &self,
        ctx: &Arc<ApplyContext>,
        namespace: &str,
        cached: Option<ObjectMeta>,
        tracking: ChangeTracking,
        force: bool,
    ) -> Result<Option<(Pending, bool)>, Error>;
}

impl<K> ChildObject for K
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug
        + Send
        + Sync
        + 'static,
{
    fn kind(&self) -> &'static str {
        kind_name::<K>()
    }
    fn name(&self) -> String {
        self.meta().name.clone().unwrap_or_default()
    }
    fn plan(
        &self,
        ctx: &Arc<ApplyContext>,
        namespace: &str,
        cached: Option<ObjectMeta>,
        tracking: ChangeTracking,
        force: bool,
    ) -> Result<Option<(Pending, bool)>, Error> {
        plan_apply(ctx, namespace, self.clone(), cached, tracking, force)
    }
}

/// Computes the status and writes it when it differs from the stored one;
/// publishes events for condition changes a user wants to know about.
async fn write_status(
    app: &ClusterApp,
    ctx: &Context,
    observed: Observed<'_>,
    problem: Option<&Problem>,
) -> Result<(), Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = compute_status(app, observed, problem, now);
    if app.status.as_ref() == Some(&status) {
        return Ok(());
    }
    condition_events(app, ctx, &status).await;
    let apps: Api<ClusterApp> =
        Api::namespaced(ctx.client.clone(), app.metadata.namespace.as_deref().unwrap_or_default());
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
            publish(
                ctx,
                app,
                EventType::Normal,
                "Recovered",
                "Reconcile",
                "The ClusterApp is no longer degraded".to_string(),
            )
            .await;
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
    let event =
        Event { type_, reason: reason.to_string(), note: Some(note), action: action.to_string(), secondary: None };
    publish_event(ctx, app, event).await;
}

/// `note` cut to what the API server accepts (a condition's message may be
/// longer, e.g. NodesCrashLooping quoting several pods): its start, which
/// names the first problem in full, and a mark that the status has the rest.
fn event_note(note: String) -> String {
    const CUT_MARK: &str = " … (cut; the ClusterApp's status has all)";
    if note.len() <= EVENT_NOTE_MAX_BYTES {
        return note;
    }
    let mut end = EVENT_NOTE_MAX_BYTES - CUT_MARK.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARK}", &note[..end])
}

async fn publish_event(ctx: &Context, app: &ClusterApp, mut event: Event) {
    event.note = event.note.map(event_note);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_what_the_api_server_accepts() {
        assert_eq!(event_note("short".to_string()), "short");
        let exact = "x".repeat(EVENT_NOTE_MAX_BYTES);
        assert_eq!(event_note(exact.clone()), exact);
        // Multi-byte characters across the limit: cut on a boundary.
        let long = format!("pod shop-1 restarted 3 times; its last lines:\n{}", "é".repeat(EVENT_NOTE_MAX_BYTES));
        let note = event_note(long.clone());
        assert!(note.len() <= EVENT_NOTE_MAX_BYTES, "{} bytes", note.len());
        assert!(note.starts_with("pod shop-1 restarted 3 times") && note.ends_with("the ClusterApp's status has all)"));
    }
}
