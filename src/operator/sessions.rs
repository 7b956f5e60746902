//! The session watch: how many sessions each node serves, for
//! `status.members[].sessions` and the SESSIONS column, and events when the
//! balancers rebalance sessions onto a newcomer.
//!
//! Every [`POLL_INTERVAL`] it asks each ready balancer Pod of each app for
//! its `/sessions.json` (one HyperLogLog sketch per node of the session ids
//! it saw in the last 2 minutes) and merges them per node (register-wise
//! maximum: a session whose requests reached several replicas counts once).
//! It runs beside the controller, never inside a reconcile: a slow or dead
//! balancer costs at most [`FETCH_TIMEOUT`] here and nothing there, and one
//! that does not answer (or answers garbage) is left out of that round.
//!
//! It writes the status only when an estimate changed noticeably (see
//! [`changed_noticeably`]) or, for smaller changes, once per
//! [`REFRESH_INTERVAL`]; a reconcile (which the write triggers, like any
//! change of the app) copies the estimates over and so writes nothing, and
//! never fetches: the fetches happen on this loop's clock only.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};

use crate::balancer::sessions::{self as sketch, SessionsReport};
use crate::crd::{BALANCER_ADMIN_PORT, ClusterApp, ClusterAppStatus, Member};
use crate::operator::cache;
use crate::operator::names::{self, LABEL_INSTANCE};
use crate::operator::reconcile::Context;
use crate::operator::reconcile::events::publish_event;
use crate::operator::reconcile::update_status::patch_status;

/// How often each app's balancers are asked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(15);
/// Longest wait for one balancer replica's answer (connect, request, body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Smaller changes than [`changed_noticeably`] are written this often.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// An estimate moved by at least this many sessions…
pub const MIN_CHANGE_SESSIONS: i64 = 2;
/// …and by more than this fraction of the written one is written at once.
pub const MIN_CHANGE_FRACTION: f64 = 0.05;
/// A larger `/sessions.json` is garbage: a sketch is 1368 base64
/// characters, so this is room for hundreds of nodes.
const MAX_REPORT_BYTES: usize = 1 << 20;
/// Apps whose balancers are asked at once.
const APPS_AT_ONCE: usize = 16;

/// The sketches of every balancer replica that answered, merged per route.
#[derive(Debug, Default, PartialEq)]
pub struct Merged {
    /// Route → estimated distinct sessions (rounded).
    pub estimates: BTreeMap<String, i64>,
    /// Balancer Pod → its sessions-moved counter.
    pub sessions_moved: BTreeMap<String, u64>,
    /// Newcomers any replica is rebalancing onto now.
    pub rebalancing: BTreeSet<String>,
}

/// Merges the replicas' reports (`(pod, report)`): per route the
/// register-wise maximum of the sketches, so a session seen by several
/// replicas counts once. A sketch that does not decode is left out, with a
/// log line.
pub fn merge_reports(reports: &[(String, SessionsReport)]) -> Merged {
    let mut registers: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    let mut merged = Merged::default();
    for (pod, report) in reports {
        for (route, text) in &report.members {
            let Some(sketch) = sketch::decode(text) else {
                tracing::warn!(balancer = %pod, route = %route, "a balancer sent a session sketch that is none; left out");
                continue;
            };
            match registers.get_mut(route.as_str()) {
                Some(into) => {
                    sketch::merge(into, &sketch);
                }
                None => {
                    registers.insert(route, sketch);
                }
            }
        }
        merged.sessions_moved.insert(pod.clone(), report.sessions_moved);
        merged.rebalancing.extend(report.rebalancing.iter().cloned());
    }
    merged.estimates =
        registers.into_iter().map(|(route, r)| (route.to_string(), sketch::estimate(&r).round() as i64)).collect();
    merged
}

/// `status` with every member's estimate from `estimates` (`None`: no
/// balancer answered, so none). A member the balancers do not list (not
/// ready yet, or gone from their view) served no session through them: 0.
pub fn with_estimates(status: &ClusterAppStatus, estimates: Option<&BTreeMap<String, i64>>) -> ClusterAppStatus {
    let mut status = status.clone();
    for member in &mut status.members {
        member.sessions = estimates.map(|e| e.get(&member.route).copied().unwrap_or(0));
    }
    status.sessions = spread(&status.members);
    status
}

/// The SESSIONS column: the estimates in member order joined by `/`, `-`
/// for a member without one; `None` when no member has one.
pub fn spread(members: &[Member]) -> Option<String> {
    if members.iter().all(|m| m.sessions.is_none()) {
        return None;
    }
    let parts: Vec<String> =
        members.iter().map(|m| m.sessions.map_or_else(|| "-".to_string(), |n| n.to_string())).collect();
    Some(parts.join("/"))
}

/// Copies each member's estimate from the member of the same route in
/// `previous` (a reconcile rebuilds the members from the Pods, and must
/// not undo what the session watch wrote).
pub fn carry_estimates(members: &mut [Member], previous: Option<&ClusterAppStatus>) {
    let Some(previous) = previous else { return };
    for member in members {
        member.sessions = previous.members.iter().find(|p| p.route == member.route).and_then(|p| p.sessions);
    }
}

/// Whether `new` differs from `old` enough to write at once: a member got
/// or lost its estimate, or an estimate moved by at least
/// [`MIN_CHANGE_SESSIONS`] *and* more than [`MIN_CHANGE_FRACTION`]. Both,
/// because either alone is noise: ±2 is 3 % error on a hundred sessions,
/// and 5 % of three sessions is a fraction of one.
pub fn changed_noticeably(old: &[Member], new: &[Member]) -> bool {
    new.iter().any(|member| {
        let before = old.iter().find(|o| o.route == member.route).and_then(|o| o.sessions);
        match (before, member.sessions) {
            (Some(a), Some(b)) => {
                let moved = (a - b).abs();
                moved >= MIN_CHANGE_SESSIONS && moved as f64 > MIN_CHANGE_FRACTION * a as f64
            }
            (None, None) => false,
            _ => true,
        }
    })
}

/// What a round of answers means for the rebalancing events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// The balancers began to move sessions to these newcomers.
    Started { routes: Vec<String> },
    /// No newcomer takes sessions any more; `moved` requests moved a
    /// session to one, summed over the balancer replicas.
    Finished { routes: Vec<String>, moved: u64 },
}

/// Follows the balancers' rebalancing windows and moved-session counters
/// from round to round.
#[derive(Debug, Default)]
pub struct RebalanceTracker {
    /// Each balancer Pod's counter as last seen.
    moved_seen: BTreeMap<String, u64>,
    /// The rebalancing under way: its newcomers and the moves counted so far.
    current: Option<(BTreeSet<String>, u64)>,
}

impl RebalanceTracker {
    /// One round in which at least one replica answered. Moves happen only
    /// while a window is open, so a replica's increase since the round
    /// before counts for the rebalancing under way: from the round that
    /// first sees it (the moves since the round before) through the round
    /// that sees it over. A replica seen for the first time counts from
    /// there (its earlier moves may belong to an earlier rebalancing); one
    /// whose counter went down restarted, and counts from zero.
    pub fn observe(&mut self, merged: &Merged) -> Vec<RebalanceEvent> {
        let mut increase = 0u64;
        for (pod, &moved) in &merged.sessions_moved {
            if let Some(before) = self.moved_seen.insert(pod.clone(), moved) {
                increase += if moved >= before { moved - before } else { moved };
            }
        }
        let mut events = Vec::new();
        let open = &merged.rebalancing;
        match &mut self.current {
            None if open.is_empty() => {}
            None => {
                events.push(RebalanceEvent::Started { routes: open.iter().cloned().collect() });
                self.current = Some((open.clone(), increase));
            }
            Some((routes, moved)) => {
                *moved += increase;
                let joined: Vec<String> = open.difference(routes).cloned().collect();
                if !joined.is_empty() {
                    routes.extend(joined.iter().cloned());
                    events.push(RebalanceEvent::Started { routes: joined });
                }
                if open.is_empty() {
                    events.push(RebalanceEvent::Finished { routes: routes.iter().cloned().collect(), moved: *moved });
                    self.current = None;
                }
            }
        }
        events
    }

    /// Forgets balancer Pods that are gone.
    pub fn retain_pods(&mut self, pods: &BTreeSet<String>) {
        self.moved_seen.retain(|pod, _| pods.contains(pod));
    }
}

/// What the watch remembers of one app between rounds.
#[derive(Debug, Default)]
struct AppWatch {
    rebalance: RebalanceTracker,
    /// When the estimates were last written.
    written_at: Option<Instant>,
    /// When a balancer replica last answered.
    answered_at: Option<Instant>,
}

/// A ready balancer Pod's name and admin address.
fn admin_address(pod: &Pod) -> Option<(String, SocketAddr)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let port = u16::try_from(BALANCER_ADMIN_PORT).ok()?;
    ready.then(|| (pod.name_any(), SocketAddr::new(ip, port)))
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("no answer within {FETCH_TIMEOUT:?}")]
    Timeout,
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP status {0}")]
    Status(http::StatusCode),
    #[error("reading the answer: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("not a sessions report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("sketches of precision {0}, expected {expected}", expected = sketch::PRECISION)]
    Precision(u32),
}

impl FetchError {
    /// The balancer answered, but not with what it should: worth a warning.
    fn is_garbage(&self) -> bool {
        matches!(self, FetchError::Json(_) | FetchError::Precision(_) | FetchError::Body(_))
    }
}

/// One replica's `/sessions.json`, within [`FETCH_TIMEOUT`].
async fn fetch_report(address: SocketAddr) -> Result<SessionsReport, FetchError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_report_unbounded(address)).await.map_err(|_| FetchError::Timeout)?
}

async fn fetch_report_unbounded(address: SocketAddr) -> Result<SessionsReport, FetchError> {
    let stream = tokio::net::TcpStream::connect(address).await.map_err(FetchError::Connect)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let request = http::Request::get("/sessions.json")
        .header(http::header::HOST, address.to_string())
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Body(e.into()))?;
    let exchange = async move {
        let response = sender.send_request(request).await?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_REPORT_BYTES).collect().await.map_err(FetchError::Body)?;
        Ok(body.to_bytes())
        // `sender` dropped here: the connection future ends.
    };
    let (body, _) = tokio::join!(exchange, connection);
    let report: SessionsReport = serde_json::from_slice(&body?)?;
    if report.precision != sketch::PRECISION {
        return Err(FetchError::Precision(report.precision));
    }
    Ok(report)
}

/// The reports of an app's ready balancer Pods that answered.
async fn fetch_reports(app: &ClusterApp, pods: &[(String, SocketAddr)]) -> Vec<(String, SessionsReport)> {
    let answers = futures::future::join_all(pods.iter().map(|(pod, address)| async move {
        match fetch_report(*address).await {
            Ok(report) => Some((pod.clone(), report)),
            Err(e) if e.is_garbage() => {
                tracing::warn!(app = %app.name_any(), balancer = %pod, error = %e, "a balancer's /sessions.json is unusable; left out");
                None
            }
            Err(e) => {
                tracing::debug!(app = %app.name_any(), balancer = %pod, error = %e, "a balancer did not answer for /sessions.json; left out");
                None
            }
        }
    }))
    .await;
    answers.into_iter().flatten().collect()
}

/// Runs until the controller stops: watches the balancer Pods and polls
/// them every [`POLL_INTERVAL`].
pub async fn run(ctx: Arc<Context>, apps: Store<ClusterApp>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let pods_api: kube::Api<Pod> = match &namespace {
        Some(ns) => kube::Api::namespaced(client, ns),
        None => kube::Api::all(client),
    };
    let (balancer_pods, writer) = reflector::store::<Pod>();
    let pod_watch = watcher(pods_api, watcher::Config::default().labels(&names::all_balancers_selector()))
        .default_backoff()
        .modify(cache::strip_pod)
        .reflect(writer)
        .touched_objects()
        .for_each(|event| async move {
            if let Err(e) = event {
                tracing::debug!(error = %e, "balancer pod watch");
            }
        });
    futures::join!(pod_watch, poll(ctx, apps, balancer_pods));
}

async fn poll(ctx: Arc<Context>, apps: Store<ClusterApp>, balancer_pods: Store<Pod>) {
    if apps.wait_until_ready().await.is_err() || balancer_pods.wait_until_ready().await.is_err() {
        return;
    }
    let mut watches: HashMap<ObjectRef<ClusterApp>, AppWatch> = HashMap::new();
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let current = apps.state();
        let keys: HashSet<_> = current.iter().map(|app| ObjectRef::from_obj(app.as_ref())).collect();
        watches.retain(|key, _| keys.contains(key));
        let pods = balancer_pods.state();
        let rounds: Vec<_> =
            futures::stream::iter(current.into_iter().filter(|app| app.metadata.deletion_timestamp.is_none()))
                .map(|app| {
                    let pods = &pods;
                    async move {
                        let instance = app.name_any();
                        let addresses: Vec<_> = pods
                            .iter()
                            .filter(|p| {
                                p.namespace() == app.namespace() && p.labels().get(LABEL_INSTANCE) == Some(&instance)
                            })
                            .filter_map(|p| admin_address(p))
                            .collect();
                        let reports = fetch_reports(&app, &addresses).await;
                        (app, addresses, reports)
                    }
                })
                .buffer_unordered(APPS_AT_ONCE)
                .collect()
                .await;
        for (app, addresses, reports) in rounds {
            let watch = watches.entry(ObjectRef::from_obj(app.as_ref())).or_default();
            round(&ctx, &app, watch, &addresses, &reports).await;
        }
    }
}

/// One app's round: events for the rebalancing, and the status write if
/// the estimates changed enough.
async fn round(
    ctx: &Context,
    app: &ClusterApp,
    watch: &mut AppWatch,
    addresses: &[(String, SocketAddr)],
    reports: &[(String, SessionsReport)],
) {
    let now = Instant::now();
    watch.rebalance.retain_pods(&addresses.iter().map(|(pod, _)| pod.clone()).collect());
    let estimates = if reports.is_empty() {
        // Transient silence keeps the last estimates; a minute of it clears them.
        if watch.answered_at.is_some_and(|at| now.duration_since(at) < REFRESH_INTERVAL) {
            return;
        }
        None
    } else {
        watch.answered_at = Some(now);
        let merged = merge_reports(reports);
        for event in watch.rebalance.observe(&merged) {
            publish_rebalance_event(ctx, app, event).await;
        }
        Some(merged.estimates)
    };
    let Some(status) = app.status.as_ref() else { return };
    let new = with_estimates(status, estimates.as_ref());
    if &new == status {
        return;
    }
    let due = watch.written_at.is_none_or(|at| now.duration_since(at) >= REFRESH_INTERVAL);
    if !due && !changed_noticeably(&status.members, &new.members) {
        return;
    }
    // Onto the version the estimates were put into, or not at all: the next
    // round tries again with the reconcile's newer status.
    match patch_status(ctx, app, &new, app.metadata.resource_version.as_deref()).await {
        Ok(()) => watch.written_at = Some(now),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(app = %app.name_any(), "the app changed meanwhile; session estimates written next round");
        }
        Err(e) => tracing::warn!(app = %app.name_any(), error = %e, "writing the session estimates failed"),
    }
}

/// The session node Pod of `route` as an event's related object, with its
/// UID: the event names its newcomer. The recorder folds events with the
/// same reason, action, regarding and related object into one series and
/// keeps the first note; the note's hash in the action (see
/// `reconcile::events`) keeps a rebalance onto shop-3 from showing as a
/// repeat of one onto shop-2, and the Pod with its UID makes a node that
/// leaves and joins again a new object, so its next rebalance is a new
/// event even with the same note.
fn newcomer_reference(
    ctx: &Context,
    app: &ClusterApp,
    routes: &[String],
) -> Option<k8s_openapi::api::core::v1::ObjectReference> {
    let namespace = app.namespace()?;
    let pod = ctx.caches.pods.get(&ObjectRef::new(routes.first()?).within(&namespace))?;
    Some(k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Pod".to_string()),
        name: pod.metadata.name.clone(),
        namespace: Some(namespace),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    })
}

async fn publish_rebalance_event(ctx: &Context, app: &ClusterApp, event: RebalanceEvent) {
    let ramp = app.spec.balancer.rebalance.ramp_seconds;
    let secondary = match &event {
        RebalanceEvent::Started { routes } | RebalanceEvent::Finished { routes, .. } => {
            newcomer_reference(ctx, app, routes)
        }
    };
    let (reason, note) = match event {
        RebalanceEvent::Started { routes } => (
            "RebalanceStarted",
            format!(
                "The balancers are moving existing sessions to {}: spread over {ramp} s from 5 s after the node became ready, then sessions idle until then move at their next request for 60 s",
                routes.join(", ")
            ),
        ),
        RebalanceEvent::Finished { routes, moved } => (
            "RebalanceFinished",
            format!(
                "The balancers finished moving sessions to {}: {moved} sessions moved (requests that moved a session, summed over the balancer replicas)",
                routes.join(", ")
            ),
        ),
    };
    let event = kube::runtime::events::Event {
        type_: EventType::Normal,
        reason: reason.to_string(),
        note: Some(note),
        action: "Rebalance".to_string(),
        secondary,
    };
    publish_event(ctx, app, event).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::routing::SessionWeigher;
    use crate::balancer::sessions::{SessionSketch, WINDOW_MS, encode};

    fn hash(i: u64) -> u64 {
        SessionWeigher::new(&format!("{:032X}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15))).sketch_hash()
    }

    /// A replica's report with the sessions `ids` on each route.
    fn report(routes: &[(&str, std::ops::Range<u64>)], moved: u64, rebalancing: &[&str]) -> SessionsReport {
        SessionsReport {
            precision: sketch::PRECISION,
            window_seconds: sketch::ACTIVE_WINDOWS * WINDOW_MS / 1000,
            members: routes
                .iter()
                .map(|(route, ids)| {
                    let s = SessionSketch::default();
                    for i in ids.clone() {
                        s.record(hash(i), WINDOW_MS);
                    }
                    (route.to_string(), encode(&s.registers(WINDOW_MS)))
                })
                .collect(),
            sessions_moved: moved,
            rebalancing: rebalancing.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn member(route: &str, sessions: Option<i64>) -> Member {
        Member { pod: route.to_string(), route: route.to_string(), ready: true, sessions, ..Default::default() }
    }

    #[test]
    fn replicas_merge_into_the_union_of_their_sessions() {
        // Each replica saw part of each node's sessions, overlapping.
        let a = report(&[("shop-0", 0..400), ("shop-1", 1000..1100)], 0, &[]);
        let b = report(&[("shop-0", 200..600), ("shop-1", 1050..1150), ("shop-2", 2000..2010)], 0, &[]);
        let merged = merge_reports(&[("b-1".to_string(), a), ("b-2".to_string(), b)]);
        let within = |route: &str, truth: f64| {
            let e = merged.estimates[route] as f64;
            assert!((e - truth).abs() / truth < 0.06, "{route}: {e} for {truth} distinct sessions");
        };
        within("shop-0", 600.0);
        within("shop-1", 150.0);
        within("shop-2", 10.0);
        assert_eq!(merged.estimates.len(), 3);
    }

    #[test]
    fn a_sketch_that_is_garbage_is_left_out() {
        let mut bad = report(&[("shop-0", 0..100)], 0, &[]);
        bad.members.insert("shop-1".to_string(), "not a sketch".to_string());
        let merged = merge_reports(&[("b-1".to_string(), bad)]);
        assert_eq!(merged.estimates.keys().collect::<Vec<_>>(), ["shop-0"]);
        // Garbage JSON never becomes a report.
        assert!(serde_json::from_str::<SessionsReport>(r#"{"precision": "x"}"#).is_err());
    }

    #[test]
    fn spread_is_in_member_order_with_dashes_for_missing_estimates() {
        let members = [member("shop-0", Some(41)), member("shop-1", Some(40)), member("shop-2", None)];
        assert_eq!(spread(&members).as_deref(), Some("41/40/-"));
        assert_eq!(spread(&[member("shop-0", None)]), None);
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn estimates_fill_the_members_and_the_column() {
        let status = ClusterAppStatus {
            members: vec![member("shop-0", None), member("shop-1", None), member("shop-2", Some(7))],
            ..Default::default()
        };
        let estimates = BTreeMap::from([("shop-0".to_string(), 12), ("shop-1".to_string(), 9)]);
        let new = with_estimates(&status, Some(&estimates));
        assert_eq!(new.members.iter().map(|m| m.sessions).collect::<Vec<_>>(), [Some(12), Some(9), Some(0)]);
        assert_eq!(new.sessions.as_deref(), Some("12/9/0"));
        let silent = with_estimates(&new, None);
        assert!(silent.members.iter().all(|m| m.sessions.is_none()) && silent.sessions.is_none());
    }

    #[test]
    fn a_reconcile_carries_the_estimates_by_route() {
        let previous = ClusterAppStatus {
            members: vec![member("shop-0", Some(5)), member("shop-1", Some(6))],
            ..Default::default()
        };
        let mut members = vec![member("shop-1", None), member("shop-2", None)];
        carry_estimates(&mut members, Some(&previous));
        assert_eq!(members.iter().map(|m| m.sessions).collect::<Vec<_>>(), [Some(6), None]);
    }

    #[test]
    fn only_noticeable_changes_are_written_at_once() {
        let one = |n: Option<i64>| vec![member("shop-0", Some(100)), member("shop-1", n)];
        assert!(!changed_noticeably(&one(Some(100)), &one(Some(104))), "4 %");
        assert!(changed_noticeably(&one(Some(100)), &one(Some(106))), "6 %");
        assert!(!changed_noticeably(&one(Some(3)), &one(Some(4))), "one session");
        assert!(changed_noticeably(&one(Some(3)), &one(Some(5))), "two sessions, 67 %");
        assert!(changed_noticeably(&one(Some(0)), &one(Some(2))));
        assert!(!changed_noticeably(&one(Some(2000)), &one(Some(2090))), "HLL noise on many sessions");
        assert!(changed_noticeably(&one(None), &one(Some(0))), "an estimate appears");
        assert!(changed_noticeably(&one(Some(0)), &one(None)), "an estimate goes");
        assert!(changed_noticeably(&[member("shop-0", Some(100))], &one(Some(0))), "a new member");
    }

    fn merged(moved: &[(&str, u64)], rebalancing: &[&str]) -> Merged {
        Merged {
            estimates: BTreeMap::new(),
            sessions_moved: moved.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            rebalancing: rebalancing.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn a_rebalancing_starts_and_finishes_with_the_moves_of_every_replica() {
        let mut t = RebalanceTracker::default();
        // The operator's first look: counters of earlier rebalancings are no moves now.
        assert!(t.observe(&merged(&[("b-1", 50), ("b-2", 70)], &[])).is_empty());
        // Moves began before this round saw the window open: they count.
        let started = t.observe(&merged(&[("b-1", 60), ("b-2", 75)], &["shop-3"]));
        assert_eq!(started, [RebalanceEvent::Started { routes: vec!["shop-3".to_string()] }]);
        // A second newcomer joins; b-2 restarted (its counter went down), b-1 did not answer.
        let joined = t.observe(&merged(&[("b-2", 4)], &["shop-3", "shop-4"]));
        assert_eq!(joined, [RebalanceEvent::Started { routes: vec!["shop-4".to_string()] }]);
        assert!(t.observe(&merged(&[("b-1", 100), ("b-2", 10)], &["shop-4"])).is_empty());
        let finished = t.observe(&merged(&[("b-1", 101), ("b-2", 10)], &[]));
        // 10 + 5, then 4, then 40 + 6, then 1.
        assert_eq!(
            finished,
            [RebalanceEvent::Finished { routes: vec!["shop-3".to_string(), "shop-4".to_string()], moved: 66 }]
        );
        assert!(t.observe(&merged(&[("b-1", 101), ("b-2", 10)], &[])).is_empty(), "finished once");
    }

    #[test]
    fn only_ready_balancer_pods_with_an_address_are_asked() {
        let pod = |ready: &str, ip: Option<&str>| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "shop-balancer-x"},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
            }))
            .expect("pod")
        };
        let address = admin_address(&pod("True", Some("10.244.0.7"))).expect("ready");
        assert_eq!(address, ("shop-balancer-x".to_string(), "10.244.0.7:9090".parse().expect("addr")));
        assert_eq!(admin_address(&pod("False", Some("10.244.0.7"))), None);
        assert_eq!(admin_address(&pod("True", None)), None);
        assert_eq!(admin_address(&pod("True", Some("garbage"))), None);
    }
}
