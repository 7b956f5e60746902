//! TLS termination in the balancer (`--tls-listen`), against real Tomcat:
//! an HTTPS request reaches the servlet as secure, with the cipher suite, key
//! size, protocol and client certificate the handshake negotiated; plain HTTP
//! keeps working next to it; a renewed certificate is served without a
//! restart; failed handshakes are counted and cost nothing else.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::http::{Conn, read_reply};
use crate::common::tomcat::{TomcatNode, TomcatOptions, start_cluster};
use crate::common::{Balancer, BalancerOptions, TempDir, free_port};
use crate::support::pki::Pki;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

const SECRET: &str = "tls-test-secret";

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    TlsConnector::from(config).connect(ServerName::try_from("balancer.test").expect("name"), tcp).await
}

/// An HTTP/1.1 connection over TLS, with what the client negotiated.
async fn https(addr: SocketAddr, config: Arc<ClientConfig>) -> (Conn, String, String, CertificateDer<'static>) {
    let stream = tls_connect(addr, config).await.expect("TLS handshake with the balancer");
    let local = stream.get_ref().0.local_addr().expect("local");
    let session = stream.get_ref().1;
    let suite = format!("{:?}", session.negotiated_cipher_suite().expect("suite").suite());
    let version = format!("{:?}", session.protocol_version().expect("version"));
    let server_cert = session.peer_certificates().expect("server certificate")[0].clone();
    (Conn::over(stream, local).await, suite, version, server_cert)
}

/// One echo request on a new TLS connection; any failure is an error.
async fn try_request(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    host: &str,
) -> std::io::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = tls_connect(addr, config).await?;
    let local = stream.get_ref().0.local_addr()?;
    let mut conn: Conn = Conn::over(stream, local).await;
    conn.send(echo_request(host)).await.map_err(std::io::Error::other)
}

/// A balancer in front of `node` with an HTTPS front on `tls_addr` asking for client certificates.
fn tls_options(node: &TomcatNode, tls_addr: SocketAddr, cert: &Path, key: &Path, client_ca: &Path) -> BalancerOptions {
    BalancerOptions::new(SECRET)
        .members(&[node])
        .arg("--tls-listen")
        .arg(tls_addr.to_string())
        .arg("--tls-cert-file")
        .arg(cert.to_string_lossy())
        .arg("--tls-key-file")
        .arg(key.to_string_lossy())
        .arg("--tls-client-ca-file")
        .arg(client_ca.to_string_lossy())
}

fn echo_request(host: &str) -> Request<Full<Bytes>> {
    Request::get("/counter/echo?tls=1").header("host", host).body(Full::new(Bytes::new())).expect("request")
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn metric(balancer: &Balancer, name: &str) -> f64 {
    let text = common::http::raw_exchange(balancer.admin, b"GET /metrics HTTP/1.0\r\n\r\n", Duration::from_secs(2));
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_reaches_tomcat_as_secure_with_the_negotiated_tls_facts() {
    let dir = TempDir::new("tls");
    let pki = Pki::new("clusterapp test CA");
    let server = pki.leaf_until("balancer.test", &["balancer.test"], (2031, 5, 17));
    let client_pki = Pki::new("client CA");
    let alice = client_pki.leaf("alice", &[]);
    let (cert_file, key_file, client_ca_file) =
        (dir.path().join("tls.crt"), dir.path().join("tls.key"), dir.path().join("client-ca.crt"));
    std::fs::write(&cert_file, &server.cert_pem).expect("cert");
    std::fs::write(&key_file, &server.key_pem).expect("key");
    std::fs::write(&client_ca_file, client_pki.ca_pem()).expect("client CA");

    let nodes = start_cluster(&["solo"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    let tls_port = free_port();
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().expect("addr");
    let balancer = Balancer::start(
        tls_options(&nodes[0], tls_addr, &cert_file, &key_file, &client_ca_file).arg("--header-read-timeout").arg("2s"),
    );
    let host = format!("balancer.test:{tls_port}");
    // 2031-05-17T00:00:00Z, for certificate expiry alerts.
    common::wait_until(Duration::from_secs(3), "the certificate's expiry in /metrics", || {
        metric(&balancer, "clusterapp_balancer_tls_certificate_not_after_seconds") == 1_936_742_400.0
    });

    // --- TLS 1.3 with a client certificate ---
    let tls13 = pki.client(Some(&alice), &[&rustls::version::TLS13]);
    let (mut conn, suite, version, served) = https(tls_addr, tls13.clone()).await;
    assert_eq!(version, "TLSv1_3");
    assert_eq!(served, server.der, "the configured certificate is served");
    let reply = read_reply(conn.send(echo_request(&host)).await.expect("send")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    assert_eq!(echo["scheme"], "https");
    assert_eq!(echo["secure"], true);
    assert_eq!(echo["serverName"], "balancer.test");
    assert_eq!(echo["serverPort"], tls_port as u64);
    assert_eq!(echo["localPort"], tls_port as u64);
    assert_eq!(echo["remotePort"], conn.local.port() as u64);
    assert_eq!(echo["queryString"], "tls=1");
    // rustls says TLS13_AES_256_GCM_SHA384; Java (and the balancer) say TLS_AES_256_GCM_SHA384.
    let iana = suite.replace("TLS13_", "TLS_");
    assert_eq!(echo["cipherSuite"], iana.as_str(), "cipher suite forwarded");
    let bits = if iana.contains("AES_128") { "128" } else { "256" };
    assert_eq!(echo["keySize"], bits, "key size forwarded");
    assert_eq!(echo["tlsProtocol"], "TLSv1.3");
    assert_eq!(echo["clientCertSubject"], "CN=alice", "client certificate reaches Tomcat as X509Certificate");

    // A body over the same TLS connection.
    let body = "x".repeat(100_000);
    let req = Request::post("/counter/echo")
        .header("host", &host)
        .header("content-length", body.len().to_string())
        .body(Full::new(Bytes::from(body.clone())))
        .expect("request");
    let echo = read_reply(conn.send(req).await.expect("send")).await.json();
    assert_eq!(echo["bodyLength"], 100_000);
    assert_eq!(echo["secure"], true);

    // --- TLS 1.2 without a client certificate (allowed: not required) ---
    let tls12 = pki.client(None, &[&rustls::version::TLS12]);
    let (mut conn12, suite12, version12, _) = https(tls_addr, tls12).await;
    assert_eq!(version12, "TLSv1_2");
    let echo = read_reply(conn12.send(echo_request(&host)).await.expect("send")).await.json();
    assert_eq!(echo["tlsProtocol"], "TLSv1.2");
    assert_eq!(echo["cipherSuite"], suite12.as_str(), "TLS 1.2 suites keep their IANA names");
    assert!(echo["clientCertSubject"].is_null(), "no client certificate: {echo}");

    // --- plain HTTP on --listen still works and is not secure ---
    let mut plain: Conn = Conn::open(balancer.listen).await;
    let echo = read_reply(plain.send(echo_request("balancer.test")).await.expect("send")).await.json();
    assert_eq!(echo["scheme"], "http");
    assert_eq!(echo["secure"], false);
    assert!(echo["cipherSuite"].is_null(), "{echo}");

    // --- failed handshakes: counted, logged, nothing else changes ---
    let before = metric(&balancer, "clusterapp_balancer_tls_handshake_failures_total");
    // Plain HTTP on the TLS port.
    let mut raw = tokio::net::TcpStream::connect(tls_addr).await.expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "a plain-text request on the TLS port is closed");
    assert!(!String::from_utf8_lossy(&sink).contains("HTTP/1.1 200"), "no HTTP answer without TLS");
    // A client certificate from a CA the balancer does not trust.
    let mallory = Pki::new("other CA").leaf("mallory", &[]);
    let untrusted = pki.client(Some(&mallory), &[&rustls::version::TLS13]);
    let refused = try_request(tls_addr, untrusted, &host).await;
    assert!(refused.is_err(), "an untrusted client certificate is refused");
    // A client that connects and never says hello is cut off by the head read
    // timeout (which also ends idle keep-alive connections, here after 2 s).
    let mut silent = tokio::net::TcpStream::connect(tls_addr).await.expect("connect");
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut [0u8; 16])).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "silent TLS client closed: {closed:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after the 2 s head timeout, took {:?}",
        started.elapsed()
    );
    common::wait_until(Duration::from_secs(2), "handshake failures counted", || {
        metric(&balancer, "clusterapp_balancer_tls_handshake_failures_total") >= before + 3.0
    });
    let (mut conn, _, _, _) = https(tls_addr, tls13.clone()).await;
    let echo = read_reply(conn.send(echo_request(&host)).await.expect("send")).await.json();
    assert_eq!(echo["secure"], true, "served after the failed handshakes");

    // --- certificate renewal: new handshakes get the new certificate, no restart ---
    let renewed = pki.leaf_until("renewed", &["balancer.test"], (2051, 1, 2));
    write_atomically(&key_file, &renewed.key_pem);
    write_atomically(&cert_file, &renewed.cert_pem);
    let changed_at = Instant::now();
    // Full handshakes only: a resumed session reports the certificate of the
    // session it resumes, and the client holds tickets from the connections
    // above, so it would show the old certificate that many times more.
    let mut no_resumption = (*tls13).clone();
    no_resumption.resumption = rustls::client::Resumption::disabled();
    let no_resumption = Arc::new(no_resumption);
    loop {
        let (_, _, _, served) = https(tls_addr, no_resumption.clone()).await;
        // The connection from before keeps serving throughout.
        let echo =
            read_reply(conn.send(echo_request(&host)).await.expect("connection from before the renewal")).await.json();
        assert_eq!(echo["secure"], true);
        if served == renewed.der {
            break;
        }
        assert!(changed_at.elapsed() < Duration::from_secs(5), "renewed certificate not served within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("renewed certificate served after {:?}", changed_at.elapsed());
    common::wait_until(Duration::from_secs(3), "the renewed certificate's expiry in /metrics", || {
        metric(&balancer, "clusterapp_balancer_tls_certificate_not_after_seconds") == 2_556_230_400.0
    });

    // A broken replacement keeps the last good certificate and says why.
    write_atomically(&cert_file, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n");
    common::wait_until(Duration::from_secs(5), "warning about the broken certificate", || {
        balancer.log_text().contains("TLS certificate changed but does not load")
    });
    let (mut conn, _, _, served) = https(tls_addr, no_resumption).await;
    assert_eq!(served, renewed.der, "the last good certificate stays");
    let reply = read_reply(conn.send(echo_request(&host)).await.expect("send")).await;
    assert_eq!(reply.status, 200);
    assert!(!balancer.log_text().contains("PRIVATE KEY"), "no key material in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_and_bad_files_at_start() {
    let dir = TempDir::new("tls-required");
    let pki = Pki::new("clusterapp test CA");
    let server = pki.leaf("balancer.test", &["balancer.test"]);
    let alice = pki.leaf("alice", &[]);
    let other = pki.leaf("other", &["other.test"]);
    let (cert_file, key_file, ca_file, other_key) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("ca.crt"),
        dir.path().join("other.key"),
    );
    std::fs::write(&cert_file, &server.cert_pem).expect("cert");
    std::fs::write(&key_file, &server.key_pem).expect("key");
    std::fs::write(&ca_file, pki.ca_pem()).expect("CA");
    std::fs::write(&other_key, &other.key_pem).expect("key");

    // A key that does not belong to the certificate: refused at start, naming both files.
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).expect("secret");
    let start = |key: &Path| {
        Command::new(env!("CARGO_BIN_EXE_clusterapp"))
            .args(["balancer", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--member", "x=127.0.0.1:1"])
            .arg("--ajp-secret-file")
            .arg(&secret_file)
            .args(["--tls-listen", "127.0.0.1:0", "--tls-cert-file"])
            .arg(&cert_file)
            .arg("--tls-key-file")
            .arg(key)
            .output()
            .expect("run balancer")
    };
    let out = start(&other_key);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("do not belong together") && stderr.contains("other.key"), "{stderr}");
    let out = start(&dir.path().join("missing.key"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.key"), "{stderr}");
    // --tls-cert-file without --tls-listen is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_clusterapp"))
        .args(["balancer", "--member", "x=127.0.0.1:1", "--ajp-secret-file"])
        .arg(&secret_file)
        .arg("--tls-cert-file")
        .arg(&cert_file)
        .output()
        .expect("run balancer");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));

    // --tls-require-client-cert: no certificate, no service.
    let nodes = start_cluster(&["solo"], &TomcatOptions { clustered: false, ..TomcatOptions::new(SECRET) });
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let _balancer = Balancer::start(
        tls_options(&nodes[0], tls_addr, &cert_file, &key_file, &ca_file).arg("--tls-require-client-cert"),
    );
    let anonymous = pki.client(None, &[&rustls::version::TLS13, &rustls::version::TLS12]);
    let refused = try_request(tls_addr, anonymous, "balancer.test").await;
    assert!(refused.is_err(), "a client without a certificate is refused");
    let (mut conn, _, _, _) = https(tls_addr, pki.client(Some(&alice), &[&rustls::version::TLS13])).await;
    let echo = read_reply(conn.send(echo_request("balancer.test")).await.expect("send")).await.json();
    assert_eq!(echo["clientCertSubject"], "CN=alice");
}
