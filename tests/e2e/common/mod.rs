//! Helpers of the end-to-end tests (tests/e2e/, issue 5): the operator
//! under its own ServiceAccount, a ClusterApp of real Tomcat session nodes
//! (the counter app's image) in containers on the real nodes, real HTTP
//! clients against the balancer's NodePort on a node's IP, and the suite's
//! summary table.
//!
//! Every e2e test takes [`serial`] first: the e2e tests share the
//! nodes (2 cores), so they run one after another.
#![allow(dead_code)]

pub mod tls;

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clusterapp::crd::ClusterApp;
use http_body_util::{BodyExt, Empty};
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::Api;
use kube::api::PostParams;
use tokio::net::TcpStream;

use crate::operator_common::{self, OperatorNamespace, RunningOperator};
use crate::support;
use crate::support::browser::{BrowserSession, start_browsers};
use crate::support::nodes::{NODE_ADDRESS, nodes, pods_report};

/// Held for the whole test: the e2e tests run one at a time. An
/// async lock, because a test holds it across its awaits (a waiting test
/// then yields instead of blocking a thread its runtime may need).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The session nodes' logs, kept while a test runs ([`App::keep_node_logs`]).
pub struct NodeLogKeeper {
    logs: Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    namespace: String,
    session_nodes: Vec<String>,
}

impl NodeLogKeeper {
    /// Stops reading and writes every kept log to `<test tmp>/<name>/<pod>.log`;
    /// returns the folder.
    pub fn save(mut self, name: &str) -> std::path::PathBuf {
        self.stop_reading();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::create_dir_all(&dir);
        for (pod, log) in self.logs.lock().expect("logs").iter() {
            let _ = std::fs::write(dir.join(format!("{pod}.log")), log);
        }
        // Tomcat writes what a web application logs through its context
        // (a servlet's exception behind a 500, above all) to files in its
        // logs folder, not to the console: copied from each running node's
        // mount namespace.
        for pod in &self.session_nodes {
            let Some(pid) = nodes().container_pid(&self.namespace, pod, "tomcat") else { continue };
            let logs = std::path::PathBuf::from(format!("/proc/{pid}/root/usr/local/tomcat/logs"));
            for file in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                let name = file.file_name().to_string_lossy().into_owned();
                if name.starts_with("localhost.") {
                    let _ = std::fs::copy(file.path(), dir.join(format!("{pod}.{name}")));
                }
            }
        }
        dir
    }

    /// For a failure's reader where only the test's output survives (CI):
    /// from the saved logs in `dir`, what went wrong — Tomcat's warnings and
    /// errors with the start of their stack traces, the counter app's "not
    /// found" lines, the balancers' lines other than access lines, and the
    /// access lines of failed-over or unsuccessful requests. At most
    /// `limit` lines.
    pub fn excerpt(dir: &std::path::Path, limit: usize) -> String {
        let mut files: Vec<_> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|f| f.path()).collect();
        files.sort();
        let mut out = Vec::new();
        for file in files {
            let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let mut trace_lines = 0u32;
            for line in text.lines() {
                // The balancers log JSON (LOG_FORMAT=json).
                let keep = if line.contains("\"target\":\"clusterapp::access\"") {
                    line.contains("\"failover\":true") || !line.contains("\"status\":200")
                } else if line.contains("\"target\":\"clusterapp") {
                    true
                } else if line.trim_start().starts_with("at ") {
                    trace_lines > 0
                } else {
                    ["SEVERE", "WARNING", "WARN", "ERROR", "Exception", "not found on this node"]
                        .iter()
                        .any(|needle| line.contains(needle))
                };
                if line.trim_start().starts_with("at ") {
                    trace_lines = trace_lines.saturating_sub(1);
                } else {
                    trace_lines = if keep { 4 } else { 0 };
                }
                if keep {
                    out.push(format!("{name}: {line}"));
                }
            }
        }
        let skipped = out.len().saturating_sub(limit);
        let mut text = out.into_iter().take(limit).collect::<Vec<_>>().join("\n");
        if skipped > 0 {
            text.push_str(&format!("\n... and {skipped} more lines"));
        }
        text
    }

    fn stop_reading(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for NodeLogKeeper {
    fn drop(&mut self) {
        self.stop_reading();
    }
}

/// A running ClusterApp with its operator.
pub struct App {
    pub ns: OperatorNamespace,
    pub operator: RunningOperator,
    pub name: String,
    /// The balancer Service's nodePort (on [`NODE_ADDRESS`]).
    pub port: u16,
    /// From create to Ready n/n and the balancer answering 200.
    pub ready_after: Duration,
}

impl App {
    /// CRD, operator (under its ServiceAccount), a ClusterApp `name` of
    /// `replicas` counter-app nodes with a NodePort balancer; waits until it
    /// is Ready and the balancer answers 200. `extra` is merged into `spec`.
    pub async fn start(prefix: &str, name: &str, replicas: i32, extra: serde_json::Value) -> App {
        App::start_with(prefix, name, replicas, extra, &[]).await
    }

    /// [`App::start`], with `secrets` (Secret manifests, e.g. the balancer's
    /// TLS certificate) created in the namespace before the ClusterApp.
    pub async fn start_with(
        prefix: &str,
        name: &str,
        replicas: i32,
        extra: serde_json::Value,
        secrets: &[serde_json::Value],
    ) -> App {
        nodes();
        let ns = OperatorNamespace::new(prefix).await;
        let secret_api: Api<Secret> = ns.api();
        for secret in secrets {
            let secret: Secret = serde_json::from_value(secret.clone()).expect("Secret json");
            secret_api.create(&PostParams::default(), &secret).await.expect("creating a Secret for the ClusterApp");
        }
        let operator = operator_common::operator_in(&ns).await;
        let mut spec = serde_json::json!({
            "replicas": replicas, "image": "ghcr.io/clusterapp/counter-app:1.0",
            "balancer": {"replicas": 2, "service": {"type": "NodePort"}}
        });
        merge(&mut spec, extra);
        let app: ClusterApp = serde_json::from_value(serde_json::json!({
            "apiVersion": "clusterapp.io/v1alpha1", "kind": "ClusterApp", "metadata": {"name": name}, "spec": spec
        }))
        .expect("ClusterApp json");
        let created = Instant::now();
        let apps: Api<ClusterApp> = ns.api();
        apps.create(&PostParams::default(), &app).await.expect("creating the ClusterApp");
        let mut app = App { ns, operator, name: name.to_string(), port: 0, ready_after: Duration::ZERO };
        app.wait_ready(replicas, Duration::from_secs(240)).await;
        let services: Api<Service> = app.ns.api();
        let service = services.get(name).await.expect("balancer Service");
        app.port = service
            .spec
            .and_then(|s| s.ports)
            .and_then(|p| p.first().and_then(|p| p.node_port))
            .and_then(|p| u16::try_from(p).ok())
            .expect("the balancer Service has a nodePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !get_counter(app.port, None).await.is_ok_and(|r| r.status == 200) {
            assert!(
                Instant::now() < deadline,
                "the balancer on {NODE_ADDRESS}:{} never answered 200\n{}",
                app.port,
                pods_report(&app.ns.name)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        app.ready_after = created.elapsed();
        app
    }

    /// The nodePort of the balancer Service's port `port_name` (e.g. `https`).
    pub async fn node_port(&self, port_name: &str) -> u16 {
        let services: Api<Service> = self.ns.api();
        let service = services.get(&self.name).await.expect("balancer Service");
        service
            .spec
            .and_then(|s| s.ports)
            .into_iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| p.node_port)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("the balancer Service has no port {port_name:?} with a nodePort"))
    }

    pub fn apps(&self) -> Api<ClusterApp> {
        self.ns.api()
    }

    pub async fn get(&self) -> ClusterApp {
        self.apps().get(&self.name).await.expect("reading the ClusterApp")
    }

    /// Waits until the ClusterApp (at its current generation) says Ready
    /// and not Progressing, with `replicas` ready nodes of `replicas` and as
    /// many members; returns how long that took.
    pub async fn wait_ready(&self, replicas: i32, timeout: Duration) -> Duration {
        let started = Instant::now();
        let apps = self.apps();
        let name = self.name.clone();
        support::wait_until(timeout, &format!("ClusterApp {name} Ready {replicas}/{replicas}"), || {
            let apps = apps.clone();
            let name = name.clone();
            async move {
                let Some(app) = apps.get(&name).await.ok() else { return false };
                let generation = app.metadata.generation;
                let Some(status) = app.status else { return false };
                status.observed_generation == generation
                    && status.ready_replicas == replicas
                    && status.replicas == replicas
                    && status.members.len() == replicas as usize
                    && status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                    && status.conditions.iter().any(|c| c.type_ == "Progressing" && c.status == "False")
            }
        })
        .await;
        started.elapsed()
    }

    pub async fn patch_spec(&self, spec: serde_json::Value) {
        let patch = serde_json::json!({"spec": spec});
        self.apps()
            .patch(&self.name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .expect("patching the ClusterApp");
    }

    /// What a session node's Tomcat wrote (catalina.sh run: stdout), every
    /// restart, from the kubelet's log files.
    pub fn node_log(&self, pod: &str) -> String {
        nodes().container_log(&self.ns.name, pod, "tomcat")
    }

    /// Starts reading the logs of session nodes `<app>-0` .. `<app>-{count-1}`
    /// and of the balancer Pods every half second, keeping the longest read
    /// of each: a removed Pod's log goes with it, and a failure's reader
    /// needs it.
    pub fn keep_node_logs(&self, count: usize) -> NodeLogKeeper {
        let logs = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (namespace, app) = (self.ns.name.clone(), self.name.clone());
        let session_nodes = (0..count).map(|i| format!("{app}-{i}")).collect();
        let (keep, stopped) = (logs.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let session_nodes = (0..count).map(|i| (format!("{app}-{i}"), "tomcat"));
                let balancers = nodes()
                    .pods_with_logs(&namespace, &format!("{app}-balancer-"))
                    .into_iter()
                    .map(|pod| (pod, "balancer"));
                for (pod, container) in session_nodes.chain(balancers) {
                    let log = nodes().container_log(&namespace, &pod, container);
                    let mut kept = keep.lock().expect("logs");
                    if log.len() > kept.get(&pod).map_or(0, String::len) {
                        kept.insert(pod, log);
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        NodeLogKeeper { logs, stop, thread: Some(thread), namespace: self.ns.name.clone(), session_nodes }
    }

    /// kill -9 of a node's Tomcat (the JVM, its container's main process);
    /// returns its host PID.
    pub fn kill_node(&self, pod: &str) -> u32 {
        nodes().kill_container(&self.ns.name, pod, "tomcat")
    }

    /// Pods, their nodes and the namespace's last events, for a failure.
    pub fn pods_report(&self) -> String {
        pods_report(&self.ns.name)
    }
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// One answer of GET /counter/.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub counter: Option<u64>,
    pub route: Option<String>,
    /// From Set-Cookie, else X-Session-Id.
    pub session: Option<String>,
}

impl Reply {
    /// The counter page's answer from its status and headers.
    pub fn of(status: u16, headers: &http::HeaderMap) -> Reply {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let session = headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| c.strip_prefix("JSESSIONID=").map(|v| v.split(';').next().unwrap_or("").to_string()))
            .or_else(|| header("x-session-id"));
        Reply {
            status,
            counter: header("x-counter").and_then(|v| v.trim().parse().ok()),
            route: header("x-route"),
            session,
        }
    }
}

/// One GET /counter/ through the balancer on a fresh connection (so the
/// NodePort spreads requests over both balancer Pods).
pub async fn get_counter(port: u16, session: Option<&str>) -> Result<Reply, String> {
    let exchange = async {
        let stream = TcpStream::connect((NODE_ADDRESS, port)).await.map_err(|e| format!("connect: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let mut request = http::Request::get("/counter/").header("host", format!("{NODE_ADDRESS}:{port}"));
        if let Some(id) = session {
            request = request.header("cookie", format!("JSESSIONID={id}"));
        }
        let request = request.body(Empty::<bytes::Bytes>::new()).expect("request");
        let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
        let reply = Reply::of(response.status().as_u16(), response.headers());
        response.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
        Ok(reply)
    };
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .unwrap_or_else(|_| Err("timeout after 15 s".to_string()))
}

/// The route part of a session id: what follows the first '.'.
pub fn route_of_session_id(id: &str) -> Option<&str> {
    id.split_once('.').map(|(_, route)| route)
}

/// What one client saw.
#[derive(Debug, Default, Clone)]
pub struct ClientStats {
    pub requests: u64,
    pub ok: u64,
    pub failures: u64,
    /// Increments acknowledged (200 with counter n) that a later answer did
    /// not build on (the counter went back).
    pub lost: u64,
    /// Counter jumps (a failed request's increment applied): not lost, but
    /// not gapless.
    pub skipped: u64,
    pub errors: Vec<String>,
    pub routes: std::collections::BTreeSet<String>,
    pub last_counter: u64,
}

impl ClientStats {
    pub fn add(&mut self, other: &ClientStats) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.failures += other.failures;
        self.lost += other.lost;
        self.skipped += other.skipped;
        self.errors.extend(other.errors.iter().take(5).cloned());
        self.routes.extend(other.routes.iter().cloned());
    }
}

/// A client incrementing its own session until `stop`, `pause` between
/// requests. Every 200 must show the previous acknowledged counter + 1.
pub async fn client_loop(port: u16, stop: Arc<AtomicBool>, pause: Duration) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut session: Option<String> = None;
    let mut last = 0u64;
    while !stop.load(Ordering::Relaxed) {
        stats.requests += 1;
        match get_counter(port, session.as_deref()).await {
            Ok(reply) if reply.status == 200 => {
                stats.ok += 1;
                let counter = reply.counter.unwrap_or(0);
                if counter <= last {
                    stats.lost += last + 1 - counter;
                    stats
                        .errors
                        .push(format!("counter {counter} after {last} (route {:?}, session {session:?})", reply.route));
                } else if counter > last + 1 {
                    stats.skipped += counter - last - 1;
                    stats.errors.push(format!("counter {counter} after {last}: skipped (route {:?})", reply.route));
                }
                last = counter;
                if let Some(id) = reply.session {
                    session = Some(id);
                }
                if let Some(route) = reply.route {
                    stats.routes.insert(route);
                }
            }
            Ok(reply) => {
                stats.failures += 1;
                stats.errors.push(format!("HTTP {} (session {session:?})", reply.status));
            }
            Err(e) => {
                stats.failures += 1;
                stats.errors.push(format!("{e} (session {session:?})"));
            }
        }
        tokio::time::sleep(pause).await;
    }
    stats.last_counter = last;
    stats
}

/// `clients` concurrent clients; call [`Load::finish`] to stop them.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<ClientStats>>,
    pub started: Instant,
}

impl Load {
    pub fn start(port: u16, clients: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients).map(|_| tokio::spawn(client_loop(port, stop.clone(), pause))).collect();
        Load { stop, tasks, started: Instant::now() }
    }

    pub async fn finish(self) -> (ClientStats, Vec<ClientStats>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = ClientStats::default();
        let mut each = Vec::new();
        for task in self.tasks {
            let stats = task.await.expect("client task");
            total.add(&stats);
            each.push(stats);
        }
        (total, each)
    }
}

/// A browser-like load through the balancer's NodePort (which spreads each
/// connection over the balancer Pods): `sessions` sessions, each with
/// `workers` keep-alive connections sending its requests in parallel and
/// sharing one cookie jar (see `support::browser`).
pub struct BrowserLoad {
    pub sessions: Vec<Arc<BrowserSession>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// What a [`BrowserLoad`] saw.
#[derive(Debug)]
pub struct BrowserOutcome {
    pub answered: usize,
    /// Requests without a 200 answer, with the error.
    pub failures: Vec<String>,
    /// Sessions that came back as a new session at least once.
    pub lost_sessions: usize,
    /// Answers that missed an increment acknowledged before their request
    /// was sent (see `BrowserSession::lost_increments`).
    pub lost_increments: usize,
    /// Every session's line: answered, lost ids, failures.
    pub report: String,
}

impl BrowserLoad {
    pub async fn start(port: u16, sessions: usize, workers: usize, pause: Duration) -> BrowserLoad {
        let mut list = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            let r = get_counter(port, None).await.expect("a new session");
            list.push(BrowserSession::new(&r.session.expect("a session cookie")));
        }
        let address = std::net::SocketAddr::new(NODE_ADDRESS.parse().expect("node address"), port);
        let (stop, workers) = start_browsers(&[address], &list, workers, pause);
        BrowserLoad { sessions: list, stop, workers }
    }

    pub async fn finish(self) -> BrowserOutcome {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.expect("browser worker");
        }
        let mut outcome = BrowserOutcome {
            answered: 0,
            failures: Vec::new(),
            lost_sessions: 0,
            lost_increments: 0,
            report: String::new(),
        };
        for s in &self.sessions {
            let lost = s.lost.lock().expect("lost").clone();
            let failed: Vec<String> = s.failed.lock().expect("failed").iter().map(|(_, e)| e.clone()).collect();
            outcome.answered += s.answered();
            outcome.lost_sessions += usize::from(!lost.is_empty());
            // Once lost, every later answer counts: the first few tell how.
            outcome.report.push_str(&format!(
                "{}: answered {}, now {}, {} answers of another session, first {:?}, failed {:?}\n",
                s.base,
                s.answered(),
                s.current_id(),
                lost.len(),
                &lost[..lost.len().min(6)],
                failed
            ));
            let lost_increments = s.lost_increments();
            outcome.lost_increments += lost_increments.len();
            if !lost_increments.is_empty() {
                outcome.report.push_str(&format!(
                    "  {} answers missed an acknowledged increment, first {:?}\n",
                    lost_increments.len(),
                    &lost_increments[..lost_increments.len().min(4)]
                ));
            }
            if !lost.is_empty() {
                outcome
                    .report
                    .push_str(&format!("  its answers, where they changed:\n    {}\n", s.moves().join("\n    ")));
            }
            outcome.failures.extend(failed);
        }
        outcome
    }
}

/// Appends one line to target/e2e-summary.txt (printed by
/// tests/bed/run-tests.sh at the end of `make test`) and prints it.
pub fn summary(test: &str, requests: u64, failures: u64, lost: u64, converge: Duration, notes: &str) {
    let line = format!("{test:<34} {requests:>8} {failures:>8} {lost:>6} {:>10.1} s  {notes}", converge.as_secs_f64());
    println!("E2E SUMMARY: {line}");
    let path = support::repo_root().join("target/e2e-summary.txt");
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(file, "{line}");
    }
}

/// The header of the summary table (for run-tests.sh).
pub const SUMMARY_HEADER: &str = "test                               requests failures   lost   converge  notes";
