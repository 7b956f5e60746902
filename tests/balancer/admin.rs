//! The admin port: Prometheus metrics, probes, and the status page as a
//! person sees it in headless Chromium (with a screenshot).

use std::process::Command;
use std::time::Duration;

use crate::common::tomcat::{TomcatOptions, start_cluster};
use crate::common::{self, http::get};
use crate::common::{Balancer, BalancerOptions, TempDir, repo_root};

const SECRET: &str = "admin-secret";

fn chromium(args: &[&str]) -> std::process::Output {
    let profile = TempDir::new("chromium-profile");
    Command::new("chromium")
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("run chromium (Debian package `chromium`)")
}

fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("series {series} missing in:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_probes_and_status_page() {
    let nodes = start_cluster(&["a1", "a2"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    let balancer = Balancer::start(BalancerOptions::new(SECRET).members(&[&nodes[0], &nodes[1]]));

    assert_eq!(get(balancer.admin, "/healthz", None).await.status, 200);
    assert_eq!(get(balancer.admin, "/readyz", None).await.status, 200);
    assert_eq!(get(balancer.admin, "/nope", None).await.status, 404);

    for _ in 0..20 {
        assert_eq!(get(balancer.listen, "/counter/", None).await.status, 200);
    }
    let missing = get(balancer.listen, "/counter/missing", None).await;
    assert_eq!(missing.status, 404);
    // Five sessions, three requests each: each member counts its own once.
    let mut sessions = Vec::new();
    for _ in 0..5 {
        let first = get(balancer.listen, "/counter/", None).await;
        let id = first.set_session_id().expect("a session");
        for _ in 0..3 {
            assert_eq!(get(balancer.listen, "/counter/", Some(&id)).await.status, 200);
        }
        sessions.push(id);
    }

    let metrics = get(balancer.admin, "/metrics", None).await.text();
    let ok = metric_value(&metrics, "clusterapp_balancer_requests_total{member=\"a1\",status=\"2xx\"}")
        + metric_value(&metrics, "clusterapp_balancer_requests_total{member=\"a2\",status=\"2xx\"}");
    assert_eq!(ok, 40.0, "every proxied 2xx counted per member");
    let per_member = |route: &str| sessions.iter().filter(|id| id.ends_with(&format!(".{route}"))).count() as f64;
    for route in ["a1", "a2"] {
        let series = format!("clusterapp_balancer_member_sessions{{member=\"{route}\"}}");
        assert_eq!(metric_value(&metrics, &series), per_member(route), "{route}'s session estimate");
    }
    let sketches = get(balancer.admin, "/sessions.json", None).await.json();
    let window_seconds =
        clusterapp::balancer::sessions::ACTIVE_WINDOWS * clusterapp::balancer::sessions::WINDOW_MS / 1000;
    assert_eq!(sketches["windowSeconds"], window_seconds);
    assert_eq!(sketches["sessionsMoved"], 0, "no rebalancing here");
    assert_eq!(sketches["rebalancing"], serde_json::json!([]));
    for route in ["a1", "a2"] {
        let text = sketches["members"][route].as_str().expect("a sketch per member");
        let registers = clusterapp::balancer::sessions::decode(text).expect("a valid sketch");
        assert_eq!(clusterapp::balancer::sessions::estimate(&registers).round(), per_member(route));
    }
    let not_found = metric_value(&metrics, "clusterapp_balancer_requests_total{member=\"a1\",status=\"4xx\"}")
        + metric_value(&metrics, "clusterapp_balancer_requests_total{member=\"a2\",status=\"4xx\"}");
    assert_eq!(not_found, 1.0);
    assert!(metric_value(&metrics, "clusterapp_balancer_response_head_seconds_count{member=\"a1\"}") >= 10.0);
    assert_eq!(metric_value(&metrics, "clusterapp_balancer_member_state{member=\"a2\"}"), 2.0, "ready");
    assert!(metrics.contains("# TYPE clusterapp_balancer_response_head_seconds histogram"));

    // The status page, rendered by a browser with its script run.
    let url = format!("http://{}/", balancer.admin);
    let dom = chromium(&["--virtual-time-budget=3000", "--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("data-route=\"a1\"") && dom.contains("data-route=\"a2\""),
        "member rows rendered by the page script:\n{dom}"
    );
    assert!(dom.contains("class=\"state ready\""), "state badges:\n{dom}");
    assert!(dom.contains("2 members"), "summary line:\n{dom}");
    assert!(dom.contains("<polyline"), "live graphs drawn:\n{dom}");
    assert!(dom.contains("class=\"session-estimate\""), "sessions per member drawn:\n{dom}");
    assert!(dom.contains(" sessions</text>"), "session estimate labelled:\n{dom}");
    assert!(dom.contains(".a1") || dom.contains(".a2"), "recent (masked) sessions listed:\n{dom}");

    let shot = repo_root().join("target/balancer-status.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&[
        "--virtual-time-budget=3000",
        "--window-size=1280,420",
        &format!("--screenshot={}", shot.display()),
        &url,
    ]);
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "a real page, not a blank one ({} bytes)", png.len());
    eprintln!("status page screenshot: {}", shot.display());

    // Readiness follows shutdown.
    let mut balancer = balancer;
    common::signal(balancer.pid(), "TERM");
    let status = balancer.terminate(Duration::from_secs(10)).expect("exits");
    assert!(status.success());
}
