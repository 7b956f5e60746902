//! `clusterapp operator`: turns each ClusterApp into a Tomcat cluster and
//! keeps it so. A typed pipeline per reconcile: read -> validate -> build
//! (pure) -> apply (server-side apply) -> status. Only the holder of the
//! leader Lease runs the controller, so only it writes.

pub mod admin;
pub mod build;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod reconcile;
pub mod status;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Client, Resource};
use k8s_openapi::NamespaceResourceScope;
use serde::de::DeserializeOwned;

use crate::crd::ClusterApp;
use build::BuildContext;
use leader::{LeaderError, LeaseLock, LeaseTiming};
use metrics::OperatorState;
use reconcile::Context;

/// Image the balancer Deployment runs unless the ClusterApp names one.
pub const DEFAULT_BALANCER_IMAGE: &str = concat!("ghcr.io/clusterapp/clusterapp:", env!("CARGO_PKG_VERSION"));

/// `clusterapp operator` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Image of the balancer Deployments (when a ClusterApp names none).
    #[arg(long, env = "CLUSTERAPP_BALANCER_IMAGE", default_value = DEFAULT_BALANCER_IMAGE)]
    pub balancer_image: String,
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "clusterapp-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
}

/// What [`run`] needs besides the client.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    pub balancer_image: String,
    pub watch_namespace: Option<String>,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_timing: LeaseTiming,
}

/// Entry point of `clusterapp operator`.
pub fn main(args: OperatorArgs) -> ExitCode {
    crate::telemetry::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "operator stopped");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(args: OperatorArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let client = Client::try_default().await.context("connecting to the Kubernetes API")?;
    let state = OperatorState::new();
    let listener = tokio::net::TcpListener::bind(args.admin_listen).await.with_context(|| format!("binding {}", args.admin_listen))?;
    tokio::spawn(admin::serve(listener, state.clone()));
    let identity = args.identity.clone().unwrap_or_else(|| format!("clusterapp-operator-{}", std::process::id()));
    let config = OperatorConfig {
        balancer_image: args.balancer_image,
        watch_namespace: args.namespace,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        identity,
        lease_timing: LeaseTiming::default(),
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    run(client, config, state, shutdown).await?;
    Ok(())
}

/// Runs the operator until `shutdown` completes (then it releases the
/// Lease) or leadership is lost (an error: a supervisor restarts us).
pub async fn run(
    client: Client,
    config: OperatorConfig,
    state: Arc<OperatorState>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LeaderError> {
    let leases = Api::namespaced(client.clone(), &config.lease_namespace);
    let mut lock = LeaseLock::new(leases, &config.lease_name, &config.identity, config.lease_timing);
    state.live.store(true, Ordering::Relaxed);
    // A standby is ready: it is healthy and waiting.
    state.ready.store(true, Ordering::Relaxed);
    tokio::pin!(shutdown);
    tokio::select! {
        () = lock.acquire() => {}
        () = &mut shutdown => return Ok(()),
    }
    tracing::info!(identity = %config.identity, lease = %config.lease_name, "became leader");
    state.leader.set(1);
    state.ready.store(false, Ordering::Relaxed);
    enum Outcome {
        Lost(LeaderError),
        Stopped,
    }
    let outcome = tokio::select! {
        lost = lock.keep() => Outcome::Lost(lost),
        () = run_controller(client, &config, state.clone()) => Outcome::Stopped,
        () = &mut shutdown => Outcome::Stopped,
    };
    // Dropping the controller future above cancels every in-flight write.
    state.leader.set(0);
    match outcome {
        Outcome::Lost(error) => {
            state.live.store(false, Ordering::Relaxed);
            tracing::error!(error = %error, "leadership lost; stopped writing");
            Err(error)
        }
        Outcome::Stopped => {
            lock.release().await;
            Ok(())
        }
    }
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Metadata-only watch of one owned kind, limited to our objects: enough to
/// trigger a reconcile when one is changed or deleted, at little memory.
fn owned_metadata<K>(
    client: &Client,
    namespace: Option<&str>,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let config = watcher::Config::default().labels(&names::managed_selector());
    // An Api of PartialObjectMeta makes metadata-only list/watch requests.
    watcher(scoped::<PartialObjectMeta<K>>(client, namespace), config).default_backoff().touched_objects()
}

/// The controller: watches ClusterApps, everything they own, and their
/// session node pods; runs until its watches end.
pub async fn run_controller(client: Client, config: &OperatorConfig, state: Arc<OperatorState>) {
    let namespace = config.watch_namespace.as_deref();
    let owned = watcher::Config::default().labels(&names::managed_selector());

    let (pods, pods_writer) = reflector::store::<Pod>();
    let pod_events = reflector(
        pods_writer,
        watcher(scoped::<Pod>(&client, namespace), watcher::Config::default().labels(&names::all_session_nodes_selector())),
    )
    .default_backoff()
    .touched_objects();
    let (stateful_sets, sts_writer) = reflector::store::<StatefulSet>();
    let sts_events = reflector(sts_writer, watcher(scoped::<StatefulSet>(&client, namespace), owned))
        .default_backoff()
        .touched_objects();

    let reporter = Reporter { controller: "clusterapp-operator".to_string(), instance: Some(config.identity.clone()) };
    let context = Arc::new(Context {
        client: client.clone(),
        build: BuildContext { balancer_image: config.balancer_image.clone() },
        state: state.clone(),
        pods: pods.clone(),
        stateful_sets: stateful_sets.clone(),
        recorder: Recorder::new(client.clone(), reporter),
    });

    // Ready once the caches the status is computed from are filled.
    let readiness = {
        let (pods, stateful_sets, state) = (pods.clone(), stateful_sets.clone(), state.clone());
        async move {
            let _ = pods.wait_until_ready().await;
            let _ = stateful_sets.wait_until_ready().await;
            state.ready.store(true, Ordering::Relaxed);
        }
    };

    let controller = Controller::new(scoped::<ClusterApp>(&client, namespace), watcher::Config::default())
        .owns_stream(sts_events)
        .owns_stream(owned_metadata::<Secret>(&client, namespace))
        .owns_stream(owned_metadata::<ConfigMap>(&client, namespace))
        .owns_stream(owned_metadata::<Service>(&client, namespace))
        .owns_stream(owned_metadata::<ServiceAccount>(&client, namespace))
        .owns_stream(owned_metadata::<Role>(&client, namespace))
        .owns_stream(owned_metadata::<RoleBinding>(&client, namespace))
        .owns_stream(owned_metadata::<Deployment>(&client, namespace))
        .owns_stream(owned_metadata::<PodDisruptionBudget>(&client, namespace))
        .owns_stream(owned_metadata::<NetworkPolicy>(&client, namespace))
        .watches_stream(pod_events, |pod| reconcile::app_of_pod(&pod))
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        });
    futures::join!(readiness, controller);
}
