//! What every Pod worker shares.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::process::Command;
use tokio::sync::OnceCell;
use tracing::info;

use crate::images::Images;
use crate::network::Network;
use crate::proxy::EndpointRegistry;

pub struct Context {
    /// Authenticated as the node (system:node:<name>).
    pub client: Client,
    pub node_name: String,
    /// The node's address as Pods see it (the bridge gateway).
    pub host_ip: Ipv4Addr,
    /// `<state>/kubelet`: pods/, webapps/.
    pub state_dir: PathBuf,
    pub images: Images,
    pub clusterapp_bin: PathBuf,
    /// This binary, for `enter`.
    pub self_exe: PathBuf,
    pub network: Arc<Network>,
    pub registry: EndpointRegistry,
    /// First delay of the crash-loop back-off (doubles up to restart_backoff_max).
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// Cap on termination grace when the kubelet itself stops.
    pub shutdown_grace: Duration,
    /// How often running Pods' ConfigMap/Secret volumes are re-read (0 = never).
    pub volume_sync_period: Duration,
    pub node_cpu: String,
    pub node_memory: String,
    pub tomcat_conf: PathBuf,
    webapps: OnceCell<Result<BTreeMap<String, PathBuf>, String>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        node_name: String,
        host_ip: Ipv4Addr,
        state_dir: PathBuf,
        images: Images,
        clusterapp_bin: PathBuf,
        self_exe: PathBuf,
        network: Arc<Network>,
        registry: EndpointRegistry,
        restart_backoff: Duration,
        shutdown_grace: Duration,
        volume_sync_period: Duration,
        node_cpu: String,
        node_memory: String,
    ) -> Context {
        Context {
            client,
            node_name,
            host_ip,
            state_dir,
            images,
            clusterapp_bin,
            self_exe,
            network,
            registry,
            restart_backoff,
            restart_backoff_max: Duration::from_secs(60),
            shutdown_grace,
            volume_sync_period,
            node_cpu,
            node_memory,
            tomcat_conf: PathBuf::from("/etc/tomcat10"),
            webapps: OnceCell::new(),
        }
    }

    /// The web applications of tomcat-kind images, built once per kubelet run
    /// with the scripts the image map names (e.g. the counter app's build.sh).
    pub async fn webapps(&self) -> Result<&BTreeMap<String, PathBuf>, String> {
        let built = self
            .webapps
            .get_or_init(|| async {
                let mut out = BTreeMap::new();
                for (name, source) in self.images.webapp_sources() {
                    let dir = self.state_dir.join("webapps").join(name);
                    let _ = std::fs::remove_dir_all(&dir);
                    let script = self.images.base_dir.join(&source.build);
                    let started = std::time::Instant::now();
                    let result = Command::new("bash")
                        .arg(&script)
                        .arg(&dir)
                        .output()
                        .await
                        .map_err(|e| format!("running {}: {e}", script.display()))?;
                    if !result.status.success() {
                        return Err(format!(
                            "building webapp {name} with {} failed: {}",
                            script.display(),
                            String::from_utf8_lossy(&result.stderr).trim()
                        ));
                    }
                    info!(webapp = name, elapsed_ms = started.elapsed().as_millis() as u64, "built web application");
                    out.insert(name.clone(), dir);
                }
                Ok(out)
            })
            .await;
        built.as_ref().map_err(Clone::clone)
    }

    /// Starts building the web applications now, so the first Tomcat Pod does not wait.
    pub fn prebuild_webapps(self: &Arc<Self>) {
        let ctx = self.clone();
        tokio::spawn(async move {
            if let Err(e) = ctx.webapps().await {
                tracing::error!("{e}");
            }
        });
    }
}
