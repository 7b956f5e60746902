//! The balancer against a real Tomcat: what Tomcat sees of a request equals
//! what the client sent; large bodies stream both ways with bounded balancer
//! memory; the AJP secret is enforced by Tomcat; the access log has a line
//! per request with what was sent.

use std::time::Duration;

use crate::common;

use crate::common::bodies::{
    Body, full, generated_body, generated_digest, head_and_expect_continue, header_pairs, proc_status_kib,
};
use crate::common::http::{Conn, read_reply};
use crate::common::tomcat::{TomcatOptions, start_cluster};
use crate::common::{Balancer, BalancerOptions};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;
use sha2::{Digest, Sha256};

const SECRET: &str = "round-trip-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_round_trip_exactly_and_bodies_stream() {
    // Before any connection: computed later, they would leave the
    // keep-alive connection idle past the balancer's head timeout.
    const UPLOAD: usize = 50 * 1024 * 1024;
    const SIZED: usize = 8 * 1024 * 1024 + 12345;
    let (upload_digest, sized_digest) = (generated_digest(UPLOAD), generated_digest(SIZED));
    let nodes = start_cluster(&["solo"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    let balancer = Balancer::start(BalancerOptions::new(SECRET).members(&[&nodes[0]]));

    // --- request line, headers, query, remote address, scheme ---
    let mut conn: Conn<Body> = Conn::open(balancer.listen).await;
    let req = Request::get("/counter/echo?a=1&b=%20x&c=%C3%A9&flag")
        .header("host", "balancer.test:8443")
        .header("user-agent", "roundtrip-test/1.0")
        .header("accept", "text/plain, */*;q=0.1")
        .header("x-custom", "one")
        .header("x-multi", "first")
        .header("x-multi", "second")
        .header("x-empty", "")
        .header("cookie", "a=b; c=d")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .body(full(Bytes::new()))
        .expect("request");
    let reply = read_reply(conn.send(req).await.expect("send")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["requestURI"], "/counter/echo");
    assert_eq!(echo["queryString"], "a=1&b=%20x&c=%C3%A9&flag");
    assert_eq!(echo["remoteAddr"], "127.0.0.1");
    assert_eq!(echo["remotePort"], conn.local.port() as u64, "client port forwarded (AJP_REMOTE_PORT)");
    assert_eq!(echo["localAddr"], "127.0.0.1", "AJP_LOCAL_ADDR");
    assert_eq!(echo["localPort"], balancer.listen.port() as u64);
    assert_eq!(echo["scheme"], "http");
    assert_eq!(echo["secure"], false);
    assert_eq!(echo["serverName"], "balancer.test");
    assert_eq!(echo["serverPort"], 8443);
    let mut expected: Vec<(String, String)> = [
        ("host", "balancer.test:8443"),
        ("user-agent", "roundtrip-test/1.0"),
        ("accept", "text/plain, */*;q=0.1"),
        ("x-custom", "one"),
        ("x-multi", "first"),
        ("x-multi", "second"),
        ("x-empty", ""),
        ("cookie", "a=b; c=d"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    expected.sort();
    assert_eq!(header_pairs(&echo), expected, "headers arrive exactly, hop-by-hop ones removed");
    assert_eq!(echo["bodyLength"], 0);

    // Same keep-alive connection: other methods, a stored method, a body with a length.
    for method in ["POST", "PUT", "DELETE", "PATCH", "PROPFIND"] {
        let body = format!("payload of {method}");
        let req = Request::builder()
            .method(method)
            .uri("/counter/echo?m=1")
            .header("host", "balancer.test")
            .header("content-type", "text/plain")
            .header("content-length", body.len().to_string())
            .body(full(body.clone()))
            .expect("request");
        let reply = read_reply(conn.send(req).await.expect("send")).await;
        assert_eq!(reply.status, 200, "{method}: {}", reply.text());
        let echo = reply.json();
        assert_eq!(echo["method"], method);
        assert_eq!(echo["bodyLength"], body.len() as u64);
        let sha: String = Sha256::digest(body.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(echo["bodySha256"], sha);
        assert_eq!(echo["remotePort"], conn.local.port() as u64, "same client connection");
    }

    // HEAD: headers only, and the connection stays usable; Expect: 100-continue.
    head_and_expect_continue(&mut conn).await;

    // --- 50 MB chunked upload, streamed ---
    let pid = balancer.pid();
    let body = generated_body(UPLOAD);
    let req = Request::post("/counter/echo").header("host", "balancer.test").body(body).expect("req");
    let reply = read_reply(conn.send(req).await.expect("send upload")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["bodyLength"], UPLOAD as u64);
    assert_eq!(echo["bodySha256"], upload_digest.as_str());

    // Same with a Content-Length (first body packet sent unasked, as Tomcat expects).
    let body = generated_body(SIZED);
    let req = Request::put("/counter/echo")
        .header("host", "balancer.test")
        .header("content-length", SIZED.to_string())
        .body(body)
        .expect("req");
    let echo = read_reply(conn.send(req).await.expect("send")).await.json();
    assert_eq!(echo["bodyLength"], SIZED as u64);
    assert_eq!(echo["bodySha256"], sized_digest.as_str());

    // --- 100 MB download, streamed and verified byte by byte ---
    for chunked in [false, true] {
        let total: u64 = 100 * 1024 * 1024;
        let uri = format!("/counter/download?bytes={total}{}", if chunked { "&chunked=1" } else { "" });
        let req = Request::get(uri).header("host", "balancer.test").body(full(Bytes::new())).expect("req");
        let resp = conn.send(req).await.expect("send download");
        assert_eq!(resp.status(), 200);
        if !chunked {
            assert_eq!(resp.headers()["content-length"], total.to_string().as_str());
        }
        let mut body = resp.into_body();
        let mut seen: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("download frame");
            if let Ok(data) = frame.into_data() {
                for (i, b) in data.iter().enumerate() {
                    assert_eq!(*b as u64, (seen + i as u64) % 251, "byte {} of the download", seen + i as u64);
                }
                seen += data.len() as u64;
            }
        }
        assert_eq!(seen, total);
    }
    let peak_kib = proc_status_kib(pid, "VmHWM:");
    assert!(
        peak_kib < 48 * 1024,
        "balancer peak RSS {peak_kib} KiB after 50 MB up and 2x100 MB down: bodies must stream"
    );

    // --- the secret: a balancer with the wrong one gets Tomcat's 403 ---
    let wrong = Balancer::start(BalancerOptions::new("not-the-secret").members(&[&nodes[0]]));
    let reply = common::http::get(wrong.listen, "/counter/", None).await;
    assert_eq!(reply.status, 403, "Tomcat refuses a wrong AJP secret");
    assert!(!wrong.log_text().contains("not-the-secret"), "the secret is never logged");
    // The right one still works.
    let reply = common::http::get(balancer.listen, "/counter/", None).await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("Tambah = 1"));
    assert_eq!(reply.header("x-route"), Some("solo"));
    drop(conn);
    let _ = Duration::from_secs(0);
}

/// The balancer's access log lines (LOG_FORMAT=json), parsed.
fn access_lines(balancer: &Balancer) -> Vec<serde_json::Value> {
    balancer
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "clusterapp::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request_when_its_response_is_done() {
    let nodes = start_cluster(&["solo"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    // `ghost` has no Tomcat: its sessions fail over to `solo`.
    let ghost_port = common::free_port();
    let mut options = BalancerOptions::new(SECRET)
        .members(&[&nodes[0]])
        .arg("--member")
        .arg(format!("ghost=127.0.0.1:{ghost_port}"))
        .arg("--access-log");
    options.envs.push(("LOG_FORMAT".into(), "json".into()));
    let balancer = Balancer::start(options);
    let wait_for_lines = |n: usize| {
        common::wait_until(Duration::from_secs(5), &format!("{n} access lines"), || access_lines(&balancer).len() >= n);
        access_lines(&balancer)
    };

    // A plain request: everything a line has.
    let mut conn: Conn<Body> = Conn::open(balancer.listen).await;
    let req = Request::get("/counter/echo?q=1")
        .header("host", "balancer.test")
        .header("user-agent", "access-test/1.0")
        .header("cookie", "JSESSIONID=CAFE1234.solo")
        .body(full(Bytes::new()))
        .expect("request");
    let reply = read_reply(conn.send(req).await.expect("send")).await;
    assert_eq!(reply.status, 200);
    let line = wait_for_lines(1).remove(0);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["uri"], "/counter/echo?q=1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes"], reply.body.len() as u64);
    assert_eq!(line["member"], "solo");
    assert_eq!(line["failover"], false);
    assert_eq!(line["complete"], true);
    assert_eq!(line["tls"], false);
    assert_eq!(line["user_agent"], "access-test/1.0");
    assert_eq!(line["remote"], conn.local.to_string());
    assert!(line["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{line}");

    // A streamed download: counted to its last byte.
    let req =
        Request::get("/counter/download?bytes=3000000").header("host", "t").body(full(Bytes::new())).expect("request");
    let reply = read_reply(conn.send(req).await.expect("send")).await;
    assert_eq!(reply.body.len(), 3_000_000);
    let line = wait_for_lines(2).remove(1);
    assert_eq!((line["bytes"].as_u64(), line["complete"].as_bool()), (Some(3_000_000), Some(true)), "{line}");

    // A download the client abandons: logged as incomplete, with what was sent.
    let mut quitter: Conn<Body> = Conn::open(balancer.listen).await;
    let req = Request::get("/counter/download?bytes=200000000")
        .header("host", "t")
        .body(full(Bytes::new()))
        .expect("request");
    let response = quitter.send(req).await.expect("send");
    let mut body = response.into_body();
    let mut got = 0;
    while got < 1_000_000 {
        got += body.frame().await.expect("frame").expect("data").into_data().map(|d| d.len()).unwrap_or(0);
    }
    drop(body);
    drop(quitter);
    let line = wait_for_lines(3).remove(2);
    assert_eq!(line["complete"], false, "{line}");
    let sent = line["bytes"].as_u64().expect("bytes");
    assert!((1_000_000..200_000_000).contains(&sent), "bytes {sent}");

    // A sticky request whose member is gone: failover is marked.
    let req = Request::get("/counter/echo")
        .header("host", "t")
        .header("cookie", "JSESSIONID=BEEF.ghost")
        .body(full(Bytes::new()))
        .expect("request");
    assert_eq!(read_reply(conn.send(req).await.expect("send")).await.status, 200);
    let line = wait_for_lines(4).remove(3);
    assert_eq!((line["member"].as_str(), line["failover"].as_bool()), (Some("solo"), Some(true)), "{line}");

    // A request the balancer refuses itself: logged with its status, no member.
    let raw = common::http::raw_exchange(
        balancer.listen,
        b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(2),
    );
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    let line = wait_for_lines(5).remove(4);
    assert_eq!((line["status"].as_u64(), line["member"].as_str()), (Some(400), Some("")), "{line}");

    let log = balancer.log_text();
    assert!(!log.contains("CAFE1234") && !log.contains("BEEF"), "session ids (cookies) never reach the log");
}
