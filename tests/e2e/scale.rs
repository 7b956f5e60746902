//! Issue 5, end-to-end tests 2, 3 and 4 on one ClusterApp (one start-up of
//! real Tomcat nodes for all three, in this order):
//!
//! 2. Scale up 3 → 5: the new members join the Tribes cluster through the
//!    Kubernetes API (their Tomcat logs), receive the existing sessions
//!    (state transfer; a session made before the scale-up then fails over
//!    onto a new node with its counter intact), become ready, and the
//!    balancer sends new sessions to them; `status.members` shows 5 routes.
//! 3. Scale down 5 → 2 while 20 concurrent clients increment their own
//!    sessions: 0 failed requests, 0 lost increments (gapless counters).
//! 4. Rolling update (a `javaOpts` change rolls every node) under the same
//!    load: 0 failed requests, 0 lost increments.

use crate::common;
use crate::support;

use std::time::{Duration, Instant};

use crate::common::{App, BrowserLoad, BrowserOutcome, Load, get_counter, serial, summary};

/// Requests without a cookie until `want` distinct routes answered (or 60).
async fn routes_of_new_sessions(port: u16) -> std::collections::BTreeSet<String> {
    let mut routes = std::collections::BTreeSet::new();
    for _ in 0..60 {
        if let Ok(r) = get_counter(port, None).await
            && r.status == 200
            && let Some(route) = r.route
        {
            routes.insert(route);
        }
    }
    routes
}

#[tokio::test]
async fn scale_up_scale_down_and_rolling_update_keep_every_session() {
    scale_and_roll("all").await;
}

#[tokio::test]
async fn scale_up_scale_down_and_rolling_update_keep_every_session_with_backup_replication() {
    scale_and_roll("backup").await;
}

async fn scale_and_roll(replication: &str) {
    let _serial = serial().await;
    let app = App::start(
        &format!("e2e-scale-{replication}"),
        "shop",
        3,
        serde_json::json!({"sessions": {"replication": replication}}),
    )
    .await;
    let port = app.port;
    let node_logs = app.keep_node_logs(5);

    // --- 2. scale up 3 -> 5 ------------------------------------------------
    // Sessions that exist before the scale-up, 5 increments each.
    let mut before = Vec::new();
    for _ in 0..6 {
        let mut r = get_counter(port, None).await.expect("new session");
        for _ in 0..4 {
            r = get_counter(port, r.session.as_deref()).await.expect("increment");
        }
        assert_eq!((r.status, r.counter), (200, Some(5)), "{r:?}");
        before.push((r.session.clone().expect("session"), 5u64));
    }
    let scaled = Instant::now();
    app.patch_spec(serde_json::json!({"replicas": 5})).await;
    let converge = app.wait_ready(5, Duration::from_secs(300)).await;
    let status = app.get().await.status.expect("status");
    let routes: Vec<&str> = status.members.iter().map(|m| m.route.as_str()).collect();
    assert_eq!(routes, ["shop-0", "shop-1", "shop-2", "shop-3", "shop-4"], "status.members");
    assert_eq!(status.routes, "shop-0,shop-1,shop-2,shop-3,shop-4");
    // The new nodes found their 4 peers through the API and got the sessions.
    for pod in ["shop-3", "shop-4"] {
        let log = app.node_log(pod);
        let added: std::collections::BTreeSet<&str> = log
            .lines()
            .filter(|l| l.contains("SimpleTcpCluster.memberAdded"))
            .filter_map(|l| l.split("tcp://").nth(1).and_then(|s| s.split(':').next()))
            .collect();
        assert!(added.len() >= 4, "{pod} saw {} peers ({added:?}), not 4:\n{log}", added.len());
        assert!(log.contains("CloudMembership-memberAdded"), "{pod}: members not from CloudMembershipService:\n{log}");
        // DeltaManager logs its state transfer; BackupManager's map copies
        // only the entries' owners and fetches a session when it is used.
        assert!(
            replication != "all" || log.contains("session state sent at") || log.contains("received in"),
            "{pod}: no state transfer:\n{log}"
        );
    }
    // The balancer sends new sessions to the new nodes.
    let mut new_routes = routes_of_new_sessions(port).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(new_routes.contains("shop-3") && new_routes.contains("shop-4")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        new_routes.extend(routes_of_new_sessions(port).await);
    }
    assert!(new_routes.contains("shop-3") && new_routes.contains("shop-4"), "new sessions went to {new_routes:?} only");
    // Every earlier session is still there (sticky, counter 6).
    let mut requests = 30 + 60;
    for (session, counter) in &mut before {
        let r = get_counter(port, Some(session)).await.expect("increment after the scale-up");
        requests += 1;
        assert_eq!((r.status, r.counter), (200, Some(*counter + 1)), "session {session} after the scale-up: {r:?}");
        *counter += 1;
        if let Some(id) = r.session {
            *session = id;
        }
    }
    println!("scale 3 -> 5: Ready 5/5 after {} ms; new sessions on {new_routes:?}", converge.as_millis());
    summary(
        &format!("2 scale up 3 -> 5 {replication}"),
        requests,
        0,
        0,
        converge,
        &format!("new sessions on {} routes", new_routes.len()),
    );
    let _ = scaled;

    // --- 3. scale down 5 -> 2 under load ------------------------------------
    const CLIENTS: usize = 20;
    let load = Load::start(port, CLIENTS, Duration::from_millis(50));
    let browsers = BrowserLoad::start(port, BROWSER_SESSIONS, BROWSER_WORKERS, BROWSER_PAUSE).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    app.patch_spec(serde_json::json!({"replicas": 2})).await;
    // Every node the new count removes is marked leaving at once, while the
    // StatefulSet still deletes shop-4 (shop-2 goes last): the balancers
    // send none of shop-4's sessions to shop-3 or shop-2 to move again.
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = app.ns.api();
    let deadline = Instant::now() + Duration::from_secs(15);
    let marked_before_deleted = loop {
        let mut views = Vec::new();
        for name in ["shop-2", "shop-3", "shop-4"] {
            if let Ok(Some(pod)) = pods.get_opt(name).await {
                let marked =
                    kube::ResourceExt::labels(&pod).get("clusterapp.io/leaving").map(String::as_str) == Some("true");
                views.push((name, marked, pod.metadata.deletion_timestamp.is_some()));
            }
        }
        if views.len() == 3 && views.iter().all(|(_, marked, _)| *marked) {
            break views;
        }
        assert!(Instant::now() < deadline, "shop-2..4 not all labelled leaving within 15 s: {views:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        !marked_before_deleted[0].2,
        "shop-2 was marked by the count, not because it terminated: {marked_before_deleted:?}"
    );
    let converge = app.wait_ready(2, Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (total, _) = load.finish().await;
    let scale_down_browsers = browsers.finish().await;
    browser_summary(&format!("3b scale down 5 -> 2 {replication} (browsers)"), &scale_down_browsers, converge);
    // The sessions made before the scale-up survive the scale-down too.
    for (session, counter) in &before {
        let r = get_counter(port, Some(session)).await.expect("increment after the scale-down");
        assert_eq!((r.status, r.counter), (200, Some(*counter + 1)), "session {session} after the scale-down: {r:?}");
    }
    println!(
        "scale 5 -> 2 under load: converged in {} ms; {} requests, {} failed, {} lost, {} skipped; errors {:?}",
        converge.as_millis(),
        total.requests,
        total.failures,
        total.lost,
        total.skipped,
        total.errors
    );
    summary(
        &format!("3 scale down 5 -> 2 {replication} (20 clients)"),
        total.requests,
        total.failures,
        total.lost + total.skipped,
        converge,
        "",
    );
    // Checked after the rolling update, so one run reports both phases.
    let scale_down = ((total.failures, total.lost, total.skipped), total.errors.clone(), total.ok);

    // --- 4. rolling update under load ----------------------------------------
    let load = Load::start(port, CLIENTS, Duration::from_millis(50));
    let browsers = BrowserLoad::start(port, BROWSER_SESSIONS, BROWSER_WORKERS, BROWSER_PAUSE).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rolled_at = Instant::now();
    app.patch_spec(serde_json::json!({"javaOpts": "-Dclusterapp.e2e.rollout=2"})).await;
    // Wait for the roll to start, then for it to finish (Ready at the new generation).
    // The ClusterApp's status can still say Ready 2/2 right after the patch,
    // before the StatefulSet controller has replaced a pod: also wait until
    // the StatefulSet has rolled every pod and both are ready again.
    app.wait_ready(2, Duration::from_secs(400)).await;
    let sts_api: kube::Api<k8s_openapi::api::apps::v1::StatefulSet> = app.ns.api();
    support::wait_until(Duration::from_secs(400), "StatefulSet shop rolled and Ready 2/2", || {
        let sts_api = sts_api.clone();
        async move {
            let Ok(sts) = sts_api.get("shop").await else { return false };
            let generation = sts.metadata.generation;
            let Some(st) = sts.status else { return false };
            st.observed_generation == generation
                && st.update_revision.is_some()
                && st.current_revision == st.update_revision
                && st.updated_replicas == Some(2)
                && st.ready_replicas == Some(2)
        }
    })
    .await;
    app.wait_ready(2, Duration::from_secs(400)).await;
    let converge = rolled_at.elapsed();
    let sts: k8s_openapi::api::apps::v1::StatefulSet = app.ns.api().get("shop").await.expect("StatefulSet");
    let sts_status = sts.status.expect("sts status");
    assert_eq!(sts_status.current_revision, sts_status.update_revision, "every node runs the new template");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (total, _) = load.finish().await;
    let rolling_browsers = browsers.finish().await;
    browser_summary(&format!("4b rolling update {replication} (browsers)"), &rolling_browsers, rolled_at.elapsed());
    println!(
        "rolling update under load: converged in {} ms; {} requests, {} failed, {} lost, {} skipped; errors {:?}",
        converge.as_millis(),
        total.requests,
        total.failures,
        total.lost,
        total.skipped,
        total.errors
    );
    summary(
        &format!("4 rolling update {replication} (20 clients)"),
        total.requests,
        total.failures,
        total.lost + total.skipped,
        rolled_at.elapsed(),
        "",
    );
    app.operator.stop().await;
    let lost = [&scale_down_browsers, &rolling_browsers]
        .iter()
        .any(|o| o.lost_sessions > 0 || o.lost_increments > 0 || !o.failures.is_empty());
    if lost || scale_down.0 != (0, 0, 0) || (total.failures, total.lost, total.skipped) != (0, 0, 0) {
        // For the failure's reader: every node's log, next to the test's output.
        println!("nodes' logs in {}", node_logs.save(&format!("e2e-scale-{replication}")).display());
    }
    assert_eq!(scale_down.0, (0, 0, 0), "scale-down under load: {:?}", scale_down.1);
    assert!(scale_down.2 > 500, "the load ran: {} ok", scale_down.2);
    assert_eq!((total.failures, total.lost, total.skipped), (0, 0, 0), "rolling update under load: {:?}", total.errors);
    for (phase, outcome) in [("scale-down", &scale_down_browsers), ("rolling update", &rolling_browsers)] {
        assert_eq!(outcome.lost_sessions, 0, "{phase}: browser sessions lost:\n{}", outcome.report);
        assert_eq!(
            outcome.lost_increments, 0,
            "{phase}: answers missed an acknowledged increment:\n{}",
            outcome.report
        );
        assert!(outcome.failures.is_empty(), "{phase}: browser requests failed:\n{}", outcome.report);
        assert!(outcome.answered > 500, "{phase}: the browser load ran: {}", outcome.answered);
    }
}

/// A browser's page load: 12 sessions with 4 parallel connections each.
const BROWSER_SESSIONS: usize = 12;
const BROWSER_WORKERS: usize = 4;
const BROWSER_PAUSE: Duration = Duration::from_millis(100);

fn browser_summary(phase: &str, outcome: &BrowserOutcome, converge: Duration) {
    println!(
        "{phase}: {} answered, {} failed, {} sessions lost, {} answers missed an acknowledged increment\n{}",
        outcome.answered,
        outcome.failures.len(),
        outcome.lost_sessions,
        outcome.lost_increments,
        outcome.report
    );
    summary(
        phase,
        outcome.answered as u64 + outcome.failures.len() as u64,
        outcome.failures.len() as u64,
        outcome.lost_sessions as u64,
        converge,
        &format!(
            "{BROWSER_SESSIONS} sessions x {BROWSER_WORKERS} parallel connections; lost = sessions; {} answers missed an acknowledged increment",
            outcome.lost_increments
        ),
    );
}

/// One session of the rebalancing test, requested one request at a time, so
/// its counter must climb by exactly one each time.
#[derive(Debug, Default)]
struct TrackedSession {
    id: String,
    route: String,
    counter: u64,
    gaps: Vec<String>,
    failures: Vec<String>,
}

/// Time since the first call, for lines that must be put side by side.
fn test_clock() -> Duration {
    static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    STARTED.get_or_init(Instant::now).elapsed()
}

/// `period_ms`: the pause between two requests, milliseconds (shared, so a
/// test can slow every tracker down at once).
async fn track_session(
    port: u16,
    session: std::sync::Arc<std::sync::Mutex<TrackedSession>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    period_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(period_ms.load(std::sync::atomic::Ordering::Relaxed))).await;
        let id = session.lock().expect("session").id.clone();
        let reply = get_counter(port, Some(&id)).await;
        let mut s = session.lock().expect("session");
        match reply {
            Ok(r) if r.status == 200 => {
                let counter = r.counter.unwrap_or(0);
                if counter != s.counter + 1 {
                    // When and where, with both ids: enough to find the
                    // session in the nodes' logs.
                    let gap = format!(
                        "{} after {} at {:.1} s: {} on {:?} answered as {:?} (was on {})",
                        counter,
                        s.counter,
                        test_clock().as_secs_f64(),
                        id,
                        r.route,
                        r.session,
                        s.route
                    );
                    s.gaps.push(gap);
                }
                s.counter = counter;
                if let Some(new_id) = r.session {
                    s.id = new_id;
                }
                s.route = r.route.unwrap_or_default();
            }
            Ok(r) => {
                s.failures.push(format!("HTTP {} on {:?} at {:.1} s", r.status, r.route, test_clock().as_secs_f64()))
            }
            Err(e) => s.failures.push(format!("{e} at {:.1} s", test_clock().as_secs_f64())),
        }
    }
}

/// Rebalancing after a scale-up, measured from the routes that serve each
/// session (not from the balancer's own numbers): 600 sessions over 3 nodes,
/// scale to 5, and within 60 s of the new nodes being ready every node serves
/// 20 % ± 5 % of them, while browsers load 12 more sessions with 4 parallel
/// connections each; no session lost, no increment lost, no request failed.
/// (600, not fewer: each session goes where a hash sends it, so a node's
/// share of n sessions varies by about √(0.16/n); with 60 sessions a fair
/// rule still misses ±5 % on some node in most runs.)
// On real nodes (2026-12-01) this lost 229 of 39 655 acknowledged
// increments and 3 of 12 browser sessions, and rebalancing was off by
// default. With `sessions.orderedRequests` (a node runs a session's
// requests one at a time, replication included) two local runs lost none.
#[tokio::test]
async fn scale_up_rebalances_existing_sessions_onto_the_new_nodes() {
    rebalance_after_scale_up("all").await;
}

#[tokio::test]
async fn scale_up_rebalances_existing_sessions_onto_the_new_nodes_with_backup_replication() {
    rebalance_after_scale_up("backup").await;
}

async fn rebalance_after_scale_up(replication: &str) {
    const SESSIONS: usize = 600;
    const RAMP_SECONDS: u64 = 20;
    let _serial = serial().await;
    let app = App::start(
        &format!("e2e-rebalance-{replication}"),
        "shop",
        3,
        serde_json::json!({
            "balancer": {"rebalance": {"enabled": true, "rampSeconds": RAMP_SECONDS}, "accessLog": true},
            "sessions": {"replication": replication}
        }),
    )
    .await;
    let node_logs = app.keep_node_logs(5);
    // The app's creation time is now or earlier: nodes ready later than two
    // minutes after it are newcomers (the operator's --rebalance-after). A
    // node of the app that came up later than that (a slow start) was one,
    // and takes sessions for 5 + ramp + 60 s: wait until that is over too,
    // so the sessions start evenly spread over the three nodes.
    let start_grace = Duration::from_secs(125);
    tokio::time::sleep(start_grace).await;
    let created_by = Instant::now() - start_grace;
    let port = app.port;
    let mut tracked = Vec::with_capacity(SESSIONS);
    println!("sessions start at {:.1} s", test_clock().as_secs_f64());
    for _ in 0..SESSIONS {
        let r = get_counter(port, None).await.expect("a new session");
        assert_eq!(r.status, 200);
        tracked.push(std::sync::Arc::new(std::sync::Mutex::new(TrackedSession {
            id: r.session.expect("session"),
            route: r.route.expect("route"),
            counter: r.counter.expect("counter"),
            ..Default::default()
        })));
    }
    let spread = |tracked: &[std::sync::Arc<std::sync::Mutex<TrackedSession>>]| {
        let mut per_route = std::collections::BTreeMap::<String, usize>::new();
        for s in tracked {
            *per_route.entry(s.lock().expect("session").route.clone()).or_default() += 1;
        }
        per_route
    };
    let before = spread(&tracked);
    println!("before the scale-up: {before:?}");
    assert!(
        before.len() == 3 && before.values().all(|n| (SESSIONS * 28 / 100..=SESSIONS * 38 / 100).contains(n)),
        "new sessions spread evenly over the three nodes: {before:?}"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let period_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(2000));
    let trackers: Vec<_> =
        tracked.iter().map(|s| tokio::spawn(track_session(port, s.clone(), stop.clone(), period_ms.clone()))).collect();
    let browsers = BrowserLoad::start(port, BROWSER_SESSIONS, BROWSER_WORKERS, BROWSER_PAUSE).await;

    tokio::time::sleep(start_grace.saturating_sub(created_by.elapsed())).await;
    app.patch_spec(serde_json::json!({"replicas": 5})).await;
    app.wait_ready(5, Duration::from_secs(300)).await;
    let ready_at = Instant::now();
    println!("Ready 5/5 at {:.1} s", test_clock().as_secs_f64());
    let mut timeline = Vec::new();
    let mut balanced_after = None;
    while ready_at.elapsed() < Duration::from_secs(60 + 5) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = spread(&tracked);
        let fair = now.len() == 5 && now.values().all(|n| (SESSIONS * 15 / 100..=SESSIONS * 25 / 100).contains(n));
        let line = format!(
            "{:>3} s: {}",
            ready_at.elapsed().as_secs(),
            now.values().map(|n| n.to_string()).collect::<Vec<_>>().join("/")
        );
        println!("rebalancing {line} {now:?}");
        timeline.push(line);
        if fair && balanced_after.is_none() {
            balanced_after = Some(ready_at.elapsed());
        }
        if balanced_after.is_some() && ready_at.elapsed() > Duration::from_secs(5 + RAMP_SECONDS + 5) {
            break;
        }
    }
    // --- scale down 5 -> 2 while sessions still move ------------------------
    // The newcomers' window is still open (ready + 5 s + ramp + 60 s): the
    // sessions that just moved to shop-3 and shop-4 fail over again, while
    // the balancers still move others. The same sessions and browsers go on.
    println!("scale 5 -> 2 at {:.1} s, {} s after Ready 5/5", test_clock().as_secs_f64(), ready_at.elapsed().as_secs());
    let scaled_down_at = Instant::now();
    app.patch_spec(serde_json::json!({"replicas": 2})).await;
    app.wait_ready(2, Duration::from_secs(300)).await;
    println!("Ready 2/2 at {:.1} s", test_clock().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outcome = browsers.finish().await;
    browser_summary(&format!("6b rebalance 3 -> 5 -> 2 {replication} (browsers)"), &outcome, scaled_down_at.elapsed());
    // What the operator reports (`status.members[].sessions`, the SESSIONS
    // column) against the spread measured from the routes. The estimate
    // counts the sessions a node served in the last minutes, so a node that
    // gave sessions away counts them until their last request there is that
    // old: the sessions stay busy (at a gentler pace; once a window is
    // enough) until then, and every node's estimate must come within 15 %.
    period_ms.store(10_000, std::sync::atomic::Ordering::Relaxed);
    let estimates = estimates_agree_with_spread(&app, &tracked, &spread, Instant::now()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in trackers {
        t.await.expect("tracker");
    }
    let rebalance_events = rebalance_events(&app).await;
    println!("rebalancing events: {rebalance_events:?}");
    let final_spread = spread(&tracked);
    let gaps: Vec<String> = tracked.iter().flat_map(|s| s.lock().expect("s").gaps.clone()).collect();
    let failures: Vec<String> = tracked.iter().flat_map(|s| s.lock().expect("s").failures.clone()).collect();
    let requests: u64 = tracked.iter().map(|s| s.lock().expect("s").counter).sum();
    summary(
        &format!("6 rebalance 3 -> 5 -> 2 {replication} (600)"),
        requests,
        failures.len() as u64,
        gaps.len() as u64,
        balanced_after.unwrap_or(ready_at.elapsed()),
        &format!("spread after Ready: {}", timeline.join(", ")),
    );
    if !gaps.is_empty() || outcome.lost_sessions > 0 {
        // For the failure's reader: every node's log, next to the test's output.
        println!("nodes' logs in {}", node_logs.save(&format!("e2e-rebalance-{replication}")).display());
    }
    app.operator.stop().await;
    assert!(gaps.is_empty(), "increments lost or sessions new: {gaps:?}");
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    assert_eq!(outcome.lost_sessions, 0, "browser sessions lost:\n{}", outcome.report);
    assert!(outcome.failures.is_empty(), "browser requests failed:\n{}", outcome.report);
    assert!(
        balanced_after.is_some(),
        "not every node served 20 % ± 5 % of the sessions within 60 s of Ready: {timeline:?}; now {final_spread:?}"
    );
    let (agreed_after, estimate_timeline) = estimates;
    assert!(
        agreed_after.is_some(),
        "status.members[].sessions never came within 15 % of the measured spread {final_spread:?}: {estimate_timeline:?}"
    );
    // The scale-up's newcomers, each in events of its own (a node that came
    // up late in the app's start may have had one before them).
    let onto_newcomers = |reason: &str, note: &str| reason_and_newcomer(reason, note, &rebalance_events);
    assert!(
        onto_newcomers("RebalanceStarted", ""),
        "a RebalanceStarted event for shop-3 or shop-4: {rebalance_events:?}"
    );
    assert!(
        onto_newcomers("RebalanceFinished", "sessions moved")
            && rebalance_events.iter().any(|(reason, note)| reason == "RebalanceFinished"
                && !note.contains(": 0 sessions moved")
                && (note.contains("shop-3") || note.contains("shop-4"))),
        "a RebalanceFinished event for shop-3 or shop-4 with the sessions moved: {rebalance_events:?}"
    );
}

type Tracked = [std::sync::Arc<std::sync::Mutex<TrackedSession>>];

/// Polls the app's status until every node's `status.members[].sessions`
/// is within 15 % of the sessions the routes show on it (the estimate
/// covers the balancers' session window: allowed until a window after
/// `since`, the last moves, plus the operator's polling and a minute of
/// slack). Returns when they first agreed (after `since`) and the SESSIONS
/// column over time.
async fn estimates_agree_with_spread(
    app: &common::App,
    tracked: &Tracked,
    spread: &impl Fn(&Tracked) -> std::collections::BTreeMap<String, usize>,
    since: Instant,
) -> (Option<Duration>, Vec<String>) {
    // The last move (the scale-down) ages out of the window, plus the
    // operator's 15 s polling and a minute of slack.
    let window = Duration::from_millis(
        clusterapp::balancer::sessions::WINDOW_MS * clusterapp::balancer::sessions::ACTIVE_WINDOWS,
    );
    let deadline = since + window + Duration::from_secs(15 + 60);
    let mut timeline = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let measured = spread(tracked);
        let status = app.get().await.status.unwrap_or_default();
        let column = status.sessions.clone().unwrap_or_default();
        let measured_text = measured.values().map(|n| n.to_string()).collect::<Vec<_>>().join("/");
        let line = format!("{:>3} s: SESSIONS {column} (measured {measured_text})", since.elapsed().as_secs());
        println!("estimates {line}");
        timeline.push(line);
        let estimated: Vec<Option<i64>> = status.members.iter().map(|m| m.sessions).collect();
        let column_matches = status.sessions.as_deref()
            == Some(
                estimated
                    .iter()
                    .map(|e| e.map_or("-".to_string(), |n| n.to_string()))
                    .collect::<Vec<_>>()
                    .join("/")
                    .as_str(),
            );
        let agree = measured.len() == status.members.len()
            && status.members.iter().all(|m| {
                let (Some(estimate), Some(&truth)) = (m.sessions, measured.get(&m.route)) else { return false };
                (estimate - truth as i64).abs() as f64 <= 0.15 * truth as f64
            });
        if agree && column_matches {
            return (Some(since.elapsed()), timeline);
        }
    }
    (None, timeline)
}

/// Whether an event `reason` whose note holds `words` names a scale-up newcomer.
fn reason_and_newcomer(reason: &str, words: &str, events: &[(String, String)]) -> bool {
    events
        .iter()
        .any(|(r, note)| r == reason && note.contains(words) && (note.contains("shop-3") || note.contains("shop-4")))
}

/// `(reason, note)` of the app's rebalancing events.
async fn rebalance_events(app: &common::App) -> Vec<(String, String)> {
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = app.ns.api();
    let list = events.list(&Default::default()).await.expect("events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(app.name.as_str()))
        .filter_map(|e| Some((e.reason?, e.note.unwrap_or_default())))
        .filter(|(reason, _)| reason.starts_with("Rebalance"))
        .collect()
}
