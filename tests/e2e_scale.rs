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

mod e2e_common;
mod operator_common;
mod support;

use std::time::{Duration, Instant};

use e2e_common::{App, BrowserLoad, BrowserOutcome, Load, get_counter, serial, summary};

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
    let _serial = serial().await;
    let app = App::start("e2e-scale", "shop", 3, serde_json::json!({})).await;
    let port = app.port;

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
        assert!(
            log.contains("session state sent at") || log.contains("received in"),
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
    summary("2 scale up 3 -> 5", requests, 0, 0, converge, &format!("new sessions on {} routes", new_routes.len()));
    let _ = scaled;

    // --- 3. scale down 5 -> 2 under load ------------------------------------
    const CLIENTS: usize = 20;
    let load = Load::start(port, CLIENTS, Duration::from_millis(50));
    let browsers = BrowserLoad::start(port, BROWSER_SESSIONS, BROWSER_WORKERS, BROWSER_PAUSE).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    app.patch_spec(serde_json::json!({"replicas": 2})).await;
    let converge = app.wait_ready(2, Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (total, _) = load.finish().await;
    let scale_down_browsers = browsers.finish().await;
    browser_summary("3b scale down 5 -> 2 (browsers)", &scale_down_browsers, converge);
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
        "3 scale down 5 -> 2 (20 clients)",
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
    browser_summary("4b rolling update (browsers)", &rolling_browsers, rolled_at.elapsed());
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
        "4 rolling update (20 clients)",
        total.requests,
        total.failures,
        total.lost + total.skipped,
        rolled_at.elapsed(),
        "",
    );
    app.operator.stop().await;
    assert_eq!(scale_down.0, (0, 0, 0), "scale-down under load: {:?}", scale_down.1);
    assert!(scale_down.2 > 500, "the load ran: {} ok", scale_down.2);
    assert_eq!((total.failures, total.lost, total.skipped), (0, 0, 0), "rolling update under load: {:?}", total.errors);
    for (phase, outcome) in [("scale-down", &scale_down_browsers), ("rolling update", &rolling_browsers)] {
        assert_eq!(outcome.lost_sessions, 0, "{phase}: browser sessions lost:\n{}", outcome.report);
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
        "{phase}: {} answered, {} failed, {} sessions lost\n{}",
        outcome.answered,
        outcome.failures.len(),
        outcome.lost_sessions,
        outcome.report
    );
    summary(
        phase,
        outcome.answered as u64 + outcome.failures.len() as u64,
        outcome.failures.len() as u64,
        outcome.lost_sessions as u64,
        converge,
        &format!("{BROWSER_SESSIONS} sessions x {BROWSER_WORKERS} parallel connections; lost = sessions"),
    );
}
