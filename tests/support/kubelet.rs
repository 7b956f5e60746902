//! The process kubelet (tests/kubelet) for tests that need Pods to run.
//!
//! [`kubelet()`] starts one per test binary on first use, registered as
//! Node `clusterapp-node` of the test binary's control plane; it stops by
//! itself (and removes its network namespaces, veths and bridge) when the
//! test binary exits (`--owner-pid`). Only one kubelet runs on a machine at a
//! time (the bridge and Pod network are machine-wide): a second waits for the
//! first to exit, which suits test binaries that cargo runs one by one.
//! [`KubeletProcess::start`] starts a private one that a test stops itself.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{cluster, repo_root};

pub struct KubeletProcess {
    child: Mutex<Child>,
    pub pid: u32,
    /// `--state-dir`; Pods live in `<state_dir>/kubelet/pods/<ns>_<name>/`.
    pub state_dir: PathBuf,
}

/// Builds `clusterapp-kubelet` (incremental; once per test binary) unless
/// CLUSTERAPP_KUBELET_BIN names a built one.
pub fn kubelet_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("CLUSTERAPP_KUBELET_BIN") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "clusterapp-kubelet", "--bin", "clusterapp-kubelet"])
            .current_dir(repo_root())
            .status()
            .expect("running cargo build -p clusterapp-kubelet");
        assert!(status.success(), "building clusterapp-kubelet failed");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
        target.join("debug/clusterapp-kubelet")
    })
}

/// `kubelet_pods` for `target/debug/deps/kubelet_pods-0e1a800a4f08087b`.
fn test_binary_name() -> String {
    let exe = std::env::current_exe().expect("current_exe");
    let stem = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("test");
    stem.rsplit_once('-').map_or(stem, |(name, _)| name).to_string()
}

impl KubeletProcess {
    /// Starts a kubelet with state in `target/test-kubelets/<name>` and waits
    /// until its Node is registered. Extra flags go after the defaults.
    pub fn start(name: &str, extra_args: &[&str]) -> KubeletProcess {
        let admin = &cluster().kubeconfig;
        let node_kubeconfig = admin.parent().expect("kubeconfig folder").join("node.kubeconfig");
        let state_dir = repo_root().join("target/test-kubelets").join(name);
        std::fs::create_dir_all(&state_dir).expect("creating the kubelet state folder");
        let ready = state_dir.join("kubelet/ready");
        let _ = std::fs::remove_file(&ready);
        let log = File::create(state_dir.join("kubelet.log")).expect("creating kubelet.log");
        let child = Command::new(kubelet_binary())
            .arg("run")
            .arg("--kubeconfig")
            .arg(&node_kubeconfig)
            .arg("--admin-kubeconfig")
            .arg(admin)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--images")
            .arg(repo_root().join("tests/kubelet/images.yaml"))
            .arg("--clusterapp-bin")
            .arg(env!("CARGO_BIN_EXE_clusterapp"))
            .arg("--owner-pid")
            .arg(std::process::id().to_string())
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting clusterapp-kubelet");
        let pid = child.id();
        let process = KubeletProcess { child: Mutex::new(child), pid, state_dir };
        // Generous: it may first wait for another test binary's kubelet to clean up.
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if std::fs::read_to_string(&ready).is_ok_and(|s| s.trim() == pid.to_string()) {
                return process;
            }
            if let Some(status) = process.child.lock().expect("child").try_wait().expect("try_wait") {
                panic!("clusterapp-kubelet exited ({status}) before it was ready:\n{}", process.log_tail(40));
            }
            assert!(Instant::now() < deadline, "clusterapp-kubelet not ready after 240 s:\n{}", process.log_tail(40));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.state_dir.join("kubelet/pods").join(format!("{namespace}_{pod}"))
    }

    /// What the container wrote to stdout/stderr (all its restarts).
    pub fn container_log(&self, namespace: &str, pod: &str, container: &str) -> String {
        std::fs::read_to_string(self.pod_dir(namespace, pod).join(format!("{container}.log"))).unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("kubelet.log")).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM (by PID), then waits for the exit.
    pub fn stop(&self, timeout: Duration) -> ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.lock().expect("child").try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "clusterapp-kubelet did not stop within {timeout:?}:\n{}",
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The kubelet of this test binary (started on first use).
pub fn kubelet() -> &'static KubeletProcess {
    static KUBELET: OnceLock<KubeletProcess> = OnceLock::new();
    KUBELET.get_or_init(|| KubeletProcess::start(&test_binary_name(), &[]))
}

/// Creates an object from JSON in `api`, panicking with the API's answer.
pub async fn create<K>(api: &kube::Api<K>, value: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("object json");
    api.create(&kube::api::PostParams::default(), &object).await.expect("creating object")
}

/// The Pod's Ready condition is True.
pub fn pod_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status.iter().flat_map(|s| s.conditions.iter().flatten()).any(|c| c.type_ == "Ready" && c.status == "True")
}
