//! `clusterapp operator`: turns each ClusterApp into a Tomcat cluster and
//! keeps it so. A typed pipeline per reconcile: read -> validate -> build
//! (pure) -> apply (server-side apply) -> status. Only the holder of the
//! leader Lease runs the controller, so only it writes.

pub mod admin;
pub mod build;
pub mod cache;
pub mod children;
pub mod error;
pub mod leader;
pub mod membership;
pub mod metrics;
pub mod names;
pub mod reconcile;
pub mod sessions;
pub mod status;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, reflector, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use crate::crd::ClusterApp;
use build::BuildContext;
use cache::{Caches, WrittenRecords};
use children::ChildCaches;
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
    /// Reconciles running at once.
    #[arg(long, default_value_t = ControllerTuning::default().concurrency)]
    pub max_concurrent_reconciles: u16,
    /// Triggers of one ClusterApp within this many milliseconds make one reconcile.
    #[arg(long, default_value_t = 100)]
    pub debounce_ms: u64,
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
    pub tuning: ControllerTuning,
}

/// How hard the controller drives the API server.
#[derive(Clone, Copy, Debug)]
pub struct ControllerTuning {
    /// Reconciles running at once (each sends up to 13 applies at once).
    /// Bounded so that a burst of apps neither opens thousands of
    /// connections nor floods the API server's priority level.
    pub concurrency: u16,
    /// Triggers of one app within this window make one reconcile (its
    /// children's watch events arrive in a burst after each apply).
    pub debounce: std::time::Duration,
}

impl Default for ControllerTuning {
    fn default() -> Self {
        ControllerTuning { concurrency: 16, debounce: std::time::Duration::from_millis(100) }
    }
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
    let listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding {}", args.admin_listen))?;
    tokio::spawn(admin::serve(listener, state.clone()));
    let identity = args.identity.clone().unwrap_or_else(|| format!("clusterapp-operator-{}", std::process::id()));
    let config = OperatorConfig {
        balancer_image: args.balancer_image,
        watch_namespace: args.namespace,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        identity,
        lease_timing: LeaseTiming::default(),
        tuning: ControllerTuning {
            concurrency: args.max_concurrent_reconciles,
            debounce: std::time::Duration::from_millis(args.debounce_ms),
        },
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
    // Said at once, so that the log of a standby (`kubectl logs` of either
    // replica) tells what it does: it waits, and for which Lease.
    tracing::info!(identity = %config.identity, lease = %config.lease_name, "waiting to become leader");
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

/// Watch config of the objects we own: label-selected, so the caches hold
/// only our objects.
fn owned_config() -> watcher::Config {
    watcher::Config::default().labels(&names::managed_selector())
}

/// The watch of one kind of our children (see `children::child_kinds!`):
/// its reflector store and the stream that fills it and triggers reconciles
/// of the owner. `C` is what the store keeps: the object itself, trimmed by
/// `strip`, or `PartialObjectMeta<Kind>`, for which the Api makes
/// metadata-only list/watch requests. A deleted child's write record is
/// forgotten.
pub(crate) fn owned_watch<C>(
    client: &Client,
    namespace: Option<&str>,
    written: &Arc<WrittenRecords>,
    strip: fn(&mut C),
) -> (Store<C>, impl Stream<Item = Result<C, watcher::Error>> + Send + 'static)
where
    C: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<C>();
    let events = watcher(scoped::<C>(client, namespace), owned_config())
        .default_backoff()
        .modify(strip)
        .map_ok(forget_deleted(written, reconcile::kind_name::<C>()))
        .reflect(writer)
        .touched_objects();
    (store, events)
}

fn forget_deleted<K: Resource>(
    written: &Arc<WrittenRecords>,
    kind: &'static str,
) -> impl FnMut(watcher::Event<K>) -> watcher::Event<K> + Send + 'static {
    let written = written.clone();
    move |event| {
        if let watcher::Event::Delete(object) = &event {
            let (namespace, name) = cache::namespace_and_name(object);
            written.forget(kind, &namespace, &name);
        }
        event
    }
}

/// The ClusterApps that name `secret` (`spec.ajp.secretRef`,
/// `spec.balancer.tls`).
fn apps_referencing(apps: &Store<ClusterApp>, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<ClusterApp>> {
    let (namespace, Some(name)) = (secret.metadata.namespace.as_deref(), secret.metadata.name.as_deref()) else {
        return Vec::new();
    };
    apps.state()
        .iter()
        .filter(|app| app.metadata.namespace.as_deref() == namespace)
        .filter(|app| reconcile::referenced_secrets(app).contains(&name))
        .map(|app| ObjectRef::from_obj(app.as_ref()))
        .collect()
}

/// The controller: watches ClusterApps, everything they own, their session
/// node pods and the Secrets they name; runs until its
/// watches end. Beside it, the session watch polls the balancers.
pub async fn run_controller(client: Client, config: &OperatorConfig, state: Arc<OperatorState>) {
    let namespace = config.watch_namespace.as_deref();
    let written = Arc::new(WrittenRecords::default());

    let (pods, pods_writer) = reflector::store::<Pod>();
    let pod_events = watcher(
        scoped::<Pod>(&client, namespace),
        watcher::Config::default().labels(&names::all_session_nodes_selector()),
    )
    .default_backoff()
    .modify(cache::strip_pod)
    .reflect(pods_writer)
    .touched_objects();
    // Secrets the user made (metadata only: no data of other Secrets in
    // memory); ours are cached in full below.
    let (other_secrets, other_secrets_writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let not_ours = format!("{}!={}", names::LABEL_MANAGED_BY, names::MANAGED_BY_VALUE);
    let other_secret_events =
        watcher(scoped::<PartialObjectMeta<Secret>>(&client, namespace), watcher::Config::default().labels(&not_ours))
            .default_backoff()
            .modify(cache::strip_partial)
            .reflect(other_secrets_writer)
            .touched_objects();
    let (apps, apps_writer) = reflector::store::<ClusterApp>();
    let app_events = watcher(scoped::<ClusterApp>(&client, namespace), watcher::Config::default())
        .default_backoff()
        .modify(cache::strip_managed_fields)
        .reflect(apps_writer)
        .applied_objects();
    let tuning = controller::Config::default().concurrency(config.tuning.concurrency).debounce(config.tuning.debounce);
    let apps_of_secret = apps.clone();
    let apps_of_sessions = apps.clone();
    let controller = Controller::for_stream(app_events, apps).with_config(tuning);
    // Every kind of the child registry: its store, and its watch as a trigger.
    let (children, controller) = ChildCaches::watch(&client, namespace, &written, controller);
    let caches = Arc::new(Caches {
        children,
        other_secrets,
        pods,
        written,
        secret_keys: Default::default(),
        filled: tokio::sync::watch::Sender::new(false),
    });

    let reporter = Reporter { controller: "clusterapp-operator".to_string(), instance: Some(config.identity.clone()) };
    let context = Arc::new(Context {
        client: client.clone(),
        build: BuildContext { balancer_image: config.balancer_image.clone() },
        state: state.clone(),
        caches: caches.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        membership: Default::default(),
    });

    // Ready once the caches the reconciles read are filled.
    let readiness = {
        let (caches, state) = (caches.clone(), state.clone());
        async move {
            caches.fill().await;
            state.ready.store(true, Ordering::Relaxed);
        }
    };

    // Beside the controller, on its own clock: see `sessions`.
    let session_watch = sessions::run(context.clone(), apps_of_sessions, config.watch_namespace.clone());
    let controller = controller
        .watches_stream(pod_events, |pod| reconcile::app_of_pod(&pod))
        .watches_stream(other_secret_events, move |secret| apps_referencing(&apps_of_secret, &secret))
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // The session watch never ends on its own; the controller's end is ours.
    let controller = async {
        tokio::select! {
            () = controller => {}
            () = session_watch => {}
        }
    };
    futures::join!(readiness, controller);
}
