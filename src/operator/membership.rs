//! The session nodes' membership permission: Tomcat's Kubernetes membership
//! lists the pods of the namespace, so the node ServiceAccount must be
//! allowed to `list pods` — and nothing more. Two things make a missing
//! permission visible instead of silent:
//!
//! - a user's change of the node Role or RoleBinding (drift) is restored
//!   and reported in a Warning event saying what was changed;
//! - after the operator created or restored them, a SubjectAccessReview
//!   asks the API server whether the node ServiceAccount really may list
//!   pods; while it may not, the ClusterApp is `Degraded` with reason
//!   [`FORBIDDEN_REASON`] and the check (with a fresh apply) is retried.
//!
//! A converged app sends none of these requests.
//!
//! The judgements are pure functions here; the requests live in
//! `reconcile/apply.rs`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, Subject};

use crate::crd::{ClusterApp, Membership};
use crate::operator::cache::{APPLIED_HASH_ANNOTATION, Written};
use crate::operator::names::AppNames;
use crate::operator::status::{DEGRADED, Problem, find_condition};

/// Reason of the Warning event when the node Role or RoleBinding was
/// changed or deleted by someone and the operator put it back.
pub const RESTORED_REASON: &str = "MembershipRBACRestored";
/// Reason of `Degraded` while the node ServiceAccount may not list pods.
pub const FORBIDDEN_REASON: &str = "MembershipForbidden";

/// A denial right after the Role and RoleBinding were written may only mean
/// that the API server's authorizer has not seen them yet: it is reported
/// once it lasts this long.
pub const GRACE: Duration = Duration::from_secs(10);
/// Retry of the check during the grace period.
pub const RETRY_PENDING: Duration = Duration::from_secs(1);
/// Retry (a fresh apply of the Role and RoleBinding, and the check) while
/// the permission is reported missing: nothing we watch tells us when an
/// admission policy or an authorizer that overrides RBAC changes.
pub const RETRY_FORBIDDEN: Duration = Duration::from_secs(10);

/// Whether the session nodes of `app` list pods through the API at all
/// (`sessions.membership: kubernetes`); with DNS membership they do not.
pub fn uses_api(app: &ClusterApp) -> bool {
    app.spec.sessions.membership == Membership::Kubernetes
}

/// The SubjectAccessReview: may the node ServiceAccount list pods in its
/// namespace? The groups are those every ServiceAccount token carries.
pub fn review(namespace: &str, names: &AppNames) -> SubjectAccessReview {
    let account = names.node_account();
    SubjectAccessReview {
        metadata: Default::default(),
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{namespace}:{account}")),
            groups: Some(vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_string(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_string()),
                verb: Some("list".to_string()),
                group: Some(String::new()),
                resource: Some("pods".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    }
}

/// The answer of a review: allowed, and the authorizer's words when not.
pub fn answer(review: &SubjectAccessReview) -> (bool, String) {
    let Some(status) = &review.status else { return (false, "no answer".to_string()) };
    let why = [status.reason.as_deref(), status.evaluation_error.as_deref()]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    (
        status.allowed && !status.denied.unwrap_or(false),
        if why.is_empty() { "no RBAC rule allows it".to_string() } else { why },
    )
}

/// The membership check of one app that has not passed yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// First denial since the permission was last seen allowed.
    pub since: Instant,
}

/// What one check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Denied within [`GRACE`] of the first denial: not reported yet.
    Pending,
    /// Denied for longer: reported as `Degraded`.
    Forbidden(Problem),
}

/// Judges one review answer given the earlier denial, if any. Returns what
/// to remember (None once allowed) and the verdict.
pub fn judge(
    earlier: Option<&Denied>,
    allowed: bool,
    why: &str,
    namespace: &str,
    names: &AppNames,
    now: Instant,
) -> (Option<Denied>, Verdict) {
    if allowed {
        return (None, Verdict::Allowed);
    }
    let since = earlier.map_or(now, |d| d.since);
    let denied = Denied { since };
    if now.duration_since(since) < GRACE {
        return (Some(denied), Verdict::Pending);
    }
    (Some(denied), Verdict::Forbidden(forbidden_problem(namespace, names, why)))
}

fn forbidden_problem(namespace: &str, names: &AppNames, why: &str) -> Problem {
    let account = names.node_account();
    Problem {
        reason: FORBIDDEN_REASON.to_string(),
        message: format!(
            "ServiceAccount {namespace}/{account} may not list pods in namespace {namespace} ({why}), although the operator applied \
             Role and RoleBinding {account} granting it: session nodes need `list pods` to find their peers (Tomcat's Kubernetes \
             membership), so each node runs alone and sessions are not replicated. Something changes or overrides them (an admission \
             policy or webhook, an authorizer); check with `kubectl auth can-i list pods -n {namespace} \
             --as=system:serviceaccount:{namespace}:{account}`"
        ),
    }
}

/// Membership checks that have not passed, by (namespace, app). An app is
/// here only between a denial and the next allowed answer (or its deletion).
#[derive(Default)]
pub struct MembershipChecks {
    denied: Mutex<HashMap<(String, String), Denied>>,
}

impl MembershipChecks {
    pub fn get(&self, namespace: &str, app: &str) -> Option<Denied> {
        let denied = self.denied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        denied.get(&(namespace.to_string(), app.to_string())).cloned()
    }

    pub fn set(&self, namespace: &str, app: &str, state: Option<Denied>) {
        let mut denied = self.denied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (namespace.to_string(), app.to_string());
        match state {
            Some(state) => denied.insert(key, state),
            None => denied.remove(&key),
        };
    }
}

// --- drift of the node Role and RoleBinding ----------------------------------

/// The last pass applied every child: a child missing now was deleted.
pub fn was_converged(app: &ClusterApp) -> bool {
    find_condition(app.status.as_ref(), DEGRADED).is_some_and(|c| c.status == "False")
}

/// What a user's change did to one object, before we restore it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Deleted,
    /// Changed; the text says what it held.
    Changed(String),
}

/// How the desired object compares with the cached one. `None` when there
/// is nothing to report: equal content (a label edit, a restart), our own
/// new version (its hash annotation differs: a new operator), or a cache
/// that has not seen our own write yet.
fn change<K>(
    desired_hash: &str,
    cached: Option<&K>,
    written: Option<&Written>,
    converged: bool,
    same: impl Fn(&K) -> bool,
    describe: impl Fn(&K) -> String,
) -> Option<Change>
where
    K: kube::Resource,
{
    let Some(cached) = cached else {
        // Without a record: not written by this process since it was
        // deleted (the watch's delete event forgets the record). With one:
        // our create the cache has not seen yet.
        return (written.is_none() && converged).then_some(Change::Deleted);
    };
    if same(cached) {
        return None;
    }
    let cached_hash = cached.meta().annotations.as_ref().and_then(|a| a.get(APPLIED_HASH_ANNOTATION));
    if cached_hash.is_some_and(|h| h != desired_hash) {
        return None;
    }
    Some(Change::Changed(describe(cached)))
}

/// The node Role's change, if any.
pub fn role_change(
    desired: &Role,
    desired_hash: &str,
    cached: Option<&Role>,
    written: Option<&Written>,
    converged: bool,
) -> Option<Change> {
    let wanted = desired.rules.clone().unwrap_or_default();
    change(
        desired_hash,
        cached,
        written,
        converged,
        |role| role.rules.clone().unwrap_or_default() == wanted,
        |role| format!("it allowed {}", describe_rules(role.rules.as_deref().unwrap_or_default())),
    )
}

/// The node RoleBinding's change, if any.
pub fn role_binding_change(
    desired: &RoleBinding,
    desired_hash: &str,
    cached: Option<&RoleBinding>,
    written: Option<&Written>,
    converged: bool,
) -> Option<Change> {
    let wanted = (desired.role_ref.clone(), subjects(desired));
    change(
        desired_hash,
        cached,
        written,
        converged,
        |binding| (binding.role_ref.clone(), subjects(binding)) == wanted,
        |binding| {
            let to = subjects(binding).iter().map(|s| format!("{} {}", s.kind, qualified(s))).collect::<Vec<_>>();
            format!(
                "it bound {} {} to {}",
                binding.role_ref.kind,
                binding.role_ref.name,
                if to.is_empty() { "nobody".to_string() } else { to.join(", ") }
            )
        },
    )
}

/// Subjects with the API server's defaults made explicit (an empty
/// apiGroup is no apiGroup), in a stable order.
fn subjects(binding: &RoleBinding) -> Vec<Subject> {
    let mut subjects: Vec<Subject> = binding
        .subjects
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|mut s| {
            s.api_group = s.api_group.filter(|g| !g.is_empty());
            s.namespace = s.namespace.filter(|n| !n.is_empty());
            s
        })
        .collect();
    subjects.sort_by(|a, b| (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name)));
    subjects
}

fn qualified(subject: &Subject) -> String {
    match &subject.namespace {
        Some(ns) => format!("{ns}/{}", subject.name),
        None => subject.name.clone(),
    }
}

/// `get pods; list,watch services.apps` — short, for an event (whose note
/// is limited to 1 kB).
pub fn describe_rules(rules: &[PolicyRule]) -> String {
    if rules.is_empty() {
        return "nothing".to_string();
    }
    let text = rules
        .iter()
        .map(|rule| {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.as_deref().unwrap_or_default().iter().map(|r| {
                match groups.iter().find(|g| !g.is_empty()) {
                    Some(group) => format!("{r}.{group}"),
                    None => r.clone(),
                }
            });
            let mut what = resources.collect::<Vec<_>>().join(",");
            if let Some(names) = rule.resource_names.as_ref().filter(|n| !n.is_empty()) {
                what = format!("{what} named {}", names.join(","));
            }
            if let Some(urls) = rule.non_resource_urls.as_ref().filter(|u| !u.is_empty()) {
                what = format!("{what} {}", urls.join(","));
            }
            format!("{} {what}", rule.verbs.join(","))
        })
        .collect::<Vec<_>>()
        .join("; ");
    shorten(&text, 300)
}

fn shorten(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The Warning event's note for a restored node Role (`kind` "Role") or
/// RoleBinding.
pub fn restored_note(kind: &str, namespace: &str, names: &AppNames, change: &Change, api_membership: bool) -> String {
    let account = names.node_account();
    let what = match change {
        Change::Deleted => format!("{kind} {namespace}/{account} was deleted"),
        Change::Changed(held) => format!("{kind} {namespace}/{account} was changed ({held})"),
    };
    let wanted = match kind {
        "Role" => "it must allow exactly `list pods`".to_string(),
        _ => format!("it must bind Role {account} to ServiceAccount {namespace}/{account}"),
    };
    let why = if api_membership {
        format!(
            "session nodes need `list pods` in namespace {namespace} to find their peers (Tomcat's Kubernetes membership); \
             without it each node runs alone and sessions are not replicated"
        )
    } else {
        "it keeps the session nodes least-privileged (they use DNS membership and need no API access)".to_string()
    };
    let done = if *change == Change::Deleted { "recreated" } else { "restored" };
    format!("{what}: {wanted}; {why}. The operator {done} it; the ClusterApp owns it, so edits to it are undone.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn names() -> AppNames {
        AppNames::new("shop")
    }

    fn rule(verbs: &[&str], resources: &[&str], group: &str) -> PolicyRule {
        PolicyRule {
            api_groups: Some(vec![group.to_string()]),
            resources: Some(resources.iter().map(|r| r.to_string()).collect()),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            ..Default::default()
        }
    }

    fn role(rules: Vec<PolicyRule>, hash: Option<&str>) -> Role {
        let mut role = Role { rules: Some(rules), ..Default::default() };
        role.metadata.name = Some("shop-node".to_string());
        if let Some(hash) = hash {
            role.metadata.annotations = Some(BTreeMap::from([(APPLIED_HASH_ANNOTATION.to_string(), hash.to_string())]));
        }
        role
    }

    fn written() -> Written {
        Written { hash: "h1".to_string(), resource_version: Some("10".to_string()), generation: None }
    }

    #[test]
    fn a_changed_role_is_reported_with_what_it_allowed() {
        let desired = role(vec![rule(&["list"], &["pods"], "")], None);
        let edited =
            role(vec![rule(&["get"], &["pods"], ""), rule(&["list", "watch"], &["deployments"], "apps")], Some("h1"));
        let change = role_change(&desired, "h1", Some(&edited), Some(&written()), true);
        assert_eq!(change, Some(Change::Changed("it allowed get pods; list,watch deployments.apps".to_string())));
        // Also after an operator restart (no record), and with our annotation removed.
        assert!(role_change(&desired, "h1", Some(&edited), None, true).is_some());
        let mut bare = edited.clone();
        bare.metadata.annotations = None;
        assert!(role_change(&desired, "h1", Some(&bare), Some(&written()), true).is_some());
    }

    #[test]
    fn equal_content_our_new_version_or_a_first_create_is_not_a_change() {
        let desired = role(vec![rule(&["list"], &["pods"], "")], None);
        // Same rules (a label edit, a restart).
        assert_eq!(
            role_change(&desired, "h1", Some(&role(vec![rule(&["list"], &["pods"], "")], Some("h1"))), None, true),
            None
        );
        // The cached Role carries another hash: an older operator built it.
        let old = role(vec![rule(&["list", "watch"], &["pods"], "")], Some("h0"));
        assert_eq!(role_change(&desired, "h1", Some(&old), Some(&written()), true), None);
        // Missing at the first apply, or our create not cached yet.
        assert_eq!(role_change(&desired, "h1", None, None, false), None);
        assert_eq!(role_change(&desired, "h1", None, Some(&written()), true), None);
        // Missing after the app converged, with no record: deleted.
        assert_eq!(role_change(&desired, "h1", None, None, true), Some(Change::Deleted));
    }

    #[test]
    fn a_changed_binding_is_reported_and_api_defaults_are_not_changes() {
        let binding = |subject_group: Option<&str>, name: &str| -> RoleBinding {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "shop-node"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "shop-node"},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "store", "apiGroup": subject_group}]
            }))
            .expect("binding")
        };
        let desired = binding(Some(""), "shop-node");
        assert_eq!(
            role_binding_change(&desired, "h1", Some(&binding(None, "shop-node")), Some(&written()), true),
            None
        );
        let change = role_binding_change(&desired, "h1", Some(&binding(None, "someone")), Some(&written()), true);
        assert_eq!(
            change,
            Some(Change::Changed("it bound Role shop-node to ServiceAccount store/someone".to_string()))
        );
    }

    #[test]
    fn restored_note_names_the_object_the_need_and_the_fix() {
        let note = restored_note("Role", "store", &names(), &Change::Changed("it allowed get pods".to_string()), true);
        assert!(note.starts_with("Role store/shop-node was changed (it allowed get pods)"), "{note}");
        assert!(note.contains("need `list pods` in namespace store to find their peers"), "{note}");
        assert!(note.contains("The operator restored it"), "{note}");
        let note = restored_note("RoleBinding", "store", &names(), &Change::Deleted, true);
        assert!(note.contains("RoleBinding store/shop-node was deleted") && note.contains("recreated"), "{note}");
        assert!(restored_note("Role", "store", &names(), &Change::Deleted, false).contains("DNS membership"));
        // Long rule lists are cut: an event note is limited to 1 kB.
        let many: Vec<PolicyRule> = (0..100).map(|i| rule(&["get"], &[&format!("things{i}")], "example.com")).collect();
        let note = restored_note(
            "Role",
            "store",
            &names(),
            &Change::Changed(format!("it allowed {}", describe_rules(&many))),
            true,
        );
        assert!(note.len() < 1024, "{} bytes", note.len());
    }

    #[test]
    fn a_denial_is_reported_only_after_the_grace_period_and_clears_when_allowed() {
        let start = Instant::now();
        let (state, verdict) = judge(None, false, "no RBAC rule allows it", "store", &names(), start);
        assert_eq!(verdict, Verdict::Pending);
        let state = state.expect("remembered");
        let (state, verdict) = judge(Some(&state), false, "no RBAC rule allows it", "store", &names(), start + GRACE);
        let Verdict::Forbidden(problem) = verdict else { panic!("not reported: {verdict:?}") };
        assert_eq!(problem.reason, FORBIDDEN_REASON);
        assert!(
            problem.message.contains("ServiceAccount store/shop-node may not list pods in namespace store"),
            "{}",
            problem.message
        );
        assert!(
            problem.message.contains("find their peers") && problem.message.contains("kubectl auth can-i"),
            "{}",
            problem.message
        );
        assert_eq!(state.as_ref().map(|s| s.since), Some(start), "the first denial is kept");
        let (state, verdict) = judge(state.as_ref(), true, "", "store", &names(), start + GRACE * 2);
        assert_eq!((state, verdict), (None, Verdict::Allowed));
    }

    #[test]
    fn review_asks_for_list_pods_as_the_node_service_account() {
        let review = review("store", &names());
        assert_eq!(review.spec.user.as_deref(), Some("system:serviceaccount:store:shop-node"));
        let attributes = review.spec.resource_attributes.expect("attributes");
        assert_eq!((attributes.verb.as_deref(), attributes.resource.as_deref()), (Some("list"), Some("pods")));
        assert_eq!(attributes.namespace.as_deref(), Some("store"));
        let allowed: SubjectAccessReview =
            serde_json::from_value(serde_json::json!({"spec": {}, "status": {"allowed": true}})).expect("sar");
        assert!(answer(&allowed).0);
        let denied: SubjectAccessReview = serde_json::from_value(
            serde_json::json!({"spec": {}, "status": {"allowed": false, "reason": "denied by policy"}}),
        )
        .expect("sar");
        assert_eq!(answer(&denied), (false, "denied by policy".to_string()));
    }
}
