//! The middle test tier: whole reconciles against a fake API server
//! ([`mock_api`](super::mock_api)), between the pure unit tests and the
//! tests on a real control plane. No cluster, milliseconds per test; each
//! asserts what the operator sends, request by request.

use http::Method;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::events::publish;
use super::mock_api::{APP, Harness, Sent, app, failure, lines, namespace_terminating};
use super::{APPLY_FAILED, REQUEUE_HEALTHY};
use crate::operator::error::Error;
use crate::operator::membership::RESTORED_REASON;
use crate::operator::names::AppNames;
use crate::operator::status::{DEGRADED, READY, READY_BUT_DEGRADED, find_condition};

const STATEFUL_SET: &str = "/apis/apps/v1/namespaces/store/statefulsets/shop";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/store/events";

/// The single event among `sent`.
fn the_event(sent: &[Sent]) -> &Sent {
    let events: Vec<&Sent> = sent.iter().filter(|s| s.is_event()).collect();
    assert_eq!(events.len(), 1, "one event: {:#?}", lines(sent));
    events[0]
}

#[tokio::test]
async fn a_converged_app_sends_no_request() {
    let (mut harness, app, created) = Harness::converged(APP).await;
    // Creating the app applied every child: the fake server sees what the
    // operator sends, so the silence below is the operator's.
    assert_eq!(created.iter().filter(|s| s.is_apply()).count(), 16, "{:#?}", lines(&created));
    assert_eq!(find_condition(app.status.as_ref(), READY).map(|c| c.status.as_str()), Some("True"));
    let requests_before = harness.ctx.state.api_requests.get();
    for _ in 0..3 {
        // The StatefulSet and Deployment controllers write their status
        // again (a new resourceVersion, the same generation): not an edit.
        harness.controllers_catch_up();
        harness.deliver_children();
        let action = harness.reconcile(&app).await.expect("reconciles");
        assert_eq!(action, Action::requeue(REQUEUE_HEALTHY));
        assert_eq!(lines(&harness.take_sent()), Vec::<String>::new());
    }
    assert_eq!(harness.ctx.state.api_requests.get(), requests_before, "the request metric agrees");
}

/// `kubectl scale statefulset shop --replicas=5` behind the operator's
/// back: one apply puts the app's replica count back, with a `Scaled`
/// event (the operator's word for any replica change it makes); nothing
/// else is sent. A second such edit gets an event of its own, not a repeat
/// of the first (see `events::series_action`).
#[tokio::test]
async fn a_scaled_stateful_set_is_scaled_back_by_one_apply_with_an_event() {
    let (mut harness, app, _) = Harness::converged(APP).await;
    for edited_to in [5, 7] {
        harness.someone_edits::<StatefulSet>("shop", |set| {
            set.spec.replicas = Some(edited_to);
            // The StatefulSet controller has seen the edit, not made Pods
            // yet: the app's status has nothing new to say.
            let status = set.status.as_mut().expect("status");
            status.observed_generation = set.metadata.generation.map(|g| g + 1);
        });
        harness.reconcile(&app).await.expect("reconciles");
        let sent = harness.take_sent();
        // Each a new Event (POST), the second not a repeat (PATCH) of the
        // first with its note.
        assert_eq!(
            lines(&sent),
            [format!("PATCH {STATEFUL_SET}"), format!("POST {EVENTS}")],
            "after the edit to {edited_to}"
        );
        assert_eq!(sent[0].body["spec"]["replicas"], 3, "the app's count, applied");
        let event = &sent[1].body;
        assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Normal"), Some("Scaled")));
        assert_eq!(event["note"], format!("Scaling session nodes from {edited_to} to 3"));
        // Once the watch shows the restored StatefulSet, all is quiet again.
        harness.controllers_catch_up();
        harness.deliver_children();
        harness.reconcile(&app).await.expect("reconciles");
        assert_eq!(lines(&harness.take_sent()), Vec::<String>::new(), "after restoring {edited_to}");
    }
}

/// The session nodes' `list pods` grant widened by hand: the Role is
/// applied back, a Warning event says what it held, and the API server is
/// asked whether the nodes may list pods again.
#[tokio::test]
async fn an_edited_node_role_is_restored_with_a_warning_event() {
    let (mut harness, app, _) = Harness::converged(APP).await;
    let account = AppNames::new("shop").node_account();
    harness.someone_edits::<Role>(&account, |role| {
        role.rules = Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".to_string(), "secrets".to_string()]),
            verbs: vec!["get".to_string()],
            ..Default::default()
        }]);
    });
    harness.reconcile(&app).await.expect("reconciles");
    let sent = harness.take_sent();
    assert_eq!(
        lines(&sent),
        [
            format!("PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/store/roles/{account}"),
            format!("POST {EVENTS}"),
            "POST /apis/authorization.k8s.io/v1/subjectaccessreviews".to_string(),
        ]
    );
    assert_eq!(sent[0].body["rules"][0]["verbs"], serde_json::json!(["list"]), "the grant as built");
    let event = &the_event(&sent).body;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some(RESTORED_REASON)));
    assert_eq!((event["related"]["kind"].as_str(), event["related"]["name"].as_str()), (Some("Role"), Some(&*account)));
    let note = event["note"].as_str().expect("note");
    assert!(note.contains("was changed (it allowed get pods,secrets)") && note.contains("restored"), "{note}");
}

/// An apply the API server refuses, for an error of its own (500) or an
/// invalid object (422), shows in the status as `Degraded`/`ApplyFailed`
/// with the server's words, with a Warning event, and fails the pass (to
/// be retried).
#[tokio::test]
async fn a_refused_apply_reaches_the_status_as_apply_failed() {
    for (code, reason) in [(500, "InternalError"), (422, "Invalid")] {
        let (harness, app, _) = Harness::converged(APP).await;
        let mut updated = app.clone();
        updated.spec.image = "registry.example/shop:1.5".to_string();
        updated.metadata.generation = Some(2);
        let words = format!("the server says no ({code})");
        harness.refuse(|sent| sent.is_apply() && sent.path == STATEFUL_SET, failure(code, reason, &words));
        let error = harness.reconcile(&updated).await.expect_err("the pass fails");
        assert!(matches!(&error, Error::Apply { kind: "StatefulSet", .. }), "{error}");
        assert_eq!(error.metric_label(), "apply");
        let sent = harness.take_sent();
        assert_eq!(
            lines(&sent),
            [
                format!("PATCH {STATEFUL_SET}"),
                format!("POST {EVENTS}"),
                "PATCH /apis/clusterapp.io/v1alpha1/namespaces/store/clusterapps/shop/status".to_string(),
            ],
            "{code}"
        );
        let event = &the_event(&sent).body;
        assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some(APPLY_FAILED)));
        let stored = harness.stored_app();
        let degraded = find_condition(stored.status.as_ref(), DEGRADED).expect("Degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", APPLY_FAILED), "{code}");
        assert!(
            degraded.message.contains("StatefulSet shop") && degraded.message.contains(&words),
            "{}",
            degraded.message
        );
        assert_eq!(degraded.observed_generation, Some(2));
        let ready = find_condition(stored.status.as_ref(), READY).expect("Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", READY_BUT_DEGRADED));
    }
}

/// Deleting a namespace deletes the app's children (the garbage
/// collector) before the app: the reconcile their deletion triggers tries
/// to create them again, the API server refuses (NamespaceTerminating),
/// and the operator leaves it at that — no status, no event, no retry
/// (unlike any other refusal, above).
#[tokio::test]
async fn a_terminating_namespace_is_left_alone() {
    let (mut harness, app, _) = Harness::converged(APP).await;
    harness.deleted::<StatefulSet>("shop");
    harness.deleted::<ConfigMap>(&AppNames::new("shop").config_map());
    harness.refuse(|sent| sent.method != Method::GET, namespace_terminating("store"));
    let action = harness.reconcile(&app).await.expect("not an error: nothing to retry");
    assert_eq!(action, Action::await_change());
    let sent = harness.take_sent();
    assert!(!sent.is_empty(), "the re-creates were tried");
    assert!(sent.iter().all(Sent::is_apply), "no status, no event: {:#?}", lines(&sent));
    let mut tried: Vec<&str> = sent.iter().map(|s| s.path.rsplit('/').nth(1).unwrap_or_default()).collect();
    tried.sort_unstable();
    assert_eq!(tried, ["configmaps", "statefulsets"], "only the deleted children");
}

/// An app being deleted is the garbage collector's: the reconcile returns
/// at once, sends nothing and does not even wait for the caches.
#[tokio::test]
async fn an_app_being_deleted_is_left_to_the_garbage_collector() {
    let harness = Harness::unfilled();
    let mut app = app(APP);
    app.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let action = harness.reconcile(&app).await.expect("reconciles");
    assert_eq!(action, Action::await_change());
    assert_eq!(lines(&harness.take_sent()), Vec::<String>::new());
}

/// kube's recorder keeps one series per key and sends a repeat as a PATCH
/// of the first Event, with the first note. Two notes of one reason must
/// be two Events; the first note again counts up its own series.
#[tokio::test]
async fn events_with_one_reason_and_different_notes_are_different_series() {
    let harness = Harness::new().await;
    let app = app(APP);
    let notes = ["session node shop-1 is crash-looping", "session node shop-2 is crash-looping"];
    for note in notes.iter().chain(&notes[..1]) {
        publish(&harness.ctx, &app, EventType::Warning, "NodesCrashLooping", "Reconcile", note.to_string()).await;
    }
    let sent = harness.take_sent();
    let first_event = sent[0].body["metadata"]["name"].as_str().expect("name");
    assert_eq!(
        lines(&sent),
        [format!("POST {EVENTS}"), format!("POST {EVENTS}"), format!("PATCH {EVENTS}/{first_event}")],
        "two series, the first repeated"
    );
    assert_eq!((sent[0].body["note"].as_str(), sent[1].body["note"].as_str()), (Some(notes[0]), Some(notes[1])));
    assert_eq!(sent[2].body["series"]["count"], 2);
    assert_eq!(sent[2].body["note"].as_str(), Some(notes[0]));
}
