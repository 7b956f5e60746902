//! The kubelet's main loop: lock, network, Node, Pod watch, shutdown.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::RunArgs;
use crate::context::Context;
use crate::images::Images;
use crate::network::Network;
use crate::node::{self, NodeInfo};
use crate::pod::{self, PodEvent, PodHandle};
use crate::proxy;

async fn client_from(path: &Path) -> anyhow::Result<(Client, Config)> {
    let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok((Client::try_from(config.clone())?, config))
}

/// One kubelet per bridge on a machine: the bridge, the Pod network and the
/// `kubernetes` Service IP are machine-wide. A second one waits its turn
/// (test binaries run one after another, each with its own kubelet).
async fn lock_bridge(bridge: &str, timeout: Duration) -> anyhow::Result<File> {
    let path = format!("/run/lock/clusterapp-kubelet-{bridge}.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {path}"))?;
    let deadline = Instant::now() + timeout;
    let mut told = false;
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            return Ok(file);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "another clusterapp-kubelet holds {path} (pid {}) for longer than {timeout:?}",
                std::fs::read_to_string(&path).unwrap_or_default().trim()
            );
        }
        if !told {
            info!(
                lock = path,
                holder = std::fs::read_to_string(&path).unwrap_or_default().trim(),
                "waiting for another kubelet on this bridge to exit"
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Resolves when the kubelet should stop: SIGTERM, SIGINT, or the owner exited.
async fn stop_requested(owner_pid: Option<i32>) -> &'static str {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        error!("cannot install signal handlers");
        return "no signal handlers";
    };
    let owner_gone = async move {
        let Some(pid) = owner_pid else { return futures::future::pending().await };
        loop {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = owner_gone => "owner process exited",
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let state_dir = std::fs::canonicalize(&args.state_dir).unwrap_or(args.state_dir.clone()).join("kubelet");
    std::fs::create_dir_all(state_dir.join("pods")).with_context(|| format!("creating {}", state_dir.display()))?;
    let images = Images::load(&args.images)?;
    let (client, config) = client_from(&args.kubeconfig).await?;
    let admin = match &args.admin_kubeconfig {
        Some(path) => Some(client_from(path).await?.0),
        None => None,
    };
    let api_port = config.cluster_url.port_u16().unwrap_or(443);
    let api_host: IpAddr =
        config.cluster_url.host().and_then(|h| h.parse().ok()).unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let self_exe = std::env::current_exe().context("locating this binary")?;
    let clusterapp_bin = std::fs::canonicalize(&args.clusterapp_bin).unwrap_or(args.clusterapp_bin.clone());

    let _lock = lock_bridge(&args.bridge, args.lock_timeout).await?;
    let network = Arc::new(Network::new(&args.bridge, args.pod_network, args.service_ip)?);
    network.remove_leftovers().await?;
    network.create_bridge().await?;

    let ready_marker = state_dir.join("ready");
    let result = serve(
        &args,
        client.clone(),
        admin.as_ref(),
        network.clone(),
        state_dir,
        images,
        self_exe,
        clusterapp_bin,
        SocketAddr::new(api_host, api_port),
    )
    .await;

    // Whatever happened: nothing of ours stays behind.
    let _ = std::fs::remove_file(&ready_marker);
    network.remove_leftovers().await.unwrap_or_else(|e| warn!("final cleanup: {e:#}"));
    info!("network cleaned up; bye");
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    args: &RunArgs,
    client: Client,
    admin: Option<&Client>,
    network: Arc<Network>,
    state_dir: std::path::PathBuf,
    images: Images,
    self_exe: std::path::PathBuf,
    clusterapp_bin: std::path::PathBuf,
    api_server: SocketAddr,
) -> anyhow::Result<()> {
    let api_listener = TcpListener::bind((args.service_ip, 443))
        .await
        .with_context(|| format!("listening on {}:443", args.service_ip))?;
    let forwarder = tokio::spawn(proxy::forward_to_fixed(api_listener, api_server));
    info!(from = %format!("{}:443", args.service_ip), to = %api_server, "API server forwarder up");

    let info = NodeInfo {
        name: args.node_name.clone(),
        internal_ip: network.gateway().to_string(),
        cpu: args.cpu.clone(),
        memory: args.memory.clone(),
        max_pods: args.max_pods,
    };
    let transition = node::register(&client, &info).await?;
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        NodeInfo {
            name: info.name.clone(),
            internal_ip: info.internal_ip.clone(),
            cpu: info.cpu.clone(),
            memory: info.memory.clone(),
            max_pods: info.max_pods,
        },
        transition.clone(),
    ));

    let registry: proxy::EndpointRegistry = Arc::new(RwLock::new(HashMap::new()));
    let ctx = Arc::new(Context::new(
        client.clone(),
        args.node_name.clone(),
        network.gateway(),
        state_dir,
        images,
        clusterapp_bin,
        self_exe,
        network.clone(),
        registry.clone(),
        args.restart_backoff,
        args.shutdown_grace,
        args.volume_sync_period,
        args.cpu.clone(),
        args.memory.clone(),
    ));
    ctx.prebuild_webapps();
    node::wait_schedulable(&client, &args.node_name, Duration::from_secs(15)).await;
    // Harnesses wait for this file: the Node is registered and Ready.
    let _ = std::fs::write(ctx.state_dir.join("ready"), format!("{}\n", std::process::id()));
    let service_proxy = tokio::spawn(proxy::run_service_proxy(client.clone(), network.clone(), registry));

    let reason = watch_pods(ctx.clone(), args.owner_pid).await;
    info!(reason, "stopping: pods first, then the node and the network");

    heartbeat.abort();
    service_proxy.abort();
    forwarder.abort();
    node::deregister(&client, admin, &info, &transition).await;
    Ok(())
}

/// Runs Pod workers for the Pods bound to this node until a stop is
/// requested; then stops them all and waits for them.
async fn watch_pods(ctx: Arc<Context>, owner_pid: Option<i32>) -> &'static str {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    // The Node authorizer only lets a node list/watch Pods with this selector.
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node_name));
    let mut stream = watcher(pods, config).boxed();
    let mut workers: HashMap<String, PodHandle> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let mut init_batch: Option<HashSet<String>> = None;
    let stop = stop_requested(owner_pid);
    tokio::pin!(stop);

    let reason = loop {
        tokio::select! {
            reason = &mut stop => break reason,
            Some(uid) = done_rx.recv() => { workers.remove(&uid); }
            event = stream.next() => {
                let Some(event) = event else { break "pod watch ended" };
                match event {
                    Ok(watcher::Event::Apply(pod)) => dispatch(&ctx, &mut workers, &done_tx, pod),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(seen), Some(uid)) = (init_batch.as_mut(), pod.metadata.uid.clone()) {
                            seen.insert(uid);
                        }
                        dispatch(&ctx, &mut workers, &done_tx, pod);
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(handle) = pod.metadata.uid.as_ref().and_then(|uid| workers.get(uid)) {
                            let _ = handle.events.send(PodEvent::Removed);
                        }
                    }
                    Ok(watcher::Event::Init) => init_batch = Some(HashSet::new()),
                    Ok(watcher::Event::InitDone) => {
                        // After a re-list: Pods that vanished meanwhile.
                        if let Some(seen) = init_batch.take() {
                            for (uid, handle) in &workers {
                                if !seen.contains(uid) {
                                    let _ = handle.events.send(PodEvent::Removed);
                                }
                            }
                        }
                    }
                    Err(e) => warn!("watching pods: {e}"),
                }
            }
        }
    };

    for handle in workers.values() {
        let _ = handle.events.send(PodEvent::Shutdown);
    }
    let deadline = ctx.shutdown_grace + Duration::from_secs(20);
    let waits = futures::future::join_all(workers.into_values().map(|h| h.task));
    if tokio::time::timeout(deadline, waits).await.is_err() {
        warn!("some pod workers did not finish in time; the network cleanup kills what is left");
    }
    reason
}

fn dispatch(
    ctx: &Arc<Context>,
    workers: &mut HashMap<String, PodHandle>,
    done: &mpsc::UnboundedSender<String>,
    pod: Pod,
) {
    let Some(uid) = pod.metadata.uid.clone() else { return };
    let pod = Arc::new(pod);
    if let Some(handle) = workers.get(&uid) {
        let _ = handle.events.send(PodEvent::Updated(pod));
        return;
    }
    info!(pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or("")), "new pod");
    workers.insert(uid, pod::spawn(ctx.clone(), pod, done.clone()));
}
