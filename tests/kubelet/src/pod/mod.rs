//! One worker task per Pod: sets up its network and volumes, runs its init
//! containers and containers as process groups, probes them, restarts them
//! by the restart policy, writes the Pod status, and stops everything when
//! the Pod is deleted (preStop, SIGTERM, grace period, SIGKILL, then the Pod
//! object is deleted with grace 0 and a UID precondition, as a kubelet does).
//!
//! Everything that can fail because of the Pod (unknown image, missing
//! ConfigMap, bad command) becomes a waiting reason in the Pod status and is
//! retried; nothing here takes the kubelet down.

pub mod env;
pub mod probe;
pub mod status;
pub mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::context::Context;
use crate::enter::{BindMount, EnterSpec};
use crate::images::{ImageEntry, ImageKind};
use crate::network::PodNetwork;
use crate::node::now_time;
use crate::proxy::PodEndpoint;
use env::{ApiObjects, PodFacts};
use probe::{Action, ActionTarget};
use volumes::Volumes;

/// Messages to a Pod worker.
#[derive(Debug)]
pub enum PodEvent {
    /// A new version of the Pod object.
    Updated(Arc<Pod>),
    /// The Pod object is gone from the API (force deletion): stop at once.
    Removed,
    /// The kubelet stops: stop the containers, report them, keep the object.
    Shutdown,
    Exited {
        container: String,
        run: u64,
        exit: ExitInfo,
    },
    Probed {
        container: String,
        run: u64,
        kind: ProbeKind,
        result: Result<String, String>,
    },
    /// A liveness or startup failure kill finished.
    Killed {
        container: String,
        run: u64,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    pub code: i32,
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

#[derive(Debug, Clone)]
pub struct Terminated {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Time,
    pub finished_at: Time,
    pub container_id: String,
}

#[derive(Debug, Clone)]
pub enum ContainerState {
    Waiting { reason: String, message: Option<String> },
    Running { started_at: Time },
    Terminated(Terminated),
}

#[derive(Debug)]
struct ProbeTrack {
    probe: k8s_openapi::api::core::v1::Probe,
    next_due: Instant,
    in_flight: bool,
    successes: i32,
    failures: i32,
}

impl ProbeTrack {
    fn new(probe: &k8s_openapi::api::core::v1::Probe, started: Instant) -> ProbeTrack {
        ProbeTrack {
            probe: probe.clone(),
            next_due: started + Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64),
            in_flight: false,
            successes: 0,
            failures: 0,
        }
    }
    fn period(&self) -> Duration {
        Duration::from_secs(self.probe.period_seconds.unwrap_or(10).max(1) as u64)
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.probe.timeout_seconds.unwrap_or(1).max(1) as u64)
    }
    fn success_threshold(&self) -> i32 {
        self.probe.success_threshold.unwrap_or(1).max(1)
    }
    fn failure_threshold(&self) -> i32 {
        self.probe.failure_threshold.unwrap_or(3).max(1)
    }
}

/// One container (or init container) and the process that runs it.
#[derive(Debug)]
pub struct ContainerRun {
    pub spec: Container,
    pub is_init: bool,
    pub state: ContainerState,
    pub last_terminated: Option<Terminated>,
    pub restart_count: i32,
    pub ready: bool,
    pub started: bool,
    /// Bumped at every start; events of an older run are ignored.
    run: u64,
    pid: Option<i32>,
    exit_watch: Option<watch::Receiver<Option<ExitInfo>>>,
    /// When to (re)start; None = do not.
    start_at: Option<Instant>,
    backoff: Duration,
    running_since: Option<Instant>,
    /// A liveness/startup kill is under way.
    killing: bool,
    env: Vec<(String, String)>,
    probes: HashMap<ProbeKind, ProbeTrack>,
    /// Has been started at least once (restarts count from then).
    ever_started: bool,
}

impl ContainerRun {
    fn new(spec: &Container, is_init: bool) -> ContainerRun {
        ContainerRun {
            spec: spec.clone(),
            is_init,
            state: ContainerState::Waiting { reason: "ContainerCreating".into(), message: None },
            last_terminated: None,
            restart_count: 0,
            ready: false,
            started: false,
            run: 0,
            pid: None,
            exit_watch: None,
            start_at: None,
            backoff: Duration::ZERO,
            running_since: None,
            killing: false,
            env: Vec::new(),
            probes: HashMap::new(),
            ever_started: false,
        }
    }

    fn is_running(&self) -> bool {
        matches!(self.state, ContainerState::Running { .. })
    }

    fn succeeded(&self) -> bool {
        matches!(&self.state, ContainerState::Terminated(t) if t.exit_code == 0)
    }

    pub fn container_id(&self) -> Option<String> {
        if self.ever_started { Some(format!("process://{}-{}", self.spec.name, self.run)) } else { None }
    }
}

/// Handle the kubelet keeps for each Pod worker.
pub struct PodHandle {
    pub events: mpsc::UnboundedSender<PodEvent>,
    pub task: tokio::task::JoinHandle<()>,
}

pub fn spawn(ctx: Arc<Context>, pod: Arc<Pod>, done: mpsc::UnboundedSender<String>) -> PodHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let worker = PodWorker::new(ctx, pod, tx.clone(), rx);
    let task = tokio::spawn(async move {
        worker.run().await;
        let _ = done.send(uid);
    });
    PodHandle { events: tx, task }
}

pub struct PodWorker {
    ctx: Arc<Context>,
    pub pod: Arc<Pod>,
    /// `namespace/name`, for logs.
    pub key: String,
    uid: String,
    pub dir: PathBuf,
    events_tx: mpsc::UnboundedSender<PodEvent>,
    events: mpsc::UnboundedReceiver<PodEvent>,
    pub network: Option<PodNetwork>,
    /// The address a finished Pod had (still reported in its status).
    pub released_ip: Option<std::net::Ipv4Addr>,
    hostname: String,
    volumes: Option<Volumes>,
    pub init_containers: Vec<ContainerRun>,
    pub containers: Vec<ContainerRun>,
    pub start_time: Option<Time>,
    /// Why the Pod cannot start yet (shown on every waiting container).
    setup_problem: Option<(String, String)>,
    next_setup_try: Instant,
    pub condition_times: HashMap<&'static str, (bool, Time)>,
    /// Pod-level phase/reason/message set at the end (shutdown, failure).
    pub final_phase: Option<(String, String, String)>,
    last_status: Option<serde_json::Value>,
    /// Seen terminal in the API before we ran it: never run it.
    adopted_terminal: bool,
}

impl PodWorker {
    fn new(
        ctx: Arc<Context>,
        pod: Arc<Pod>,
        events_tx: mpsc::UnboundedSender<PodEvent>,
        events: mpsc::UnboundedReceiver<PodEvent>,
    ) -> PodWorker {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let hostname: String = spec.hostname.clone().unwrap_or_else(|| name.clone()).chars().take(63).collect();
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        PodWorker {
            key: format!("{namespace}/{name}"),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            dir: ctx.state_dir.join("pods").join(format!("{namespace}_{name}")),
            init_containers: spec.init_containers.iter().flatten().map(|c| ContainerRun::new(c, true)).collect(),
            containers: spec.containers.iter().map(|c| ContainerRun::new(c, false)).collect(),
            ctx,
            pod,
            events_tx,
            events,
            network: None,
            released_ip: None,
            hostname,
            volumes: None,
            start_time: None,
            setup_problem: None,
            next_setup_try: Instant::now(),
            condition_times: HashMap::new(),
            final_phase: None,
            last_status: None,
            adopted_terminal: phase == "Succeeded" || phase == "Failed",
        }
    }

    pub fn ctx_host_ip(&self) -> String {
        self.ctx.host_ip.to_string()
    }

    fn restart_policy(&self) -> String {
        self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into())
    }

    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    async fn run(mut self) {
        info!(pod = self.key, uid = self.uid, "pod worker started");
        if self.adopted_terminal {
            // Finished before this kubelet saw it: only its deletion is ours.
            self.wait_for_deletion_only().await;
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.deleting() {
                let grace = self.deletion_grace();
                self.terminate(grace, true).await;
                // Clean up before the object goes: a StatefulSet creates the
                // next Pod of the same name (same directory) right after,
                // and its worker must not see this one's files vanish.
                self.cleanup().await;
                self.delete_pod_object().await;
                info!(pod = self.key, "pod worker finished");
                return;
            }
            tokio::select! {
                event = self.events.recv() => match event {
                    None | Some(PodEvent::Removed) => {
                        info!(pod = self.key, "pod object removed; stopping its containers now");
                        self.terminate(Duration::ZERO, false).await;
                        break;
                    }
                    Some(PodEvent::Shutdown) => {
                        let grace = self.deletion_grace().min(self.ctx.shutdown_grace);
                        self.terminate(grace, true).await;
                        self.final_phase = Some((
                            "Failed".into(),
                            "Terminated".into(),
                            "Pod was terminated in response to the process kubelet shutting down.".into(),
                        ));
                        self.publish_status().await;
                        break;
                    }
                    Some(event) => self.handle(event).await,
                },
                _ = tick.tick() => self.drive().await,
            }
            self.publish_status().await;
        }
        self.cleanup().await;
        info!(pod = self.key, "pod worker finished");
    }

    async fn wait_for_deletion_only(&mut self) {
        loop {
            if self.deleting() {
                self.delete_pod_object().await;
                return;
            }
            match self.events.recv().await {
                Some(PodEvent::Updated(pod)) => self.pod = pod,
                None | Some(PodEvent::Removed) | Some(PodEvent::Shutdown) => return,
                Some(_) => {}
            }
        }
    }

    fn deletion_grace(&self) -> Duration {
        let seconds = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30);
        Duration::from_secs(seconds.max(0) as u64)
    }

    async fn handle(&mut self, event: PodEvent) {
        match event {
            PodEvent::Updated(pod) => self.pod = pod,
            PodEvent::Exited { container, run, exit } => self.on_exit(&container, run, exit),
            PodEvent::Probed { container, run, kind, result } => self.on_probe(&container, run, kind, result),
            PodEvent::Killed { container, run } => {
                if let Some(c) = self.find_mut(&container).filter(|c| c.run == run) {
                    c.killing = false;
                }
            }
            PodEvent::Removed | PodEvent::Shutdown => {}
        }
    }

    fn find_mut(&mut self, name: &str) -> Option<&mut ContainerRun> {
        self.init_containers.iter_mut().chain(self.containers.iter_mut()).find(|c| c.spec.name == name)
    }

    // --- setup --------------------------------------------------------------

    fn facts(&self) -> PodFacts<'_> {
        PodFacts {
            pod: &self.pod,
            pod_ip: self.network.as_ref().map(|n| n.ip.to_string()).unwrap_or_default(),
            host_ip: self.ctx.host_ip.to_string(),
            node_name: &self.ctx.node_name,
        }
    }

    /// Network, hosts file, volumes. Err = (reason, message) shown as waiting.
    async fn setup(&mut self) -> Result<(), (String, String)> {
        if self.network.is_none() {
            let fresh_pod = !self.dir.join("uid").exists()
                || std::fs::read_to_string(self.dir.join("uid")).ok().as_deref() != Some(self.uid.as_str());
            if fresh_pod {
                // An earlier Pod of the same name: its logs and files go.
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| ("CreateContainerError".into(), format!("creating {}: {e}", self.dir.display())))?;
            let _ = std::fs::write(self.dir.join("uid"), &self.uid);
            let net = self
                .ctx
                .network
                .create_pod_network()
                .await
                .map_err(|e| ("NetworkNotReady".to_string(), format!("{e:#}")))?;
            info!(pod = self.key, ip = %net.ip, netns = net.netns, "pod network ready");
            self.network = Some(net);
            self.start_time.get_or_insert_with(now_time);
        }
        let ip = self.network.as_ref().map(|n| n.ip.to_string()).unwrap_or_default();
        let spec = self.pod.spec.clone().unwrap_or_default();
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let mut names = self.hostname.clone();
        if let Some(subdomain) = spec.subdomain.as_deref().filter(|s| !s.is_empty()) {
            names = format!("{h}.{subdomain}.{namespace}.svc.cluster.local\t{h}", h = self.hostname);
        }
        let mut hosts = format!(
            "# Kubernetes-managed hosts file (clusterapp process kubelet).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{names}\n"
        );
        for alias in spec.host_aliases.iter().flatten() {
            hosts.push_str(&format!("{}\t{}\n", alias.ip, alias.hostnames.clone().unwrap_or_default().join("\t")));
        }
        let io_err = |what: &str, e: std::io::Error| ("CreateContainerError".to_string(), format!("{what}: {e}"));
        std::fs::write(self.dir.join("etc-hosts"), hosts).map_err(|e| io_err("writing hosts file", e))?;
        std::fs::write(self.dir.join("etc-hostname"), format!("{}\n", self.hostname))
            .map_err(|e| io_err("writing hostname file", e))?;
        if self.volumes.is_none() {
            let mut objects = ApiObjects::new(&self.ctx.client, &namespace);
            let facts = self.facts();
            let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group).and_then(|g| u32::try_from(g).ok());
            let volumes = volumes::materialize(
                &self.ctx.client,
                &mut objects,
                &facts,
                &self.dir,
                (&self.ctx.node_cpu, &self.ctx.node_memory),
                fs_group,
            )
            .await
            .map_err(|m| ("ContainerCreating".to_string(), format!("MountVolume.SetUp failed: {m}")))?;
            self.volumes = Some(volumes);
        }
        self.publish_endpoint();
        Ok(())
    }

    fn named_ports(&self) -> BTreeMap<String, u16> {
        self.pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
            .collect()
    }

    /// Tells the service proxy about this Pod's address and readiness.
    fn publish_endpoint(&self) {
        let Some(net) = &self.network else { return };
        let ready =
            !self.containers.is_empty() && self.containers.iter().all(|c| c.ready) && self.final_phase.is_none();
        let endpoint = PodEndpoint {
            namespace: self.pod.metadata.namespace.clone().unwrap_or_default(),
            labels: self.pod.metadata.labels.clone().unwrap_or_default(),
            ip: net.ip,
            ready,
            named_ports: self.named_ports(),
        };
        self.ctx.registry.write().unwrap_or_else(|p| p.into_inner()).insert(self.uid.clone(), endpoint);
    }

    // --- the control loop ---------------------------------------------------

    async fn drive(&mut self) {
        if self.final_phase.is_some() || self.pod_finished() {
            return;
        }
        if self.volumes.is_none() || self.network.is_none() {
            if Instant::now() < self.next_setup_try {
                return;
            }
            match self.setup().await {
                Ok(()) => {
                    self.setup_problem = None;
                    let now = Instant::now();
                    for c in self.init_containers.iter_mut().chain(self.containers.iter_mut()) {
                        c.start_at = Some(now);
                    }
                }
                Err((reason, message)) => {
                    if self.setup_problem.as_ref().map(|p| &p.1) != Some(&message) {
                        warn!(pod = self.key, reason, "pod setup: {message}");
                    }
                    for c in self.init_containers.iter_mut().chain(self.containers.iter_mut()) {
                        c.state = ContainerState::Waiting { reason: reason.clone(), message: Some(message.clone()) };
                    }
                    self.setup_problem = Some((reason, message));
                    self.next_setup_try = Instant::now() + Duration::from_secs(1);
                    return;
                }
            }
        }
        self.refresh_tokens().await;
        self.resync_volumes().await;

        // Init containers in order; the next starts when the previous succeeded.
        if let Some(index) = self.init_containers.iter().position(|c| !c.succeeded()) {
            self.maybe_start(true, index).await;
            return;
        }
        for index in 0..self.containers.len() {
            self.maybe_start(false, index).await;
        }
        self.launch_due_probes();
        if self.pod_finished() {
            info!(pod = self.key, "all containers finished; releasing the pod network");
            self.release_runtime().await;
        }
        self.publish_endpoint();
    }

    async fn refresh_tokens(&mut self) {
        let Some(volumes) = self.volumes.as_mut() else { return };
        if let Err(e) = volumes::refresh_tokens(&self.ctx.client, &self.pod, volumes).await {
            warn!(pod = self.key, "refreshing a ServiceAccount token: {e}");
        }
    }

    /// Every `--volume-sync-period` while a container runs: ConfigMap and
    /// Secret volume files follow their objects (only changed files are
    /// rewritten).
    async fn resync_volumes(&mut self) {
        if !self.containers.iter().chain(self.init_containers.iter()).any(|c| c.pid.is_some()) {
            return;
        }
        let period = self.ctx.volume_sync_period;
        let Some(volumes) = self.volumes.as_mut() else { return };
        if volumes.synced.is_empty() || period.is_zero() {
            return;
        }
        let now = Instant::now();
        match volumes.next_resync {
            None => {
                volumes.next_resync = Some(now + period);
                return;
            }
            Some(due) if due > now => return,
            Some(_) => {}
        }
        volumes.next_resync = Some(now + period);
        match volumes::resync(&self.ctx.client, &self.pod, volumes).await {
            Ok(0) => {}
            Ok(n) => info!(pod = self.key, files = n, "volume files updated"),
            Err(e) => warn!(pod = self.key, "re-syncing ConfigMap/Secret volumes: {e}"),
        }
    }

    /// Phase Succeeded/Failed reached and nothing will restart.
    fn pod_finished(&self) -> bool {
        let init_failed = self
            .init_containers
            .iter()
            .any(|c| matches!(&c.state, ContainerState::Terminated(t) if t.exit_code != 0) && c.start_at.is_none());
        let all_done = !self.containers.is_empty()
            && self.containers.iter().all(|c| matches!(c.state, ContainerState::Terminated(_)) && c.start_at.is_none());
        init_failed || all_done
    }

    async fn maybe_start(&mut self, init: bool, index: usize) {
        let now = Instant::now();
        let c = if init { &self.init_containers[index] } else { &self.containers[index] };
        if c.pid.is_some() || c.start_at.is_none_or(|t| t > now) {
            return;
        }
        let name = c.spec.name.clone();
        match self.start_container(init, index).await {
            Ok(()) => {}
            Err((reason, message)) => {
                warn!(pod = self.key, container = name, reason, "cannot start container: {message}");
                let backoff = self.ctx.restart_backoff;
                let c = if init { &mut self.init_containers[index] } else { &mut self.containers[index] };
                c.state = ContainerState::Waiting { reason, message: Some(message) };
                c.start_at = Some(Instant::now() + backoff.max(Duration::from_secs(2)));
            }
        }
    }

    // --- starting a container -------------------------------------------------

    async fn start_container(&mut self, init: bool, index: usize) -> Result<(), (String, String)> {
        let spec = if init { self.init_containers[index].spec.clone() } else { self.containers[index].spec.clone() };
        let image = spec.image.clone().unwrap_or_default();
        let entry: ImageEntry = self.ctx.images.lookup(&image).cloned().ok_or_else(|| {
            (
                "ErrImagePull".to_string(),
                format!(
                    "image {image:?} is not in the process kubelet's image map ({}/images.yaml); nothing to run",
                    self.ctx.images.base_dir.display()
                ),
            )
        })?;
        let pod_ip =
            self.network.as_ref().map(|n| n.ip).ok_or(("NetworkNotReady".to_string(), "no pod network".to_string()))?;

        // Environment: image ENV < kubelet-provided < envFrom < env.
        let mut base: Vec<(String, String)> = Vec::new();
        base.push(("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
        base.push(("HOME".into(), "/root".into()));
        for (k, v) in &entry.env {
            base.push((k.clone(), v.clone()));
        }
        base.push(("HOSTNAME".into(), self.hostname.clone()));
        let svc = self.ctx.network.service_ip;
        for (k, v) in [
            ("KUBERNETES_SERVICE_HOST", svc.to_string()),
            ("KUBERNETES_SERVICE_PORT", "443".into()),
            ("KUBERNETES_SERVICE_PORT_HTTPS", "443".into()),
            ("KUBERNETES_PORT", format!("tcp://{svc}:443")),
            ("KUBERNETES_PORT_443_TCP", format!("tcp://{svc}:443")),
            ("KUBERNETES_PORT_443_TCP_PROTO", "tcp".into()),
            ("KUBERNETES_PORT_443_TCP_PORT", "443".into()),
            ("KUBERNETES_PORT_443_TCP_ADDR", svc.to_string()),
        ] {
            base.push((k.into(), v));
        }
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let mut objects = ApiObjects::new(&self.ctx.client, &namespace);
        let env =
            env::container_env(&mut objects, &self.facts(), &spec, &base, &self.ctx.node_cpu, &self.ctx.node_memory)
                .await
                .map_err(|m| ("CreateContainerConfigError".to_string(), m))?;
        let vars: HashMap<String, String> = env.iter().cloned().collect();

        // argv: command replaces ENTRYPOINT, args replace CMD (Docker's rule).
        let mut argv: Vec<String> = match (&spec.command, &spec.args) {
            (Some(cmd), args) if !cmd.is_empty() => {
                cmd.iter().chain(args.iter().flatten()).map(|a| env::expand(a, &vars)).collect()
            }
            (_, Some(args)) if !args.is_empty() => {
                entry.entrypoint.iter().cloned().chain(args.iter().map(|a| env::expand(a, &vars))).collect()
            }
            _ => entry.entrypoint.iter().chain(entry.cmd.iter()).cloned().collect(),
        };
        if entry.kind == ImageKind::Clusterapp {
            let binary = self.ctx.clusterapp_bin.to_string_lossy().into_owned();
            match argv.first() {
                Some(first) if Path::new(first).file_name().is_some_and(|n| n == "clusterapp") => argv[0] = binary,
                _ => argv.insert(0, binary),
            }
        }
        if argv.is_empty() {
            return Err(("CreateContainerError".into(), "no command: the container and its image define none".into()));
        }

        // Mounts: hosts files, the image's own folders, then volume mounts
        // (parents before children, so e.g. a subPath file lands inside a folder).
        let mut mounts: Vec<BindMount> = Vec::new();
        let volume_mounts = spec.volume_mounts.clone().unwrap_or_default();
        for (file, target) in [("etc-hosts", "/etc/hosts"), ("etc-hostname", "/etc/hostname")] {
            if !volume_mounts.iter().any(|m| m.mount_path == target) {
                mounts.push(BindMount { source: self.dir.join(file), target: target.into(), read_only: false });
            }
        }
        if entry.kind == ImageKind::Tomcat {
            let base_dir = self.prepare_catalina_base(&spec.name, &entry).await?;
            mounts.push(BindMount { source: base_dir, target: "/usr/local/tomcat".into(), read_only: false });
        }
        let volumes =
            self.volumes.as_ref().ok_or(("ContainerCreating".to_string(), "volumes not ready".to_string()))?;
        let mut volume_binds: Vec<BindMount> = Vec::new();
        for m in &volume_mounts {
            let source = volumes.paths.get(&m.name).ok_or_else(|| {
                ("CreateContainerConfigError".to_string(), format!("volumeMount {:?}: no volume of that name", m.name))
            })?;
            let sub_path = match (&m.sub_path, &m.sub_path_expr) {
                (Some(p), _) if !p.is_empty() => Some(p.clone()),
                (_, Some(expr)) if !expr.is_empty() => Some(env::expand(expr, &vars)),
                _ => None,
            };
            let source = match sub_path {
                Some(p) if Path::new(&p).components().all(|c| matches!(c, std::path::Component::Normal(_))) => {
                    let full = source.join(&p);
                    if !full.exists() {
                        // Kubernetes creates a missing subPath as a folder.
                        std::fs::create_dir_all(&full)
                            .map_err(|e| ("CreateContainerError".to_string(), format!("subPath {p:?}: {e}")))?;
                    }
                    full
                }
                Some(p) => return Err(("CreateContainerConfigError".into(), format!("invalid subPath {p:?}"))),
                None => source.clone(),
            };
            volume_binds.push(BindMount {
                source,
                target: PathBuf::from(&m.mount_path),
                read_only: m.read_only.unwrap_or(false),
            });
        }
        volume_binds.sort_by_key(|b| b.target.components().count());
        mounts.extend(volume_binds);

        let security = spec.security_context.as_ref();
        let pod_security = self.pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        let run_as_user = security.and_then(|s| s.run_as_user).or_else(|| pod_security.and_then(|s| s.run_as_user));
        let run_as_group = security.and_then(|s| s.run_as_group).or_else(|| pod_security.and_then(|s| s.run_as_group));
        let run_as_non_root = security
            .and_then(|s| s.run_as_non_root)
            .or_else(|| pod_security.and_then(|s| s.run_as_non_root))
            .unwrap_or(false);
        if run_as_non_root && run_as_user.unwrap_or(0) == 0 {
            // Our local programs have no image USER, so root it would be.
            return Err((
                "CreateContainerConfigError".into(),
                "container has runAsNonRoot and image will run as root".into(),
            ));
        }
        let to_id = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
        let supplemental_groups: Vec<u32> = pod_security
            .and_then(|s| s.fs_group)
            .into_iter()
            .chain(pod_security.and_then(|s| s.supplemental_groups.clone()).into_iter().flatten())
            .filter_map(|g| u32::try_from(g).ok())
            .collect();
        let enter_spec = EnterSpec {
            hostname: self.hostname.clone(),
            mounts,
            stash_dir: self.dir.join("stash").join(&spec.name),
            pod_dir: self.dir.clone(),
            run_as_user: to_id(run_as_user),
            run_as_group: to_id(run_as_group),
            supplemental_groups,
            working_dir: spec.working_dir.clone().filter(|w| !w.is_empty()),
        };
        let spec_file = self.dir.join(format!("{}.enter.json", spec.name));
        let text = serde_json::to_string_pretty(&enter_spec)
            .map_err(|e| ("CreateContainerError".to_string(), e.to_string()))?;
        std::fs::write(&spec_file, text)
            .map_err(|e| ("CreateContainerError".to_string(), format!("writing {}: {e}", spec_file.display())))?;

        let log_path = self.dir.join(format!("{}.log", spec.name));
        let open_log = || std::fs::OpenOptions::new().create(true).append(true).open(&log_path);
        let stdout = open_log()
            .map_err(|e| ("CreateContainerError".to_string(), format!("opening {}: {e}", log_path.display())))?;
        let stderr = stdout.try_clone().map_err(|e| ("CreateContainerError".to_string(), e.to_string()))?;
        let netns = self.network.as_ref().map(|n| n.netns.clone()).unwrap_or_default();
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &netns, "unshare", "--mount", "--uts", "--propagation", "private"])
            .arg(&self.ctx.self_exe)
            .arg("enter")
            .arg("--spec")
            .arg(&spec_file)
            .arg("--")
            .args(&argv)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            // Its own process group, so SIGTERM/SIGKILL reach every process of it.
            .process_group(0);
        // `ip` is looked up with the container's PATH after env_clear; make
        // sure the root tools are found whatever the container's PATH says.
        command.env("PATH", vars.get("PATH").cloned().unwrap_or_default() + ":/usr/sbin:/usr/bin:/sbin:/bin");
        let mut child = command.spawn().map_err(|e| ("StartError".to_string(), format!("starting {argv:?}: {e}")))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or(("StartError".to_string(), "process exited at once".to_string()))?;

        let c = if init { &mut self.init_containers[index] } else { &mut self.containers[index] };
        if c.ever_started {
            c.restart_count += 1;
        }
        c.ever_started = true;
        c.run += 1;
        let run = c.run;
        c.pid = Some(pid);
        c.env = env;
        c.state = ContainerState::Running { started_at: now_time() };
        c.start_at = None;
        c.running_since = Some(Instant::now());
        c.ready = false;
        c.started = false;
        c.killing = false;
        c.probes.clear();
        let started = Instant::now();
        if let Some(p) = &c.spec.startup_probe {
            c.probes.insert(ProbeKind::Startup, ProbeTrack::new(p, started));
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        c.exit_watch = Some(exit_rx);
        info!(pod = self.key, container = spec.name, pid, pod_ip = %pod_ip, argv = ?argv, "container started");

        let events = self.events_tx.clone();
        let name = spec.name.clone();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    ExitInfo {
                        code: status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                        signal: status.signal(),
                    }
                }
                Err(_) => ExitInfo { code: 128, signal: None },
            };
            // Leftovers of the group (children of a shell, say) go with it.
            // SAFETY: plain syscall on the group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = exit_tx.send(Some(exit));
            let _ = events.send(PodEvent::Exited { container: name, run, exit });
        });
        Ok(())
    }

    /// A fresh CATALINA_BASE per start (a container restart gets a fresh
    /// writable layer): conf/ from Debian's /etc/tomcat10, logs/, temp/,
    /// work/, and the image's web applications.
    async fn prepare_catalina_base(&self, container: &str, entry: &ImageEntry) -> Result<PathBuf, (String, String)> {
        let err = |m: String| ("CreateContainerError".to_string(), m);
        let base = self.dir.join("tomcat").join(container);
        let _ = std::fs::remove_dir_all(&base);
        for sub in ["logs", "temp", "work", "webapps"] {
            std::fs::create_dir_all(base.join(sub)).map_err(|e| err(format!("creating CATALINA_BASE: {e}")))?;
        }
        copy_tree(&self.ctx.tomcat_conf, &base.join("conf"))
            .map_err(|e| err(format!("copying {}: {e}", self.ctx.tomcat_conf.display())))?;
        let lib = base.join("lib");
        std::fs::create_dir_all(&lib).map_err(|e| err(e.to_string()))?;
        if !entry.webapps.is_empty() {
            let built = self.ctx.webapps().await.map_err(|m| ("ErrImagePull".to_string(), m))?;
            for name in entry.webapps.keys() {
                if let Some(dir) = built.get(name) {
                    copy_tree(dir, &base.join("webapps").join(name))
                        .map_err(|e| err(format!("copying webapp {name}: {e}")))?;
                }
            }
        }
        Ok(base)
    }

    // --- exits, probes, restarts --------------------------------------------

    fn on_exit(&mut self, name: &str, run: u64, exit: ExitInfo) {
        let policy = self.restart_policy();
        let key = self.key.clone();
        let backoff_base = self.ctx.restart_backoff;
        let backoff_max = self.ctx.restart_backoff_max;
        let deleting = self.deleting();
        let Some(c) = self.find_mut(name).filter(|c| c.run == run) else { return };
        let started_at = match &c.state {
            ContainerState::Running { started_at } => started_at.clone(),
            _ => now_time(),
        };
        let reason = if exit.code == 0 { "Completed" } else { "Error" };
        info!(pod = key, container = name, code = exit.code, signal = ?exit.signal, "container exited");
        let terminated = Terminated {
            exit_code: exit.code,
            signal: exit.signal,
            reason: reason.into(),
            message: None,
            started_at,
            finished_at: now_time(),
            container_id: c.container_id().unwrap_or_default(),
        };
        c.pid = None;
        c.ready = false;
        c.started = false;
        c.killing = false;
        c.probes.clear();
        let ran_long = c.running_since.is_some_and(|s| s.elapsed() > Duration::from_secs(600));
        c.running_since = None;
        let restart = !deleting
            && match (c.is_init, policy.as_str()) {
                (true, "Never") => false,
                (true, _) => exit.code != 0,
                (false, "Always") => true,
                (false, "OnFailure") => exit.code != 0,
                _ => false,
            };
        if !restart {
            c.state = ContainerState::Terminated(terminated);
            return;
        }
        // Crash-loop back-off: first restart at once, then base, 2×base … max;
        // reset after ten minutes of running.
        if ran_long {
            c.backoff = Duration::ZERO;
        }
        let delay = c.backoff;
        c.backoff = if delay.is_zero() { backoff_base } else { (delay * 2).min(backoff_max) };
        c.last_terminated = Some(terminated.clone());
        c.state = if delay.is_zero() {
            ContainerState::Terminated(terminated)
        } else {
            ContainerState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(format!(
                    "back-off {}s restarting failed container={} pod={}",
                    delay.as_secs(),
                    name,
                    key.rsplit('/').next().unwrap_or("")
                )),
            }
        };
        c.start_at = Some(Instant::now() + delay);
    }

    fn launch_due_probes(&mut self) {
        let Some(pod_ip) = self.network.as_ref().map(|n| n.ip) else { return };
        let named_ports = self.named_ports();
        let now = Instant::now();
        for c in &mut self.containers {
            let (Some(pid), Some(since)) = (c.pid, c.running_since) else { continue };
            if c.killing {
                continue;
            }
            if c.spec.startup_probe.is_none() && !c.started {
                c.started = true;
            }
            if c.started {
                if let Some(p) = &c.spec.liveness_probe {
                    c.probes.entry(ProbeKind::Liveness).or_insert_with(|| ProbeTrack::new(p, since));
                }
                if let Some(p) = &c.spec.readiness_probe {
                    c.probes.entry(ProbeKind::Readiness).or_insert_with(|| ProbeTrack::new(p, since));
                } else {
                    c.ready = true;
                }
            }
            for (kind, track) in c.probes.iter_mut() {
                if track.in_flight || track.next_due > now {
                    continue;
                }
                if *kind == ProbeKind::Startup && c.started {
                    continue;
                }
                track.in_flight = true;
                let action = Action::of_probe(&track.probe);
                let target = ActionTarget { pod_ip, pid, env: c.env.clone(), named_ports: named_ports.clone() };
                let timeout = track.timeout();
                let events = self.events_tx.clone();
                let (container, run, kind) = (c.spec.name.clone(), c.run, *kind);
                tokio::spawn(async move {
                    let result = probe::run(&action, &target, timeout).await;
                    let _ = events.send(PodEvent::Probed { container, run, kind, result });
                });
            }
        }
    }

    fn on_probe(&mut self, name: &str, run: u64, kind: ProbeKind, result: Result<String, String>) {
        let key = self.key.clone();
        let grace = self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
        let events = self.events_tx.clone();
        let pod_ip = self.network.as_ref().map(|n| n.ip);
        let named_ports = self.named_ports();
        let Some(c) = self.find_mut(name).filter(|c| c.run == run) else { return };
        let Some(track) = c.probes.get_mut(&kind) else { return };
        track.in_flight = false;
        track.next_due = Instant::now() + track.period();
        let ok = result.is_ok();
        if ok {
            track.successes += 1;
            track.failures = 0;
        } else {
            track.failures += 1;
            track.successes = 0;
        }
        let (successes, failures) = (track.successes, track.failures);
        let (success_threshold, failure_threshold) = (track.success_threshold(), track.failure_threshold());
        match &result {
            Ok(m) => debug!(pod = key, container = name, ?kind, "probe succeeded: {m}"),
            Err(m) => info!(pod = key, container = name, ?kind, failures, "probe failed: {m}"),
        }
        match kind {
            ProbeKind::Readiness => {
                if ok && successes >= success_threshold {
                    c.ready = true;
                } else if !ok && failures >= failure_threshold {
                    c.ready = false;
                }
            }
            ProbeKind::Startup if ok => c.started = true,
            ProbeKind::Startup | ProbeKind::Liveness => {
                if !ok && failures >= failure_threshold && !c.killing {
                    warn!(
                        pod = key,
                        container = name,
                        ?kind,
                        "probe failed {failures} times; killing the container to restart it"
                    );
                    c.killing = true;
                    c.ready = false;
                    let stop = StopRequest {
                        pid: c.pid,
                        exit: c.exit_watch.clone(),
                        pre_stop: c.spec.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).map(Action::of_hook),
                        target: pod_ip.zip(c.pid).map(|(ip, pid)| ActionTarget {
                            pod_ip: ip,
                            pid,
                            env: c.env.clone(),
                            named_ports,
                        }),
                        grace: Duration::from_secs(grace.max(0) as u64),
                        pod: key,
                        container: name.to_string(),
                    };
                    let (container, run) = (name.to_string(), run);
                    tokio::spawn(async move {
                        stop.run().await;
                        let _ = events.send(PodEvent::Killed { container, run });
                    });
                }
            }
        }
    }

    // --- stopping -------------------------------------------------------------

    /// Stops every running container: preStop (when `run_pre_stop`), SIGTERM,
    /// up to `grace`, SIGKILL. A Removed event on the way kills at once.
    async fn terminate(&mut self, grace: Duration, run_pre_stop: bool) {
        let pod_ip = self.network.as_ref().map(|n| n.ip);
        let named_ports = self.named_ports();
        let mut stops = Vec::new();
        for c in self.init_containers.iter_mut().chain(self.containers.iter_mut()) {
            c.start_at = None;
            c.ready = false;
            let Some(pid) = c.pid else {
                if matches!(c.state, ContainerState::Waiting { .. }) && c.last_terminated.is_some() {
                    // In back-off: it is not running and will not run.
                    if let Some(t) = c.last_terminated.clone() {
                        c.state = ContainerState::Terminated(t);
                    }
                }
                continue;
            };
            stops.push(StopRequest {
                pid: Some(pid),
                exit: c.exit_watch.clone(),
                pre_stop: if run_pre_stop {
                    c.spec.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).map(Action::of_hook)
                } else {
                    None
                },
                target: pod_ip.map(|ip| ActionTarget {
                    pod_ip: ip,
                    pid,
                    env: c.env.clone(),
                    named_ports: named_ports.clone(),
                }),
                grace,
                pod: self.key.clone(),
                container: c.spec.name.clone(),
            });
        }
        if !stops.is_empty() {
            info!(pod = self.key, grace_s = grace.as_secs(), containers = stops.len(), "stopping containers");
            self.publish_endpoint();
            let pids: Vec<i32> = stops.iter().filter_map(|s| s.pid).collect();
            let all = futures::future::join_all(stops.into_iter().map(StopRequest::run));
            tokio::pin!(all);
            loop {
                tokio::select! {
                    _ = &mut all => break,
                    event = self.events.recv() => match event {
                        None | Some(PodEvent::Removed) => {
                            for pid in &pids {
                                // SAFETY: plain syscall on groups we created.
                                unsafe { libc::kill(-pid, libc::SIGKILL) };
                            }
                        }
                        Some(PodEvent::Updated(pod)) => self.pod = pod,
                        Some(PodEvent::Exited { container, run, exit }) => self.on_exit(&container, run, exit),
                        Some(_) => {}
                    }
                }
            }
        }
        // Collect the exits that arrived meanwhile.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.init_containers.iter().chain(self.containers.iter()).any(|c| c.pid.is_some())
            && Instant::now() < deadline
        {
            match tokio::time::timeout(Duration::from_millis(100), self.events.recv()).await {
                Ok(Some(PodEvent::Exited { container, run, exit })) => self.on_exit(&container, run, exit),
                Ok(Some(PodEvent::Updated(pod))) => self.pod = pod,
                Ok(None) => break,
                _ => {}
            }
        }
        for c in self.init_containers.iter_mut().chain(self.containers.iter_mut()) {
            c.start_at = None;
            if let ContainerState::Waiting { .. } = c.state
                && !c.ever_started
            {
                // Never ran: Kubernetes reports it terminated with ContainerStatusUnknown-like data.
                c.state = ContainerState::Terminated(Terminated {
                    exit_code: 137,
                    signal: None,
                    reason: "ContainerStatusUnknown".into(),
                    message: Some("The container could not be located when the pod was terminated".into()),
                    started_at: now_time(),
                    finished_at: now_time(),
                    container_id: String::new(),
                });
            }
        }
        self.publish_status().await;
    }

    /// The last step of a graceful deletion: remove the object for good.
    async fn delete_pod_object(&self) {
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(self.uid.clone()), resource_version: None }),
            ..DeleteParams::default()
        };
        match pods.delete(&name, &params).await {
            Ok(_) => info!(pod = self.key, "pod object deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                debug!(pod = self.key, "pod object already gone")
            }
            Err(e) => error!(pod = self.key, "deleting the pod object: {e}"),
        }
    }

    /// Network namespace and endpoint of a Pod whose processes are gone.
    async fn release_runtime(&mut self) {
        self.ctx.registry.write().unwrap_or_else(|p| p.into_inner()).remove(&self.uid);
        if let Some(net) = self.network.take() {
            kill_leftovers_in(&net.netns).await;
            self.ctx.network.delete_pod_network(&net).await;
            // Keep reporting the address the Pod had.
            self.released_ip = Some(net.ip);
        }
    }

    async fn cleanup(&mut self) {
        self.release_runtime().await;
        // Keep the logs (tests and people read them); drop the rest — unless
        // a newer Pod of the same name owns the directory by now.
        if std::fs::read_to_string(self.dir.join("uid")).ok().as_deref() != Some(self.uid.as_str()) {
            return;
        }
        for sub in ["volumes", "tomcat", "stash"] {
            let _ = std::fs::remove_dir_all(self.dir.join(sub));
        }
    }

    async fn publish_status(&mut self) {
        let body = status::pod_status(self);
        if self.last_status.as_ref() == Some(&body) {
            return;
        }
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let patch = serde_json::json!({ "status": body });
        match pods.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch)).await {
            Ok(_) => self.last_status = Some(body),
            Err(kube::Error::Api(e)) if e.code == 404 => self.last_status = Some(body),
            Err(e) => warn!(pod = self.key, "updating pod status: {e}"),
        }
    }
}

/// Stopping one container's process group.
struct StopRequest {
    pid: Option<i32>,
    exit: Option<watch::Receiver<Option<ExitInfo>>>,
    pre_stop: Option<Action>,
    target: Option<ActionTarget>,
    grace: Duration,
    pod: String,
    container: String,
}

impl StopRequest {
    async fn run(self) {
        let Some(pid) = self.pid else { return };
        let deadline = Instant::now() + self.grace;
        if let (Some(action), Some(target)) = (&self.pre_stop, &self.target) {
            info!(pod = self.pod, container = self.container, "running preStop hook");
            match probe::run(action, target, self.grace).await {
                Ok(_) => debug!(pod = self.pod, container = self.container, "preStop hook done"),
                Err(e) => warn!(pod = self.pod, container = self.container, "preStop hook failed: {e}"),
            }
        }
        // SAFETY: plain syscalls on the process group we created.
        unsafe { libc::kill(-pid, libc::SIGTERM) };
        let mut exit = self.exit;
        let exited = |exit: &mut Option<watch::Receiver<Option<ExitInfo>>>| {
            let exit = exit.clone();
            async move {
                if let Some(mut rx) = exit {
                    let _ = rx.wait_for(Option::is_some).await;
                }
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(remaining, exited(&mut exit)).await.is_err() {
            warn!(pod = self.pod, container = self.container, "grace period over; sending SIGKILL");
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = tokio::time::timeout(Duration::from_secs(5), exited(&mut exit)).await;
        }
    }
}

/// Kills processes still inside a Pod's network namespace (ones that left
/// their process group). They can only be the Pod's.
async fn kill_leftovers_in(netns: &str) {
    if let Ok(pids) = crate::network::ip(&["netns", "pids", netns]).await {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            warn!(netns, pid, "killing a process left in the pod's network namespace");
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Copies a folder; the copies are readable by everyone, as an image's files
/// are (Debian's /etc/tomcat10 is 0640 root:tomcat, and Pods may run with
/// `runAsUser`).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            let resolved = std::fs::canonicalize(entry.path())?;
            if resolved.is_dir() {
                copy_tree(&resolved, &target)?
            } else {
                std::fs::copy(&resolved, &target)?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644))?;
            }
        } else {
            let mode = entry.metadata()?.permissions().mode();
            std::fs::copy(entry.path(), &target)?;
            std::fs::set_permissions(
                &target,
                std::fs::Permissions::from_mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 }),
            )?;
        }
    }
    Ok(())
}
