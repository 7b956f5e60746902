//! What the balancer does with bad input from either side. A fake AJP
//! member (the only fake in our tests) sends malformed packets: the client
//! gets 502 and the balancer keeps serving. Malformed or hostile HTTP from
//! clients gets 4xx; limits hold; SIGTERM drains in-flight requests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common;

use crate::common::http::{get, raw_exchange};
use crate::common::{Balancer, BalancerOptions, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "fake-secret";

fn packet(payload: &[u8]) -> Vec<u8> {
    let mut p = vec![b'A', b'B'];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ajp_string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

fn send_headers(status: u16, content_length: Option<usize>) -> Vec<u8> {
    let mut p = vec![4u8];
    p.extend_from_slice(&status.to_be_bytes());
    p.extend(ajp_string("OK"));
    let headers: Vec<(u16, String)> = content_length.map(|n| (0xA003u16, n.to_string())).into_iter().collect();
    p.extend_from_slice(&(headers.len() as u16).to_be_bytes());
    for (code, value) in headers {
        p.extend_from_slice(&code.to_be_bytes());
        p.extend(ajp_string(&value));
    }
    packet(&p)
}

fn body_chunk(data: &[u8]) -> Vec<u8> {
    let mut p = vec![3u8];
    p.extend_from_slice(&(data.len() as u16).to_be_bytes());
    p.extend_from_slice(data);
    p.push(0);
    packet(&p)
}

fn end_response(reuse: u8) -> Vec<u8> {
    packet(&[5, reuse])
}

/// Reads one web-server packet; returns its payload, or None at EOF.
async fn read_request_packet(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await.ok()?;
    assert_eq!(&header[..2], &[0x12, 0x34], "balancer sent a bad magic");
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some(payload)
}

/// The request URI inside a FORWARD_REQUEST payload.
fn uri_of(forward: &[u8]) -> String {
    let mut pos = 2; // prefix, method
    let mut next = || {
        let len = u16::from_be_bytes([forward[pos], forward[pos + 1]]) as usize;
        let s = String::from_utf8_lossy(&forward[pos + 2..pos + 2 + len]).into_owned();
        pos += len + 3;
        s
    };
    let _protocol = next();
    next()
}

/// A fake member whose answer depends on the request path.
async fn fake_member() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                while let Some(payload) = read_request_packet(&mut s).await {
                    if payload == [10] {
                        let _ = s.write_all(&packet(&[9])).await; // CPong
                        continue;
                    }
                    if payload.first() != Some(&2) {
                        continue; // a stray body packet
                    }
                    let uri = uri_of(&payload);
                    let reply: Vec<u8> = match uri.as_str() {
                        "/bad-magic" => b"XY\x00\x02\x05\x01".to_vec(),
                        "/oversize" => b"AB\xff\xf0\x04".to_vec(),
                        "/truncated" => packet(&[4, 0, 200, 0, 40, b'O', b'K']),
                        "/unterminated" => packet(&[4, 0, 200, 0, 2, b'O', b'K', b'!', 0, 0]),
                        "/reuse" => [send_headers(200, Some(2)), body_chunk(b"ok"), end_response(7)].concat(),
                        "/unknown-type" => packet(&[42]),
                        "/bad-header" => {
                            let mut p = vec![4u8, 0, 200];
                            p.extend(ajp_string("OK"));
                            p.extend_from_slice(&[0, 1]);
                            p.extend(ajp_string("x"));
                            p.extend(ajp_string("a\r\nInjected: yes"));
                            packet(&p)
                        }
                        "/end-first" => end_response(1),
                        "/mid-body" => {
                            [send_headers(200, Some(10)), body_chunk(b"12345"), packet(&[3, 0, 50, b'x'])].concat()
                        }
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                            [send_headers(200, Some(4)), body_chunk(b"slow"), end_response(1)].concat()
                        }
                        "/read-body" => {
                            // Ask for the whole body, then report its length.
                            let mut total = 0usize;
                            loop {
                                let _ = s.write_all(&packet(&[6, 0x1f, 0xfa])).await;
                                let Some(body) = read_request_packet(&mut s).await else { return };
                                if body.len() < 2 {
                                    break;
                                }
                                let n = u16::from_be_bytes([body[0], body[1]]) as usize;
                                if n == 0 {
                                    break;
                                }
                                total += n;
                            }
                            let text = total.to_string();
                            [send_headers(200, Some(text.len())), body_chunk(text.as_bytes()), end_response(1)].concat()
                        }
                        _ => [send_headers(200, Some(2)), body_chunk(b"ok"), end_response(1)].concat(),
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn member_arg(route: &str, addr: SocketAddr) -> [String; 2] {
    ["--member".to_string(), format!("{route}={addr}")]
}

fn start(addr: SocketAddr, extra: &[&str]) -> Balancer {
    let mut o = BalancerOptions::new(SECRET);
    o.args.extend(member_arg("fake", addr));
    o.args.extend(extra.iter().map(|s| s.to_string()));
    Balancer::start(o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_502_and_the_balancer_keeps_serving() {
    let fake = fake_member().await;
    let mut balancer = start(fake, &[]);
    assert_eq!(get(balancer.listen, "/good", None).await.status, 200);
    for path in ["/bad-magic", "/oversize", "/truncated", "/unterminated", "/unknown-type", "/bad-header", "/end-first"]
    {
        let r = get(balancer.listen, path, None).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        let r = get(balancer.listen, "/good", None).await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "still serving after {path}");
    }
    // An invalid reuse flag arrives after the response is complete: the
    // client already has its response, the connection is never reused.
    let r = get(balancer.listen, "/reuse", None).await;
    assert!(r.status == 200 || r.status == 502);
    assert_eq!(get(balancer.listen, "/good", None).await.status, 200);

    // Broken mid-body: the client's response is cut (never a wrong complete body).
    let mut conn: common::http::Conn = common::http::Conn::open(balancer.listen).await;
    let sent = conn
        .send(
            hyper::Request::get("/mid-body")
                .header("host", "t")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("req"),
        )
        .await;
    if let Ok(resp) = sent {
        use http_body_util::BodyExt;
        assert_eq!(resp.status(), 200);
        assert!(resp.into_body().collect().await.is_err(), "the body must fail, not end short");
    }
    assert_eq!(get(balancer.listen, "/good", None).await.status, 200);

    assert!(balancer.try_wait().is_none(), "balancer still running");
    let log = balancer.log_text();
    assert!(log.contains("invalid AJP packet"), "a log line names the problem:\n{log}");
    assert!(!log.contains("panicked"), "no panic:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_and_limits_are_refused() {
    let fake = fake_member().await;
    let balancer = start(fake, &["--max-body-bytes", "1000", "--header-read-timeout", "1s", "--max-connections", "8"]);
    let addr = balancer.listen;
    let wait = Duration::from_secs(3);
    let status_of = |resp: &str| resp.get(9..12).unwrap_or("").to_string();

    // Each smuggling shape, and which layer refuses it: hyper itself, or
    // (for shapes hyper accepts under RFC 9112) the framing scanner or the
    // Transfer-Encoding check in the proxy.
    let cases: [(&str, &[u8], &str); 13] = [
        // scanner: hyper drops the length and reads the body chunked
        ("CL + TE", b"POST /read-body HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "400"),
        ("TE + CL", b"POST /read-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "400"),
        // scanner: hyper folds identical lengths into one
        ("duplicate CL", b"POST /read-body HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "400"),
        // hyper
        ("conflicting CL", b"POST /read-body HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "400"),
        ("CL list", b"POST /read-body HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello", "400"),
        ("CL with a sign", b"POST /read-body HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello", "400"),
        // proxy: hyper accepts any codings before a final chunked
        ("TE not chunked", b"POST /read-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "400"),
        ("TE twice", b"POST /read-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        ("TE chunked twice", b"POST /read-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "400"),
        ("bad chunk size", b"POST /read-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "400"),
        ("body over the cap (CL)", b"POST /read-body HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n", "413"),
        ("no Host on 1.1 is still parsed", b"GET /good HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", "200"),
        ("garbage request line", b"GET /good HTTP/1.1 extra\r\n\r\n", "400"),
    ];
    for (name, request, expected) in cases {
        let resp = raw_exchange(addr, request, wait);
        assert_eq!(status_of(&resp), expected, "{name}: {resp}");
    }

    // Chunked body over the cap: refused when the member asks for it.
    let mut big = b"POST /read-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        big.extend_from_slice(b"200\r\n");
        big.extend_from_slice(&[b'x'; 0x200]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(status_of(&raw_exchange(addr, &big, wait)), "413");
    // Within the cap it passes whole.
    let ok = b"POST /read-body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n";
    let resp = raw_exchange(addr, ok, wait);
    assert_eq!(status_of(&resp), "200");
    assert!(resp.ends_with("\r\n\r\n8"), "member read 8 body bytes: {resp}");

    // Header size and count.
    let huge = format!("GET /good HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(status_of(&raw_exchange(addr, huge.as_bytes(), wait)), "431");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /good HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    assert_eq!(status_of(&raw_exchange(addr, many.as_bytes(), wait)), "431");

    // Slowloris: an unfinished head is cut off after the header read timeout.
    let started = Instant::now();
    let resp = raw_exchange(addr, b"GET /good HTTP/1.1\r\nHost: t\r\nX-Slow: ", Duration::from_secs(5));
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "slow head held the connection {took:?}: {resp:?}");
    assert!(!resp.contains("200 OK"));

    // Connection limit: over it, a new connection is closed at once.
    let mut held = Vec::new();
    for _ in 0..8 {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let resp = raw_exchange(addr, b"GET /good HTTP/1.1\r\nHost: t\r\n\r\n", Duration::from_secs(3));
    assert!(resp.is_empty() && started.elapsed() < Duration::from_secs(2), "ninth connection must be closed: {resp:?}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get(addr, "/good", None).await.status, 200, "capacity comes back");
    let log = balancer.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

/// The front builds hyper's connection (and its buffers) only at a
/// connection's first byte: a connection that is silent for a while is
/// served when it speaks, and one that never speaks is closed after the
/// head read timeout, as hyper would close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_served_when_it_speaks_and_closed_when_it_never_does() {
    use std::io::{Read, Write};
    let fake = fake_member().await;
    let mut balancer = start(fake, &["--header-read-timeout", "1s"]);
    let addr = balancer.listen;
    let mut late = std::net::TcpStream::connect(addr).expect("connect");
    let mut silent = std::net::TcpStream::connect(addr).expect("connect");
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    late.write_all(b"GET /good HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").expect("write");
    late.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut answer = String::new();
    let _ = late.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "the late speaker is served: {answer:?}");

    silent.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut byte = [0u8; 1];
    let read = silent.read(&mut byte);
    let open_for = opened.elapsed();
    assert!(matches!(read, Ok(0)), "the silent connection is closed, not answered: {read:?}");
    assert!(
        open_for >= Duration::from_millis(900) && open_for < Duration::from_millis(2500),
        "closed after the 1 s head read timeout, not {open_for:?}"
    );
    assert!(balancer.try_wait().is_none(), "balancer still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_retry_elsewhere_and_sigterm_drains() {
    let fake = fake_member().await;
    let dead = format!("127.0.0.1:{}", free_port()); // nothing listens there
    let mut o = BalancerOptions::new(SECRET);
    o.args.extend(["--member".into(), format!("dead={dead}"), "--member".into(), format!("fake={fake}")]);
    let mut balancer = Balancer::start(o);
    for _ in 0..10 {
        let r = get(balancer.listen, "/good", None).await;
        assert_eq!(r.status, 200, "a request that never reached a member is retried on another");
    }
    // A sticky request for the dead route fails over too (failover on by default).
    let r = get(balancer.listen, "/good", Some("ABC.dead")).await;
    assert_eq!(r.status, 200);

    // SIGTERM with a request in flight: it completes; then the port closes and the process exits 0.
    let listen = balancer.listen;
    let in_flight = tokio::spawn(async move { get(listen, "/slow", None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = balancer.pid();
    common::signal(pid, "TERM");
    let r = in_flight.await.expect("join");
    assert_eq!((r.status, r.text().as_str()), (200, "slow"), "in-flight request finished during shutdown");
    let status = balancer.terminate(Duration::from_secs(10)).expect("balancer exits after draining");
    assert!(status.success(), "exit status {status}");
    assert!(std::net::TcpStream::connect(listen).is_err(), "no longer accepting");
}
