//! `clusterapp-kubelet`: the process kubelet of clusterapp's local test
//! cluster. It registers a Node and runs the Pods scheduled to it as local
//! processes, each Pod in a network namespace of its own (see README.md next
//! to this crate for what is and is not emulated).

mod context;
mod enter;
mod images;
mod kubelet;
mod network;
mod node;
mod pod;
mod proxy;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "clusterapp-kubelet", about = "Process kubelet for the clusterapp local cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register the node and run its Pods until SIGTERM/SIGINT (or the owner exits).
    Run(Box<RunArgs>),
    /// Internal: the in-namespace step before a container's program.
    Enter {
        #[arg(long)]
        spec: PathBuf,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kubeconfig of the node identity (CN=system:node:<name>, O=system:nodes).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Optional admin kubeconfig, used only to delete the Node object at exit
    /// (the Node authorizer does not let a node delete itself).
    #[arg(long)]
    pub admin_kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = "clusterapp-node")]
    pub node_name: String,
    /// State folder; Pods live under <state>/kubelet/pods/<ns>_<name>/.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The image → program map (tests/kubelet/images.yaml).
    #[arg(long)]
    pub images: PathBuf,
    /// The clusterapp binary for images of kind `clusterapp`.
    #[arg(long)]
    pub clusterapp_bin: PathBuf,
    /// Stop (and clean up) when this process exits.
    #[arg(long)]
    pub owner_pid: Option<i32>,
    #[arg(long, default_value = "cabr0")]
    pub bridge: String,
    /// The Pods' /24 (its .1 is the bridge).
    #[arg(long, default_value = "10.244.0.0")]
    pub pod_network: Ipv4Addr,
    /// The `kubernetes` Service IP (in the API server certificate's SANs).
    #[arg(long, default_value = "10.96.0.1")]
    pub service_ip: Ipv4Addr,
    /// First crash-loop back-off delay (a real kubelet uses 10 s).
    #[arg(long, default_value = "2", value_parser = parse_seconds)]
    pub restart_backoff: Duration,
    /// Longest termination grace given to Pods when the kubelet itself stops.
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,
    /// How often the ConfigMap/Secret volumes of running Pods are re-read and
    /// changed files rewritten (a real kubelet: about a minute); 0 = never.
    #[arg(long, env = "CLUSTERAPP_KUBELET_VOLUME_SYNC_PERIOD", default_value = "2", value_parser = parse_seconds)]
    pub volume_sync_period: Duration,
    /// Advertised (not enforced) node capacity.
    #[arg(long, default_value = "16")]
    pub cpu: String,
    #[arg(long, default_value = "32Gi")]
    pub memory: String,
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// How long to wait for another kubelet using the same bridge to exit.
    #[arg(long, default_value = "180", value_parser = parse_seconds)]
    pub lock_timeout: Duration,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s').parse::<f64>().map(Duration::from_secs_f64).map_err(|e| format!("{s:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Enter { spec, argv } => {
            // Only returns on failure; the message lands in the container log.
            let error = enter::enter(&spec, &argv).err().map(|e| format!("{e:#}")).unwrap_or_default();
            eprintln!("clusterapp-kubelet enter: {error}");
            ExitCode::from(127)
        }
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,kube=warn,hyper=warn,rustls=warn".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("clusterapp-kubelet: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(kubelet::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("clusterapp-kubelet: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
