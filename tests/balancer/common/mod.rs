//! Helpers for the balancer's integration tests: real Tomcat nodes (Debian
//! `tomcat10`) running the counter sample app, the balancer binary, and a
//! small HTTP client.
//!
//! Every process started here is stopped by PID when its handle drops, also
//! when a test panics.
#![allow(dead_code)]

pub mod bodies;
pub mod http;
pub mod tomcat;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Not from the kernel's ephemeral range (32768-60999 here), where every
    // outgoing connection on the machine takes its source port: during a
    // clean-clone run, with the e2e suite's kubelets and API server beside
    // these tests, one took the port a Tomcat was about to bind for AJP
    // ("Address already in use"; the node then ran without the connector).
    // Below the NodePort range (30000-32767) too. Test processes start at
    // offsets of their own, and each port is checked by binding it.
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(7_919) % COUNT;
    for _ in 0..COUNT {
        let port = (FIRST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + COUNT);
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "clusterapp-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Sends a signal to exactly one process we started.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A running `clusterapp balancer`.
pub struct Balancer {
    child: Option<Child>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _dir: TempDir,
}

pub struct BalancerOptions {
    pub secret: String,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    /// Wait for /readyz before returning.
    pub wait_ready: bool,
    /// Another build of clusterapp to run instead of this one (the bench's
    /// A/B row); None: the binary under test.
    pub program: Option<std::path::PathBuf>,
}

impl BalancerOptions {
    pub fn new(secret: &str) -> Self {
        BalancerOptions {
            secret: secret.to_string(),
            args: Vec::new(),
            envs: Vec::new(),
            wait_ready: true,
            program: None,
        }
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// `--backend-protocol http` with the nodes' HTTP connectors for the balancer as members.
    pub fn http_members(mut self, nodes: &[&tomcat::TomcatNode]) -> Self {
        self.args.push("--backend-protocol".into());
        self.args.push("http".into());
        for n in nodes {
            self.args.push("--member".into());
            self.args.push(format!("{}=127.0.0.1:{}", n.route, n.backend_http_port));
        }
        self
    }
    pub fn members(mut self, nodes: &[&tomcat::TomcatNode]) -> Self {
        for n in nodes {
            self.args.push("--member".into());
            self.args.push(format!("{}=127.0.0.1:{}", n.route, n.ajp_port));
        }
        self
    }
}

impl Balancer {
    pub fn start(options: BalancerOptions) -> Balancer {
        let dir = TempDir::new("balancer");
        let secret_file = dir.path().join("ajp-secret");
        std::fs::write(&secret_file, format!("{}\n", options.secret)).expect("write secret");
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = dir.path().join("balancer.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let program = options.program.clone().unwrap_or_else(|| env!("CARGO_BIN_EXE_clusterapp").into());
        let mut cmd = Command::new(program);
        cmd.arg("balancer")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--ajp-secret-file")
            .arg(&secret_file)
            .args(&options.args)
            .env("RUST_LOG", std::env::var("BALANCER_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone"))
            .stderr(log_file);
        for (k, v) in &options.envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn clusterapp balancer");
        let mut b = Balancer { child: Some(child), listen, admin, log, _dir: dir };
        let path = if options.wait_ready { "/readyz" } else { "/healthz" };
        let admin_addr = b.admin;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = b.try_wait() {
                panic!("balancer exited early with {status}; log:\n{}", b.log_text());
            }
            if http::blocking_status(admin_addr, path) == Some(200) {
                break;
            }
            assert!(Instant::now() < deadline, "balancer not ready; log:\n{}", b.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait up to `timeout` for exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Resident memory of the balancer process in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- balancer log ----\n{}", self.log_text());
        }
    }
}
