//! Stage 1, observe: what is known about one app, read from the caches and
//! from the API server only for what the caches lack (an own Secret that
//! is not cached whole, the keys of a referenced Secret at a new
//! resourceVersion).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};

use super::Context;
use super::validate::secret_value;
use crate::crd::ClusterApp;
use crate::operator::cache::{CachedMeta, SecretKeys};
use crate::operator::error::Error;
use crate::operator::names::{AJP_SECRET_KEY, AppNames, LABEL_INSTANCE, TRIBES_KEY_KEY};
use crate::operator::status::Observed;

/// What one reconcile knows about its app.
pub struct Observation {
    pub namespace: String,
    pub names: AppNames,
    /// The app's generated Secret (None: not created yet).
    pub own_secret: Option<Secret>,
    /// The session node pods, as cached (stripped).
    pub pods: Vec<Pod>,
    pub stateful_set: Option<Arc<StatefulSet>>,
    pub balancer: Option<Arc<Deployment>>,
    /// Every Secret the app names ([`referenced_secrets`]): the keys that
    /// hold a non-empty value, None when the Secret does not exist. Key
    /// names only, never values.
    pub referenced_secrets: BTreeMap<String, Option<BTreeSet<String>>>,
}

impl Observation {
    /// What the status is computed from.
    pub fn for_status(&self) -> Observed<'_> {
        Observed { pods: &self.pods, stateful_set: self.stateful_set.as_deref(), balancer: self.balancer.as_deref() }
    }

    /// The non-empty keys of the referenced Secret `name`; None when it does
    /// not exist.
    pub fn keys_of(&self, name: &str) -> Option<&BTreeSet<String>> {
        self.referenced_secrets.get(name).and_then(Option::as_ref)
    }
}

pub async fn observe(
    app: &ClusterApp,
    ctx: &Context,
    namespace: String,
    names: AppNames,
) -> Result<Observation, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let own_secret = own_secret(ctx, &secrets, &namespace, &names).await?;
    let pods = pods_of(&ctx.caches.pods, &namespace, &names.app);
    let stateful_set = ctx.caches.children.stateful_sets.get(&ObjectRef::new(&names.stateful_set()).within(&namespace));
    let balancer = ctx.caches.children.deployments.get(&ObjectRef::new(&names.balancer()).within(&namespace));
    let mut referenced = BTreeMap::new();
    for name in referenced_secrets(app) {
        if !referenced.contains_key(name) {
            let keys = secret_keys(ctx, &secrets, &namespace, name).await?;
            referenced.insert(name.to_string(), keys);
        }
    }
    Ok(Observation { namespace, names, own_secret, pods, stateful_set, balancer, referenced_secrets: referenced })
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
    let cached = ctx.caches.children.secrets.get(&ObjectRef::new(&names.secret()).within(namespace));
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
    if let Some(ours) = ctx.caches.children.secrets.get(&ObjectRef::new(name).within(namespace)) {
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
