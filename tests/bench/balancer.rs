//! `make bench`: the balancer against Apache httpd 2.4 (event MPM,
//! mod_proxy_ajp + mod_proxy_balancer) in front of the same 3 Tomcats,
//! measured in the same run, interleaved, with wrk.
//!
//! Prints a table (req/s, p50, p99, proxy CPU seconds per 10k requests,
//! proxy RSS) and, last, the ratio lines the issue asks for.
//! Knobs: BENCH_SECONDS (per run, default 8), BENCH_ROUNDS (default 3),
//! BENCH_CONNECTIONS (default 64), BENCH_BASELINE_BIN (another build of
//! clusterapp, e.g. of the last commit: one more row, the default balancer
//! run from that binary, interleaved with the others, so a change's cost is
//! told apart from the machine's drift between runs).

#[path = "../balancer/common/mod.rs"]
mod balancer_common;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use balancer_common::tomcat::{TomcatOptions, start_cluster};
use balancer_common::{Balancer, BalancerOptions, TempDir, free_port, wait_until};

const SECRET: &str = "bench-secret";
const PATH: &str = "/counter/echo";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Apache httpd configured like our balancer.
struct Httpd {
    child: Option<Child>,
    /// mod_proxy_ajp.
    port: u16,
    /// mod_proxy_http to the Tomcats' HTTP connectors: the peer of the
    /// balancer's HTTP backend.
    http_proxy_port: u16,
    /// HTTPS (mod_ssl) in front of the same balancer.
    tls_port: u16,
    dir: TempDir,
}

/// A certificate (ECDSA P-256, self-signed) both proxies serve HTTPS with.
struct TlsFiles {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    _dir: TempDir,
}

impl TlsFiles {
    fn new() -> TlsFiles {
        let dir = TempDir::new("bench-tls");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["bench.local".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        // httpd's children run as www-data.
        let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(dir.path()).status();
        TlsFiles { cert: cert_path, key: key_path, _dir: dir }
    }
}

const HTTPD_SERVERS: u32 = 2;
const HTTPD_THREADS_PER_CHILD: u32 = 64;
/// httpd keeps up to ThreadsPerChild connections per member in each child
/// process; the balancer gets the same ceiling per member.
const BALANCER_POOL_PER_MEMBER: u32 = HTTPD_SERVERS * HTTPD_THREADS_PER_CHILD;
const TOMCAT_THREADS: u32 = 200;
/// The balancer CPings every pooled connection before reusing it
/// (`--cping-after-idle` 0s, its default) and waits `--cping-timeout`
/// (500ms) for the CPong; httpd's `ping=` does the same before every request.
const HTTPD_PING: &str = "500ms";
const WRK_THREADS: u32 = 2;

impl Httpd {
    /// `members`: (route, AJP port, HTTP connector port) of each Tomcat.
    fn start(members: &[(String, u16, u16)], tls: &TlsFiles) -> Httpd {
        let dir = TempDir::new("httpd");
        let port = free_port();
        let tls_port = free_port();
        let http_proxy_port = free_port();
        let m = "/usr/lib/apache2/modules";
        let balancer_members: String = members
            .iter()
            .map(|(route, ajp, _)| {
                format!("  BalancerMember ajp://127.0.0.1:{ajp} route={route} secret={SECRET} ping={HTTPD_PING}\n")
            })
            .collect();
        // No `ping=`: for HTTP it only adds `Expect: 100-continue` to
        // requests with a body, and the bench's GETs have none.
        let http_members: String = members
            .iter()
            .map(|(route, _, http)| format!("  BalancerMember http://127.0.0.1:{http} route={route}\n"))
            .collect();
        let conf = format!(
            r#"ServerRoot {root}
ServerName bench.local
Listen 127.0.0.1:{port}
PidFile {root}/httpd.pid
DefaultRuntimeDir {root}
Mutex file:{root} default
ErrorLog {root}/error.log
LogLevel warn
LoadModule mpm_event_module {m}/mod_mpm_event.so
LoadModule authz_core_module {m}/mod_authz_core.so
LoadModule slotmem_shm_module {m}/mod_slotmem_shm.so
LoadModule proxy_module {m}/mod_proxy.so
LoadModule proxy_ajp_module {m}/mod_proxy_ajp.so
LoadModule proxy_http_module {m}/mod_proxy_http.so
LoadModule proxy_balancer_module {m}/mod_proxy_balancer.so
LoadModule lbmethod_byrequests_module {m}/mod_lbmethod_byrequests.so
LoadModule socache_shmcb_module {m}/mod_socache_shmcb.so
LoadModule ssl_module {m}/mod_ssl.so
Listen 127.0.0.1:{tls_port} https
SSLSessionCache shmcb:{root}/ssl_scache(512000)
<VirtualHost 127.0.0.1:{tls_port}>
  SSLEngine on
  SSLCertificateFile {cert}
  SSLCertificateKeyFile {key}
  ProxyPass / balancer://tomcats/
</VirtualHost>
Listen 127.0.0.1:{http_proxy_port}
<VirtualHost 127.0.0.1:{http_proxy_port}>
  ProxyPass / balancer://tomcats-http/
</VirtualHost>
User www-data
Group www-data
StartServers {servers}
ServerLimit {servers}
ThreadsPerChild {threads}
ThreadLimit {threads}
MinSpareThreads 1
MaxSpareThreads {max_threads}
MaxRequestWorkers {max_threads}
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 30
<Proxy balancer://tomcats>
{balancer_members}  ProxySet stickysession=JSESSIONID|jsessionid lbmethod=byrequests
</Proxy>
<Proxy balancer://tomcats-http>
{http_members}  ProxySet stickysession=JSESSIONID|jsessionid lbmethod=byrequests
</Proxy>
<VirtualHost 127.0.0.1:{port}>
  ProxyPass / balancer://tomcats/
</VirtualHost>
"#,
            root = dir.path().display(),
            servers = HTTPD_SERVERS,
            threads = HTTPD_THREADS_PER_CHILD,
            max_threads = HTTPD_SERVERS * HTTPD_THREADS_PER_CHILD,
            cert = tls.cert.display(),
            key = tls.key.display(),
        );
        let conf_path = dir.path().join("httpd.conf");
        std::fs::write(&conf_path, conf).expect("httpd.conf");
        // www-data must be able to reach the runtime dir.
        let _ = Command::new("chmod").args(["0777"]).arg(dir.path()).status();
        let child = Command::new("/usr/sbin/apache2")
            .arg("-f")
            .arg(&conf_path)
            .arg("-DFOREGROUND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start apache2");
        let mut h = Httpd { child: Some(child), port, http_proxy_port, tls_port, dir };
        wait_until(Duration::from_secs(15), "httpd", || {
            [port, http_proxy_port].iter().all(|p| {
                balancer_common::http::blocking_status(format!("127.0.0.1:{p}").parse().expect("addr"), PATH)
                    == Some(200)
            })
        });
        if let Some(c) = h.child.as_mut() {
            assert!(
                c.try_wait().ok().flatten().is_none(),
                "httpd exited: {}",
                std::fs::read_to_string(h.dir.path().join("error.log")).unwrap_or_default()
            );
        }
        h
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM lets the parent stop its own children.
            balancer_common::signal(c.id(), "TERM");
            for _ in 0..50 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A process and its children (httpd's workers).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let out = Command::new("pgrep").arg("-P").arg(pid.to_string()).output().expect("pgrep");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Ok(child) = line.trim().parse::<u32>() {
            all.extend(process_tree(child));
        }
    }
    all
}

/// CPU seconds (user + system) of a process tree.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = 100.0; // CLK_TCK on Linux
    process_tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            let after = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = after.split(' ').collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / ticks
}

/// Resident memory of a process tree in MiB.
fn rss_mb(pid: u32) -> f64 {
    process_tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum::<f64>()
        / 1024.0
}

#[derive(Debug, Default, Clone)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_per_10k: Option<f64>,
    rss_mb: Option<f64>,
    /// CPU seconds per 10k requests of the three Tomcats together.
    tomcat_cpu_per_10k: f64,
    /// CPU seconds per 10k requests of wrk itself.
    wrk_cpu_per_10k: f64,
}

fn parse_latency(s: &str) -> f64 {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        _ => f64::NAN,
    }
}

/// Runs wrk against `port` and measures it, with the CPU time every part
/// spent on the run: the proxy (`proxy_pid`'s tree), the Tomcats, wrk.
fn wrk(
    target: (&str, u16),
    cookie: Option<&str>,
    seconds: u64,
    connections: u64,
    proxy_pid: Option<u32>,
    tomcat_pids: &[u32],
) -> Sample {
    let (scheme, port) = target;
    let cpu_before = proxy_pid.map(cpu_seconds);
    let tomcat_before: f64 = tomcat_pids.iter().map(|&p| cpu_seconds(p)).sum();
    // wrk runs under `sh`, which reports its waited-for children's CPU
    // (cutime + cstime in /proc/self/stat) once wrk has exited.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "wrk \"$@\" && echo \"WRKSTAT $(cat /proc/$$/stat)\"", "sh"]);
    cmd.args([
        "-t",
        &WRK_THREADS.to_string(),
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--latency",
    ]);
    if let Some(c) = cookie {
        cmd.args(["-H", &format!("Cookie: JSESSIONID={c}")]);
    }
    cmd.arg(format!("{scheme}://127.0.0.1:{port}{PATH}"));
    let out = cmd.output().expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut s = Sample::default();
    let mut requests = 0.0;
    let mut wrk_cpu = f64::NAN;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            s.p50_ms = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            s.p99_ms = parse_latency(v);
        } else if t.contains("requests in") {
            requests = t.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
        } else if t.starts_with("Non-2xx") || t.starts_with("Socket errors") {
            eprintln!("wrk on :{port}: {t}");
        } else if let Some(stat) = t.strip_prefix("WRKSTAT ") {
            // Fields after the command name: cutime and cstime are the 14th and 15th.
            let f: Vec<&str> =
                stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
            if let (Some(u), Some(st)) =
                (f.get(13).and_then(|v| v.parse::<f64>().ok()), f.get(14).and_then(|v| v.parse::<f64>().ok()))
            {
                wrk_cpu = (u + st) / 100.0;
            }
        }
    }
    if requests > 0.0 {
        let tomcat_after: f64 = tomcat_pids.iter().map(|&p| cpu_seconds(p)).sum();
        s.tomcat_cpu_per_10k = (tomcat_after - tomcat_before) / requests * 10_000.0;
        s.wrk_cpu_per_10k = wrk_cpu / requests * 10_000.0;
    }
    if let (Some(pid), Some(before)) = (proxy_pid, cpu_before) {
        if requests > 0.0 {
            s.cpu_per_10k = Some((cpu_seconds(pid) - before) / requests * 10_000.0);
        }
        s.rss_mb = Some(rss_mb(pid));
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[v.len() / 2]
}

// Row names: the two-digit prefix orders the table.
const DIRECT: &str = "01 direct tomcat";
const HTTPD_STICKY: &str = "02 httpd sticky";
const BALANCER_STICKY: &str = "03 balancer sticky";
const BALANCER_IDLE_PING: &str = "06 balancer sticky, CPing if idle>=1s";
const HTTPD_HTTP: &str = "09 httpd sticky, mod_proxy_http";
const BALANCER_HTTP: &str = "10 balancer sticky, HTTP backend";
const BALANCER_ONE_WORKER: &str = "11 balancer sticky, 1 worker thread";
const BALANCER_BASELINE: &str = "12 balancer sticky, baseline binary";

fn main() {
    let seconds = env_or("BENCH_SECONDS", 8);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let connections = env_or("BENCH_CONNECTIONS", 64);
    for tool in ["wrk", "/usr/sbin/apache2", "java", "gnuplot"] {
        assert!(
            Command::new("which").arg(tool).output().map(|o| o.status.success()).unwrap_or(false)
                || Path::new(tool).exists(),
            "{tool} is missing: run `make deps`"
        );
    }

    let mut options = TomcatOptions::new(SECRET);
    options.jvm_opts = vec!["-Xms512m".into(), "-Xmx512m".into(), "-XX:+UseParallelGC".into()];
    options.max_threads = TOMCAT_THREADS;
    // Both connectors on the same Tomcats: AJP and the HTTP backend's,
    // with the RemoteIpValve and SSLValve the operator configures for it.
    options.http_backend = true;
    options.keep_ajp_connector = true;
    // wrk sends every sticky request with one session cookie over all its
    // connections: with the per-session semaphore of ordered requests the
    // bench would measure one request at a time per node, not the proxies.
    options.ordered_requests = false;
    let nodes = start_cluster(&["s1", "s2", "s3"], &options);
    let members: Vec<(String, u16, u16)> =
        nodes.iter().map(|n| (n.route.clone(), n.ajp_port, n.backend_http_port)).collect();
    let tls = TlsFiles::new();
    let balancer_tls_port = free_port();
    let balancer = Balancer::start(
        BalancerOptions::new(SECRET)
            .members(&[&nodes[0], &nodes[1], &nodes[2]])
            .arg("--pool-max-per-member")
            .arg(BALANCER_POOL_PER_MEMBER.to_string()),
    );
    // HTTPS in a process of its own, so the idle-connection RSS measured at
    // the end is that of a balancer that served plain HTTP only.
    let balancer_https = Balancer::start(
        BalancerOptions::new(SECRET)
            .members(&[&nodes[0], &nodes[1], &nodes[2]])
            .arg("--pool-max-per-member")
            .arg(BALANCER_POOL_PER_MEMBER.to_string())
            .arg("--tls-listen")
            .arg(format!("127.0.0.1:{balancer_tls_port}"))
            .arg("--tls-cert-file")
            .arg(tls.cert.to_string_lossy())
            .arg("--tls-key-file")
            .arg(tls.key.to_string_lossy()),
    );
    // The same balancer, CPinging only connections idle for 1 s or more:
    // shows what the CPing round trip before every request costs (httpd's
    // `ping=` has no such threshold).
    let balancer_idle_ping = Balancer::start(
        BalancerOptions::new(SECRET)
            .members(&[&nodes[0], &nodes[1], &nodes[2]])
            .arg("--pool-max-per-member")
            .arg(BALANCER_POOL_PER_MEMBER.to_string())
            .arg("--cping-after-idle")
            .arg("1s"),
    );
    // The HTTP/1.1 backend (`--backend-protocol http`) to the same Tomcats.
    let balancer_http = Balancer::start(
        BalancerOptions::new(SECRET)
            .http_members(&[&nodes[0], &nodes[1], &nodes[2]])
            .arg("--pool-max-per-member")
            .arg(BALANCER_POOL_PER_MEMBER.to_string()),
    );
    // The default balancer on a runtime of one worker thread instead of one
    // per core: what work stealing between the two costs per request.
    let mut one_worker = BalancerOptions::new(SECRET)
        .members(&[&nodes[0], &nodes[1], &nodes[2]])
        .arg("--pool-max-per-member")
        .arg(BALANCER_POOL_PER_MEMBER.to_string());
    one_worker.envs.push(("TOKIO_WORKER_THREADS".into(), "1".into()));
    let balancer_one_worker = Balancer::start(one_worker);
    let balancer_baseline = std::env::var_os("BENCH_BASELINE_BIN").map(|program| {
        let mut options = BalancerOptions::new(SECRET)
            .members(&[&nodes[0], &nodes[1], &nodes[2]])
            .arg("--pool-max-per-member")
            .arg(BALANCER_POOL_PER_MEMBER.to_string());
        options.program = Some(program.into());
        Balancer::start(options)
    });
    let tomcat_pids: Vec<u32> = nodes.iter().filter_map(|n| n.pid()).collect();
    let httpd = Httpd::start(&members, &tls);
    let direct_port = nodes[1].http_port;
    let sticky = "benchsession.s2";

    // Profiling aid: BENCH_HOLD=FILE writes the ports and pids of every
    // part to FILE and keeps them running until FILE is deleted.
    if let Ok(hold) = std::env::var("BENCH_HOLD") {
        let ajp: Vec<String> = nodes.iter().map(|n| format!("{}=127.0.0.1:{}", n.route, n.ajp_port)).collect();
        let http: Vec<String> =
            nodes.iter().map(|n| format!("{}=127.0.0.1:{}", n.route, n.backend_http_port)).collect();
        let text = format!(
            "direct_port={direct_port}\nhttpd_port={}\nhttpd_http_port={}\nhttpd_pid={}\nbalancer_port={}\nbalancer_pid={}\nbalancer_http_port={}\nbalancer_http_pid={}\nmembers={}\nhttp_members={}\nsecret={SECRET}\nsticky={sticky}\n",
            httpd.port,
            httpd.http_proxy_port,
            httpd.pid(),
            balancer.listen.port(),
            balancer.pid(),
            balancer_http.listen.port(),
            balancer_http.pid(),
            ajp.join(" "),
            http.join(" ")
        );
        std::fs::write(&hold, text).expect("write BENCH_HOLD file");
        eprintln!("holding until {hold} is deleted");
        while Path::new(&hold).exists() {
            std::thread::sleep(Duration::from_millis(500));
        }
        return;
    }

    println!(
        "# balancer vs Apache httpd {} (event MPM, {} servers x {} threads = {} workers, mod_proxy_ajp + mod_proxy_balancer, access logs off)",
        String::from_utf8_lossy(
            &Command::new("/usr/sbin/apache2").arg("-v").output().map(|o| o.stdout).unwrap_or_default()
        )
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("Server version: "),
        HTTPD_SERVERS,
        HTTPD_THREADS_PER_CHILD,
        HTTPD_SERVERS * HTTPD_THREADS_PER_CHILD
    );
    println!(
        "# balancer: tokio multi-thread runtime, {} worker threads (one per core), at most {BALANCER_POOL_PER_MEMBER} AJP connections per member (httpd: {HTTPD_SERVERS} children x {HTTPD_THREADS_PER_CHILD}); CPing before every request on both (balancer default --cping-after-idle 0s, httpd ping={HTTPD_PING}); access log off",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "# 3 Tomcat 10.1 nodes ({TOMCAT_THREADS} connector threads each, AJP packetSize 8192), GET {PATH}, wrk -t{WRK_THREADS} -c{connections} -d{seconds}s, {rounds} interleaved rounds, medians"
    );
    println!(
        "# HTTPS rows: one self-signed ECDSA P-256 certificate on both (httpd mod_ssl/OpenSSL, balancer rustls); wrk keeps its connections, so they show the cost of encryption more than of handshakes"
    );
    println!(
        "# machine: {} cores shared by wrk, the proxy and the Tomcats; cpu columns are CPU seconds per 10k requests of each part",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    // Warm up the JITs of every node (non-sticky requests reach all three)
    // and both proxies' pools, so no target pays for a cold node.
    for (target, cookie) in [
        (("http", direct_port), Some(sticky)),
        (("http", httpd.port), Some(sticky)),
        (("http", balancer.listen.port()), Some(sticky)),
        (("http", httpd.port), None),
        (("http", balancer.listen.port()), None),
        (("http", balancer_idle_ping.listen.port()), Some(sticky)),
        (("https", httpd.tls_port), Some(sticky)),
        (("https", balancer_tls_port), Some(sticky)),
        (("http", balancer_http.listen.port()), Some(sticky)),
        (("http", httpd.http_proxy_port), Some(sticky)),
        (("http", balancer_one_worker.listen.port()), Some(sticky)),
    ]
    .into_iter()
    .chain(balancer_baseline.as_ref().map(|b| (("http", b.listen.port()), Some(sticky))))
    {
        wrk(target, cookie, 3, connections, None, &tomcat_pids);
    }

    type Key = &'static str;
    /// One measured target of a round: its name in the table, where wrk
    /// sends (scheme, port), the sticky cookie (None: a new session every
    /// request) and the process whose CPU and memory are measured.
    type Run<'a> = (Key, (&'a str, u16), Option<&'a str>, Option<u32>);
    let mut results: BTreeMap<Key, Vec<Sample>> = BTreeMap::new();
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        let mut runs: Vec<Run<'_>> = vec![
            (DIRECT, ("http", direct_port), Some(sticky), None),
            (HTTPD_STICKY, ("http", httpd.port), Some(sticky), Some(httpd.pid())),
            (BALANCER_STICKY, ("http", balancer.listen.port()), Some(sticky), Some(balancer.pid())),
            ("04 httpd non-sticky", ("http", httpd.port), None, Some(httpd.pid())),
            ("05 balancer non-sticky", ("http", balancer.listen.port()), None, Some(balancer.pid())),
            (
                BALANCER_IDLE_PING,
                ("http", balancer_idle_ping.listen.port()),
                Some(sticky),
                Some(balancer_idle_ping.pid()),
            ),
            ("07 httpd sticky, HTTPS", ("https", httpd.tls_port), Some(sticky), Some(httpd.pid())),
            ("08 balancer sticky, HTTPS", ("https", balancer_tls_port), Some(sticky), Some(balancer_https.pid())),
            (HTTPD_HTTP, ("http", httpd.http_proxy_port), Some(sticky), Some(httpd.pid())),
            (BALANCER_HTTP, ("http", balancer_http.listen.port()), Some(sticky), Some(balancer_http.pid())),
            (
                BALANCER_ONE_WORKER,
                ("http", balancer_one_worker.listen.port()),
                Some(sticky),
                Some(balancer_one_worker.pid()),
            ),
        ];
        if let Some(b) = &balancer_baseline {
            runs.push((BALANCER_BASELINE, ("http", b.listen.port()), Some(sticky), Some(b.pid())));
        }
        // Each round starts at another row, so no row always runs right
        // after the same one (the Tomcats' state after httpd's pooled
        // connections, say) and the medians do not carry an order effect.
        let shift = (round as usize * runs.len() / rounds as usize) % runs.len();
        runs.rotate_left(shift);
        for (name, target, cookie, pid) in runs {
            results.entry(name).or_default().push(wrk(target, cookie, seconds, connections, pid, &tomcat_pids));
        }
    }

    println!(
        "{:<36} {:>10} {:>9} {:>9} {:>14} {:>9} {:>11} {:>9}",
        "target", "req/s", "p50 ms", "p99 ms", "cpu s/10k req", "rss MB", "tomcat cpu", "wrk cpu"
    );
    let mut med: BTreeMap<Key, Sample> = BTreeMap::new();
    for (name, samples) in &results {
        let m = Sample {
            rps: median(samples.iter().map(|s| s.rps).collect()),
            p50_ms: median(samples.iter().map(|s| s.p50_ms).collect()),
            p99_ms: median(samples.iter().map(|s| s.p99_ms).collect()),
            cpu_per_10k: samples[0].cpu_per_10k.map(|_| median(samples.iter().filter_map(|s| s.cpu_per_10k).collect())),
            rss_mb: samples.iter().filter_map(|s| s.rss_mb).reduce(f64::max),
            tomcat_cpu_per_10k: median(samples.iter().map(|s| s.tomcat_cpu_per_10k).collect()),
            wrk_cpu_per_10k: median(samples.iter().map(|s| s.wrk_cpu_per_10k).collect()),
        };
        let fmt_opt = |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<36} {:>10.0} {:>9.2} {:>9.2} {:>14} {:>9} {:>11.3} {:>9.3}",
            &name[3..],
            m.rps,
            m.p50_ms,
            m.p99_ms,
            fmt_opt(m.cpu_per_10k, 3),
            fmt_opt(m.rss_mb, 1),
            m.tomcat_cpu_per_10k,
            m.wrk_cpu_per_10k
        );
        med.insert(name, m);
    }

    // 1000 idle client connections.
    let before = balancer.rss_kib();
    let idle: Vec<TcpStream> = (0..1000).filter_map(|_| TcpStream::connect(balancer.listen).ok()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let with_idle = balancer.rss_kib();
    println!(
        "# {} idle connections held: balancer rss {:.1} MB -> {:.1} MB",
        idle.len(),
        before as f64 / 1024.0,
        with_idle as f64 / 1024.0
    );
    drop(idle);

    // Where the CPU of one request goes: with every core busy, req/s is
    // bounded by cores / (CPU per request of all parts together).
    let cores = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
    for (name, m) in &med {
        let proxy = m.cpu_per_10k.unwrap_or(0.0);
        let total_us = (m.wrk_cpu_per_10k + m.tomcat_cpu_per_10k + proxy) * 100.0;
        println!(
            "# cpu per request {:<36} wrk {:>5.1} us + tomcat {:>5.1} us + proxy {:>5.1} us = {:>5.1} us -> at most {:>6.0} req/s on {cores} cores",
            &name[3..],
            m.wrk_cpu_per_10k * 100.0,
            m.tomcat_cpu_per_10k * 100.0,
            proxy * 100.0,
            total_us,
            cores * 1e6 / total_us
        );
    }

    let b_sticky = &med[BALANCER_STICKY];
    let b_idle_ping = &med[BALANCER_IDLE_PING];
    let h_sticky = &med[HTTPD_STICKY];
    let direct = &med[DIRECT];
    let b_http = &med[BALANCER_HTTP];
    let h_http = &med[HTTPD_HTTP];
    let rss_mb = with_idle as f64 / 1024.0;
    // The req/s the machine allows the balancer's row when the proxy cost
    // nothing: cores / (wrk + Tomcat CPU per request).
    let bound = |m: &Sample| cores * 1e6 / ((m.wrk_cpu_per_10k + m.tomcat_cpu_per_10k) * 100.0);
    let proxy_cpu = |m: &Sample| m.cpu_per_10k.unwrap_or(f64::NAN);
    plot(&med);
    // The HTTP backend against its fair peer, httpd's mod_proxy_http (no
    // target of their own).
    println!("ratio sticky_rps balancer_http/httpd_http: {:.2}", b_http.rps / h_http.rps);
    println!("ratio proxy_cpu_per_request balancer_http/httpd_http: {:.2}", proxy_cpu(b_http) / proxy_cpu(h_http));
    println!("ratio p99 balancer_http/httpd_http: {:.2}", b_http.p99_ms / h_http.p99_ms);
    // One worker thread against one per core (no target of their own).
    let b_one = &med[BALANCER_ONE_WORKER];
    println!("ratio sticky_rps balancer_one_worker/balancer: {:.2}", b_one.rps / b_sticky.rps);
    println!("ratio proxy_cpu_per_request balancer_one_worker/balancer: {:.2}", proxy_cpu(b_one) / proxy_cpu(b_sticky));
    println!("ratio p99 balancer_one_worker/balancer: {:.2}", b_one.p99_ms / b_sticky.p99_ms);
    // This build against the baseline build, when one was given.
    if let Some(b_base) = med.get(BALANCER_BASELINE) {
        println!("ratio sticky_rps balancer/baseline: {:.2}", b_sticky.rps / b_base.rps);
        println!("ratio proxy_cpu_per_request balancer/baseline: {:.2}", proxy_cpu(b_sticky) / proxy_cpu(b_base));
        println!("ratio p99 balancer/baseline: {:.2}", b_sticky.p99_ms / b_base.p99_ms);
    }
    // Issue 13's targets, each a ratio measured in this run.
    let lines = [
        ("ratio proxy_cpu_per_request balancer/httpd", proxy_cpu(b_sticky) / proxy_cpu(h_sticky), "<=", 0.25),
        (
            "ratio tomcat_cpu_per_request balancer/httpd",
            b_sticky.tomcat_cpu_per_10k / h_sticky.tomcat_cpu_per_10k,
            "<=",
            1.0,
        ),
        ("ratio sticky_rps balancer/bound", b_sticky.rps / bound(b_sticky), ">=", 0.85),
        ("ratio sticky_rps balancer/httpd", b_sticky.rps / h_sticky.rps, ">=", 1.8),
        ("ratio sticky_rps balancer_cping_idle_1s/httpd", b_idle_ping.rps / h_sticky.rps, ">=", 1.8),
        ("ratio sticky_rps balancer/direct", b_sticky.rps / direct.rps, ">=", 0.6),
        ("ratio sticky_rps balancer_http/direct", b_http.rps / direct.rps, ">=", 0.55),
        ("ratio p99 balancer/httpd", b_sticky.p99_ms / h_sticky.p99_ms, "<=", 0.6),
        ("balancer rss_mb at 1000 idle connections", rss_mb, "<=", 20.0),
    ];
    for (name, value, relation, target) in lines {
        let met = if relation == "<=" { value <= target } else { value >= target };
        println!("{name}: {value:.2}   (target {relation} {target}: {})", if met { "met" } else { "not met" });
    }
}

/// `target/bench/balancer.png`: req/s and p99 of every row, drawn by
/// gnuplot from this run's medians (the README shows a copy). Bars are
/// grey for Tomcat alone, red for httpd, blue for the balancer.
fn plot(med: &BTreeMap<&'static str, Sample>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let data: String = med
        .iter()
        .map(|(name, m)| {
            let name = &name[3..];
            let colour = if name.starts_with("httpd") {
                2
            } else if name.starts_with("balancer") {
                3
            } else {
                1
            };
            format!("\"{name}\"\t{:.0}\t{:.2}\t{colour}\n", m.rps, m.p99_ms)
        })
        .collect();
    let (data_path, png) = (dir.join("balancer.dat"), dir.join("balancer.png"));
    std::fs::write(&data_path, data).expect("write the plot data");
    let script = format!(
        r##"set terminal pngcairo noenhanced size 1400,640 font "sans,10"
set output "{png}"
set datafile separator "\t"
set linetype 1 linecolor rgb "#8c8c8c"
set linetype 2 linecolor rgb "#c0504d"
set linetype 3 linecolor rgb "#3b6ea8"
set style fill solid 0.85 border -1
set boxwidth 0.7
set xtics rotate by -35 left nomirror
set grid ytics
set key off
set yrange [0:*]
set xrange [-0.6:*]
set bmargin 11
set multiplot layout 1,2 title "make bench: 3 Tomcats on 2 cores, wrk -c64, medians of the rounds"
set title "requests per second (higher is better)"
plot "{data}" using 0:2:4:xtic(1) with boxes linecolor variable
set title "p99 latency, ms (lower is better)"
plot "{data}" using 0:3:4:xtic(1) with boxes linecolor variable
unset multiplot
"##,
        png = png.display(),
        data = data_path.display()
    );
    let script_path = dir.join("balancer.gp");
    std::fs::write(&script_path, script).expect("write the plot script");
    let out = Command::new("gnuplot").arg(&script_path).output().expect("run gnuplot (make deps installs it)");
    assert!(out.status.success(), "gnuplot failed: {}", String::from_utf8_lossy(&out.stderr));
    println!("# plot: {}", png.display());
}
