//! Real Tomcat 10.1 nodes (Debian `tomcat10`) running the counter sample,
//! clustered with static membership (DeltaManager, use_ack+sync), each with
//! its own CATALINA_BASE, ports and jvmRoute.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{TempDir, free_port, http, repo_root};

pub const CATALINA_HOME: &str = "/usr/share/tomcat10";

/// The counter app, compiled once per source hash into
/// `target/counter-app/<hash>` (exploded WAR).
pub fn counter_app() -> &'static Path {
    static APP: OnceLock<PathBuf> = OnceLock::new();
    APP.get_or_init(|| {
        let app_src = repo_root().join("deploy/examples/counter-app");
        let mut files: Vec<PathBuf> = Vec::new();
        collect_files(&app_src.join("src"), &mut files);
        files.push(app_src.join("build.sh"));
        files.sort();
        let mut hasher = Sha256::new();
        for f in &files {
            hasher.update(f.strip_prefix(&app_src).expect("inside").to_string_lossy().as_bytes());
            hasher.update(std::fs::read(f).expect("read app source"));
        }
        let hash: String = hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        let out = repo_root().join("target/counter-app").join(&hash);
        if !out.join("WEB-INF/classes/io/clusterapp/counter/CounterServlet.class").exists() {
            let staging = repo_root().join(format!("target/counter-app/.build-{}-{hash}", std::process::id()));
            let _ = std::fs::remove_dir_all(&staging);
            let status =
                Command::new("bash").arg(app_src.join("build.sh")).arg(&staging).status().expect("run build.sh");
            assert!(status.success(), "building the counter app failed");
            // Another test binary may have won the race; either copy is complete.
            if std::fs::rename(&staging, &out).is_err() {
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        out
    })
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Ports and identity of one node, chosen before any node starts so the
/// static membership of each can list the others.
#[derive(Debug, Clone)]
pub struct NodePlan {
    pub route: String,
    pub http_port: u16,
    pub ajp_port: u16,
    /// The HTTP connector for the balancer (`TomcatOptions::http_backend`).
    pub backend_http_port: u16,
    pub receiver_port: u16,
    pub unique_id: u8,
}

pub struct TomcatNode {
    pub route: String,
    pub http_port: u16,
    pub ajp_port: u16,
    pub backend_http_port: u16,
    pub receiver_port: u16,
    child: Option<Child>,
    base: TempDir,
    jvm_opts: Vec<String>,
}

/// Connector and cluster knobs.
#[derive(Debug, Clone)]
pub struct TomcatOptions {
    pub secret: String,
    pub max_threads: u32,
    /// Extra JVM options (heap, JIT).
    pub jvm_opts: Vec<String>,
    pub clustered: bool,
    /// The balancer speaks HTTP: an HTTP connector on `backend_http_port`
    /// with the operator's RemoteIpValve and SSLValve instead of AJP.
    pub http_backend: bool,
    /// With `http_backend`, the AJP connector too: `make bench` measures
    /// both backend protocols on the same Tomcats.
    pub keep_ajp_connector: bool,
    /// With `clustered`: the operator's `sessions.orderedRequests` valve
    /// (one request of a session at a time on a node).
    pub ordered_requests: bool,
}

impl TomcatOptions {
    pub fn new(secret: &str) -> Self {
        TomcatOptions {
            secret: secret.to_string(),
            max_threads: 200,
            // Fast start for tests: C1 only, small heap.
            jvm_opts: vec![
                "-Xms64m".into(),
                "-Xmx256m".into(),
                "-XX:TieredStopAtLevel=1".into(),
                "-XX:+UseSerialGC".into(),
            ],
            clustered: true,
            ordered_requests: true,
            http_backend: false,
            keep_ajp_connector: false,
        }
    }
}

fn unique_id(n: u8) -> String {
    let mut parts = vec!["0".to_string(); 15];
    parts.push(n.to_string());
    format!("{{{}}}", parts.join(","))
}

fn server_xml(me: &NodePlan, peers: &[NodePlan], o: &TomcatOptions) -> String {
    let members: String = peers
        .iter()
        .filter(|p| p.route != me.route)
        .map(|p| {
            format!(
                r#"          <Member className="org.apache.catalina.tribes.membership.StaticMember" host="127.0.0.1" port="{}" uniqueId="{}"/>
"#,
                p.receiver_port,
                unique_id(p.unique_id)
            )
        })
        .collect();
    let cluster = if o.clustered {
        format!(
            r#"{ordered}      <Cluster className="org.apache.catalina.ha.tcp.SimpleTcpCluster" channelSendOptions="6">
        <Manager className="org.apache.catalina.ha.session.DeltaManager" expireSessionsOnShutdown="false"
                 notifyListenersOnReplication="true" stateTransferTimeout="60"/>
        <Channel className="org.apache.catalina.tribes.group.GroupChannel">
          <Membership className="org.apache.catalina.tribes.membership.StaticMembershipService">
          <LocalMember className="org.apache.catalina.tribes.membership.StaticMember" uniqueId="{local_id}"/>
{members}          </Membership>
          <Receiver className="org.apache.catalina.tribes.transport.nio.NioReceiver" address="127.0.0.1"
                    port="{receiver}" autoBind="1" selectorTimeout="100" maxThreads="6"/>
          <Sender className="org.apache.catalina.tribes.transport.ReplicationTransmitter">
            <Transport className="org.apache.catalina.tribes.transport.nio.PooledParallelSender"/>
          </Sender>
          <Interceptor className="org.apache.catalina.tribes.group.interceptors.TcpPingInterceptor" staticOnly="true"/>
          <Interceptor className="org.apache.catalina.tribes.group.interceptors.TcpFailureDetector"/>
          <Interceptor className="org.apache.catalina.tribes.group.interceptors.MessageDispatchInterceptor"/>
        </Channel>
        <Valve className="org.apache.catalina.ha.tcp.ReplicationValve" filter=""/>
        <Valve className="org.apache.catalina.ha.session.JvmRouteBinderValve"/>
        <ClusterListener className="org.apache.catalina.ha.session.ClusterSessionListener"/>
      </Cluster>
"#,
            ordered =
                if o.ordered_requests { clusterapp::operator::build::server_xml::ordered_requests_valve() } else { "" },
            local_id = unique_id(me.unique_id),
            receiver = me.receiver_port,
        )
    } else {
        String::new()
    };
    // With the HTTP backend: the connector and valves the operator writes
    // (src/operator/build/server_xml.rs), on loopback.
    let ajp_connector = format!(
        r#"    <Connector port="{}" address="127.0.0.1" protocol="AJP/1.3" secret="{}" secretRequired="true"
               packetSize="8192" maxThreads="{}"/>"#,
        me.ajp_port, o.secret, o.max_threads
    );
    let (backend_connector, valves) = if o.http_backend {
        let http_connector = format!(
            r#"    <Connector port="{}" address="127.0.0.1" protocol="HTTP/1.1" connectionTimeout="20000"
               maxThreads="{}" maxKeepAliveRequests="-1"/>"#,
            me.backend_http_port, o.max_threads
        );
        let connectors =
            if o.keep_ajp_connector { format!("{http_connector}\n{ajp_connector}") } else { http_connector };
        (connectors, clusterapp::operator::build::server_xml::http_backend_valves())
    } else {
        (ajp_connector, "")
    };
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector port="{http}" address="127.0.0.1" protocol="HTTP/1.1" connectionTimeout="20000"
               maxThreads="{threads}" maxKeepAliveRequests="-1"/>
{backend_connector}
    <Engine name="Catalina" defaultHost="localhost" jvmRoute="{route}">
{valves}{cluster}      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false"/>
    </Engine>
  </Service>
</Server>
"#,
        http = me.http_port,
        threads = o.max_threads,
        route = me.route,
    )
}

impl TomcatNode {
    /// Starts one node and waits until the app answers on its HTTP port.
    pub fn start(me: &NodePlan, peers: &[NodePlan], options: &TomcatOptions) -> TomcatNode {
        let app = counter_app();
        let base = TempDir::new(&format!("tomcat-{}", me.route));
        let b = base.path();
        for d in ["conf/Catalina/localhost", "logs", "temp", "work", "webapps"] {
            std::fs::create_dir_all(b.join(d)).expect("mkdir");
        }
        std::fs::write(b.join("conf/server.xml"), server_xml(me, peers, options)).expect("server.xml");
        std::fs::copy(Path::new(CATALINA_HOME).join("etc/web.xml"), b.join("conf/web.xml")).expect("copy web.xml");
        std::fs::write(
            b.join("conf/logging.properties"),
            "handlers = java.util.logging.ConsoleHandler\n.level = INFO\njava.util.logging.ConsoleHandler.level = INFO\n\
             java.util.logging.ConsoleHandler.formatter = org.apache.juli.OneLineFormatter\n",
        )
        .expect("logging.properties");
        std::fs::write(
            b.join("conf/Catalina/localhost/counter.xml"),
            format!("<Context docBase=\"{}\"/>\n", app.display()),
        )
        .expect("context xml");
        let mut node = TomcatNode {
            route: me.route.clone(),
            http_port: me.http_port,
            ajp_port: me.ajp_port,
            backend_http_port: me.backend_http_port,
            receiver_port: me.receiver_port,
            child: None,
            base,
            jvm_opts: options.jvm_opts.clone(),
        };
        node.launch();
        node
    }

    /// Starts the JVM on this node's base and ports and waits until the app answers.
    fn launch(&mut self) {
        let b = self.base.path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(b.join("logs/catalina.out")).expect("log");
        let home = Path::new(CATALINA_HOME);
        let child = Command::new("java")
            .args(&self.jvm_opts)
            .arg(format!("-Dcatalina.home={CATALINA_HOME}"))
            .arg(format!("-Dcatalina.base={}", b.display()))
            .arg(format!("-Djava.io.tmpdir={}", b.join("temp").display()))
            .arg(format!("-Djava.util.logging.config.file={}", b.join("conf/logging.properties").display()))
            .arg("-Djava.util.logging.manager=org.apache.juli.ClassLoaderLogManager")
            .arg("-Djava.net.preferIPv4Stack=true")
            .arg("-cp")
            .arg(format!("{}:{}", home.join("bin/bootstrap.jar").display(), home.join("bin/tomcat-juli.jar").display()))
            .arg("org.apache.catalina.startup.Bootstrap")
            .arg("start")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log)
            .spawn()
            .expect("spawn java (Tomcat)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        let addr = format!("127.0.0.1:{}", self.http_port).parse().expect("addr");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("Tomcat {} exited with {status}:\n{}", self.route, self.log_text());
            }
            if http::blocking_status(addr, "/counter/echo") == Some(200) {
                break;
            }
            assert!(Instant::now() < deadline, "Tomcat {} did not start:\n{}", self.route, self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts a stopped node again on the same ports and configuration.
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.base.path().join("logs/catalina.out")).unwrap_or_default()
    }

    /// `kill -9`: the node dies without any chance to hand off sessions.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TomcatNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: String =
                text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            eprintln!("---- Tomcat {} log (tail) ----\n{tail}", self.route);
        }
        self.kill9();
    }
}

/// Plans `routes.len()` nodes with free ports.
pub fn plan(routes: &[&str]) -> Vec<NodePlan> {
    routes
        .iter()
        .enumerate()
        .map(|(i, r)| NodePlan {
            route: r.to_string(),
            http_port: free_port(),
            ajp_port: free_port(),
            backend_http_port: free_port(),
            receiver_port: free_port(),
            unique_id: i as u8 + 1,
        })
        .collect()
}

/// Starts a cluster one node after another (simultaneous starts can stall
/// in state transfer) and waits until every node sees all its peers.
pub fn start_cluster(routes: &[&str], options: &TomcatOptions) -> Vec<TomcatNode> {
    let plans = plan(routes);
    let nodes: Vec<TomcatNode> = plans.iter().map(|p| TomcatNode::start(p, &plans, options)).collect();
    if options.clustered && nodes.len() > 1 {
        let expected = nodes.len() - 1;
        super::wait_until(Duration::from_secs(30), "cluster membership", || {
            nodes.iter().all(|n| n.log_text().matches("Replication member added").count() >= expected)
        });
    }
    nodes
}
