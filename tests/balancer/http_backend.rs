//! `--backend-protocol http` against real Tomcat 10.1, whose server.xml
//! carries the operator's RemoteIpValve and SSLValve lines
//! (`server_xml::http_backend_valves`): what the servlet sees of a request
//! equals what the client sent, with the client's address (through
//! RemoteIpValve, from another loopback address than the balancer's), scheme,
//! server port and TLS client certificate (through SSLValve); a client's
//! forged X-Forwarded-*/SSL headers change nothing; bodies stream both ways
//! with bounded balancer memory; sessions stick and fail over between two
//! clustered Tomcats; and the front refuses what it refuses with AJP.

use crate::common;
use crate::support::pki;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::bodies::{
    Body, full, generated_body, generated_digest, head_and_expect_continue, header_pairs, proc_status_kib,
};
use crate::common::http::{Conn, get, raw_exchange, read_reply};
use crate::common::tomcat::{TomcatOptions, start_cluster};
use crate::common::{Balancer, BalancerOptions, TempDir, free_port};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsConnector;

/// The AJP secret the helper always writes; unused over HTTP.
const SECRET: &str = "http-backend-unused-secret";

fn http_options() -> TomcatOptions {
    TomcatOptions { http_backend: true, ..TomcatOptions::new(SECRET) }
}

/// A TCP connection to `to` from the loopback address `from` (Linux
/// answers on all of 127.0.0.0/8), so Tomcat's view of the client differs
/// from the balancer's own address.
async fn connect_from(from: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{from}:0").parse().expect("addr")).expect("bind the client address");
    socket.connect(to).await.expect("connect to the balancer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_round_trip_over_http_with_the_clients_facts() {
    // Before any connection: computed later, they would leave the
    // keep-alive connection idle past the balancer's head timeout.
    const UPLOAD: usize = 50 * 1024 * 1024;
    const SIZED: usize = 8 * 1024 * 1024 + 12345;
    let (upload_digest, sized_digest) = (generated_digest(UPLOAD), generated_digest(SIZED));
    let nodes = start_cluster(&["solo"], &TomcatOptions { clustered: false, ..http_options() });

    // The assumption behind the health probe: Tomcat answers `OPTIONS *` itself.
    let probe = raw_exchange(
        format!("127.0.0.1:{}", nodes[0].backend_http_port).parse().expect("addr"),
        b"OPTIONS * HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(probe.starts_with("HTTP/1.1 200") && probe.contains("Allow: "), "{probe}");

    let balancer = Balancer::start(BalancerOptions::new(SECRET).http_members(&[&nodes[0]]));

    // --- request line, headers, query, the client's address and port ---
    let stream = connect_from("127.0.0.2", balancer.listen).await;
    let local = stream.local_addr().expect("local");
    let mut conn: Conn<Body> = Conn::over(stream, local).await;
    let req = Request::get("/counter/echo?a=1&b=%20x&c=%C3%A9&flag")
        .header("host", "balancer.test:8443")
        .header("user-agent", "http-backend-test/1.0")
        .header("accept", "text/plain, */*;q=0.1")
        .header("x-custom", "one")
        .header("x-multi", "first")
        .header("x-multi", "second")
        .header("x-empty", "")
        .header("cookie", "a=b; c=d")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        // Claims a client must not be able to make.
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-port", "1")
        .header("forwarded", "for=6.6.6.6;proto=https")
        .header("ssl_cipher", "FORGED")
        .header("ssl_client_cert", "-----BEGIN CERTIFICATE----- forged -----END CERTIFICATE-----")
        .body(full(Bytes::new()))
        .expect("request");
    let reply = read_reply(conn.send(req).await.expect("send")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["requestURI"], "/counter/echo");
    assert_eq!(echo["queryString"], "a=1&b=%20x&c=%C3%A9&flag");
    assert_eq!(echo["remoteAddr"], "127.0.0.2", "RemoteIpValve: the client's address, not the balancer's");
    assert_eq!(echo["scheme"], "http", "a client's X-Forwarded-Proto is not believed");
    assert_eq!(echo["secure"], false);
    assert_eq!(echo["serverName"], "balancer.test");
    assert_eq!(echo["serverPort"], 8443, "the port the client addressed (X-Forwarded-Port)");
    assert!(echo["cipherSuite"].is_null() && echo["clientCertSubject"].is_null(), "forged SSL headers dropped: {echo}");
    assert_eq!(echo["route"], "solo");
    let headers = header_pairs(&echo);
    let text = format!("{headers:?}");
    assert!(!text.contains("6.6.6.6") && !text.contains("FORGED") && !text.contains("forged"), "{text}");
    // What the application sees of the client's headers: exactly what it sent,
    // less hop-by-hop ones; the rest are the balancer's forwarding headers.
    let from_client: Vec<(String, String)> =
        headers.iter().filter(|(name, _)| !name.starts_with("x-forwarded-")).cloned().collect();
    let mut expected: Vec<(String, String)> = [
        ("host", "balancer.test:8443"),
        ("user-agent", "http-backend-test/1.0"),
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
    assert_eq!(from_client, expected, "headers arrive exactly, hop-by-hop and forged ones removed");
    assert!(headers.contains(&("x-forwarded-host".into(), "balancer.test:8443".into())), "{headers:?}");

    // Same keep-alive connection: other methods, a method Tomcat has no constant for, bodies.
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
        assert_eq!(echo["remoteAddr"], "127.0.0.2");
        // No port in Host: the port the client connected to, as over AJP.
        assert_eq!(echo["serverPort"], balancer.listen.port() as u64);
    }

    // HEAD: headers only, and the connection stays usable; Expect: 100-continue.
    head_and_expect_continue(&mut conn).await;

    // --- large bodies, streamed both ways ---
    let pid = balancer.pid();
    let started = Instant::now();
    let body = generated_body(UPLOAD);
    let req = Request::post("/counter/echo").header("host", "balancer.test").body(body).expect("req");
    let reply = read_reply(conn.send(req).await.expect("send upload")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["bodyLength"], UPLOAD as u64, "a chunked upload arrives whole");
    assert_eq!(echo["bodySha256"], upload_digest.as_str());

    let body = generated_body(SIZED);
    let req = Request::put("/counter/echo")
        .header("host", "balancer.test")
        .header("content-length", SIZED.to_string())
        .body(body)
        .expect("req");
    let echo = read_reply(conn.send(req).await.expect("send")).await.json();
    assert_eq!(echo["bodyLength"], SIZED as u64);
    assert_eq!(echo["bodySha256"], sized_digest.as_str());

    const DOWNLOAD: u64 = 100 * 1024 * 1024;
    for chunked in [false, true] {
        let uri = format!("/counter/download?bytes={DOWNLOAD}{}", if chunked { "&chunked=1" } else { "" });
        let req = Request::get(uri).header("host", "balancer.test").body(full(Bytes::new())).expect("req");
        let resp = conn.send(req).await.expect("send download");
        assert_eq!(resp.status(), 200);
        if !chunked {
            assert_eq!(resp.headers()["content-length"], DOWNLOAD.to_string().as_str());
        }
        let mut body = resp.into_body();
        let mut seen: u64 = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("download frame").into_data() {
                for (i, b) in data.iter().enumerate() {
                    assert_eq!(*b as u64, (seen + i as u64) % 251, "byte {} of the download", seen + i as u64);
                }
                seen += data.len() as u64;
            }
        }
        assert_eq!(seen, DOWNLOAD);
    }
    let peak_kib = proc_status_kib(pid, "VmHWM:");
    eprintln!(
        "50 MB up, 8 MB up, 2x100 MB down over HTTP in {:?}; balancer peak RSS {peak_kib} KiB",
        started.elapsed()
    );
    assert!(peak_kib < 48 * 1024, "balancer peak RSS {peak_kib} KiB: bodies must stream");

    // Every request went over pooled connections the probe keeps proving.
    let status = get(balancer.admin, "/status.json", None).await.json();
    assert_eq!(status["members"][0]["healthy"], true, "{status}");
    assert!(status["members"][0]["pool_idle"].as_u64().is_some_and(|n| n >= 1), "{status}");
    assert!(!balancer.log_text().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_facts_and_the_client_certificate_reach_tomcat_through_sslvalve() {
    let dir = TempDir::new("http-backend-tls");
    let pki = pki::Pki::new("clusterapp test CA");
    let server = pki.leaf("balancer.test", &["balancer.test"]);
    let client_pki = pki::Pki::new("client CA");
    let alice = client_pki.leaf("alice", &[]);
    let (cert, key, client_ca) =
        (dir.path().join("tls.crt"), dir.path().join("tls.key"), dir.path().join("client-ca.crt"));
    std::fs::write(&cert, &server.cert_pem).expect("cert");
    std::fs::write(&key, &server.key_pem).expect("key");
    std::fs::write(&client_ca, client_pki.ca_pem()).expect("client CA");

    let nodes = start_cluster(&["solo"], &TomcatOptions { clustered: false, ..http_options() });
    let tls_port = free_port();
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().expect("addr");
    let _balancer = Balancer::start(
        BalancerOptions::new(SECRET)
            .http_members(&[&nodes[0]])
            .arg("--tls-listen")
            .arg(tls_addr.to_string())
            .arg("--tls-cert-file")
            .arg(cert.to_string_lossy())
            .arg("--tls-key-file")
            .arg(key.to_string_lossy())
            .arg("--tls-client-ca-file")
            .arg(client_ca.to_string_lossy()),
    );

    for (client_cert, versions) in
        [(Some(&alice), &[&rustls::version::TLS13][..]), (None, &[&rustls::version::TLS12][..])]
    {
        let config: Arc<rustls::ClientConfig> = pki.client(client_cert, versions);
        let tcp = connect_from("127.0.0.3", tls_addr).await;
        let local = tcp.local_addr().expect("local");
        let tls = TlsConnector::from(config)
            .connect(ServerName::try_from("balancer.test").expect("name"), tcp)
            .await
            .expect("TLS handshake");
        let suite = format!("{:?}", tls.get_ref().1.negotiated_cipher_suite().expect("suite").suite());
        let mut conn: Conn = Conn::over(tls, local).await;
        let req = Request::get("/counter/echo?tls=1")
            .header("host", format!("balancer.test:{tls_port}"))
            .header("x-forwarded-proto", "http")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let reply = read_reply(conn.send(req).await.expect("send")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let echo = reply.json();
        assert_eq!(echo["scheme"], "https", "RemoteIpValve: X-Forwarded-Proto from the balancer");
        assert_eq!(echo["secure"], true);
        assert_eq!(echo["serverPort"], tls_port as u64);
        assert_eq!(echo["remoteAddr"], "127.0.0.3");
        // rustls says TLS13_AES_256_GCM_SHA384; Java (and the balancer) say TLS_AES_256_GCM_SHA384.
        let iana = suite.replace("TLS13_", "TLS_");
        assert_eq!(echo["cipherSuite"], iana.as_str(), "SSLValve: ssl_cipher");
        let bits = if iana.contains("AES_128") { "128" } else { "256" };
        assert_eq!(echo["keySize"], bits, "SSLValve: ssl_cipher_usekeysize");
        match client_cert {
            Some(_) => assert_eq!(echo["clientCertSubject"], "CN=alice", "SSLValve: ssl_client_cert"),
            None => assert!(echo["clientCertSubject"].is_null(), "{echo}"),
        }
        // SSLValve has no header for the protocol version: over HTTP Tomcat
        // does not learn it (over AJP it does, as AJP_SSL_PROTOCOL).
        assert!(echo["tlsProtocol"].is_null(), "{echo}");
    }
}

fn route_of(id: &str) -> &str {
    id.split_once('.').map(|(_, r)| r).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stick_and_fail_over_between_two_tomcats() {
    let mut nodes = start_cluster(&["h1", "h2"], &http_options());
    let balancer = Balancer::start(BalancerOptions::new(SECRET).http_members(&[&nodes[0], &nodes[1]]));

    let first = get(balancer.listen, "/counter/", None).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let session = first.set_session_id().expect("a new session");
    let home = route_of(&session).to_string();
    assert_eq!(first.header("x-route"), Some(home.as_str()));
    for expected in 2..=6 {
        let r = get(balancer.listen, "/counter/", Some(&session)).await;
        assert_eq!(r.header("x-counter"), Some(expected.to_string().as_str()), "counter climbs");
        assert_eq!(r.header("x-route"), Some(home.as_str()), "sticky to {home}");
    }
    // The path parameter wins over a cookie naming the other route.
    let other = if home == "h1" { "h2" } else { "h1" };
    let bogus_cookie = format!("{}.{other}", session.split_once('.').expect("id").0);
    let r = get(balancer.listen, &format!("/counter/;jsessionid={session}"), Some(&bogus_cookie)).await;
    assert_eq!(r.header("x-route"), Some(home.as_str()), "path parameter wins");
    assert_eq!(r.header("x-counter"), Some("7"));

    nodes.iter_mut().find(|n| n.route == home).expect("home node").kill9();
    let started = Instant::now();
    let r = get(balancer.listen, "/counter/", Some(&session)).await;
    let failover_took = started.elapsed();
    assert_eq!(r.status, 200, "failover answers: {}", r.text());
    assert_eq!(r.header("x-counter"), Some("8"), "no acknowledged write lost");
    assert_eq!(r.header("x-route"), Some(other));
    assert!(failover_took < Duration::from_secs(1), "a dead node cost {failover_took:?}");
    let rewritten = r.set_session_id().expect("the id is reissued with the new route");
    assert_eq!(route_of(&rewritten), other, "JvmRouteBinderValve rewrote the route");
    for expected in 9..=11 {
        let r = get(balancer.listen, "/counter/", Some(&rewritten)).await;
        assert_eq!(r.header("x-counter"), Some(expected.to_string().as_str()));
        assert_eq!(r.header("x-route"), Some(other));
    }
    common::wait_until(Duration::from_secs(5), "the killed node marked failed", || {
        let text = raw_exchange(balancer.admin, b"GET /status.json HTTP/1.0\r\n\r\n", Duration::from_secs(2));
        let json = text.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or("");
        serde_json::from_str::<serde_json::Value>(json).ok().is_some_and(|status| {
            status["members"]
                .as_array()
                .is_some_and(|members| members.iter().any(|m| m["route"] == home.as_str() && m["healthy"] == false))
        })
    });
}

/// The front is the same whatever speaks behind it: the smuggling shapes,
/// limits and slow heads that `tests/balancer/malformed.rs` shows refused
/// in front of AJP are refused the same way in front of HTTP, before any
/// byte reaches Tomcat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_refuses_the_same_requests_as_with_ajp() {
    let nodes = start_cluster(&["solo"], &TomcatOptions { clustered: false, ..http_options() });
    let balancer = Balancer::start(
        BalancerOptions::new(SECRET)
            .http_members(&[&nodes[0]])
            .arg("--max-body-bytes")
            .arg("1000")
            .arg("--header-read-timeout")
            .arg("1s"),
    );
    let addr = balancer.listen;
    let wait = Duration::from_secs(3);
    let status_of = |resp: &str| resp.get(9..12).unwrap_or("").to_string();
    let cases: [(&str, &[u8], &str); 12] = [
        ("CL + TE", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "400"),
        ("TE + CL", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "400"),
        ("duplicate CL", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "400"),
        ("conflicting CL", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "400"),
        ("CL list", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello", "400"),
        ("CL with a sign", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello", "400"),
        ("TE not chunked", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "400"),
        ("TE twice", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        ("bad chunk size", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "400"),
        ("body over the cap (CL)", b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n", "413"),
        ("a good request passes", b"GET /counter/echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", "200"),
        ("garbage request line", b"GET /counter/echo HTTP/1.1 extra\r\n\r\n", "400"),
    ];
    for (name, request, expected) in cases {
        let resp = raw_exchange(addr, request, wait);
        assert_eq!(status_of(&resp), expected, "{name}: {resp}");
    }
    // A chunked body over the cap is cut off while it streams to Tomcat.
    let mut big = b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        big.extend_from_slice(b"200\r\n");
        big.extend_from_slice(&[b'x'; 0x200]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(status_of(&raw_exchange(addr, &big, wait)), "413");
    // Within the cap it passes whole.
    let ok = b"POST /counter/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n";
    let resp = raw_exchange(addr, ok, wait);
    assert_eq!(status_of(&resp), "200", "{resp}");
    assert!(resp.contains("\"bodyLength\":8"), "{resp}");

    let huge = format!("GET /counter/echo HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(status_of(&raw_exchange(addr, huge.as_bytes(), wait)), "431");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /counter/echo HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    assert_eq!(status_of(&raw_exchange(addr, many.as_bytes(), wait)), "431");

    let started = Instant::now();
    let resp = raw_exchange(addr, b"GET /counter/echo HTTP/1.1\r\nHost: t\r\nX-Slow: ", Duration::from_secs(5));
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "slow head held the connection {took:?}: {resp:?}");
    assert!(!resp.contains("200"), "{resp}");
    assert!(!balancer.log_text().contains("panicked"));
}
