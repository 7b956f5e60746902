//! Probe and lifecycle-hook actions: httpGet and tcpSocket from the root
//! namespace to the Pod IP over the bridge, exec inside the container's
//! namespaces (nsenter), sleep.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ExecAction, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// Where an action runs.
#[derive(Debug, Clone)]
pub struct ActionTarget {
    pub pod_ip: Ipv4Addr,
    /// The container's main process (for exec actions).
    pub pid: i32,
    pub env: Vec<(String, String)>,
    pub named_ports: BTreeMap<String, u16>,
}

#[derive(Debug, Clone)]
pub enum Action {
    Exec(ExecAction),
    Http(HTTPGetAction),
    Tcp(TCPSocketAction),
    Sleep(i64),
    Unsupported(&'static str),
}

impl Action {
    pub fn of_probe(p: &Probe) -> Action {
        if let Some(a) = &p.exec {
            Action::Exec(a.clone())
        } else if let Some(a) = &p.http_get {
            Action::Http(a.clone())
        } else if let Some(a) = &p.tcp_socket {
            Action::Tcp(a.clone())
        } else {
            Action::Unsupported("grpc probes are not emulated")
        }
    }

    pub fn of_hook(h: &LifecycleHandler) -> Action {
        if let Some(a) = &h.exec {
            Action::Exec(a.clone())
        } else if let Some(a) = &h.http_get {
            Action::Http(a.clone())
        } else if let Some(a) = &h.tcp_socket {
            Action::Tcp(a.clone())
        } else if let Some(a) = &h.sleep {
            Action::Sleep(a.seconds)
        } else {
            Action::Unsupported("unknown lifecycle handler")
        }
    }
}

fn resolve_port(port: &IntOrString, named: &BTreeMap<String, u16>) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("bad port {n}")),
        IntOrString::String(name) => name
            .parse()
            .ok()
            .or_else(|| named.get(name).copied())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

fn host_address(host: Option<&String>, target: &ActionTarget) -> Result<IpAddr, String> {
    match host.filter(|h| !h.is_empty()) {
        None => Ok(IpAddr::V4(target.pod_ip)),
        Some(h) => h.parse().map_err(|_| format!("probe host {h:?}: only IP addresses are supported")),
    }
}

/// Runs the action once within `timeout`; Ok(message) on success.
pub async fn run(action: &Action, target: &ActionTarget, timeout: Duration) -> Result<String, String> {
    match tokio::time::timeout(timeout, run_unbounded(action, target)).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

async fn run_unbounded(action: &Action, target: &ActionTarget) -> Result<String, String> {
    match action {
        Action::Unsupported(why) => Err((*why).to_string()),
        Action::Sleep(seconds) => {
            tokio::time::sleep(Duration::from_secs((*seconds).max(0) as u64)).await;
            Ok(format!("slept {seconds}s"))
        }
        Action::Tcp(tcp) => {
            let addr = SocketAddr::new(
                host_address(tcp.host.as_ref(), target)?,
                resolve_port(&tcp.port, &target.named_ports)?,
            );
            TcpStream::connect(addr)
                .await
                .map(|_| format!("connected to {addr}"))
                .map_err(|e| format!("dial tcp {addr}: {e}"))
        }
        Action::Http(http) => http_get(http, target).await,
        Action::Exec(exec) => {
            let argv = exec.command.clone().unwrap_or_default();
            if argv.is_empty() {
                return Err("exec action without command".into());
            }
            let out = Command::new("nsenter")
                // --root: the container may be chrooted into its own root (see enter.rs).
                .args(["--target", &target.pid.to_string(), "--net", "--mount", "--uts", "--root", "--wd", "--"])
                .args(&argv)
                .env_clear()
                .envs(target.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| format!("running nsenter: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                Ok(text)
            } else {
                Err(format!("command {argv:?} failed ({}): {}", out.status, text.trim()))
            }
        }
    }
}

/// A minimal HTTP/1.1 GET: success is a status in 200..400, as for a kubelet.
async fn http_get(http: &HTTPGetAction, target: &ActionTarget) -> Result<String, String> {
    if http.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS")) {
        return Err("HTTPS probes are not emulated".into());
    }
    let ip = host_address(http.host.as_ref(), target)?;
    let port = resolve_port(&http.port, &target.named_ports)?;
    let addr = SocketAddr::new(ip, port);
    let path = http.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("dial tcp {addr}: {e}"))?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for header in http.http_headers.iter().flatten() {
        request.push_str(&format!("{}: {}\r\n", header.name, header.value));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await.map_err(|e| format!("reading from {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status line from {addr}"))?;
    if (200..400).contains(&status) {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP probe failed with statuscode: {status}"))
    }
}
