//! The registry of child kinds: every object a ClusterApp owns is listed
//! once, in [`Children::visit`], and every kind says once, in its
//! [`ChildKind`] impl, which cache holds it and how it reports changes.
//!
//! Adding a child is one change the compiler walks you through: a field in
//! [`Children`], its line in [`Children::visit`] (which destructures the
//! struct without `..`, so a forgotten field does not compile), and for a
//! new kind a [`ChildKind`] impl, which needs a store in [`Caches`] — and a
//! store does not compile until `Caches::fill` waits for it and
//! `run_controller` builds it (then give it a watch and `owns_stream` there,
//! next to the others). The golden files, the applies and the tests all walk
//! the children through `visit`.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::operator::build::Children;
use crate::operator::cache::{CachedMeta, Caches, ChangeTracking};

/// When a child is applied within one reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyStage {
    /// Independent objects, applied concurrently (the pods wait for their
    /// Secret, ConfigMap and ServiceAccount anyway).
    First,
    /// RoleBindings, once their Roles are applied: the API server checks that
    /// we hold every permission of the referenced Role, and a Role it cannot
    /// find yet fails the binding (reported as the binding "not found").
    AfterRoles,
}

impl ApplyStage {
    /// Every stage, in the order they run.
    pub const ALL: [ApplyStage; 2] = [ApplyStage::First, ApplyStage::AfterRoles];
}

/// A kind of child object: a namespaced Kubernetes type with a cache.
pub trait ChildKind:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Serialize
    + DeserializeOwned
    + Clone
    + Debug
    + Send
    + Sync
    + 'static
{
    /// How objects of this kind show edits by others.
    const TRACKING: ChangeTracking;
    /// The cache of objects of this kind.
    fn cache(caches: &Caches) -> &dyn CachedMeta;
    /// Metadata of the cached object `namespace`/`name`, if cached.
    fn cached_meta(caches: &Caches, namespace: &str, name: &str) -> Option<ObjectMeta> {
        Self::cache(caches).cached_meta(namespace, name)
    }
}

macro_rules! child_kind {
    ($kind:ty, $tracking:ident, $cache:ident) => {
        impl ChildKind for $kind {
            const TRACKING: ChangeTracking = ChangeTracking::$tracking;
            fn cache(caches: &Caches) -> &dyn CachedMeta {
                &caches.$cache
            }
        }
    };
}

// `metadata.generation` moves on every spec change of these (status
// updates by their controllers do not count as edits)...
child_kind!(StatefulSet, Generation, stateful_sets);
child_kind!(Deployment, Generation, deployments);
child_kind!(PodDisruptionBudget, Generation, pod_disruption_budgets);
child_kind!(NetworkPolicy, Generation, network_policies);
// ...these have no generation: any new resourceVersion may be an edit.
child_kind!(Secret, ResourceVersion, secrets);
child_kind!(ConfigMap, ResourceVersion, config_maps);
child_kind!(Service, ResourceVersion, services);
child_kind!(ServiceAccount, ResourceVersion, service_accounts);
child_kind!(Role, ResourceVersion, roles);
child_kind!(RoleBinding, ResourceVersion, role_bindings);

/// Something done with every child, each with its static kind.
pub trait ChildVisitor {
    type Error;
    fn child<K: ChildKind>(&mut self, object: &K, stage: ApplyStage) -> Result<(), Self::Error>;
}

impl Children {
    /// Calls `visitor` for every child, in a fixed order (that of the golden
    /// files); stops at its first error.
    pub fn visit<V: ChildVisitor>(&self, visitor: &mut V) -> Result<(), V::Error> {
        use ApplyStage::{AfterRoles, First};
        // No `..`: a new field of Children does not compile until listed here.
        let Children {
            secret,
            config_map,
            peers_service,
            nodes_service,
            node_service_account,
            node_role,
            node_role_binding,
            stateful_set,
            balancer_service_account,
            balancer_role,
            balancer_role_binding,
            balancer_deployment,
            balancer_service,
            pod_disruption_budget,
            network_policy,
        } = self;
        visitor.child(secret, First)?;
        visitor.child(config_map, First)?;
        visitor.child(peers_service, First)?;
        visitor.child(nodes_service, First)?;
        visitor.child(node_service_account, First)?;
        visitor.child(node_role, First)?;
        visitor.child(node_role_binding, AfterRoles)?;
        visitor.child(stateful_set, First)?;
        visitor.child(balancer_service_account, First)?;
        visitor.child(balancer_role, First)?;
        visitor.child(balancer_role_binding, AfterRoles)?;
        visitor.child(balancer_deployment, First)?;
        visitor.child(balancer_service, First)?;
        visitor.child(pod_disruption_budget, First)?;
        visitor.child(network_policy, First)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::build::{BuildContext, SecretMaterial, build_children};

    /// (kind, name, stage) of every child.
    struct Listing(Vec<(String, String, ApplyStage)>);

    impl ChildVisitor for Listing {
        type Error = std::convert::Infallible;
        fn child<K: ChildKind>(&mut self, object: &K, stage: ApplyStage) -> Result<(), Self::Error> {
            self.0.push((K::kind(&()).to_string(), object.meta().name.clone().unwrap_or_default(), stage));
            Ok(())
        }
    }

    #[test]
    fn every_child_once_and_bindings_after_roles() {
        let app: crate::crd::ClusterApp = serde_yaml_ng::from_str(
            "metadata: {name: shop, namespace: store, uid: u1}\nspec: {image: registry.example/shop:1.4}",
        )
        .expect("app");
        let material = SecretMaterial { ajp_secret: "a".repeat(64), tribes_key: "b".repeat(64) };
        let context = BuildContext { balancer_image: "balancer:1".to_string() };
        let children = build_children(&app, &material, &context).expect("builds");
        let mut listing = Listing(Vec::new());
        let Ok(()) = children.visit(&mut listing);
        let mut seen: Vec<_> = listing.0.iter().map(|(kind, name, _)| (kind.clone(), name.clone())).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 15, "each child once: {:?}", listing.0);
        for (kind, name, stage) in &listing.0 {
            assert_eq!(*stage == ApplyStage::AfterRoles, kind == "RoleBinding", "{kind} {name}");
        }
    }
}
