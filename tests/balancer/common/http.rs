//! Minimal HTTP clients for tests: hyper's HTTP/1.1 client connection for
//! real requests, raw sockets for malformed ones.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Status of `GET path` over HTTP/1.0, or None when nothing answers.
pub fn blocking_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Sends raw bytes, returns everything read until the peer closes or `wait` passes.
pub fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    s.write_all(request).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// The `JSESSIONID` value set by this response, if any.
    pub fn set_session_id(&self) -> Option<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| c.strip_prefix("JSESSIONID=").map(|r| r.split(';').next().unwrap_or("").to_string()))
    }
}

/// One keep-alive HTTP/1.1 client connection.
pub struct Conn<B = Full<Bytes>> {
    sender: SendRequest<B>,
    pub local: SocketAddr,
}

impl<B> Conn<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect to balancer");
        let local = stream.local_addr().expect("local");
        Self::over(stream, local).await
    }

    /// HTTP/1.1 over an established stream (e.g. a TLS session); `local` is
    /// the client's socket address.
    pub async fn over<S>(stream: S, local: SocketAddr) -> Self
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn { sender, local }
    }

    pub async fn send(&mut self, req: Request<B>) -> Result<hyper::Response<Incoming>, hyper::Error> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }
}

/// Reads a response whole.
pub async fn read_reply(resp: hyper::Response<Incoming>) -> Reply {
    try_read_reply(resp).await.expect("response body")
}

/// Reads a response whole; an error when its body is cut (the balancer
/// aborts the client connection when the member fails mid-response).
pub async fn try_read_reply(resp: hyper::Response<Incoming>) -> Result<Reply, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body })
}

/// `GET path` on a new connection, with an optional session cookie.
pub async fn get(addr: SocketAddr, path: &str, session: Option<&str>) -> Reply {
    let mut conn: Conn = Conn::open(addr).await;
    let mut req = Request::get(path).header("host", "balancer.test");
    if let Some(id) = session {
        req = req.header("cookie", format!("JSESSIONID={id}"));
    }
    let resp = conn.send(req.body(Full::new(Bytes::new())).expect("request")).await.expect("send");
    read_reply(resp).await
}

/// Reads a response body at about `bytes_per_second` (a slow client, so a
/// transfer spans what a test changes meanwhile); returns the bytes read.
/// Panics when the body breaks off.
pub async fn read_paced(resp: hyper::Response<Incoming>, bytes_per_second: f64) -> usize {
    let mut body = resp.into_body();
    let mut n = 0usize;
    let started = std::time::Instant::now();
    while let Some(frame) = body.frame().await {
        n += frame.expect("frame").into_data().map(|d| d.len()).unwrap_or(0);
        let due = Duration::from_secs_f64(n as f64 / bytes_per_second);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    n
}
