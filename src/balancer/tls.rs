//! TLS termination on the client side (`--tls-listen`).
//!
//! The certificate and key are PEM files, typically a mounted
//! `kubernetes.io/tls` Secret. They are polled (every second, like the members
//! file, so Secret symlink swaps are seen) and a changed pair replaces the
//! served one for new handshakes; a pair that does not load keeps the last
//! good one and logs why. Optionally, client certificates are requested and
//! verified against `--tls-client-ca-file`.
//!
//! What the handshake negotiated is forwarded to Tomcat the way mod_ssl +
//! mod_proxy_ajp do: `is_ssl`, the cipher suite, its key size, the protocol
//! (`AJP_SSL_PROTOCOL`) and the client's certificate (PEM) — Tomcat turns
//! them into the servlet request attributes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerConnection, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ProtocolVersion, RootCertStore};
use tokio::sync::watch;

/// How often the certificate files are checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub require_client_cert: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading TLS certificate chain {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("reading TLS private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("TLS certificate {cert} and key {key} do not belong together: {message}")]
    Mismatch { cert: PathBuf, key: PathBuf, message: String },
    #[error("reading TLS client CA file {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
}

/// What a TLS connection negotiated, captured once per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFacts {
    /// IANA name, as Java reports it (`TLS_AES_128_GCM_SHA256`).
    pub cipher: &'static str,
    /// `TLSv1.2` / `TLSv1.3`, as Java names them.
    pub protocol: &'static str,
    /// Bits of the bulk cipher's key.
    pub key_size: u16,
    /// The client's certificate (PEM), when it sent one.
    pub client_cert_pem: Option<String>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks a certificate chain and its private key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate { path: cert.to_path_buf(), message: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.to_path_buf(),
            message: "no CERTIFICATE block in the file".into(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key { path: key.to_path_buf(), message: e.to_string() })?;
    CertifiedKey::from_der(chain, private_key, &provider()).map_err(|e| TlsError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        message: e.to_string(),
    })
}

/// Serves the current certificate; swapped by [`watch_files`].
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    /// `notAfter` of the served certificate (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        current.cert.first().and_then(|leaf| not_after_unix(leaf.as_ref()))
    }

    /// Publishes the served certificate's expiry and warns when it is near or past.
    pub fn report(&self, gauge: &prometheus_client::metrics::gauge::Gauge, cert: &Path) {
        let Some(not_after) = self.not_after() else {
            tracing::warn!(cert = %cert.display(), "cannot read the expiry of the TLS certificate");
            return;
        };
        gauge.set(not_after);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let days_left = (not_after - now).div_euclid(86_400);
        if not_after <= now {
            tracing::warn!(cert = %cert.display(), not_after, "the TLS certificate has expired; clients will refuse it");
        } else if days_left < 14 {
            tracing::warn!(cert = %cert.display(), not_after, days_left, "the TLS certificate expires soon");
        } else {
            tracing::info!(cert = %cert.display(), not_after, days_left, "TLS certificate in use");
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The acceptor and the store behind it.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub store: Arc<CertStore>,
}

/// Builds the server side: fails fast on files that do not load at start.
pub fn build(files: &TlsFiles) -> Result<Tls, TlsError> {
    let store = Arc::new(CertStore { current: RwLock::new(Arc::new(load_certified_key(&files.cert, &files.key)?)) });
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3");
    let builder = match &files.client_ca {
        Some(path) => {
            let ca_error = |message: String| TlsError::ClientCa { path: path.clone(), message };
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))? {
                roots.add(cert.map_err(|e| ca_error(e.to_string()))?).map_err(|e| ca_error(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ca_error("no CERTIFICATE block in the file".into()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = if files.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| ca_error(e.to_string()))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(store.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption by ticket spares returning clients a full handshake.
    if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(Tls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), store })
}

/// Modification stamp of a file (following symlinks, as Secret mounts use).
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reloads the certificate when either file changes, until shutdown.
pub async fn watch_files(
    store: Arc<CertStore>,
    files: TlsFiles,
    expiry: prometheus_client::metrics::gauge::Gauge,
    mut shutdown: watch::Receiver<bool>,
) {
    store.report(&expiry, &files.cert);
    let mut seen = (stamp(&files.cert), stamp(&files.key));
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = (stamp(&files.cert), stamp(&files.key));
        if now == seen {
            continue;
        }
        // Once per change: a half-written pair (cert updated, key not yet)
        // changes again when the rest is written, and loads then.
        seen = now;
        match load_certified_key(&files.cert, &files.key) {
            Ok(key) => {
                store.replace(key);
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                store.report(&expiry, &files.cert);
            }
            Err(e) => tracing::warn!(error = %e, "TLS certificate changed but does not load; serving the previous one"),
        }
    }
}

/// Reads what the handshake of `conn` negotiated.
pub fn facts(conn: &ServerConnection) -> TlsFacts {
    let (cipher, key_size) = match conn.negotiated_cipher_suite() {
        Some(suite) => cipher_facts(suite.suite().as_str().unwrap_or("UNKNOWN")),
        None => ("UNKNOWN", 0),
    };
    let protocol = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "UNKNOWN",
    };
    let client_cert_pem = conn.peer_certificates().and_then(|chain| chain.first()).map(|leaf| pem_certificate(leaf));
    TlsFacts { cipher, protocol, key_size, client_cert_pem }
}

/// rustls names TLS 1.3 suites `TLS13_…`; Java and IANA say `TLS_…`.
fn cipher_facts(rustls_name: &'static str) -> (&'static str, u16) {
    let iana = match rustls_name {
        "TLS13_AES_128_GCM_SHA256" => "TLS_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384" => "TLS_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256" => "TLS_CHACHA20_POLY1305_SHA256",
        other => other,
    };
    let key_size = if iana.contains("AES_128") {
        128
    } else if iana.contains("AES_256") || iana.contains("CHACHA20") {
        256
    } else {
        0
    };
    (iana, key_size)
}

/// When a DER certificate stops being valid (its `notAfter`), as Unix
/// seconds; None for anything that is not a well-formed certificate head.
pub fn not_after_unix(der: &[u8]) -> Option<i64> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, … } … }
    let (_, certificate, _) = der_element(der)?;
    let (_, tbs, _) = der_element(certificate)?;
    let mut rest = tbs;
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xA0 {
        rest = after; // explicit version
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2; // serialNumber, signature, issuer
    }
    let (_, validity, _) = der_element(rest)?;
    let not_before_rest = der_element(validity)?.2;
    let (tag, time, _) = der_element(not_before_rest)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        // UTCTime YYMMDDHHMMSSZ: 50..99 are 19xx (RFC 5280).
        0x17 => {
            let yy: i64 = text.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        // GeneralizedTime YYYYMMDDHHMMSSZ.
        0x18 => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    if rest.len() != 11 || !rest.ends_with('Z') || !rest[..10].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |i: usize| -> i64 { rest[i..i + 2].parse().unwrap_or(0) };
    let (month, day, hour, minute, second) = (field(0), field(2), field(4), field(6), field(8));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// One DER element at the start of `input`: (tag, contents, what follows).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize), &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// PEM text of one certificate, the form Tomcat's AJP connector parses.
fn pem_certificate(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls13_suites_get_their_iana_names_and_key_sizes() {
        assert_eq!(cipher_facts("TLS13_AES_128_GCM_SHA256"), ("TLS_AES_128_GCM_SHA256", 128));
        assert_eq!(cipher_facts("TLS13_AES_256_GCM_SHA384"), ("TLS_AES_256_GCM_SHA384", 256));
        assert_eq!(cipher_facts("TLS13_CHACHA20_POLY1305_SHA256"), ("TLS_CHACHA20_POLY1305_SHA256", 256));
        assert_eq!(
            cipher_facts("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
            ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", 256)
        );
    }

    #[test]
    fn pem_lines_are_64_columns_and_round_trip() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = pem_certificate(&CertificateDer::from(der.clone()));
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("parses");
        assert_eq!(back.as_ref(), der.as_slice());
    }

    fn certificate_expiring(year: i32, month: u8, day: u8) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["t.example".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, month, day);
        params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn not_after_is_read_from_utc_and_generalized_times() {
        // Before 2050 notAfter is a UTCTime, from 2050 a GeneralizedTime (RFC 5280).
        assert_eq!(not_after_unix(&certificate_expiring(2031, 5, 17)), Some(1_936_742_400));
        assert_eq!(not_after_unix(&certificate_expiring(2051, 1, 2)), Some(2_556_230_400));
        assert_eq!(days_from_civil(1999, 12, 31) * 86_400, 946_598_400);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }

    #[test]
    fn not_after_of_broken_input_is_none_not_a_panic() {
        let der = certificate_expiring(2031, 5, 17);
        for cut in 0..der.len() {
            // Truncated anywhere before the validity ends: no answer, no panic.
            let _ = not_after_unix(&der[..cut]);
        }
        assert_eq!(not_after_unix(b""), None);
        assert_eq!(not_after_unix(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(not_after_unix(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }

    #[test]
    fn missing_files_and_garbage_give_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("clusterapp-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        let err = load_certified_key(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("tls.crt"), "{err}");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        let err = load_certified_key(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("no CERTIFICATE block"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
