//! One reconcile of one ClusterApp, as a pipeline of stages with typed
//! outputs. Only the ends talk to the API server, and a converged app sends
//! nothing at all:
//!
//! 1. [`observe`]: what the caches (and, for what they lack, the API server)
//!    hold about the app → [`Observation`];
//! 2. [`validate`]: pure; the observation judged → [`Validated`], or a
//!    [`Problem`] the user can fix (then nothing is applied);
//! 3. [`keys`]: the key material, new random keys for missing ones (an
//!    effect: randomness) → [`SecretMaterial`];
//! 4. desired children: the pure builders, [`build_children`] → [`Children`];
//! 5. [`apply`]: server-side apply of what the caches show changed, then the
//!    events and the membership check that follow → [`Applied`];
//!    Then [`leaving`]: the session nodes that terminate, or that the
//!    applied replica count removes, are labelled leaving (terminating ones
//!    whatever the app's validity): peers stop replicating to them and the
//!    balancers stop sending them new and failing-over sessions;
//! 6. [`update_status`]: the status computed from the observation and
//!    written when it changed, with events for condition changes.
//!
//! [`SecretMaterial`]: crate::operator::build::SecretMaterial
//! [`Children`]: crate::operator::build::Children
//! [`Problem`]: crate::operator::status::Problem

mod apply;
pub(crate) mod events;
mod keys;
mod leaving;
#[cfg(test)]
mod mock_api;
#[cfg(test)]
mod mock_tests;
mod observe;
pub(crate) mod update_status;
mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};

use crate::crd::ClusterApp;
use crate::operator::build::{BuildContext, BuildError, build_children};
use crate::operator::cache::Caches;
use crate::operator::error::Error;
use crate::operator::membership::MembershipChecks;
use crate::operator::metrics::OperatorState;
use crate::operator::names::{AppNames, LABEL_INSTANCE};

pub use apply::{Applied, kind_name};
pub use observe::{Observation, referenced_secrets};
pub use validate::{
    APPLY_FAILED, INVALID_ENCRYPTION_KEY, SECRET_KEY_NOT_FOUND, SECRET_NOT_FOUND, TLS_SECRET_MISSING, Validated,
    is_valid_tribes_key,
};

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
        return Err(Error::Build(BuildError::MissingNamespace));
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

    let observation = observe::observe(app, ctx, namespace, names).await?;
    // Not while a problem would make the nodes unable to start.
    let (problem, requeue, applied_replicas) = match validate::validate(app, &observation) {
        Err(problem) => (Some(problem), None, None),
        Ok(validated) => {
            let material = keys::key_material(validated.existing_keys)?;
            let children = build_children(app, &material, &ctx.build)?;
            match apply::apply(app, ctx, &observation, &children).await? {
                Applied::Done { problem, requeue } => (problem, requeue, Some(app.spec.replicas)),
                Applied::NamespaceTerminating => return Ok(Action::await_change()),
                Applied::Failed { problem, error } => {
                    leaving::label_leaving_nodes(ctx, &observation, None).await;
                    update_status::write_status(app, ctx, observation.for_status(), Some(&problem)).await?;
                    return Err(error);
                }
            }
        }
    };
    leaving::label_leaving_nodes(ctx, &observation, applied_replicas).await;

    update_status::write_status(app, ctx, observation.for_status(), problem.as_ref()).await?;
    let requeue = requeue.unwrap_or(if problem.is_some() { REQUEUE_PROBLEM } else { REQUEUE_HEALTHY });
    tracing::debug!(app = %observation.names.app, namespace = %observation.namespace, requeue_s = requeue.as_secs_f64(), problem = ?problem.as_ref().map(|p| &p.reason), "reconciled");
    Ok(Action::requeue(requeue))
}

/// The labels selecting one app's session nodes (used by the pod mapper).
pub fn app_of_pod(pod: &Pod) -> Option<ObjectRef<ClusterApp>> {
    let labels = pod.metadata.labels.as_ref()?;
    let app = labels.get(LABEL_INSTANCE)?;
    Some(ObjectRef::new(app).within(pod.metadata.namespace.as_deref()?))
}
