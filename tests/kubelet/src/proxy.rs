//! TCP forwarders: the `kubernetes` Service to the API server, and a tiny
//! kube-proxy for Services with a selector (their ClusterIP on the bridge,
//! and 127.0.0.1:<nodePort> for NodePort/LoadBalancer Services so the host
//! reaches them).
//!
//! Endpoints come from the Pods this kubelet runs (the registry below), not
//! from EndpointSlices: the node identity may not list EndpointSlices, and on
//! a one-node cluster every Pod is ours.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::network::Network;

/// What the service proxy needs to know about a running Pod.
#[derive(Debug, Clone)]
pub struct PodEndpoint {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    pub ready: bool,
    /// Named container ports, for Services whose targetPort is a name.
    pub named_ports: BTreeMap<String, u16>,
}

/// Pod UID → endpoint, written by the Pod workers.
pub type EndpointRegistry = Arc<RwLock<HashMap<String, PodEndpoint>>>;

/// Forwards connections accepted on `listener` to `target`; runs until cancelled.
pub async fn forward_to_fixed(listener: TcpListener, target: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((inbound, peer)) => {
                tokio::spawn(async move {
                    match TcpStream::connect(target).await {
                        Ok(outbound) => pipe(inbound, outbound).await,
                        Err(e) => debug!(%peer, %target, "forward connect failed: {e}"),
                    }
                });
            }
            Err(e) => {
                warn!("accept on the API server forwarder: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn pipe(mut a: TcpStream, mut b: TcpStream) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// Where one listener sends connections.
#[derive(Debug, Clone, PartialEq)]
struct Backend {
    namespace: String,
    selector: BTreeMap<String, String>,
    target_port: IntOrString,
}

struct Listener {
    backend: Arc<RwLock<Backend>>,
    task: JoinHandle<()>,
}

/// Watches Services and keeps one listener per (address, port) in use.
pub async fn run_service_proxy(client: Client, network: Arc<Network>, registry: EndpointRegistry) {
    let services: Api<Service> = Api::all(client);
    let mut stream = watcher(services, watcher::Config::default()).boxed();
    let mut known: HashMap<(String, String), Service> = HashMap::new();
    let mut init_batch: Option<HashMap<(String, String), Service>> = None;
    let mut listeners: HashMap<SocketAddr, Listener> = HashMap::new();
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Apply(svc)) => { known.insert(service_key(&svc), svc); }
                    Ok(watcher::Event::Delete(svc)) => { known.remove(&service_key(&svc)); }
                    Ok(watcher::Event::Init) => init_batch = Some(HashMap::new()),
                    Ok(watcher::Event::InitApply(svc)) => { if let Some(b) = init_batch.as_mut() { b.insert(service_key(&svc), svc); } }
                    Ok(watcher::Event::InitDone) => { if let Some(b) = init_batch.take() { known = b; } }
                    Err(e) => { warn!("watching Services: {e}"); continue; }
                }
            }
            _ = retry.tick() => {}
        }
        reconcile_listeners(&known, &mut listeners, &network, &registry).await;
    }
}

fn service_key(svc: &Service) -> (String, String) {
    (svc.metadata.namespace.clone().unwrap_or_default(), svc.metadata.name.clone().unwrap_or_default())
}

/// The listeners a set of Services asks for.
fn desired_listeners(services: &HashMap<(String, String), Service>, network: &Network) -> HashMap<SocketAddr, Backend> {
    let mut wanted = HashMap::new();
    for ((namespace, _), svc) in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(selector) = spec.selector.clone().filter(|s| !s.is_empty()) else { continue };
        let cluster_ip = spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let backend = Backend {
                namespace: namespace.clone(),
                selector: selector.clone(),
                target_port: port.target_port.clone().unwrap_or(IntOrString::Int(port.port)),
            };
            if let Some(ip) = cluster_ip
                && ip != network.service_ip
                && let Ok(p) = u16::try_from(port.port)
            {
                wanted.insert(SocketAddr::new(IpAddr::V4(ip), p), backend.clone());
            }
            if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                wanted.insert(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), node_port), backend);
            }
        }
    }
    wanted
}

async fn reconcile_listeners(
    services: &HashMap<(String, String), Service>,
    listeners: &mut HashMap<SocketAddr, Listener>,
    network: &Network,
    registry: &EndpointRegistry,
) {
    let wanted = desired_listeners(services, network);
    let gone: Vec<SocketAddr> = listeners.keys().filter(|a| !wanted.contains_key(a)).copied().collect();
    for addr in gone {
        if let Some(l) = listeners.remove(&addr) {
            l.task.abort();
            info!(%addr, "stopped a Service listener");
            if let IpAddr::V4(ip) = addr.ip()
                && !ip.is_loopback()
                && !listeners.keys().any(|a| a.ip() == addr.ip())
            {
                network.remove_service_address(ip).await;
            }
        }
    }
    for (addr, backend) in wanted {
        if let Some(existing) = listeners.get(&addr) {
            let mut current = existing.backend.write().unwrap_or_else(|p| p.into_inner());
            if *current != backend {
                *current = backend;
            }
            continue;
        }
        if let IpAddr::V4(ip) = addr.ip()
            && !ip.is_loopback()
            && let Err(e) = network.add_service_address(ip).await
        {
            warn!(%addr, "adding a Service IP to the bridge: {e:#}");
            continue;
        }
        match TcpListener::bind(addr).await {
            Ok(socket) => {
                info!(%addr, namespace = backend.namespace, "Service listener up");
                let backend = Arc::new(RwLock::new(backend));
                let task = tokio::spawn(serve_service(socket, backend.clone(), registry.clone()));
                listeners.insert(addr, Listener { backend, task });
            }
            Err(e) => warn!(%addr, "cannot listen for a Service (retrying): {e}"),
        }
    }
}

async fn serve_service(listener: TcpListener, backend: Arc<RwLock<Backend>>, registry: EndpointRegistry) {
    let next = AtomicUsize::new(0);
    loop {
        let (inbound, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("accept on a Service listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let targets = {
            let backend = backend.read().unwrap_or_else(|p| p.into_inner()).clone();
            let pods = registry.read().unwrap_or_else(|p| p.into_inner());
            ready_targets(&backend, pods.values())
        };
        if targets.is_empty() {
            debug!(%peer, "no ready endpoint; closing");
            continue;
        }
        let target = targets[next.fetch_add(1, Ordering::Relaxed) % targets.len()];
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target)).await {
                Ok(Ok(outbound)) => pipe(inbound, outbound).await,
                Ok(Err(e)) => debug!(%target, "Service connect failed: {e}"),
                Err(_) => debug!(%target, "Service connect timed out"),
            }
        });
    }
}

fn ready_targets<'a>(backend: &Backend, pods: impl Iterator<Item = &'a PodEndpoint>) -> Vec<SocketAddr> {
    let mut targets: Vec<SocketAddr> = pods
        .filter(|p| p.ready && p.namespace == backend.namespace)
        .filter(|p| backend.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .filter_map(|p| {
            let port = match &backend.target_port {
                IntOrString::Int(n) => u16::try_from(*n).ok()?,
                IntOrString::String(name) => match name.parse::<u16>() {
                    Ok(n) => n,
                    Err(_) => *p.named_ports.get(name)?,
                },
            };
            Some(SocketAddr::new(IpAddr::V4(p.ip), port))
        })
        .collect();
    targets.sort();
    targets
}
