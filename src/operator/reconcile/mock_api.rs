//! A fake Kubernetes API server for the reconcile tests (`mock_tests`),
//! after kube-rs/controller-rs's `ApiServerVerifier`: the operator's own
//! `kube::Client` sends its requests through a `tower_test` mock service to
//! [`FakeApiServer`], which answers them as an API server would —
//! server-side applies, status applies, events, reads, SubjectAccessReviews
//! — keeps what was written, and logs every request for the tests to assert
//! on. Failures are scripted with [`Harness::refuse`].
//!
//! The operator reads its children from caches filled by watches; here the
//! [`Harness`] plays those watches: it delivers what the fake server stores
//! to the caches, and stands in for the other controllers (StatefulSet and
//! Deployment status, the session node Pods) and for users who edit or
//! delete a child.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock;

use super::{Context, reconcile};
use crate::crd::ClusterApp;
use crate::operator::build::BuildContext;
use crate::operator::cache::{self, Caches};
use crate::operator::children::{ChildCacheWriters, ChildCaches, ChildKind, Watched};
use crate::operator::error::Error;
use crate::operator::metrics::OperatorState;

/// Content type of a server-side apply (`Patch::Apply`).
const APPLY_PATCH: &str = "application/apply-patch+yaml";

/// One request the operator sent.
#[derive(Clone, Debug)]
pub struct Sent {
    pub method: Method,
    /// Without the query.
    pub path: String,
    pub content_type: Option<String>,
    /// The JSON body; Null without one.
    pub body: Value,
}

impl Sent {
    /// `PATCH /apis/apps/v1/namespaces/store/statefulsets/shop`
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// A server-side apply of an object (not of a status).
    pub fn is_apply(&self) -> bool {
        self.method == Method::PATCH
            && self.content_type.as_deref() == Some(APPLY_PATCH)
            && !self.path.ends_with("/status")
    }

    pub fn is_status_write(&self) -> bool {
        self.method == Method::PATCH && self.path.contains("/clusterapps/") && self.path.ends_with("/status")
    }

    /// A new event, or a repeat of one (a PATCH of its series).
    pub fn is_event(&self) -> bool {
        self.path.contains("/apis/events.k8s.io/")
    }
}

/// The lines of `sent`, for assertions and their messages.
pub fn lines(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(Sent::line).collect()
}

/// A `Status` an API server answers an error with.
pub fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// What the API server answers a write into a namespace being deleted
/// (403, with the cause `NamespaceTerminating`).
pub fn namespace_terminating(namespace: &str) -> Value {
    let mut status = failure(
        403,
        "Forbidden",
        &format!("unable to create new content in namespace {namespace} because it is being terminated"),
    );
    status["details"] = json!({"causes": [{"reason": "NamespaceTerminating",
        "message": format!("namespace {namespace} is being terminated"), "field": "metadata.namespace"}]});
    status
}

/// An object as the fake server stores it.
struct Stored {
    object: Value,
    /// The body of our last apply: an apply of the same body changes
    /// nothing (no new resourceVersion), as on a real API server...
    applied: Value,
    /// ...unless someone else changed the object since.
    edited_since_applied: bool,
}

/// A scripted answer to every request it matches.
struct Refusal {
    matches: Box<dyn Fn(&Sent) -> bool + Send>,
    code: u16,
    status: Value,
}

#[derive(Default)]
struct FakeState {
    log: Vec<Sent>,
    /// By path (`/api/v1/namespaces/store/secrets/shop-secrets`).
    objects: BTreeMap<String, Stored>,
    /// The ClusterApp whose status the reconciles write.
    app: Option<Value>,
    refusals: Vec<Refusal>,
    last_resource_version: u64,
}

impl FakeState {
    fn next_resource_version(&mut self) -> String {
        self.last_resource_version += 1;
        self.last_resource_version.to_string()
    }

    fn answer(&mut self, sent: &Sent) -> (u16, Value) {
        if let Some(refusal) = self.refusals.iter().find(|r| (r.matches)(sent)) {
            return (refusal.code, refusal.status.clone());
        }
        let path = sent.path.as_str();
        match sent.method {
            Method::PATCH if sent.is_status_write() => self.apply_status(sent),
            Method::PATCH if sent.is_apply() => (200, self.apply(sent)),
            // A new event, or the next of its series: stored as sent.
            Method::POST | Method::PATCH if sent.is_event() => (201, sent.body.clone()),
            Method::POST if path.ends_with("/subjectaccessreviews") => {
                let mut review = sent.body.clone();
                review["status"] = json!({"allowed": true});
                (201, review)
            }
            Method::GET => match self.objects.get(path) {
                Some(stored) => (200, stored.object.clone()),
                None => (404, failure(404, "NotFound", &format!("{path} not found"))),
            },
            _ => (404, failure(404, "NotFound", &format!("the fake API server does not serve {}", sent.line()))),
        }
    }

    /// A server-side apply: the object as applied, with the metadata the
    /// server keeps (uid, resourceVersion, generation) and the status other
    /// controllers wrote.
    fn apply(&mut self, sent: &Sent) -> Value {
        let previous = self.objects.get(&sent.path);
        let changed = previous.is_none_or(|p| p.edited_since_applied || p.applied != sent.body);
        let previous_meta = previous.map(|p| p.object["metadata"].clone()).unwrap_or(Value::Null);
        let previous_status = previous.map(|p| p.object["status"].clone()).unwrap_or(Value::Null);
        let mut object = sent.body.clone();
        let metadata = &mut object["metadata"];
        metadata["uid"] = match &previous_meta["uid"] {
            Value::Null => json!(format!("uid-{}", self.last_resource_version + 1)),
            uid => uid.clone(),
        };
        let (resource_version, generation) = if changed {
            (json!(self.next_resource_version()), json!(previous_meta["generation"].as_i64().unwrap_or(0) + 1))
        } else {
            (previous_meta["resourceVersion"].clone(), previous_meta["generation"].clone())
        };
        object["metadata"]["resourceVersion"] = resource_version;
        object["metadata"]["generation"] = generation;
        if !previous_status.is_null() {
            object["status"] = previous_status;
        }
        let stored = Stored { object: object.clone(), applied: sent.body.clone(), edited_since_applied: false };
        self.objects.insert(sent.path.clone(), stored);
        object
    }

    /// The app's status written with server-side apply.
    fn apply_status(&mut self, sent: &Sent) -> (u16, Value) {
        let resource_version = self.next_resource_version();
        let Some(app) = self.app.as_mut() else {
            return (404, failure(404, "NotFound", "no ClusterApp was added to the fake API server"));
        };
        app["status"] = sent.body["status"].clone();
        app["metadata"]["resourceVersion"] = json!(resource_version);
        (200, app.clone())
    }
}

/// The fake API server: answers every request the mock service receives
/// until the client is gone.
pub struct FakeApiServer {
    state: Arc<Mutex<FakeState>>,
}

impl FakeApiServer {
    /// A client whose requests the returned server answers.
    fn start() -> (Client, FakeApiServer) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let state = Arc::new(Mutex::new(FakeState { last_resource_version: 100, ..Default::default() }));
        let serving = state.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("request body");
                let sent = Sent {
                    method: parts.method,
                    path: parts.uri.path().to_string(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                    body: if bytes.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&bytes).expect("JSON body")
                    },
                };
                let (code, answer) = {
                    let mut state = serving.lock().expect("fake state");
                    state.log.push(sent.clone());
                    state.answer(&sent)
                };
                let response = Response::builder()
                    .status(StatusCode::from_u16(code).expect("status code"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).expect("JSON answer")))
                    .expect("response");
                respond.send_response(response);
            }
        });
        (Client::new(service, "default"), FakeApiServer { state })
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake state")
    }
}

/// A reconcile context on a fake API server, with caches the test fills.
pub struct Harness {
    pub ctx: Arc<Context>,
    api: FakeApiServer,
    children: ChildCacheWriters,
    pods: Writer<Pod>,
    other_secrets: Writer<PartialObjectMeta<Secret>>,
}

/// The app of most tests: 3 session nodes, the defaults otherwise
/// (Kubernetes membership, so the node Role and RoleBinding matter).
pub const APP: &str = "metadata: {name: shop, namespace: store, uid: app-uid, generation: 1}
spec: {image: registry.example/shop:1.4, replicas: 3}";

pub fn app(yaml: &str) -> ClusterApp {
    serde_yaml_ng::from_str(yaml).expect("ClusterApp")
}

impl Harness {
    /// Caches that have seen their first (empty) lists.
    pub async fn new() -> Harness {
        let mut harness = Harness::unfilled();
        harness.children.list_done();
        harness.pods.apply_watcher_event(&watcher::Event::InitDone);
        harness.other_secrets.apply_watcher_event(&watcher::Event::InitDone);
        harness.ctx.caches.fill().await;
        harness
    }

    /// Caches whose watches have not listed yet: a reconcile that waits
    /// for them waits forever.
    pub fn unfilled() -> Harness {
        let (client, api) = FakeApiServer::start();
        let (children, children_writers) = ChildCaches::for_tests();
        let (pods, pods_writer) = reflector::store::<Pod>();
        let (other_secrets, other_secrets_writer) = reflector::store::<PartialObjectMeta<Secret>>();
        let caches = Caches {
            children,
            other_secrets,
            pods,
            written: Default::default(),
            secret_keys: Default::default(),
            filled: tokio::sync::watch::Sender::new(false),
        };
        let reporter = Reporter { controller: "clusterapp-operator".to_string(), instance: Some("test".to_string()) };
        let ctx = Arc::new(Context {
            client: client.clone(),
            build: BuildContext { balancer_image: "registry.example/clusterapp:test".to_string() },
            state: OperatorState::new(),
            caches: Arc::new(caches),
            recorder: Recorder::new(client, reporter),
            membership: Default::default(),
        });
        Harness { ctx, api, children: children_writers, pods: pods_writer, other_secrets: other_secrets_writer }
    }

    /// An app that the operator created and whose status followed, with
    /// the StatefulSet rolled out, its nodes ready and the balancer
    /// available. Returns the app as stored and what creating it sent.
    pub async fn converged(yaml: &str) -> (Harness, ClusterApp, Vec<Sent>) {
        let mut harness = Harness::new().await;
        let app = app(yaml);
        harness.api.state().app = Some(serde_json::to_value(&app).expect("app JSON"));
        harness.reconcile(&app).await.expect("the first reconcile creates the app's children");
        let created = harness.take_sent();
        harness.controllers_catch_up();
        harness.deliver_children();
        // The status follows what the caches now show.
        let app = harness.stored_app();
        harness.reconcile(&app).await.expect("the second reconcile writes the status");
        harness.take_sent();
        let app = harness.stored_app();
        (harness, app, created)
    }

    /// One reconcile of `app`, as the controller runs it. Fails the test
    /// when it does not finish within 10 s (it waits for a request that
    /// is never answered, or for caches that are never filled).
    pub async fn reconcile(&self, app: &ClusterApp) -> Result<Action, Error> {
        let pass = reconcile(Arc::new(app.clone()), self.ctx.clone());
        tokio::time::timeout(Duration::from_secs(10), pass).await.expect("the reconcile finished")
    }

    /// The requests sent since the last call.
    pub fn take_sent(&self) -> Vec<Sent> {
        std::mem::take(&mut self.api.state().log)
    }

    /// The app with the status last written.
    pub fn stored_app(&self) -> ClusterApp {
        let app = self.api.state().app.clone().expect("an app was added");
        serde_json::from_value(app).expect("ClusterApp")
    }

    /// From now on, every request `matches` accepts is answered with the
    /// error `status` (a [`failure`]; its `code` is the HTTP status).
    pub fn refuse(&self, matches: impl Fn(&Sent) -> bool + Send + 'static, status: Value) {
        let code = status["code"].as_u64().and_then(|c| u16::try_from(c).ok()).expect("the status has a code");
        self.api.state().refusals.push(Refusal { matches: Box::new(matches), code, status });
    }

    /// The watches deliver every child the fake server stores.
    pub fn deliver_children(&mut self) {
        let objects: Vec<Value> = self.api.state().objects.values().map(|s| s.object.clone()).collect();
        for object in objects {
            self.children.cache_json(object, Watched::Applied).expect("a child kind");
        }
    }

    /// The StatefulSet and Deployment controllers report every replica
    /// updated, ready and available (a new resourceVersion, the same
    /// generation), and the kubelets run the session node Pods, ready.
    pub fn controllers_catch_up(&mut self) {
        let mut state = self.api.state();
        let paths: Vec<String> = state.objects.keys().cloned().collect();
        for path in paths {
            let workload = path.contains("/statefulsets/") || path.contains("/deployments/");
            if !workload {
                continue;
            }
            let resource_version = state.next_resource_version();
            let stored = state.objects.get_mut(&path).expect("stored");
            let object = &mut stored.object;
            let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
            object["status"] = json!({
                "observedGeneration": object["metadata"]["generation"], "replicas": replicas,
                "readyReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas,
                "currentRevision": "rev-1", "updateRevision": "rev-1",
            });
            object["metadata"]["resourceVersion"] = json!(resource_version);
        }
        let sets: Vec<Value> =
            state.objects.iter().filter(|(p, _)| p.contains("/statefulsets/")).map(|(_, s)| s.object.clone()).collect();
        drop(state);
        for set in sets {
            let name = set["metadata"]["name"].as_str().expect("name").to_string();
            for ordinal in 0..set["spec"]["replicas"].as_i64().unwrap_or(1) {
                let mut pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-{ordinal}"), "namespace": set["metadata"]["namespace"],
                                 "uid": format!("pod-uid-{ordinal}"), "labels": set["spec"]["selector"]["matchLabels"]},
                    "status": {"phase": "Running", "podIP": format!("10.0.0.{}", ordinal + 1),
                               "conditions": [{"type": "Ready", "status": "True"}]},
                }))
                .expect("pod");
                cache::strip_pod(&mut pod);
                self.pods.apply_watcher_event(&watcher::Event::Apply(pod));
            }
        }
    }

    /// Someone (a user, another tool) changes the child `name` of kind `K`:
    /// the server stores the change with a new resourceVersion (and, for a
    /// kind with one, a new generation), and the watch delivers it.
    pub fn someone_edits<K: ChildKind>(&mut self, name: &str, edit: impl FnOnce(&mut K)) {
        let mut state = self.api.state();
        let path = path_of::<K>(&state, name);
        let resource_version = state.next_resource_version();
        let stored = state.objects.get_mut(&path).expect("stored");
        let mut object: K = serde_json::from_value(stored.object.clone()).expect("the stored object");
        edit(&mut object);
        let meta = object.meta_mut();
        meta.resource_version = Some(resource_version);
        meta.generation = meta.generation.map(|g| g + 1);
        stored.object = serde_json::to_value(&object).expect("JSON");
        stored.edited_since_applied = true;
        let delivered = stored.object.clone();
        drop(state);
        self.children.cache_json(delivered, Watched::Applied).expect("a child kind");
    }

    /// The child `name` of kind `K` is deleted (by a user, or the garbage
    /// collector): the watch delivers the deletion, which also forgets our
    /// record of writing it (as `operator::owned_watch` does).
    pub fn deleted<K: ChildKind>(&mut self, name: &str) {
        let mut state = self.api.state();
        let path = path_of::<K>(&state, name);
        let stored = state.objects.remove(&path).expect("stored");
        drop(state);
        let namespace = stored.object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        self.ctx.caches.written.forget(super::kind_name::<K>(), &namespace, name);
        self.children.cache_json(stored.object, Watched::Deleted).expect("a child kind");
    }
}

/// The path of the stored child `name` of kind `K`.
fn path_of<K: ChildKind>(state: &FakeState, name: &str) -> String {
    let suffix = format!("/{}/{name}", K::plural(&()));
    state.objects.keys().find(|p| p.ends_with(&suffix)).unwrap_or_else(|| panic!("no {suffix} stored")).clone()
}
