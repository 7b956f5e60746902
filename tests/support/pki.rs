//! Certificates made in a test (rcgen): a CA, leaf certificates it signs,
//! and rustls client configurations that trust it. Used by the balancer's
//! TLS tests and the e2e HTTPS test.
#![allow(dead_code)]

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};

/// A CA made for one test.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM, and the DER a peer presents.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Pki { ca: CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA") }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf for the DNS `names` (none: a client certificate) with a fresh key.
    pub fn leaf(&self, common_name: &str, names: &[&str]) -> Leaf {
        self.leaf_until(common_name, names, (4096, 1, 1))
    }

    /// A leaf whose notAfter is the given (year, month, day), 00:00 UTC.
    pub fn leaf_until(&self, common_name: &str, names: &[&str], (year, month, day): (i32, u8, u8)) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }

    /// A client that trusts this CA only, presents `identity` if given, and
    /// speaks `versions` (e.g. `rustls::DEFAULT_VERSIONS`).
    pub fn client(&self, identity: Option<&Leaf>, versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem().as_bytes()).expect("CA PEM")).expect("CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots);
        let config = match identity {
            Some(leaf) => builder
                .with_client_auth_cert(
                    vec![leaf.der.clone()],
                    PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key PEM"),
                )
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}
