//! Reused backend connections when a node stalls or vanishes, against real
//! clustered Tomcats, for both CPing policies: before every reuse (the
//! default, `--cping-after-idle 0s`) and only after 1 s idle, where a request
//! on a connection reused without a CPing is watched instead (see
//! `src/balancer/pool.rs`). Sessions send one request at a time (25 ms
//! apart), so each answer's counter must be the last one plus one: a larger
//! step after an answered request is a request executed twice, a smaller
//! one a lost write.
//!
//! - A stall (the JVM stopped for 3 s, as in a long GC pause; its kernel
//!   still acknowledges): nothing fails, nothing runs twice.
//! - A vanish (the node's AJP traffic dropped, so not even a reset comes
//!   back): a request the node may have got when it vanished fails, since
//!   it may have run — at `--backend-timeout` when it was written after a
//!   CPong, after the CPing timeout (500 ms) when it was written on a
//!   connection reused without one and nothing was acknowledged; every
//!   later request goes to the other node with the session's last write,
//!   and none runs twice. (Sending an unacknowledged request elsewhere ran
//!   4 of them twice here: the cut had dropped the acknowledgement of a
//!   request that had arrived.)

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;

use crate::common::http::{Conn, get, try_read_reply};
use crate::common::tomcat::{TomcatNode, TomcatOptions, start_cluster};
use crate::common::{Balancer, BalancerOptions, signal};

const SECRET: &str = "reuse-secret";
const SESSIONS: usize = 8;
const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Between a session's requests: its connection is still reused well
/// within 1 s, and the load leaves the other tests of this binary, which
/// run meanwhile, their share of the 2 cores.
const THINK_TIME: Duration = Duration::from_millis(25);

/// Held by each test of this file: one stalled or vanished node at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// What one session's requests saw.
#[derive(Debug, Default)]
struct Tally {
    answered: u32,
    /// Non-200 answers and broken connections.
    failed: u32,
    /// An answered request's counter more than one past the last answer.
    ran_twice: u32,
    /// A counter not past the last answer: an acknowledged write lost.
    lost: u32,
    slowest: Duration,
}

/// Drops every packet to or from one TCP port on this machine, in a table
/// of its own that goes with the value (also when the test panics).
struct Blackhole {
    table: String,
}

impl Blackhole {
    fn port(port: u16) -> Blackhole {
        let table = format!("clusterapp_test_vanish_{}_{port}", std::process::id());
        let rules = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0;\n    tcp dport {port} drop\n    tcp sport {port} drop\n  }}\n}}\n"
        );
        let mut nft = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("running nft");
        std::io::Write::write_all(nft.stdin.as_mut().expect("stdin"), rules.as_bytes()).expect("writing the rules");
        drop(nft.stdin.take());
        assert!(nft.wait().expect("nft").success(), "nft refused: {rules}");
        Blackhole { table }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

/// New sessions until `SESSIONS` of them live on `route`.
async fn sessions_on(front: SocketAddr, route: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..SESSIONS * 6 {
        let reply = get(front, "/counter/", None).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        if reply.header("x-route") == Some(route) {
            ids.push(reply.set_session_id().expect("a new session"));
        }
        if ids.len() == SESSIONS {
            return ids;
        }
    }
    panic!("only {} sessions landed on {route}", ids.len());
}

/// One session's requests, one at a time over a keep-alive connection
/// (a new one after an error), until `stop`.
async fn run_session(front: SocketAddr, mut id: String, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut last = 1u32; // the session's first request made it 1
    let mut after_failure = false;
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => conn.insert(Conn::open(front).await),
        };
        let request = Request::get("/counter/")
            .header("host", "balancer.test")
            .header("cookie", format!("JSESSIONID={id}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let started = Instant::now();
        // A cut body (the node vanished between its head and its end)
        // fails like a broken connection: the request may have run.
        let reply = match c.send(request).await {
            Ok(response) => try_read_reply(response).await,
            Err(e) => Err(e),
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(_) => {
                tally.failed += 1;
                after_failure = true;
                conn = None;
                continue;
            }
        };
        tally.slowest = tally.slowest.max(started.elapsed());
        if reply.status != 200 {
            tally.failed += 1;
            after_failure = true;
            continue;
        }
        tally.answered += 1;
        let counter: u32 = reply.header("x-counter").and_then(|c| c.parse().ok()).expect("x-counter");
        if counter <= last {
            tally.lost += 1;
        } else if counter > last + 1 && !after_failure {
            tally.ran_twice += 1;
        }
        last = counter;
        after_failure = false;
        if let Some(new_id) = reply.set_session_id() {
            id = new_id;
        }
        tokio::time::sleep(THINK_TIME).await;
    }
    tally
}

/// Sessions on `nodes[0]` under load while `disturb` runs, through a
/// balancer CPinging connections idle for `cping_after_idle`; the sum of
/// their tallies.
async fn under_load(
    nodes: &mut [TomcatNode],
    cping_after_idle: &str,
    disturb: impl AsyncFnOnce(&mut TomcatNode),
) -> Tally {
    let balancer = Balancer::start(
        BalancerOptions::new(SECRET)
            .members(&[&nodes[0], &nodes[1]])
            .arg("--cping-after-idle")
            .arg(cping_after_idle)
            .arg("--backend-timeout")
            .arg(format!("{}s", BACKEND_TIMEOUT.as_secs())),
    );
    let victim = nodes[0].route.clone();
    let ids = sessions_on(balancer.listen, &victim).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = ids.into_iter().map(|id| tokio::spawn(run_session(balancer.listen, id, stop.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    disturb(&mut nodes[0]).await;
    // Past the slow grace (5 s) and a backend timeout, so every session
    // either is answered again or has failed over.
    tokio::time::sleep(BACKEND_TIMEOUT + Duration::from_secs(7)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sum = Tally::default();
    for session in load {
        let t = session.await.expect("session task");
        sum.answered += t.answered;
        sum.failed += t.failed;
        sum.ran_twice += t.ran_twice;
        sum.lost += t.lost;
        sum.slowest = sum.slowest.max(t.slowest);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_is_waited_for_and_runs_nothing_twice() {
    let _one = one_at_a_time().await;
    for cping_after_idle in ["0s", "1s"] {
        let mut nodes = start_cluster(&["p1", "p2"], &TomcatOptions::new(SECRET));
        let tally = under_load(&mut nodes, cping_after_idle, async |node| {
            let pid = node.pid().expect("a running JVM");
            signal(pid, "STOP");
            tokio::time::sleep(Duration::from_secs(3)).await;
            signal(pid, "CONT");
        })
        .await;
        eprintln!("stall 3 s, --cping-after-idle {cping_after_idle}: {tally:?}");
        assert!(tally.answered > 100, "{cping_after_idle}: load ran: {tally:?}");
        assert_eq!((tally.failed, tally.ran_twice, tally.lost), (0, 0, 0), "{cping_after_idle}: {tally:?}");
        assert!(
            tally.slowest >= Duration::from_secs(2),
            "{cping_after_idle}: requests waited out the stall: {tally:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_node_fails_only_what_it_acknowledged_and_runs_nothing_twice() {
    let _one = one_at_a_time().await;
    for cping_after_idle in ["0s", "1s"] {
        let mut nodes = start_cluster(&["v1", "v2"], &TomcatOptions::new(SECRET));
        let ajp_port = nodes[0].ajp_port;
        let mut blackhole = None;
        let tally =
            under_load(&mut nodes, cping_after_idle, async |_| blackhole = Some(Blackhole::port(ajp_port))).await;
        drop(blackhole);
        eprintln!("vanish, --cping-after-idle {cping_after_idle}: {tally:?}");
        assert!(tally.answered > 100, "{cping_after_idle}: load ran: {tally:?}");
        // At most the request each session had on the wire when the node vanished.
        assert!(tally.failed <= SESSIONS as u32, "{cping_after_idle}: {tally:?}");
        assert_eq!((tally.ran_twice, tally.lost), (0, 0), "{cping_after_idle}: {tally:?}");
    }
}
