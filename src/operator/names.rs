//! Names and labels of everything one ClusterApp owns. One place, so the
//! builders, the watches and the tests agree.

use std::collections::BTreeMap;

/// Field manager of every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "clusterapp";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// `app.kubernetes.io/name` of everything we create.
pub const NAME_VALUE: &str = "clusterapp";
/// `app.kubernetes.io/managed-by` of everything we create; the operator's
/// watches select on it so its caches hold only its own objects.
pub const MANAGED_BY_VALUE: &str = "clusterapp-operator";
pub const COMPONENT_SESSION_NODE: &str = "session-node";
pub const COMPONENT_BALANCER: &str = "balancer";
/// See [`crate::crd::LABEL_LEAVING`] and `reconcile::leaving`.
pub use crate::crd::LABEL_LEAVING;

/// Label selector of every object the operator owns.
pub fn managed_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY_VALUE}")
}

/// Label selector of every session node pod of every ClusterApp.
pub fn all_session_nodes_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY_VALUE},{LABEL_COMPONENT}={COMPONENT_SESSION_NODE}")
}

/// Label selector of every balancer pod of every ClusterApp.
pub fn all_balancers_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY_VALUE},{LABEL_COMPONENT}={COMPONENT_BALANCER}")
}

/// Secret keys of the app's generated Secret.
pub const AJP_SECRET_KEY: &str = "ajp-secret";
pub const TRIBES_KEY_KEY: &str = "tribes-encryption-key";

/// Keys of a `kubernetes.io/tls` Secret (`spec.balancer.tls.secretName`).
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_PRIVATE_KEY_KEY: &str = "tls.key";
/// Key of the client CA Secret (`spec.balancer.tls.clientCASecretName`).
pub const CLIENT_CA_KEY: &str = "ca.crt";

/// Names of the children of the ClusterApp called `app`.
#[derive(Clone, Debug)]
pub struct AppNames {
    pub app: String,
}

impl AppNames {
    pub fn new(app: &str) -> Self {
        AppNames { app: app.to_string() }
    }
    /// StatefulSet of the session nodes; pod `<app>-N` has route `<app>-N`.
    pub fn stateful_set(&self) -> String {
        self.app.clone()
    }
    /// Secret with the generated AJP secret and Tribes encryption key.
    pub fn secret(&self) -> String {
        format!("{}-secrets", self.app)
    }
    /// ConfigMap with the session nodes' server.xml.
    pub fn config_map(&self) -> String {
        format!("{}-tomcat", self.app)
    }
    /// Headless Service governing the StatefulSet: lists not-ready pods too,
    /// because a joining node must be reachable by its peers (DNS membership,
    /// stable pod DNS) before it is ready.
    pub fn peers_service(&self) -> String {
        format!("{}-peers", self.app)
    }
    /// Headless Service of the ready session nodes: the balancer's member
    /// source (its EndpointSlices).
    pub fn nodes_service(&self) -> String {
        format!("{}-nodes", self.app)
    }
    /// ServiceAccount, Role and RoleBinding of the session nodes.
    pub fn node_account(&self) -> String {
        format!("{}-node", self.app)
    }
    /// Deployment, ServiceAccount, Role and RoleBinding of the balancer.
    pub fn balancer(&self) -> String {
        format!("{}-balancer", self.app)
    }
    /// The Service users send traffic to: the balancer's.
    pub fn balancer_service(&self) -> String {
        self.app.clone()
    }
    /// PodDisruptionBudget and NetworkPolicy of the session nodes.
    pub fn node_policy(&self) -> String {
        format!("{}-nodes", self.app)
    }
    /// NetworkPolicy of the balancer Pods.
    pub fn balancer_policy(&self) -> String {
        format!("{}-balancer", self.app)
    }

    /// Labels every child carries.
    pub fn common_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_NAME.to_string(), NAME_VALUE.to_string()),
            (LABEL_INSTANCE.to_string(), self.app.clone()),
            (LABEL_MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string()),
        ])
    }

    /// Selector labels of one component's pods (immutable once a
    /// StatefulSet/Deployment exists, so never add to it).
    pub fn selector_labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_NAME.to_string(), NAME_VALUE.to_string()),
            (LABEL_INSTANCE.to_string(), self.app.clone()),
            (LABEL_COMPONENT.to_string(), component.to_string()),
        ])
    }

    /// Labels of a component's objects and pods.
    pub fn component_labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut labels = self.common_labels();
        labels.insert(LABEL_COMPONENT.to_string(), component.to_string());
        labels
    }

    /// The session nodes' selector as text (`status.selector`).
    pub fn session_node_selector(&self) -> String {
        label_selector_text(&self.selector_labels(COMPONENT_SESSION_NODE))
    }

    /// The balancer Pods' selector as text.
    pub fn balancer_selector(&self) -> String {
        label_selector_text(&self.selector_labels(COMPONENT_BALANCER))
    }

    /// Tomcat's `KUBERNETES_LABELS`: the session nodes that are not leaving
    /// (without a selector, every pod of the namespace would join).
    pub fn tribes_member_selector(&self) -> String {
        format!("{},{LABEL_LEAVING}!=true", self.session_node_selector())
    }
}

/// `k=v,k=v` in key order.
pub fn label_selector_text(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}
