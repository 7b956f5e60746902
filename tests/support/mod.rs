//! Test support: a real local control plane for integration tests.
//!
//! Every test binary that uses this module gets one control plane, started on
//! first use with `tests/bed/cluster.sh up` (and stopped by that script's
//! watchdog when the test binary exits), unless `CLUSTERAPP_TEST_KUBECONFIG`
//! names a running one — `make test` starts one for the whole suite and sets
//! it. Each test takes a fresh namespace from [`TestNamespace::new`]; the
//! namespace is deleted when the value is dropped, also when the test panics.
//!
//! We use a variable of our own instead of `KUBECONFIG` so that a developer's
//! kubeconfig for a real cluster is never touched by a test run.
#![allow(dead_code)]

/// A browser's parallel requests of one session: `support::browser`.
pub mod browser;
/// The real nodes (tests/bed/nodes): `support::nodes::nodes()`.
pub mod nodes;
/// Test certificates: `support::pki::Pki`.
pub mod pki;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Reads a `KEY=value` line from a file of such lines (tests/bed/versions.env).
fn env_file_value(file: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| panic!("{key} missing in {}", file.display()))
}

/// Folders of the binaries that tests/bed/install.sh builds.
pub struct BedPaths {
    /// `$CLUSTERAPP_CACHE`: every tool tests/bed builds lives under it.
    pub cache: PathBuf,
    pub kube_bin: PathBuf,
    pub etcd_bin: PathBuf,
    pub helm_bin: PathBuf,
    pub kubernetes_version: String,
    pub helm_version: String,
}

pub fn bed_paths() -> BedPaths {
    let versions = repo_root().join("tests/bed/versions.env");
    let cache = std::env::var_os("CLUSTERAPP_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME is not set");
        PathBuf::from(home).join(".cache/clusterapp")
    });
    let kubernetes_version = env_file_value(&versions, "KUBERNETES_VERSION");
    let etcd_version = env_file_value(&versions, "ETCD_VERSION");
    let helm_version = env_file_value(&versions, "HELM_VERSION");
    BedPaths {
        cache: cache.clone(),
        kube_bin: cache.join(format!("kubernetes-{kubernetes_version}/bin")),
        etcd_bin: cache.join(format!("etcd-{etcd_version}/bin")),
        helm_bin: cache.join(format!("helm-{helm_version}-2/bin")),
        kubernetes_version,
        helm_version,
    }
}

/// The running control plane the tests of this binary share.
pub struct Cluster {
    pub kubeconfig: PathBuf,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static PRIVATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts (once per test binary) or finds the control plane.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let private = PRIVATE.load(std::sync::atomic::Ordering::SeqCst);
        if !private && let Some(path) = std::env::var_os("CLUSTERAPP_TEST_KUBECONFIG") {
            return Cluster { kubeconfig: PathBuf::from(path) };
        }
        start_own_cluster()
    })
}

/// Makes `kubeconfig` this binary's control plane ([`nodes::nodes`]: the
/// one its nodes belong to); a binary that already uses another one is a
/// mistake in the test.
fn use_cluster(kubeconfig: PathBuf) {
    let cluster = CLUSTER.get_or_init(|| Cluster { kubeconfig: kubeconfig.clone() });
    assert_eq!(
        cluster.kubeconfig, kubeconfig,
        "this test binary already uses another control plane than the nodes' (call nodes() first)"
    );
}

/// For test binaries that change cluster-wide objects other binaries rely on
/// (the ClusterApp CRD, say): every test of such a binary calls this first,
/// and the binary gets a control plane of its own even under `make test`.
pub fn private_cluster() -> &'static Cluster {
    PRIVATE.store(true, std::sync::atomic::Ordering::SeqCst);
    cluster()
}

fn start_own_cluster() -> Cluster {
    // One state folder per test binary, so test binaries run in parallel
    // do not share (and stop) each other's control plane.
    let exe = std::env::current_exe().expect("current_exe");
    let name = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("test").to_string();
    let state = repo_root().join("target/test-clusters").join(name);
    let out = Command::new("bash")
        .arg(repo_root().join("tests/bed/cluster.sh"))
        .args(["up", "--owner-pid", &std::process::id().to_string()])
        .env("CLUSTERAPP_STATE", &state)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running tests/bed/cluster.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tests/bed/cluster.sh up failed: {stdout}");
    let line = stdout.lines().last().unwrap_or_default();
    let path =
        line.strip_prefix("KUBECONFIG=").unwrap_or_else(|| panic!("unexpected last line from cluster.sh: {line:?}"));
    Cluster { kubeconfig: PathBuf::from(path) }
}

/// A kube client with cluster-admin rights. Make one per test: a client is
/// tied to the tokio runtime it was made in, and every `#[tokio::test]` has
/// its own runtime.
pub async fn admin_client() -> Client {
    let kc = Kubeconfig::read_from(&cluster().kubeconfig).expect("reading the admin kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig");
    Client::try_from(config).expect("kube client")
}

/// `kubectl` of the control plane's version, talking to the test cluster.
pub fn kubectl() -> Command {
    let mut cmd = Command::new(bed_paths().kube_bin.join("kubectl"));
    cmd.env("KUBECONFIG", &cluster().kubeconfig);
    cmd
}

/// `helm` from the cache, talking to the test cluster.
pub fn helm() -> Command {
    let mut cmd = Command::new(bed_paths().helm_bin.join("helm"));
    cmd.env("KUBECONFIG", &cluster().kubeconfig);
    cmd
}

/// Runs a command, panics with its output if it fails, returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh namespace, deleted on drop.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    /// Creates namespace `<prefix>-<random>` and waits for its `default`
    /// ServiceAccount (made by the controller manager), as Pods need it.
    pub async fn new(prefix: &str) -> TestNamespace {
        let client = admin_client().await;
        let name = format!("{prefix}-{}", random_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"clusterapp.io/test": "true"}}
        }))
        .expect("namespace json");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating test namespace");
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_until(Duration::from_secs(30), "default ServiceAccount", || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.ok().flatten().is_some() }
        })
        .await;
        TestNamespace { name, client }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and this must also run
        // while a test unwinds.
        let _ = kubectl().args(["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"]).output();
    }
}

fn random_suffix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    format!("{:08x}", h.finish() as u32)
}

/// Polls `check` every 100 ms until it returns true; panics naming `what`
/// after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
