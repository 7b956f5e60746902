//! Issue 5, end-to-end test 6: membership is API-based and least-privilege.
//! The session nodes find each other with Tomcat's CloudMembershipService
//! and its `kubernetes` provider (their logs; every node counts its 2 peers),
//! the node ServiceAccount may list pods in its namespace and nothing more
//! (SubjectAccessReview), and a user's edit that takes `list pods` away from
//! the node Role does not go unnoticed: the operator puts the Role back, says
//! so in a Warning event on the ClusterApp (`MembershipRBACRestored`, naming
//! the Role and why the nodes need it), the app does not turn Degraded, and
//! membership keeps working (a node killed afterwards, its sessions fail
//! over intact). The case where the permission cannot be restored
//! (`Degraded`/`MembershipForbidden`) is tested against the API server in
//! tests/operator/reconcile.rs.

use std::time::{Duration, Instant};

use crate::common::{App, get_counter, serial, summary};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::Role;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};

async fn node_may(app: &App, verb: &str, resource: &str) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {
            "user": format!("system:serviceaccount:{}:shop-node", app.ns.name),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", app.ns.name), "system:authenticated"],
            "resourceAttributes": {"namespace": app.ns.name, "verb": verb, "resource": resource}
        }
    }))
    .expect("review json");
    let reviews: Api<SubjectAccessReview> = Api::all(app.ns.client.clone());
    let answer = reviews.create(&PostParams::default(), &review).await.expect("SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

/// Warning events about the ClusterApp (not its StatefulSet of the same
/// name): (reason, note).
async fn warnings(app: &App) -> Vec<(String, String)> {
    let events: Api<Event> = app.ns.api();
    let list = events.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.name.as_deref() == Some(app.name.as_str()) && r.kind.as_deref() == Some("ClusterApp")
            })
        })
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

fn peers_of(log: &str) -> std::collections::BTreeSet<String> {
    let mut peers = std::collections::BTreeSet::new();
    for line in log.lines() {
        let ip = line.split("tcp://").nth(1).and_then(|s| s.split(':').next()).map(str::to_string);
        if let Some(ip) = ip {
            if line.contains("SimpleTcpCluster.memberAdded") {
                peers.insert(ip);
            } else if line.contains("SimpleTcpCluster.memberDisappeared") {
                peers.remove(&ip);
            }
        }
    }
    peers
}

#[tokio::test]
async fn membership_is_api_based_and_least_privilege() {
    let _serial = serial().await;
    let app = App::start("e2e-members", "shop", 3, serde_json::json!({})).await;

    // Found each other through the API: 2 peers each. A node may first hear
    // of a peer because that peer contacts it (Tribes' TcpFailureDetector:
    // "Member added, even though we weren't notified") — but the first
    // contact between any two nodes needs one of them to have found the
    // other, and with no multicast that is only the cloud membership's
    // Kubernetes query: so at least one node's log shows it adding a peer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut logs = Vec::new();
    for pod in ["shop-0", "shop-1", "shop-2"] {
        loop {
            let log = app.node_log(pod);
            assert!(!log.contains("McastService"), "{pod}: multicast membership in use:\n{log}");
            if peers_of(&log).len() == 2 {
                logs.push(log);
                break;
            }
            assert!(Instant::now() < deadline, "{pod} does not see 2 peers ({:?}):\n{log}", peers_of(&log));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let found_via_api = logs.iter().filter(|log| log.contains("CloudMembership-memberAdded")).count();
    assert!(found_via_api >= 1, "no node added a peer through CloudMembershipService:\n{}", logs.join("\n---\n"));
    // Least privilege: list pods, nothing else.
    assert!(node_may(&app, "list", "pods").await, "the node ServiceAccount may list pods");
    for (verb, resource) in
        [("get", "secrets"), ("watch", "pods"), ("delete", "pods"), ("list", "services"), ("create", "pods")]
    {
        assert!(!node_may(&app, verb, resource).await, "the node ServiceAccount may {verb} {resource}");
    }

    // A user takes `list pods` away: the operator notices and restores it.
    let roles: Api<Role> = app.ns.api();
    let edited = Instant::now();
    let patch = serde_json::json!({"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]});
    roles.patch("shop-node", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("editing the node Role");
    let mut restored = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if node_may(&app, "list", "pods").await {
            restored = Some(edited.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restored = restored.expect("the operator restores the node Role's `list pods` within 30 s");
    // ... and says so: a Warning event on the ClusterApp naming the Role,
    // what it allowed, and why the nodes need `list pods`.
    let mut warned = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while warned.is_none() && Instant::now() < deadline {
        warned = warnings(&app).await.into_iter().find(|(reason, _)| reason == "MembershipRBACRestored");
        if warned.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let Some((_, note)) = warned else {
        panic!("no MembershipRBACRestored warning within 30 s; warnings: {:?}", warnings(&app).await);
    };
    let warned_after = edited.elapsed();
    assert!(note.starts_with(&format!("Role {}/shop-node was changed (it allowed get pods)", app.ns.name)), "{note}");
    assert!(
        note.contains("need `list pods`") && note.contains("find their peers") && note.contains("restored"),
        "{note}"
    );
    println!("membership: warning event after {} ms: {note}", warned_after.as_millis());
    // Restored at once: the permission check after the restore passed, the
    // app is not Degraded.
    let degraded = app.get().await.status.and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Degraded"));
    assert_eq!(degraded.as_ref().map(|c| c.status.as_str()), Some("False"), "{degraded:?}");

    // Membership still works: a session's node is killed, the session fails over intact.
    let mut r = get_counter(app.port, None).await.expect("new session");
    for _ in 0..9 {
        r = get_counter(app.port, r.session.as_deref()).await.expect("increment");
    }
    assert_eq!(r.counter, Some(10));
    let route = r.route.clone().expect("route");
    let session = r.session.clone().expect("session");
    app.kill_node(&route);
    let after = get_counter(app.port, Some(&session)).await.expect("after the kill");
    assert_eq!((after.status, after.counter), (200, Some(11)), "{after:?}");
    println!(
        "membership: 3 nodes, 2 peers each via the API; node Role edit restored after {} ms",
        restored.as_millis()
    );
    summary("6 membership via API, RBAC", 11, 0, 0, restored, "Role edit restored and warned about");
    app.operator.stop().await;
}
