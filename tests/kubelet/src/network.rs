//! Pod networking: one bridge in the root namespace, one network namespace
//! and veth pair per Pod.
//!
//! The bridge holds the gateway address (10.244.0.1/24) and the Service IPs
//! the kubelet answers on (the `kubernetes` Service 10.96.0.1, ClusterIPs of
//! Services with selectors). IP forwarding stays off: Pods reach each other
//! over the bridge, and reach the kubelet's forwarders as local addresses of
//! the root namespace — nothing is routed anywhere else.
//!
//! Every name we create starts with the bridge name (`cabr0-7` for a Pod's
//! namespace, `cabr0v7` for its host-side veth), so a kubelet that died
//! without cleaning up is cleaned up by the next one (see `remove_leftovers`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use anyhow::Context as _;
use tokio::process::Command;
use tracing::{info, warn};

pub struct Network {
    pub bridge: String,
    /// First three octets of the /24 Pod network; .1 is the gateway.
    pub prefix: [u8; 3],
    pub service_ip: Ipv4Addr,
    free_hosts: Mutex<BTreeSet<u8>>,
    /// Last host number handed out: allocation goes round the /24 so a
    /// deleted Pod's address is not reused at once (peers may still list it).
    last_host: Mutex<u8>,
}

/// A Pod's network: its namespace, address and host-side veth.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub netns: String,
    pub ip: Ipv4Addr,
    host_veth: String,
    host: u8,
}

/// Runs `ip <args>`; errors carry its stderr.
pub async fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().await.context("running ip (iproute2)")?;
    if !out.status.success() {
        anyhow::bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Network {
    pub fn new(bridge: &str, pod_network: Ipv4Addr, service_ip: Ipv4Addr) -> anyhow::Result<Network> {
        if bridge.len() > 10 {
            // veth names are limited to 15 bytes: bridge + 'v' + up to 3 digits.
            anyhow::bail!("bridge name {bridge:?} is longer than 10 characters");
        }
        let o = pod_network.octets();
        Ok(Network {
            bridge: bridge.to_string(),
            prefix: [o[0], o[1], o[2]],
            service_ip,
            free_hosts: Mutex::new((2..=254).collect()),
            last_host: Mutex::new(1),
        })
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], 1)
    }

    /// Removes what a kubelet with our bridge name left behind (a previous
    /// one that died, or this one at exit): processes still in its Pod
    /// namespaces (they were its Pods), the namespaces, veths and the bridge.
    pub async fn remove_leftovers(&self) -> anyhow::Result<()> {
        let netns_prefix = format!("{}-", self.bridge);
        let listing = ip(&["netns", "list"]).await?;
        for netns in
            listing.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(&netns_prefix))
        {
            let pids = ip(&["netns", "pids", netns]).await.unwrap_or_default();
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                warn!(netns, pid, "killing a leftover process of an earlier kubelet's Pod");
                // SAFETY: plain syscall; the PID is in a namespace only we create.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            info!(netns, "removing a leftover Pod network namespace");
            if let Err(e) = ip(&["netns", "delete", netns]).await {
                warn!(netns, "removing leftover network namespace: {e:#}");
            }
        }
        let links = ip(&["-o", "link", "show"]).await?;
        let veth_prefix = format!("{}v", self.bridge);
        for name in links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        {
            if name == self.bridge || name.starts_with(&veth_prefix) {
                info!(link = name, "removing a leftover link");
                let _ = ip(&["link", "delete", &name]).await;
            }
        }
        Ok(())
    }

    pub async fn create_bridge(&self) -> anyhow::Result<()> {
        let gw = format!("{}/24", self.gateway());
        let svc = format!("{}/32", self.service_ip);
        ip(&["link", "add", &self.bridge, "type", "bridge"]).await?;
        ip(&["addr", "add", &gw, "dev", &self.bridge]).await?;
        ip(&["addr", "add", &svc, "dev", &self.bridge]).await?;
        ip(&["link", "set", &self.bridge, "up"]).await?;
        info!(bridge = self.bridge, gateway = %self.gateway(), service_ip = %self.service_ip, "bridge up");
        Ok(())
    }

    /// Adds a Service IP to the bridge so the kubelet can listen on it.
    pub async fn add_service_address(&self, address: Ipv4Addr) -> anyhow::Result<()> {
        let cidr = format!("{address}/32");
        match ip(&["addr", "add", &cidr, "dev", &self.bridge]).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("File exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn remove_service_address(&self, address: Ipv4Addr) {
        let cidr = format!("{address}/32");
        let _ = ip(&["addr", "del", &cidr, "dev", &self.bridge]).await;
    }

    pub async fn create_pod_network(&self) -> anyhow::Result<PodNetwork> {
        let host = {
            let mut free = self.free_hosts.lock().unwrap_or_else(|p| p.into_inner());
            let mut last = self.last_host.lock().unwrap_or_else(|p| p.into_inner());
            let next = free.range(last.saturating_add(1)..).next().or_else(|| free.iter().next()).copied();
            let host = next.context("no free Pod address left in the /24")?;
            free.remove(&host);
            *last = host;
            host
        };
        let net = PodNetwork {
            netns: format!("{}-{host}", self.bridge),
            ip: Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], host),
            host_veth: format!("{}v{host}", self.bridge),
            host,
        };
        if let Err(e) = self.plumb(&net).await {
            self.delete_pod_network(&net).await;
            return Err(e);
        }
        Ok(net)
    }

    async fn plumb(&self, net: &PodNetwork) -> anyhow::Result<()> {
        let ns = net.netns.as_str();
        let cidr = format!("{}/24", net.ip);
        let gw = self.gateway().to_string();
        ip(&["netns", "add", ns]).await?;
        ip(&["link", "add", &net.host_veth, "type", "veth", "peer", "name", "eth0", "netns", ns]).await?;
        ip(&["link", "set", &net.host_veth, "master", &self.bridge, "up"]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"]).await?;
        ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        ip(&["-n", ns, "route", "add", "default", "via", &gw]).await?;
        Ok(())
    }

    /// Deletes the namespace (and with it the veth pair) and frees the address.
    /// Processes must be gone first.
    pub async fn delete_pod_network(&self, net: &PodNetwork) {
        if let Err(e) = ip(&["netns", "delete", &net.netns]).await {
            warn!(netns = net.netns, "deleting network namespace: {e:#}");
        }
        // Normally gone with the namespace's end of the pair.
        let _ = ip(&["link", "delete", &net.host_veth]).await;
        self.free_hosts.lock().unwrap_or_else(|p| p.into_inner()).insert(net.host);
    }
}
