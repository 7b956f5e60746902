//! The registry of child kinds: every object a ClusterApp owns is listed
//! once, in [`Children::visit`], and every kind of them once, in
//! [`child_kinds!`], which says how it is cached and how it shows edits.
//!
//! Adding a child is one change the compiler walks you through: a field in
//! [`Children`] and its line in [`Children::visit`] (which destructures the
//! struct without `..`, so a forgotten field does not compile). A child of a
//! new kind does not compile until the kind has its line in
//! [`child_kinds!`]; that one line gives it its store in [`ChildCaches`],
//! its label-selected watch, its `owns_stream` trigger of the controller,
//! its wait in `Caches::fill`, and its place in the test caches. The golden
//! files, the applies and the tests all walk the children through `visit`.

use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::Controller;
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::ClusterApp;
use crate::operator::build::Children;
use crate::operator::cache::{self, CachedMeta, Caches, ChangeTracking, WrittenRecords};

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
/// Implemented by [`child_kinds!`] only.
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
    /// Delivers `object` to the test caches as its watch would (trimmed,
    /// or metadata only).
    #[cfg(test)]
    fn cache_for_test(writers: &mut ChildCacheWriters, object: Self, watched: Watched);
}

/// The type a kind's store holds: the whole object (`full`, trimmed by the
/// kind's strip function) or its metadata only (`metadata`: the watch makes
/// metadata-only requests, so no body is ever transferred or kept).
macro_rules! cached_type {
    (full, $kind:ty) => { $kind };
    (metadata, $kind:ty) => { PartialObjectMeta<$kind> };
}

/// What the cache keeps of an object of the kind (see [`cached_type!`]).
macro_rules! strip_fn {
    (full($strip:path)) => {
        $strip
    };
    (metadata) => {
        cache::strip_partial
    };
}

/// The registry of child kinds. One line per kind:
/// `Kind => store field, cached form, change tracking;` where the cached
/// form is `full(strip function)` or `metadata` (see [`cached_type!`]) and
/// the tracking a [`ChangeTracking`] variant.
macro_rules! child_kinds {
    ($($kind:ident => $field:ident, $form:ident $(($strip:path))?, $tracking:ident;)+) => {
        /// The stores of the child kinds, one per line of [`child_kinds!`],
        /// each filled by a label-selected watch of our objects.
        pub struct ChildCaches {
            $(pub $field: Store<cached_type!($form, $kind)>,)+
        }

        $(impl ChildKind for $kind {
            const TRACKING: ChangeTracking = ChangeTracking::$tracking;
            fn cache(caches: &Caches) -> &dyn CachedMeta {
                &caches.children.$field
            }
            #[cfg(test)]
            fn cache_for_test(writers: &mut ChildCacheWriters, object: Self, watched: Watched) {
                let cached = object_for_test!($form, object);
                cache_as_watched(&mut writers.$field, cached, strip_fn!($form $(($strip))?), watched);
            }
        })+

        impl ChildCaches {
            /// Starts the watch of every child kind (only our objects: see
            /// `operator::owned_watch`), and makes each a trigger of
            /// `controller` for the owning app. Returns the stores the
            /// watches fill and the controller with its triggers.
            pub fn watch(
                client: &Client,
                namespace: Option<&str>,
                written: &Arc<WrittenRecords>,
                controller: Controller<ClusterApp>,
            ) -> (Self, Controller<ClusterApp>) {
                $(
                    let ($field, events) =
                        crate::operator::owned_watch(client, namespace, written, strip_fn!($form $(($strip))?));
                    let controller = controller.owns_stream(events);
                )+
                (ChildCaches { $($field,)+ }, controller)
            }

            /// Waits until every store has been filled by its watch's first
            /// list (see `Caches::fill`, the only caller).
            pub async fn fill(&self) {
                // Err only when a watch's writer is gone, i.e. the controller
                // stopped: nothing left to wait for.
                let _ = futures::join!($(cache::filled(
                    <$kind as k8s_openapi::Resource>::URL_PATH_SEGMENT,
                    self.$field.wait_until_ready(),
                ),)+);
            }

            /// Empty stores and their writers, for tests: nothing is cached
            /// until [`ChildCacheWriters::list_done`].
            #[cfg(test)]
            pub fn for_tests() -> (Self, ChildCacheWriters) {
                // (store, writer) of each kind, named by its field.
                $(let $field = kube::runtime::reflector::store();)+
                (ChildCaches { $($field: $field.0,)+ }, ChildCacheWriters { $($field: $field.1,)+ })
            }
        }

        /// The writers of [`ChildCaches::for_tests`]: tests play the
        /// watches.
        #[cfg(test)]
        pub struct ChildCacheWriters {
            $(pub $field: kube::runtime::reflector::store::Writer<cached_type!($form, $kind)>,)+
        }

        #[cfg(test)]
        impl ChildCacheWriters {
            /// Every store as after its watch's first (empty) list: filled.
            pub fn list_done(&mut self) {
                $(self.$field.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);)+
            }

            /// Delivers `object` (JSON with its `kind`, as the API server
            /// returns it) to the store of its kind, as its watch would. Err
            /// for a kind that is not a child kind.
            pub fn cache_json(&mut self, object: serde_json::Value, watched: Watched) -> Result<(), String> {
                let kind = object.get("kind").and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
                $(if kind == <$kind as k8s_openapi::Resource>::KIND {
                    let object: $kind = serde_json::from_value(object).map_err(|e| format!("{kind}: {e}"))?;
                    <$kind as ChildKind>::cache_for_test(self, object, watched);
                    return Ok(());
                })+
                Err(format!("{kind} is not a child kind"))
            }
        }
    };
}

/// A child object as its store keeps it, in tests (see [`cached_type!`]).
#[cfg(test)]
macro_rules! object_for_test {
    (full, $object:expr) => {
        $object
    };
    (metadata, $object:expr) => {
        kube::core::PartialObjectMetaExt::into_response_partial($object.metadata)
    };
}

child_kinds! {
    // `metadata.generation` moves on every spec change of these (status
    // updates by their controllers do not count as edits)...
    // Full objects (without their pod template): status reads them.
    StatefulSet => stateful_sets, full(cache::strip_stateful_set), Generation;
    // Full objects (without their pod template): `Ready` needs the
    // balancer's available replicas.
    Deployment => deployments, full(cache::strip_deployment), Generation;
    PodDisruptionBudget => pod_disruption_budgets, metadata, Generation;
    NetworkPolicy => network_policies, metadata, Generation;
    // ...these have no generation: any new resourceVersion may be an edit.
    // Our generated Secrets, with data (the keys are kept from them).
    Secret => secrets, full(cache::strip_secret), ResourceVersion;
    ConfigMap => config_maps, metadata, ResourceVersion;
    Service => services, metadata, ResourceVersion;
    ServiceAccount => service_accounts, metadata, ResourceVersion;
    // Full Roles and RoleBindings (small): a change of the session nodes'
    // `list pods` grant is reported by what it changed.
    Role => roles, full(cache::strip_managed_fields), ResourceVersion;
    RoleBinding => role_bindings, full(cache::strip_managed_fields), ResourceVersion;
}

/// What a test's watch event says of an object.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watched {
    /// Created or changed.
    Applied,
    Deleted,
}

/// Strips `object` as the watch of its kind does and delivers it.
#[cfg(test)]
fn cache_as_watched<C>(
    writer: &mut kube::runtime::reflector::store::Writer<C>,
    mut object: C,
    strip: fn(&mut C),
    watched: Watched,
) where
    C: Resource<DynamicType = ()> + Clone + 'static,
{
    use kube::runtime::watcher::Event;
    strip(&mut object);
    let event = match watched {
        Watched::Applied => Event::Apply(object),
        Watched::Deleted => Event::Delete(object),
    };
    writer.apply_watcher_event(&event);
}

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
            balancer_network_policy,
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
        visitor.child(balancer_network_policy, First)?;
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
        assert_eq!(seen.len(), 16, "each child once: {:?}", listing.0);
        for (kind, name, stage) in &listing.0 {
            assert_eq!(*stage == ApplyStage::AfterRoles, kind == "RoleBinding", "{kind} {name}");
        }
    }
}
