//! The real nodes of the local cluster (tests/bed/nodes/nodes.sh): three
//! kubelets, each with its own containerd and runc, on this machine, with
//! kube-proxy and CoreDNS, and images pulled from the local registry that
//! `make images` fills.
//!
//! `make test` starts the nodes with their control plane before the suites
//! and names them in `CLUSTERAPP_TEST_NODES` (the state folder) and
//! `CLUSTERAPP_TEST_KUBECONFIG`. A test binary run on its own starts them
//! itself in `target/cluster-nodes` (or reuses the ones running there) and
//! leaves them running for the next run: `make nodes-down` stops them.
//! [`nodes`] must come before the first [`super::cluster`] of a test binary
//! so that both name the same control plane.
//!
//! Everything here reads what the kubelets and containerds really did:
//! container logs from the kubelets' pod log folders (every restart), host
//! PIDs from the container runtime (`crictl inspect`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::{bed_paths, env_file_value, repo_root, run_ok};

/// Where NodePort Services answer: the first node's IP on the `canode0`
/// bridge (kube-proxy's nftables mode opens NodePorts on node IPs only, not
/// on 127.0.0.1). nodes.sh gives node N the address 10.201.0.(10+N).
pub const NODE_ADDRESS: &str = "10.201.0.11";

pub struct Nodes {
    /// nodes.sh's state folder: `nodes/<N>/` per node, `admin.kubeconfig`.
    pub state: PathBuf,
}

/// The running nodes (started on first use when `make test` did not).
pub fn nodes() -> &'static Nodes {
    static NODES: OnceLock<Nodes> = OnceLock::new();
    NODES.get_or_init(|| {
        let state = match std::env::var_os("CLUSTERAPP_TEST_NODES") {
            Some(state) => PathBuf::from(state),
            None => start_nodes(),
        };
        super::use_cluster(state.join("admin.kubeconfig"));
        Nodes { state }
    })
}

fn start_nodes() -> PathBuf {
    let state = repo_root().join("target/cluster-nodes");
    let out = Command::new("bash")
        .arg(repo_root().join("tests/bed/nodes/nodes.sh"))
        .arg("up")
        .env("CLUSTERAPP_STATE", &state)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running tests/bed/nodes/nodes.sh up");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tests/bed/nodes/nodes.sh up failed: {stdout}");
    // The images of the code under test (a no-op when nothing changed).
    run_ok(Command::new("bash").arg(repo_root().join("tests/bed/nodes/images.sh")));
    state
}

impl Nodes {
    /// Node folders `nodes/<N>`, in order.
    fn node_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.state.join("nodes"))
            .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        dirs.sort();
        dirs
    }

    /// The kubelet's log folders of `namespace/pod` (`<ns>_<pod>_<uid>`) on
    /// any node, oldest first: a StatefulSet Pod deleted and made again
    /// has a new UID and may have run on another node.
    fn pod_log_dirs(&self, namespace: &str, pod: &str) -> Vec<(PathBuf, PathBuf)> {
        let prefix = format!("{namespace}_{pod}_");
        let mut found = Vec::new();
        for node in self.node_dirs() {
            let Ok(entries) = std::fs::read_dir(node.join("pod-logs")) else { continue };
            for entry in entries.filter_map(Result::ok) {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    found.push((node.clone(), entry.path()));
                }
            }
        }
        found.sort_by_key(|(_, dir)| std::fs::metadata(dir).and_then(|m| m.modified()).ok());
        found
    }

    /// The Pods of `namespace` whose names start with `prefix` and that
    /// have (or had) logs on a node.
    pub fn pods_with_logs(&self, namespace: &str, prefix: &str) -> std::collections::BTreeSet<String> {
        let start = format!("{namespace}_{prefix}");
        let mut pods = std::collections::BTreeSet::new();
        for node in self.node_dirs() {
            let Ok(entries) = std::fs::read_dir(node.join("pod-logs")) else { continue };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                // `<namespace>_<pod>_<uid>`: none of the three has a `_`.
                if name.starts_with(&start)
                    && let Some(pod) = name.split('_').nth(1)
                {
                    pods.insert(pod.to_string());
                }
            }
        }
        pods
    }

    /// Everything the container wrote (stdout and stderr, every restart, in
    /// the CRI log format: `<time> <stream> <tag> <line>`); empty when the
    /// Pod never ran or is gone.
    pub fn container_log(&self, namespace: &str, pod: &str, container: &str) -> String {
        let mut text = String::new();
        for (_, dir) in self.pod_log_dirs(namespace, pod) {
            let Ok(entries) = std::fs::read_dir(dir.join(container)) else { continue };
            // `<restart>.log`, numbered from 0.
            let mut files: Vec<(u32, PathBuf)> = entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".log").and_then(|n| n.parse().ok()).map(|n| (n, e.path()))
                })
                .collect();
            files.sort();
            for (_, file) in files {
                text.push_str(&std::fs::read_to_string(file).unwrap_or_default());
            }
        }
        text
    }

    /// `crictl` against node folder `node`'s containerd.
    fn crictl(&self, node: &Path) -> Command {
        let version = env_file_value(&repo_root().join("tests/bed/versions.env"), "CRI_TOOLS_VERSION");
        let mut cmd = Command::new(bed_paths().cache.join(format!("cri-tools-{version}/bin/crictl")));
        cmd.arg("--timeout")
            .arg("20s")
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", node.join("containerd/containerd.sock").display()));
        cmd
    }

    /// The host PID of the running `container` of `namespace/pod` (what
    /// the runtime started: Tomcat's JVM in a session node), from the
    /// containerd of the node that runs it.
    pub fn container_pid(&self, namespace: &str, pod: &str, container: &str) -> Option<u32> {
        for (node, _) in self.pod_log_dirs(namespace, pod).into_iter().rev() {
            let ids = run_ok(self.crictl(&node).args([
                "ps",
                "--quiet",
                "--state",
                "running",
                "--name",
                &format!("^{container}$"),
                "--label",
                &format!("io.kubernetes.pod.namespace={namespace}"),
                "--label",
                &format!("io.kubernetes.pod.name={pod}"),
            ]));
            let Some(id) = ids.split_whitespace().next() else { continue };
            let pid = run_ok(self.crictl(&node).args([
                "inspect",
                "--output",
                "go-template",
                "--template",
                "{{.info.pid}}",
                id,
            ]));
            return pid.trim().parse().ok();
        }
        None
    }

    /// kill -9 of the container's main process, from the host (the runtime
    /// sees it die like any crash); returns its host PID.
    pub fn kill_container(&self, namespace: &str, pod: &str, container: &str) -> u32 {
        let pid = self
            .container_pid(namespace, pod, container)
            .unwrap_or_else(|| panic!("no running container {container} of {namespace}/{pod} on any node"));
        run_ok(Command::new("kill").args(["-KILL", &pid.to_string()]));
        pid
    }

    /// The node named `node` (`clusterapp-node<N>`) dies: its Pods are cut
    /// off the network, then its kubelet, containerd and containers are
    /// killed (`nodes.sh kill-node`). The node comes back when the returned
    /// guard is revived or dropped: later tests share the nodes.
    pub fn kill_node(&self, node: &str) -> DeadNode {
        let number = node.strip_prefix("clusterapp-node").unwrap_or_else(|| panic!("not a node of ours: {node}"));
        self.nodes_sh(&["kill-node", number]);
        DeadNode { state: self.state.clone(), number: number.to_string(), revived: false }
    }

    fn nodes_sh(&self, args: &[&str]) {
        run_ok(
            Command::new("bash")
                .arg(repo_root().join("tests/bed/nodes/nodes.sh"))
                .args(args)
                .env("CLUSTERAPP_STATE", &self.state),
        );
    }
}

/// A node that [`Nodes::kill_node`] killed.
pub struct DeadNode {
    state: PathBuf,
    number: String,
    revived: bool,
}

impl DeadNode {
    /// Brings the node back and waits until it is Ready.
    pub fn revive(mut self) {
        self.revived = true;
        Nodes { state: self.state.clone() }.nodes_sh(&["revive-node", &self.number]);
    }
}

impl Drop for DeadNode {
    fn drop(&mut self) {
        if !self.revived {
            let _ = Command::new("bash")
                .arg(repo_root().join("tests/bed/nodes/nodes.sh"))
                .args(["revive-node", &self.number])
                .env("CLUSTERAPP_STATE", &self.state)
                .output();
        }
    }
}

/// What a failure message wants about the Pods of `namespace`: where they
/// run, their state and the namespace's last events.
pub fn pods_report(namespace: &str) -> String {
    let pods = super::kubectl().args(["get", "pods", "-o", "wide", "-n", namespace]).output();
    let events = super::kubectl().args(["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"]).output();
    let text = |out: std::io::Result<std::process::Output>| {
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    let events = text(events);
    let tail: Vec<&str> = events.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{}\n{}", text(pods), tail.join("\n"))
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

/// The uids of a process (real, effective, saved, filesystem) from the host.
pub fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid: line");
    line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect()
}

/// The mount options of the process's root (`/` in its own mount
/// namespace), from the host.
pub fn root_mount_options(pid: u32) -> String {
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("/proc/<pid>/mountinfo");
    // `id parent major:minor root mount-point options ...`
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .rfind(|f| f.len() > 5 && f[4] == "/")
        .map(|f| f[5].to_string())
        .expect("a mount at /")
}

/// The process's environment as `NAME=value` lines, from the host.
pub fn environment(pid: u32) -> String {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).expect("/proc/<pid>/environ");
    String::from_utf8_lossy(&bytes).replace('\0', "\n")
}

/// `kubectl port-forward pod/<pod> :<port>` until dropped; the local port.
pub struct PortForward {
    child: std::process::Child,
    /// Kept open: kubectl writes a line per connection, and dies of
    /// SIGPIPE once nobody reads its stdout.
    _stdout: BufReader<std::process::ChildStdout>,
    pub local_port: u16,
}

impl PortForward {
    pub fn open(namespace: &str, pod: &str, port: u16) -> PortForward {
        let mut child = super::kubectl()
            .args(["port-forward", "-n", namespace, &format!("pod/{pod}"), &format!(":{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl port-forward");
        let stdout = child.stdout.take().expect("stdout");
        // "Forwarding from 127.0.0.1:41234 -> 9090"
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).expect("port-forward's first line");
        let local_port = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("port-forward to {pod}:{port} said {line:?}"));
        PortForward { child, _stdout: stdout, local_port }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status line of a GET through 127.0.0.1:`port` (curl, a fresh
/// connection).
pub fn http_status(port: u16, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
