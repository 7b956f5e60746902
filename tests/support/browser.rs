//! A browser's load on one session: several workers send the session's
//! requests in parallel, each over its own keep-alive connection to one of
//! the balancer replicas (as a Service spreads a browser's connections), and
//! share one cookie jar: a response's new session cookie is used by all of
//! them from the next request on. A client that sends one request at a time
//! per session cannot see a session split; this one can.
//!
//! Included by the e2e tests (through `support`) and on its own by the
//! balancer tests, which do not use every part.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// What one response told about its session.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When the request went out, and when its answer came.
    pub sent_at: Instant,
    pub at: Instant,
    /// `at` in UTC, to match the nodes' logs.
    pub wall: k8s_openapi::jiff::Timestamp,
    /// The session id the request carried.
    pub sent_id: String,
    pub route: String,
    pub session_id: String,
    /// The session's counter after this request's increment.
    pub counter: u64,
}

/// One browser session: its cookie jar and what its workers saw.
#[derive(Debug)]
pub struct BrowserSession {
    /// The id's base (before the route): what a renamed session keeps.
    pub base: String,
    jar: Mutex<String>,
    pub seen: Mutex<Vec<Seen>>,
    /// Responses whose session had another base: the session was lost and
    /// the application made a new one. Each says when (UTC, to match the
    /// nodes' logs), which id the request carried and which it got where.
    pub lost: Mutex<Vec<String>>,
    /// Requests that got no 200 (status, or the error), with when.
    pub failed: Mutex<Vec<(Instant, String)>>,
}

fn base_of(id: &str) -> &str {
    id.split_once('.').map_or(id, |(b, _)| b)
}

impl BrowserSession {
    pub fn new(session_id: &str) -> Arc<Self> {
        Arc::new(BrowserSession {
            base: base_of(session_id).to_string(),
            jar: Mutex::new(session_id.to_string()),
            seen: Mutex::new(Vec::new()),
            lost: Mutex::new(Vec::new()),
            failed: Mutex::new(Vec::new()),
        })
    }

    pub fn current_id(&self) -> String {
        self.jar.lock().expect("jar").clone()
    }

    /// The session's route as its cookie says now.
    pub fn route(&self) -> String {
        self.current_id().split_once('.').map(|(_, r)| r.to_string()).unwrap_or_default()
    }

    /// Routes that served the session at or after `since`.
    pub fn routes_since(&self, since: Instant) -> Vec<String> {
        let mut routes: Vec<String> =
            self.seen.lock().expect("seen").iter().filter(|s| s.at >= since).map(|s| s.route.clone()).collect();
        routes.sort();
        routes.dedup();
        routes
    }

    pub fn answered(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }

    /// Answers that miss an increment acknowledged before their request
    /// went out: a counter not above the highest one answered (to any of
    /// the session's workers) before the request was sent. The session
    /// lived on, but its state went back in time: an acknowledged write
    /// lost. Answers of another session (a lost session) do not count.
    pub fn lost_increments(&self) -> Vec<String> {
        let seen = self.seen.lock().expect("seen");
        let mine: Vec<&Seen> = seen.iter().filter(|s| base_of(&s.session_id) == self.base).collect();
        let mut by_answer: Vec<(Instant, u64)> = mine.iter().map(|s| (s.at, s.counter)).collect();
        by_answer.sort();
        // The highest counter answered up to each answer.
        let mut highest = Vec::with_capacity(by_answer.len());
        let mut max = 0;
        for (_, counter) in &by_answer {
            max = max.max(*counter);
            highest.push(max);
        }
        let mut lost = Vec::new();
        for s in &mine {
            let before = by_answer.partition_point(|(at, _)| *at < s.sent_at);
            if before > 0 && s.counter <= highest[before - 1] {
                lost.push(format!(
                    "{:.3} got {} on {} ({}), {} was answered before it was sent",
                    s.wall,
                    s.counter,
                    s.route,
                    s.session_id,
                    highest[before - 1]
                ));
            }
        }
        lost
    }

    /// Each answer whose (sent id, answered id, route) differs from the one
    /// before it: how a session moved, for a failure's reader.
    pub fn moves(&self) -> Vec<String> {
        let seen = self.seen.lock().expect("seen");
        let mut moves = Vec::new();
        let mut last: Option<(&str, &str, &str)> = None;
        for s in seen.iter() {
            let now = (s.sent_id.as_str(), s.session_id.as_str(), s.route.as_str());
            if last != Some(now) {
                moves.push(format!("{:.3} sent {} got {} on {}", s.wall, s.sent_id, s.session_id, s.route));
                last = Some(now);
            }
        }
        moves
    }
}

async fn open(balancer: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(balancer).await.map_err(|e| format!("connect: {e}"))?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends `session`'s requests to `balancer` over one keep-alive connection
/// (a new one after an error), `pause` apart, until `stop`.
pub async fn browser_worker(
    balancer: SocketAddr,
    session: Arc<BrowserSession>,
    pause: Duration,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match open(balancer).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    session.failed.lock().expect("failed").push((Instant::now(), e));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let sent_id = session.current_id();
        let sent_at = Instant::now();
        let cookie = format!("JSESSIONID={sent_id}");
        let req = Request::get("/counter/")
            .header("host", "browser.test")
            .header("cookie", cookie)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let sent = match c.ready().await {
            Ok(()) => c.send_request(req).await,
            Err(e) => Err(e),
        };
        let outcome = match sent {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                match body.collect().await {
                    Ok(_) => Ok(parts),
                    Err(e) => Err(format!("body: {e}")),
                }
            }
            Err(e) => Err(format!("send: {e}")),
        };
        let parts = match outcome {
            Ok(parts) if parts.status == 200 => parts,
            Ok(parts) => {
                let route = parts.headers.get("x-route").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                let at = k8s_openapi::jiff::Timestamp::now();
                session
                    .failed
                    .lock()
                    .expect("failed")
                    .push((Instant::now(), format!("{at:.3} {} {route}", parts.status)));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => {
                session.failed.lock().expect("failed").push((Instant::now(), e));
                conn = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let session_id = header("x-session-id");
        if base_of(&session_id) != session.base {
            let at = k8s_openapi::jiff::Timestamp::now();
            let route = header("x-route");
            session.lost.lock().expect("lost").push(format!("{at:.3} sent {sent_id} got {session_id} on {route}"));
        }
        let set_cookie = parts
            .headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| c.strip_prefix("JSESSIONID=").map(|r| r.split(';').next().unwrap_or("").to_string()));
        if let Some(new_id) = set_cookie {
            *session.jar.lock().expect("jar") = new_id;
        }
        session.seen.lock().expect("seen").push(Seen {
            sent_at,
            at: Instant::now(),
            wall: k8s_openapi::jiff::Timestamp::now(),
            sent_id,
            route: header("x-route"),
            session_id,
            counter: header("x-counter").parse().unwrap_or(0),
        });
    }
}

/// `workers` workers per session, worker `w` on balancer `w % balancers.len()`
/// (one address: a Service that spreads the connections itself).
pub fn start_browsers(
    balancers: &[SocketAddr],
    sessions: &[Arc<BrowserSession>],
    workers: usize,
    pause: Duration,
) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for session in sessions {
        for w in 0..workers {
            let addr = balancers[w % balancers.len()];
            handles.push(tokio::spawn(browser_worker(addr, session.clone(), pause, stop.clone())));
        }
    }
    (stop, handles)
}
