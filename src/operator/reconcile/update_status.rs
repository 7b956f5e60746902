//! Stage 6, status: computed from the observation (pure, in
//! `operator::status`) and written with server-side apply only when it
//! differs from the stored one; events for the condition changes a user
//! wants to know about.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde::Serialize;

use super::Context;
use super::events::publish;
use crate::crd::{ClusterApp, ClusterAppStatus};
use crate::operator::error::Error;
use crate::operator::names::FIELD_MANAGER;
use crate::operator::status::{DEGRADED, Observed, Problem, READY, compute_status, find_condition};

/// Computes the status and writes it when it differs from the stored one.
pub async fn write_status(
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
    patch_status(ctx, app, &status, None).await.map_err(Error::WriteStatus)
}

/// Writes `status` (server-side apply, the operator's field manager, so the
/// reconcile and the session estimates own the status as one). With
/// `resource_version`, only onto that version of the app: a writer that
/// built `status` from a copy that may be stale (the session estimates,
/// from the reflector's copy) gets a conflict instead of undoing a newer
/// write.
pub async fn patch_status(
    ctx: &Context,
    app: &ClusterApp,
    status: &ClusterAppStatus,
    resource_version: Option<&str>,
) -> Result<(), kube::Error> {
    let apps: Api<ClusterApp> =
        Api::namespaced(ctx.client.clone(), app.metadata.namespace.as_deref().unwrap_or_default());
    let patch = StatusPatch {
        api_version: "clusterapp.io/v1alpha1",
        kind: "ClusterApp",
        metadata: resource_version.map(|resource_version| PatchMetadata { resource_version }),
        status,
    };
    ctx.state.api_writes.inc();
    ctx.state.api_requests.inc();
    apps.patch_status(&app.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct StatusPatch<'a> {
    api_version: &'static str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<PatchMetadata<'a>>,
    status: &'a ClusterAppStatus,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct PatchMetadata<'a> {
    resource_version: &'a str,
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
