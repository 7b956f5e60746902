//! `clusterapp`: the operator, the AJP balancer and the CRD printer in one binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "clusterapp", version, about = "Tomcat clusters with sticky, replicated HTTP sessions on Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ClusterApp controller.
    Operator(clusterapp::operator::OperatorArgs),
    /// Run the HTTP -> AJP/1.3 load balancer.
    // Boxed: its options are several times the size of the other variants'.
    Balancer(Box<clusterapp::balancer::BalancerArgs>),
    /// Print the ClusterApp CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Operator(args) => clusterapp::operator::main(args),
        Command::Balancer(args) => clusterapp::balancer::main(*args),
        Command::Crd => print_crd(),
    }
}

/// `clusterapp crd`: the same text as `crds/clusterapp.yaml`.
fn print_crd() -> ExitCode {
    match clusterapp::crd::crd_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("clusterapp crd: {e}");
            ExitCode::FAILURE
        }
    }
}
