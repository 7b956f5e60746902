//! Request bodies and what the echo page tells about a request, shared by
//! the round-trip tests over AJP (balancer_roundtrip) and over HTTP
//! (balancer_http_backend).

use std::convert::Infallible;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::Request;
use hyper::body::Frame;
use sha2::{Digest, Sha256};

use super::http::{Conn, read_reply};

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A body of `total` pseudo-random bytes generated in 64 KiB pieces, and its SHA-256.
pub fn generated_body(total: usize) -> (Body, String) {
    const PIECE: usize = 64 * 1024;
    let piece_at = move |i: usize| -> Bytes {
        let start = i * PIECE;
        let len = PIECE.min(total - start);
        Bytes::from((0..len).map(|j| ((start + j) * 7 % 253) as u8).collect::<Vec<u8>>())
    };
    let mut sha = Sha256::new();
    let pieces = total.div_ceil(PIECE);
    for i in 0..pieces {
        sha.update(piece_at(i));
    }
    let digest = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let stream = futures::stream::iter(0..pieces).map(move |i| Ok::<_, Infallible>(Frame::data(piece_at(i))));
    (BodyExt::boxed(StreamBody::new(stream)), digest)
}

/// A `/proc/<pid>/status` field in KiB, e.g. `VmHWM:` (peak RSS).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// The echo's headers, lowercase names, sorted.
pub fn header_pairs(echo: &serde_json::Value) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = echo["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|p| (p[0].as_str().expect("name").to_ascii_lowercase(), p[1].as_str().expect("value").to_string()))
        .collect();
    pairs.sort();
    pairs
}

/// HEAD gets headers only and leaves the connection usable; a POST with
/// `Expect: 100-continue` gets its body through (the counter app's echo on
/// route `solo`).
pub async fn head_and_expect_continue(conn: &mut Conn<Body>) {
    let req = Request::head("/counter/echo").header("host", "balancer.test").body(full(Bytes::new())).expect("req");
    let reply = read_reply(conn.send(req).await.expect("send")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("x-route"), Some("solo"));

    let req = Request::post("/counter/echo")
        .header("host", "balancer.test")
        .header("expect", "100-continue")
        .header("content-length", "5")
        .body(full("hello"))
        .expect("req");
    let reply = read_reply(conn.send(req).await.expect("send")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["bodyLength"], 5);
}
