//! `clusterapp balancer`: HTTP/1.1 in front, AJP/1.3 (or HTTP/1.1,
//! `--backend-protocol http`) to the Tomcat nodes, sticky by jvmRoute, with
//! live membership, draining and failover.
//!
//! Module map: [`state`] the process-wide [`Balancer`] · [`ajp`] codec ·
//! [`pool`] backend connections · [`routing`] sticky/new-session choice ·
//! [`moves`] a moving session's first request goes alone · [`member`]
//! member table · [`membership`] sources (static, file, Kubernetes) ·
//! [`health`] CPing checks · [`front`] client server · [`framing`]
//! smuggling guard on the client's bytes · [`proxy`] the hyper service
//! (HTTP side of a request) · [`exchange`] one request's trip to a member
//! (AJP side, phase by phase) · [`http_backend`] the same trip over
//! HTTP/1.1 · [`body`] response bodies · [`admin`] metrics, probes and
//! status page · [`config`] command line.

pub mod access;
pub mod admin;
pub mod ajp;
pub mod body;
pub mod config;
pub mod exchange;
pub mod framing;
pub mod front;
pub mod health;
pub mod http_backend;
pub mod member;
pub mod membership;
pub mod metrics;
pub mod moves;
pub mod pool;
pub mod proxy;
pub mod routing;
pub mod sessions;
pub mod state;
pub mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{BackendProtocol, BalancerArgs, LbMethod};
use membership::{MembershipError, MembershipSource};
use moves::SessionMoves;
use pool::PoolSettings;
use routing::Router;
use state::{AjpSecret, Backend, Balancer, ProxySettings};

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("reading the AJP secret file {path}: {source}")]
    SecretFile { path: PathBuf, source: std::io::Error },
    #[error("the AJP secret file {0} is empty; the secret is required")]
    EmptySecret(PathBuf),
    #[error("--backend-protocol ajp needs --ajp-secret-file: the AJP secret is always on")]
    NoSecretFile,
    #[error("no members: give --member, --members-file or --kubernetes-service")]
    NoMemberSource,
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("binding {what} {address}: {source}")]
    Bind { what: &'static str, address: std::net::SocketAddr, source: std::io::Error },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
}

fn read_secret(path: &PathBuf) -> Result<AjpSecret, BalancerError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| BalancerError::SecretFile { path: path.clone(), source })?;
    // Files written by `echo` or mounted from Secrets may end in a newline
    // that is not part of the secret.
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(BalancerError::EmptySecret(path.clone()));
    }
    Ok(AjpSecret::new(secret.to_string()))
}

fn membership_source(args: &BalancerArgs) -> Result<MembershipSource, BalancerError> {
    if let Some(service) = &args.kubernetes_service {
        let (namespace, service) = membership::parse_service_ref(service)?;
        return Ok(MembershipSource::Kubernetes { namespace, service, port_name: args.kubernetes_port_name.clone() });
    }
    if let Some(path) = &args.members_file {
        // Fail fast on a file that is broken at start; later breakage keeps
        // the last good member set.
        membership::file::load(path)?;
        return Ok(MembershipSource::File(path.clone()));
    }
    if args.members.is_empty() {
        return Err(BalancerError::NoMemberSource);
    }
    Ok(MembershipSource::Static(args.members.clone()))
}

/// The HTTPS front's address and files, when `--tls-listen` is given (clap
/// requires the certificate and key with it).
fn tls_front(args: &BalancerArgs) -> Option<(std::net::SocketAddr, tls::TlsFiles)> {
    let files = tls::TlsFiles {
        cert: args.tls_cert_file.clone()?,
        key: args.tls_key_file.clone()?,
        client_ca: args.tls_client_ca_file.clone(),
        require_client_cert: args.tls_require_client_cert,
    };
    Some((args.tls_listen?, files))
}

/// Builds the shared state from the command line.
pub fn build(args: &BalancerArgs) -> Result<Arc<Balancer>, BalancerError> {
    let backend = match args.backend_protocol {
        BackendProtocol::Ajp => {
            let path = args.ajp_secret_file.as_ref().ok_or(BalancerError::NoSecretFile)?;
            Backend::Ajp(read_secret(path)?)
        }
        BackendProtocol::Http => Backend::Http,
    };
    let settings = ProxySettings {
        packet_size: args.packet_size,
        sticky_cookie: args.sticky_cookie.clone(),
        sticky_path_param: args.sticky_path_param.clone(),
        backend_timeout: args.backend_timeout,
        max_body_bytes: args.max_body_bytes,
        drain_timeout: args.drain_timeout,
        access_log: args.access_log,
    };
    let pool_settings = PoolSettings {
        packet_size: args.packet_size,
        connect_timeout: args.connect_timeout,
        slow_grace: args.slow_member_grace,
        cping_after_idle: args.cping_after_idle,
        cping_timeout: args.cping_timeout,
        slot_wait: args.pool_wait_timeout,
    };
    let mut router = Router::new(args.method, !args.no_failover);
    if !args.rebalance_ramp.is_zero() {
        router = router.with_rebalancing(args.rebalance_ramp, args.rebalance_after.saturating_mul(1000));
    }
    let moves = SessionMoves::new(args.pod_name.clone(), args.move_follower_pause);
    Ok(Arc::new(
        Balancer::new(settings, pool_settings, args.pool_max_per_member, router, backend).with_session_moves(moves),
    ))
}

/// Runs the balancer until SIGTERM/SIGINT and the graceful drain after it.
pub async fn run(args: BalancerArgs) -> Result<(), BalancerError> {
    let source = membership_source(&args)?;
    let bal = build(&args)?;
    let front = TcpListener::bind(args.listen).await.map_err(|source| BalancerError::Bind {
        what: "--listen",
        address: args.listen,
        source,
    })?;
    let tls = match tls_front(&args) {
        Some((address, files)) => {
            let tls = tls::build(&files)?;
            let listener = TcpListener::bind(address).await.map_err(|source| BalancerError::Bind {
                what: "--tls-listen",
                address,
                source,
            })?;
            Some((tls, files, listener))
        }
        None => None,
    };
    let admin = TcpListener::bind(args.admin_listen).await.map_err(|source| BalancerError::Bind {
        what: "--admin-listen",
        address: args.admin_listen,
        source,
    })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    match source {
        MembershipSource::Static(members) => bal.members.apply(&members, &bal.metrics),
        MembershipSource::File(path) => {
            tokio::spawn(membership::file::watch_file(bal.clone(), path, shutdown_rx.clone()));
        }
        MembershipSource::Kubernetes { namespace, service, port_name } => {
            let client = kube::Client::try_default().await.map_err(MembershipError::from)?;
            if let Some(selector) = &args.kubernetes_pod_selector {
                tokio::spawn(membership::kubernetes::watch_member_pods(
                    bal.clone(),
                    client.clone(),
                    namespace.clone(),
                    selector.clone(),
                    shutdown_rx.clone(),
                ));
            }
            if let Some(selector) = &args.kubernetes_peer_selector {
                tokio::spawn(membership::kubernetes::watch_peer_pods(
                    bal.clone(),
                    client.clone(),
                    namespace.clone(),
                    selector.clone(),
                    shutdown_rx.clone(),
                ));
            }
            tokio::spawn(membership::kubernetes::watch_endpoint_slices(
                bal.clone(),
                client,
                namespace,
                service,
                port_name,
                shutdown_rx.clone(),
            ));
        }
    }
    tokio::spawn(health::run_health_checks(bal.clone(), args.health_interval, shutdown_rx.clone()));
    tokio::spawn(admin::serve_admin(bal.clone(), admin));

    let front_settings = front::FrontSettings {
        connection_slots: Arc::new(tokio::sync::Semaphore::new(args.max_connections)),
        max_connections: args.max_connections,
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        header_read_timeout: args.header_read_timeout,
        shutdown_grace: args.shutdown_grace,
    };
    tracing::info!(listen = %args.listen, admin = %args.admin_listen, backend = ?args.backend_protocol, method = ?args.method, failover = !args.no_failover, drain_timeout = ?args.drain_timeout, rebalance_ramp = ?args.rebalance_ramp, "balancer started");
    let mut servers = vec![];
    if let Some((tls, files, listener)) = tls {
        tracing::info!(tls_listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), cert = %files.cert.display(), client_ca = ?files.client_ca, "HTTPS front started");
        let expiry = bal.metrics.tls_certificate_not_after.clone();
        tokio::spawn(tls::watch_files(tls.store.clone(), files, expiry, shutdown_rx.clone()));
        servers.push(tokio::spawn(front::serve_front(
            bal.clone(),
            listener,
            Some(tls.acceptor),
            front_settings.clone(),
            shutdown_rx.clone(),
        )));
    }
    servers.push(tokio::spawn(front::serve_front(bal.clone(), front, None, front_settings, shutdown_rx)));

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(BalancerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(BalancerError::Signals)?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    bal.begin_shutdown();
    let _ = shutdown_tx.send(true);
    for server in servers {
        let _ = server.await;
    }
    tracing::info!("balancer stopped");
    Ok(())
}

/// Entry point for `clusterapp balancer`.
pub fn main(args: BalancerArgs) -> ExitCode {
    crate::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %BalancerError::Runtime(e), "balancer failed");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "balancer failed");
            eprintln!("clusterapp balancer: {e}");
            ExitCode::FAILURE
        }
    }
}
