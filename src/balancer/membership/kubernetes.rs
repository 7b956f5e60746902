//! Members from the EndpointSlices of a (headless) Service.
//!
//! A member's route is its Pod name (the StatefulSet gives pod `shop-N` the
//! jvmRoute `shop-N`). Endpoint conditions map to member states:
//! `ready` → ready; `serving` and `terminating` → draining (keeps its
//! sticky sessions while the pod's preStop wait runs, for at most the
//! balancer's `--drain-timeout`; see [`crate::balancer::member`]);
//! otherwise down.
//! The watch delivers changes as they happen; each one rebuilds the whole
//! member set from all slices and swaps it in.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::balancer::member::{MemberSpec, MemberState, PodFacts};
use crate::balancer::state::Balancer;

/// Label the EndpointSlice controller puts on the slices of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn state_rank(state: MemberState) -> u8 {
    match state {
        MemberState::Ready => 0,
        MemberState::Draining => 1,
        MemberState::Down => 2,
    }
}

/// An endpoint's address: an IP, or a name (`FQDN` slices, e.g. hand-made
/// slices for nodes outside the cluster) resolved when the set is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(IpAddr),
    Name(String),
}

/// A member as one endpoint describes it, before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMember {
    pub route: String,
    pub address: EndpointAddress,
    pub port: u16,
    pub state: MemberState,
    /// The endpoint's `terminating` condition.
    pub terminating: bool,
}

/// The member set described by `slices` (any order), IP endpoints only.
pub fn members_from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: &str,
) -> Vec<MemberSpec> {
    endpoint_members(slices, port_name)
        .into_iter()
        .filter_map(|m| match m.address {
            EndpointAddress::Ip(ip) => Some(MemberSpec {
                route: m.route,
                address: SocketAddr::new(ip, m.port),
                state: m.state,
                terminating: m.terminating,
                ready_since: None,
            }),
            EndpointAddress::Name(_) => None,
        })
        .collect()
}

/// Resolves name endpoints (a name that does not resolve is left out and logged).
pub async fn resolve_members(members: Vec<EndpointMember>) -> Vec<MemberSpec> {
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        let address = match &m.address {
            EndpointAddress::Ip(ip) => SocketAddr::new(*ip, m.port),
            EndpointAddress::Name(name) if is_localhost_name(name) => {
                SocketAddr::new(IpAddr::from([127, 0, 0, 1]), m.port)
            }
            EndpointAddress::Name(name) => match tokio::net::lookup_host((name.as_str(), m.port)).await {
                Ok(mut addrs) => match addrs.find(|a| a.is_ipv4()) {
                    Some(a) => a,
                    None => {
                        tracing::warn!(route = %m.route, %name, "endpoint name has no IPv4 address; skipped");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(route = %m.route, %name, error = %e, "endpoint name does not resolve; skipped");
                    continue;
                }
            },
        };
        out.push(MemberSpec { route: m.route, address, state: m.state, terminating: m.terminating, ready_since: None });
    }
    out
}

/// RFC 6761 §6.3: `localhost` and names under `.localhost` are the loopback
/// address, whatever the resolver says (many resolvers know only `localhost`).
fn is_localhost_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Every endpoint of `slices` with a route, best state per route, sorted by route.
pub fn endpoint_members<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: &str,
) -> Vec<EndpointMember> {
    let mut by_route: BTreeMap<String, EndpointMember> = BTreeMap::new();
    for slice in slices {
        let ip_slice = slice.address_type == "IPv4" || slice.address_type == "IPv6";
        if !ip_slice && slice.address_type != "FQDN" {
            continue;
        }
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(port_name))
            .or(if ports.len() == 1 { ports.first() } else { None })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else {
            tracing::debug!(slice = %slice.name_any(), port_name, "slice has no matching port");
            continue;
        };
        for endpoint in slice.endpoints.as_deref().unwrap_or_default() {
            let Some(first) = endpoint.addresses.first() else { continue };
            let address = if ip_slice {
                match first.parse::<IpAddr>() {
                    Ok(ip) => EndpointAddress::Ip(ip),
                    Err(_) => continue,
                }
            } else {
                EndpointAddress::Name(first.clone())
            };
            let route = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone())
                .or_else(|| endpoint.hostname.clone());
            let Some(route) = route else { continue };
            let conditions = endpoint.conditions.as_ref();
            // Per the API, an unknown `ready` is to be read as ready, an
            // unknown `serving` as `ready`, an unknown `terminating` as false.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let state = if ready && !terminating {
                MemberState::Ready
            } else if serving && terminating {
                MemberState::Draining
            } else {
                MemberState::Down
            };
            let spec = EndpointMember { route: route.clone(), address, port, state, terminating };
            // The same pod can briefly appear in two slices; keep its best view.
            match by_route.get(&route) {
                Some(existing) if state_rank(existing.state) <= state_rank(state) => {}
                _ => {
                    by_route.insert(route, spec);
                }
            }
        }
    }
    by_route.into_values().collect()
}

/// When `pod` became ready, as its `Ready` condition says (`None` while it
/// is not ready). Every balancer replica reads the same value, which is what
/// lets them move a session at the same instant (see
/// [`crate::balancer::routing`]); the precision is the API's: seconds.
pub fn pod_ready_since(pod: &Pod) -> Option<std::time::SystemTime> {
    let ready = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")?;
    if ready.status != "True" || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ms = u64::try_from(ready.last_transition_time.as_ref()?.0.as_millisecond()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// When the deletion of `pod` was asked for: its deletionTimestamp less its
/// grace period. Every replica reads the same value, so every replica's
/// drain clock of the terminating member starts there (see
/// [`crate::balancer::member::Member::drain_by`]).
pub fn pod_deletion_requested(pod: &Pod) -> Option<std::time::SystemTime> {
    let deleted_at = pod.metadata.deletion_timestamp.as_ref()?;
    let grace = std::time::Duration::from_secs(pod.metadata.deletion_grace_period_seconds.unwrap_or(0).max(0) as u64);
    let ms = u64::try_from(deleted_at.0.as_millisecond()).ok()?;
    (std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).checked_sub(grace)
}

/// What the balancer reads from a member's Pod.
fn pod_facts(pod: &Pod) -> PodFacts {
    PodFacts {
        ready_since: pod_ready_since(pod),
        leaving: crate::crd::pod_is_leaving(pod),
        deletion_requested: pod_deletion_requested(pod),
    }
}

/// The objects of `api` that match `selector`, as `facts` of each by name:
/// one snapshot per change while the watch runs (a relist after a watch
/// restart is one change, once complete). Watch errors are logged (`what`
/// names the watch) and retried with backoff; the last snapshot stands
/// meanwhile.
fn snapshots<K, T>(
    api: Api<K>,
    selector: &str,
    what: String,
    facts: fn(&K) -> T,
) -> impl futures::Stream<Item = BTreeMap<String, T>> + Send
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    T: Clone + Send + 'static,
{
    let events = watcher::watcher(api, watcher::Config::default().labels(selector)).default_backoff().boxed();
    let start = (events, BTreeMap::<String, T>::new(), None::<BTreeMap<String, T>>, what);
    futures::stream::unfold(start, move |(mut events, mut known, mut relisting, what)| async move {
        loop {
            match events.next().await? {
                Ok(Event::Init) => relisting = Some(BTreeMap::new()),
                Ok(Event::InitApply(object)) => {
                    relisting.get_or_insert_with(BTreeMap::new).insert(object.name_any(), facts(&object));
                }
                Ok(Event::InitDone) => {
                    known = relisting.take().unwrap_or_default();
                    break;
                }
                Ok(Event::Apply(object)) => {
                    known.insert(object.name_any(), facts(&object));
                    break;
                }
                Ok(Event::Delete(object)) => {
                    known.remove(&object.name_any());
                    break;
                }
                Err(e) => tracing::warn!(error = %e, watch = %what, "watch error; retrying"),
            }
        }
        Some((known.clone(), (events, known, relisting, what)))
    })
}

/// Watches the member Pods (`selector`) for their ready times, leaving marks
/// and deletion times until shutdown. Without it (or while the watch fails, e.g. for lack
/// of RBAC) the member table uses the time this replica first saw a member
/// ready, and no member is marked leaving.
pub async fn watch_member_pods(
    bal: Arc<Balancer>,
    client: Client,
    namespace: String,
    selector: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let what = format!("member Pods {selector} in {namespace}");
    let mut pods = std::pin::pin!(snapshots(Api::<Pod>::namespaced(client, &namespace), &selector, what, pod_facts));
    let mut known: BTreeMap<String, PodFacts> = BTreeMap::new();
    loop {
        let now = tokio::select! {
            now = pods.next() => now,
            _ = shutdown.changed() => return,
        };
        let Some(now) = now else { return };
        for gone in known.keys().filter(|name| !now.contains_key(*name)) {
            bal.members.set_pod(gone, None);
        }
        for (name, facts) in now.iter().filter(|(name, facts)| known.get(*name) != Some(facts)) {
            bal.members.set_pod(name, Some(*facts));
        }
        known = now;
    }
}

/// Watches this balancer's own Pods (`selector`) and tells the session
/// moves which of them are ready: those share out the lead of moving
/// sessions ([`crate::balancer::moves`]). Until the first list (or while
/// the watch fails) the replica knows no peers and leads every move, as a
/// lone balancer does.
pub async fn watch_peer_pods(
    bal: Arc<Balancer>,
    client: Client,
    namespace: String,
    selector: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let what = format!("balancer Pods {selector} in {namespace}");
    let is_ready = |pod: &Pod| pod_ready_since(pod).is_some();
    let mut pods = std::pin::pin!(snapshots(Api::<Pod>::namespaced(client, &namespace), &selector, what, is_ready));
    let mut peers: Vec<String> = Vec::new();
    loop {
        let now = tokio::select! {
            now = pods.next() => now,
            _ = shutdown.changed() => return,
        };
        let Some(now) = now else { return };
        let ready: Vec<String> = now.into_iter().filter(|(_, ready)| *ready).map(|(name, _)| name).collect();
        if ready != peers {
            tracing::info!(peers = ?ready, "ready balancer replicas");
            bal.moves.set_peers(ready.clone());
            peers = ready;
        }
    }
}

/// Watches the EndpointSlices of `service` and applies every change to the
/// member table until shutdown.
pub async fn watch_endpoint_slices(
    bal: Arc<Balancer>,
    client: Client,
    namespace: String,
    service: String,
    port_name: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let what = format!("EndpointSlices of {namespace}/{service}");
    let selector = format!("{SERVICE_NAME_LABEL}={service}");
    let api = Api::<EndpointSlice>::namespaced(client, &namespace);
    let mut slices = std::pin::pin!(snapshots(api, &selector, what, EndpointSlice::clone));
    loop {
        let now = tokio::select! {
            now = slices.next() => now,
            _ = shutdown.changed() => return,
        };
        let Some(now) = now else { return };
        let members = resolve_members(endpoint_members(now.values(), &port_name)).await;
        tracing::info!(%namespace, %service, members = members.len(), "EndpointSlices changed");
        bal.members.apply(&members, &bal.metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml_ng::from_str(yaml).expect("slice yaml")
    }

    #[test]
    fn conditions_map_to_states() {
        let s = slice(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: shop-abc, labels: { kubernetes.io/service-name: shop } }
addressType: IPv4
ports: [ { name: http, port: 8080 }, { name: ajp, port: 8009 } ]
endpoints:
  - addresses: ["10.0.0.1"]
    conditions: { ready: true, serving: true, terminating: false }
    targetRef: { kind: Pod, name: shop-0 }
  - addresses: ["10.0.0.2"]
    conditions: { ready: false, serving: true, terminating: true }
    targetRef: { kind: Pod, name: shop-1 }
  - addresses: ["10.0.0.3"]
    conditions: { ready: false, serving: false, terminating: false }
    targetRef: { kind: Pod, name: shop-2 }
  - addresses: ["10.0.0.4"]
    hostname: shop-3
"#,
        );
        let m = members_from_slices([&s], "ajp");
        let view: Vec<_> =
            m.iter().map(|m| (m.route.as_str(), m.address.to_string(), m.state, m.terminating)).collect();
        assert_eq!(
            view,
            [
                ("shop-0", "10.0.0.1:8009".to_string(), MemberState::Ready, false),
                ("shop-1", "10.0.0.2:8009".to_string(), MemberState::Draining, true),
                ("shop-2", "10.0.0.3:8009".to_string(), MemberState::Down, false),
                ("shop-3", "10.0.0.4:8009".to_string(), MemberState::Ready, false),
            ]
        );
        assert!(members_from_slices([&s], "nope").is_empty(), "no port of that name among several");
    }

    #[tokio::test]
    async fn fqdn_endpoints_resolve() {
        let s = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: f}\naddressType: FQDN\nports: [{name: ajp, port: 8009}]\nendpoints: [{addresses: [\"web-0.localhost\"], targetRef: {kind: Pod, name: web-0}}, {addresses: [\"no-such-host.invalid\"], targetRef: {kind: Pod, name: web-1}}]\n",
        );
        assert!(members_from_slices([&s], "ajp").is_empty(), "names need resolving");
        let m = resolve_members(endpoint_members([&s], "ajp")).await;
        assert_eq!(m.len(), 1, "the unresolvable name is left out");
        assert_eq!(m[0].address, "127.0.0.1:8009".parse().expect("addr"));
        assert!(is_localhost_name("A.LOCALHOST.") && !is_localhost_name("localhost.example"));
    }

    #[test]
    fn duplicates_keep_the_best_state() {
        let a = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a}\naddressType: IPv4\nports: [{port: 8009}]\nendpoints: [{addresses: [\"10.0.0.1\"], conditions: {ready: false, serving: false}, targetRef: {kind: Pod, name: p}}]\n",
        );
        let b = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: b}\naddressType: IPv4\nports: [{port: 8009}]\nendpoints: [{addresses: [\"10.0.0.1\"], conditions: {ready: true}, targetRef: {kind: Pod, name: p}}]\n",
        );
        let m = members_from_slices([&a, &b], "ajp");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].state, MemberState::Ready, "the single port is used even without the name");
    }
}
