//! Command line of `clusterapp balancer`. Every limit is a named option with
//! a default that matches (or is stricter than) httpd's.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::ajp::{DEFAULT_PACKET_SIZE, MAX_PACKET_SIZE, MIN_PACKET_SIZE};
use super::member::{MemberSpec, MemberState};

/// How a request without a usable sticky route picks its member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LbMethod {
    /// Round robin over ready members (httpd's byrequests with equal weights).
    Byrequests,
    /// The member with the fewest requests in flight.
    Bybusyness,
    /// The member that has moved the fewest bytes.
    Bytraffic,
}

/// What the balancer speaks to the Tomcat nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// AJP/1.3 to the AJP connector, authenticated by its `secret`.
    Ajp,
    /// HTTP/1.1 to an HTTP connector with `RemoteIpValve` and `SSLValve`;
    /// the client's address, scheme, port and TLS facts travel as headers.
    Http,
}

#[derive(Debug, Clone, Args)]
pub struct BalancerArgs {
    /// Address the HTTP/1.1 front listens on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "BALANCER_LISTEN")]
    pub listen: SocketAddr,
    /// Address of the admin server (/metrics, /healthz, /readyz, status page).
    #[arg(long, default_value = "0.0.0.0:9090", env = "BALANCER_ADMIN_LISTEN")]
    pub admin_listen: SocketAddr,

    /// A static member `ROUTE=HOST:PORT` (repeatable).
    #[arg(long = "member", value_name = "ROUTE=HOST:PORT", value_parser = parse_static_member)]
    pub members: Vec<MemberSpec>,
    /// A YAML file `members: [{route, address, state}]`, reloaded when it changes.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["members", "kubernetes_service"])]
    pub members_file: Option<PathBuf>,
    /// Members from the EndpointSlices of this Service; a member's route is its Pod name.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "members")]
    pub kubernetes_service: Option<String>,
    /// Label selector of the member Pods (with `--kubernetes-service`): their
    /// `Ready` times are the shared clock of rebalancing, and a Pod labelled
    /// `clusterapp.io/leaving=true` gets no new or failing-over sessions
    /// (needs `list` and `watch` on pods).
    #[arg(long, value_name = "SELECTOR", requires = "kubernetes_service")]
    pub kubernetes_pod_selector: Option<String>,
    /// Label selector of this balancer's own Pods (with
    /// `--kubernetes-service`): the ready ones share out the lead of moving
    /// sessions (see `--move-follower-pause`; needs `list` and `watch` on pods).
    #[arg(long, value_name = "SELECTOR", requires = "kubernetes_service")]
    pub kubernetes_peer_selector: Option<String>,
    /// This replica's Pod name, among the Pods of `--kubernetes-peer-selector`.
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// How long a replica that does not lead a moving session (failover,
    /// rebalancing) holds the session's first request, so that the leading
    /// replica's reaches the new member first: with Tomcat's BackupManager
    /// the member renames the session in steps, and a request arriving in
    /// between gets a new session. After a crash of the session's member,
    /// the leading replica's first request also waits until the member has
    /// been unhealthy this long (the Tomcat nodes settle their replicated
    /// map first), and the others one pause more. 0: off (the operator sets
    /// it for `replication: backup`).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub move_follower_pause: Duration,
    /// Name of the members' port in the EndpointSlices (the AJP port, or the
    /// HTTP one with `--backend-protocol http`; a slice with one port uses that one).
    #[arg(long, default_value = "ajp")]
    pub kubernetes_port_name: String,

    /// Address of an HTTPS front (TLS terminated here; Tomcat sees the
    /// request as secure, with the cipher, protocol and client certificate).
    /// Serves alongside `--listen`.
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert_file", "tls_key_file"], env = "BALANCER_TLS_LISTEN")]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the HTTPS front (e.g. a mounted `kubernetes.io/tls`
    /// Secret's `tls.crt`); reloaded when it changes.
    #[arg(long, value_name = "FILE", requires = "tls_listen", env = "BALANCER_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for `--tls-cert-file` (PKCS#8, PKCS#1 or SEC1); reloaded when it changes.
    #[arg(long, value_name = "FILE", requires = "tls_listen", env = "BALANCER_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: clients are asked for a certificate, and one they
    /// send must chain to these; it reaches Tomcat as the request's X509Certificate.
    #[arg(long, value_name = "FILE", requires = "tls_listen")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Refuse TLS clients without a certificate from `--tls-client-ca-file`.
    #[arg(long, requires = "tls_client_ca_file")]
    pub tls_require_client_cert: bool,

    /// Protocol to the members: `ajp` (AJP/1.3) or `http` (HTTP/1.1 with
    /// `X-Forwarded-*` and `SSL_*` headers for Tomcat's RemoteIpValve and
    /// SSLValve). Member addresses are the ports of that connector.
    #[arg(long, value_enum, default_value_t = BackendProtocol::Ajp, env = "BALANCER_BACKEND_PROTOCOL")]
    pub backend_protocol: BackendProtocol,
    /// File holding the AJP connector's `secret` (required with
    /// `--backend-protocol ajp`: the secret is always on; unused with `http`).
    #[arg(long, value_name = "FILE", env = "BALANCER_AJP_SECRET_FILE")]
    pub ajp_secret_file: Option<PathBuf>,
    /// AJP packet size; must equal the connector's `packetSize`.
    #[arg(long, default_value_t = DEFAULT_PACKET_SIZE, value_parser = parse_packet_size)]
    pub packet_size: usize,

    /// Session cookie whose value carries the route after the first '.'.
    #[arg(long, default_value = "JSESSIONID")]
    pub sticky_cookie: String,
    /// Path parameter carrying the session id (wins over the cookie).
    #[arg(long, default_value = "jsessionid")]
    pub sticky_path_param: String,
    /// How new sessions (and requests without a route) pick a member.
    #[arg(long, value_enum, default_value_t = LbMethod::Byrequests)]
    pub method: LbMethod,
    /// A sticky request whose member is unusable gets 503 instead of moving.
    #[arg(long)]
    pub no_failover: bool,
    /// How long a member whose pod is terminating (Kubernetes membership:
    /// endpoint `serving` + `terminating`) keeps its sticky sessions, from
    /// when the balancer first sees it terminating; after that its sessions
    /// fail over to other members (replicated; Tomcat rewrites the route)
    /// while its in-flight requests finish. Set it well below the pod's
    /// `preStop` wait, so the node is idle before it gets SIGTERM. 0: fail
    /// over at once. Members drained in a `--members-file` never time out.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "BALANCER_DRAIN_TIMEOUT")]
    pub drain_timeout: Duration,

    /// Rebalancing: after a member joins (scale-up, rolling update, a node's
    /// return), existing sessions that weigh most for it move to it, spread
    /// over this long from a few seconds after it became ready (the Pod's
    /// `Ready` time with `--kubernetes-pod-selector`). Every replica moves a
    /// session at the same instant, so none splits. Needs every member to
    /// hold every session (Tomcat DeltaManager). 0: off (the default; the
    /// operator turns it on).
    #[arg(long, default_value = "0s", value_parser = parse_duration, env = "BALANCER_REBALANCE_RAMP")]
    pub rebalance_ramp: Duration,
    /// Unix time (seconds) before which a member that became ready is no
    /// newcomer: the members of a starting app come up one after another,
    /// and its first sessions should stay where they were born. The operator
    /// passes the ClusterApp's creation time plus two minutes.
    #[arg(long, value_name = "UNIX_SECONDS", default_value_t = 0)]
    pub rebalance_after: u64,

    /// Connect timeout to a member; keeps the cost of a dead node low.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// How long a member whose connects and probes only time out (it may be
    /// gone, or only busy) keeps its sessions: their requests wait for it
    /// rather than move the session while it may still answer another
    /// balancer replica. A refused or reset connection fails over at once.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub slow_member_grace: Duration,
    /// Longest wait for the next AJP packet from a member, or with HTTP for
    /// the response head (while the request body does not move) and for
    /// each piece of the response body (httpd's `timeout`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub backend_timeout: Duration,
    /// A pooled connection idle this long or longer is checked with CPing
    /// (with HTTP: an `OPTIONS *` request) before reuse (0: always, as
    /// httpd's `ping=`; new connections always are).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub cping_after_idle: Duration,
    /// Longest wait for a CPong (with HTTP: the answer to `OPTIONS *`).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub cping_timeout: Duration,
    /// Interval of active health checks of every member (CPing; with HTTP `OPTIONS *`).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Connections per member (in use at once); further requests wait.
    #[arg(long, default_value_t = 512)]
    pub pool_max_per_member: usize,
    /// Longest wait for a free connection slot of a member.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub pool_wait_timeout: Duration,

    /// Client connections served at once; more are closed on accept.
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: usize,
    /// Largest request head (request line and headers), bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
    /// Most request headers.
    #[arg(long, default_value_t = 100)]
    pub max_headers: usize,
    /// Time a client has to send a complete request head (slowloris guard).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Largest request body in bytes; unlimited when unset (like httpd).
    #[arg(long)]
    pub max_body_bytes: Option<u64>,
    /// Log one line per request when its response is done (target
    /// `clusterapp::access`: client, method, URI, status, bytes, duration,
    /// member, failover, complete, user agent; no cookies or credentials).
    #[arg(long, env = "BALANCER_ACCESS_LOG")]
    pub access_log: bool,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// `ROUTE=HOST:PORT`.
pub fn parse_static_member(s: &str) -> Result<MemberSpec, String> {
    let (route, addr) = s.split_once('=').ok_or_else(|| format!("expected ROUTE=HOST:PORT, got {s:?}"))?;
    if route.is_empty() || route.contains(['.', ';', ',', ' ']) {
        return Err(format!("invalid route {route:?}"));
    }
    let address = resolve(addr)?;
    Ok(MemberSpec {
        route: route.to_string(),
        address,
        state: MemberState::Ready,
        terminating: false,
        ready_since: None,
    })
}

/// Resolves `HOST:PORT` once (static and file members are not re-resolved).
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to nothing"))
}

fn parse_packet_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if !(MIN_PACKET_SIZE..=MAX_PACKET_SIZE).contains(&n) {
        return Err(format!("packet size must be within {MIN_PACKET_SIZE}..={MAX_PACKET_SIZE}"));
    }
    Ok(n)
}

/// `250ms`, `2s`, `1m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {s:?} (ms, s, m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn static_members() {
        let m = parse_static_member("s1=127.0.0.1:8009").expect("parse");
        assert_eq!(m.route, "s1");
        assert_eq!(m.address, "127.0.0.1:8009".parse().expect("addr"));
        assert!(parse_static_member("127.0.0.1:8009").is_err());
        assert!(parse_static_member("a.b=127.0.0.1:8009").is_err(), "a route cannot contain the id separator");
        assert!(parse_static_member("s1=nowhere").is_err());
    }

    #[test]
    fn packet_sizes() {
        assert!(parse_packet_size("8192").is_ok());
        assert!(parse_packet_size("65536").is_ok());
        assert!(parse_packet_size("4096").is_err());
        assert!(parse_packet_size("65537").is_err());
    }
}
