//! Stage 5, apply: every child the caches show missing or changed is
//! applied with server-side apply (a converged app sends nothing); then the
//! events about what was written, and — after the node Role or RoleBinding
//! was written — the check that the session nodes may list pods.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, try_join_all};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};

use super::Context;
use super::events::{publish, publish_event};
use super::observe::Observation;
use super::validate::APPLY_FAILED;
use crate::crd::ClusterApp;
use crate::operator::build::Children;
use crate::operator::cache::{APPLIED_HASH_ANNOTATION, Caches, Written, desired_hash, needs_apply};
use crate::operator::children::{ApplyStage, ChildKind, ChildVisitor};
use crate::operator::error::Error;
use crate::operator::membership::{self, Change, Verdict};
use crate::operator::metrics::OperatorState;
use crate::operator::names::{AppNames, FIELD_MANAGER};
use crate::operator::status::Problem;

/// What the apply stage did.
pub enum Applied {
    /// Every child is as built. `problem`: what the membership check found
    /// wrong; `requeue`: when it wants to look again.
    Done { problem: Option<Problem>, requeue: Option<Duration> },
    /// The namespace is being deleted (and the app with it): its children
    /// are going on purpose; retrying would only load the API server until
    /// the app is gone.
    NamespaceTerminating,
    /// An apply failed: the status reports `problem`, then the pass fails
    /// with `error` (and is retried).
    Failed { problem: Problem, error: Error },
}

pub async fn apply(
    app: &ClusterApp,
    ctx: &Context,
    observation: &Observation,
    children: &Children,
) -> Result<Applied, Error> {
    let Observation { namespace, names, stateful_set, .. } = observation;
    // A membership check that has not passed yet is retried with a fresh
    // apply of the node Role and RoleBinding.
    let recheck = membership::uses_api(app) && ctx.membership.get(namespace, &names.app).is_some();
    let drift = node_rbac_drift(app, ctx, namespace, children)?;
    let written = match apply_children(ctx, namespace, names, children, recheck).await {
        Ok(written) => written,
        Err(error) if error.is_namespace_terminating() => {
            tracing::debug!(app = %names.app, namespace = %namespace, "namespace terminating; not applying");
            return Ok(Applied::NamespaceTerminating);
        }
        Err(error) => {
            let problem = Problem { reason: APPLY_FAILED.to_string(), message: error.to_string() };
            return Ok(Applied::Failed { problem, error });
        }
    };
    for (kind, change) in &drift {
        if written.restored(kind, &names.node_account()) {
            let note = membership::restored_note(kind, namespace, names, change, membership::uses_api(app));
            // The object as the event's `related`: it names what was put
            // back. (Each distinct note is its own series anyway: see
            // `events`.)
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
    if written.wrote("StatefulSet", &names.stateful_set())
        && let Some(sts) = stateful_set.as_deref()
    {
        let (had, wanted) = (sts.spec.replicas.unwrap_or(1), app.spec.replicas);
        if had != wanted {
            let note = format!("Scaling session nodes from {had} to {wanted}");
            publish(ctx, app, EventType::Normal, "Scaled", "Scale", note).await;
        }
    }
    if app.status.is_none() && written.any() {
        let note = format!("Created {} session nodes, the balancer and their policies", app.spec.replicas);
        publish(ctx, app, EventType::Normal, "Created", "Create", note).await;
    }
    // After the node Role or RoleBinding was written (created, restored,
    // changed), or while an earlier check has not passed: may the nodes
    // list pods? A converged app skips this (no request).
    let wrote_rbac =
        written.wrote("Role", &names.node_account()) || written.wrote("RoleBinding", &names.node_account());
    let (mut problem, mut requeue) = (None, None);
    if membership::uses_api(app) && (wrote_rbac || recheck) {
        match check_membership(ctx, namespace, names).await {
            Some(Verdict::Allowed) | None => {}
            Some(Verdict::Pending) => requeue = Some(membership::RETRY_PENDING),
            Some(Verdict::Forbidden(forbidden)) => {
                problem = Some(forbidden);
                requeue = Some(membership::RETRY_FORBIDDEN);
            }
        }
    } else if !membership::uses_api(app) {
        ctx.membership.set(namespace, &names.app, None);
    }
    Ok(Applied::Done { problem, requeue })
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
    let cached_role = ctx.caches.children.roles.get(&ObjectRef::new(&name).within(namespace));
    let cached_binding = ctx.caches.children.role_bindings.get(&ObjectRef::new(&name).within(namespace));
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

/// A pending server-side apply of one child.
type Pending = BoxFuture<'static, Result<(), Error>>;

/// What the apply requests share (owned, so they can run concurrently).
struct ApplyContext {
    client: Client,
    state: Arc<OperatorState>,
    caches: Arc<Caches>,
}

/// Prepares the server-side apply of one object with our field manager,
/// unless the cached child shows it is already as built (see
/// [`needs_apply`]) and `force` is off. The object carries a hash of itself
/// in an annotation. Returns the request (None: nothing to send) and
/// whether the cache alone called for it.
fn plan_apply<K: ChildKind>(
    ctx: &Arc<ApplyContext>,
    namespace: &str,
    mut object: K,
    force: bool,
) -> Result<Option<(Pending, bool)>, Error> {
    let name = object.meta().name.clone().unwrap_or_default();
    let kind = kind_name::<K>();
    let hash = desired_hash(&object).map_err(|source| Error::Serialize { kind, name: name.clone(), source })?;
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.to_string(), hash.clone());
    let cached = K::cached_meta(&ctx.caches, namespace, &name);
    let written = ctx.caches.written.get(kind, namespace, &name);
    let needed = needs_apply(object.meta(), cached.as_ref(), written.as_ref(), K::TRACKING);
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

pub fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    // Resource::kind returns a Cow; the k8s-openapi kinds are static.
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(kind) => kind,
        std::borrow::Cow::Owned(_) => "object",
    }
}

/// The children one pass wrote: (kind, name, whether the cache called for
/// it rather than a forced re-apply).
#[derive(Clone, Debug, Default)]
struct WrittenChildren {
    written: Vec<(&'static str, String, bool)>,
}

impl WrittenChildren {
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

/// Plans the apply of every child of the registry, by stage.
struct Planner<'a> {
    shared: Arc<ApplyContext>,
    namespace: &'a str,
    /// Re-apply the node Role and RoleBinding (this ServiceAccount name)
    /// even when the cache shows them as built.
    force_node_rbac: Option<String>,
    requests: [Vec<Pending>; ApplyStage::ALL.len()],
    written: WrittenChildren,
}

impl ChildVisitor for Planner<'_> {
    type Error = Error;

    fn child<K: ChildKind>(&mut self, object: &K, stage: ApplyStage) -> Result<(), Error> {
        let kind = kind_name::<K>();
        let name = object.meta().name.clone().unwrap_or_default();
        let force = matches!(kind, "Role" | "RoleBinding") && self.force_node_rbac.as_deref() == Some(name.as_str());
        if let Some((request, needed)) = plan_apply(&self.shared, self.namespace, object.clone(), force)? {
            self.written.written.push((kind, name, needed));
            self.requests[stage as usize].push(request);
        }
        Ok(())
    }
}

/// Applies every child that needs it, stage after stage (see
/// [`ApplyStage`]); the applies of one stage run concurrently.
/// `force_node_rbac` re-applies the node Role and RoleBinding even when the
/// cache shows them as built (a membership check that has not passed).
async fn apply_children(
    ctx: &Context,
    namespace: &str,
    names: &AppNames,
    children: &Children,
    force_node_rbac: bool,
) -> Result<WrittenChildren, Error> {
    let shared =
        Arc::new(ApplyContext { client: ctx.client.clone(), state: ctx.state.clone(), caches: ctx.caches.clone() });
    let mut planner = Planner {
        shared,
        namespace,
        force_node_rbac: force_node_rbac.then(|| names.node_account()),
        requests: Default::default(),
        written: WrittenChildren::default(),
    };
    children.visit(&mut planner)?;
    let Planner { requests, written, .. } = planner;
    for stage in requests {
        try_join_all(stage).await?;
    }
    Ok(written)
}
