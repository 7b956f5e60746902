//! HTTPS for the e2e tests: a CA made in the test (rcgen), `kubernetes.io/tls`
//! Secrets of its leaf certificates, and a rustls client that reports what
//! the handshake presented and negotiated.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::pki::Leaf;
use tokio_rustls::TlsConnector;

/// The name the leaf certificates carry and the client asks for (SNI).
pub const SERVER_NAME: &str = "shop.clusterapp.test";

/// A `kubernetes.io/tls` Secret holding `leaf`.
pub fn tls_secret(name: &str, leaf: &Leaf) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name},
        "stringData": {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem},
    })
}

/// One HTTP/1.1 connection over TLS to the NodePort `port`, with what the
/// handshake gave.
pub struct HttpsConn {
    sender: hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>,
    pub port: u16,
    /// The certificate the server presented.
    pub server_cert: CertificateDer<'static>,
    /// rustls' names, e.g. `TLSv1_3`, `TLS13_AES_256_GCM_SHA384`.
    pub protocol: String,
    pub cipher_suite: String,
}

/// What one request over HTTPS answered.
#[derive(Debug, Clone)]
pub struct HttpsReply {
    pub status: u16,
    pub counter: Option<u64>,
    pub route: Option<String>,
    /// From Set-Cookie, else X-Session-Id.
    pub session: Option<String>,
    pub body: String,
}

impl HttpsConn {
    pub async fn open(port: u16, config: Arc<ClientConfig>) -> Result<HttpsConn, String> {
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((crate::support::nodes::NODE_ADDRESS, port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let name = ServerName::try_from(SERVER_NAME).expect("server name");
            let tls = TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("TLS handshake: {e}"))?;
            let session = tls.get_ref().1;
            let server_cert =
                session.peer_certificates().and_then(|c| c.first().cloned()).ok_or("no server certificate")?;
            let protocol = session.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
            let cipher_suite =
                session.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
            let io = hyper_util::rt::TokioIo::new(tls);
            let (sender, conn) =
                hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(HttpsConn { sender, port, server_cert, protocol, cipher_suite })
        };
        tokio::time::timeout(Duration::from_secs(15), connect)
            .await
            .unwrap_or_else(|_| Err("timeout after 15 s".to_string()))
    }

    /// GET `path` (with the session cookie, if any) on this connection.
    pub async fn get(&mut self, path: &str, session: Option<&str>) -> Result<HttpsReply, String> {
        let exchange = async {
            self.sender.ready().await.map_err(|e| format!("connection: {e}"))?;
            let mut request = http::Request::get(path).header("host", format!("{SERVER_NAME}:{}", self.port));
            if let Some(id) = session {
                request = request.header("cookie", format!("JSESSIONID={id}"));
            }
            let response = self
                .sender
                .send_request(request.body(Empty::new()).expect("request"))
                .await
                .map_err(|e| format!("request: {e}"))?;
            let super::Reply { status, counter, route, session } =
                super::Reply::of(response.status().as_u16(), response.headers());
            let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
            Ok(HttpsReply { status, counter, route, session, body: String::from_utf8_lossy(&body).into_owned() })
        };
        tokio::time::timeout(Duration::from_secs(15), exchange)
            .await
            .unwrap_or_else(|_| Err("timeout after 15 s".to_string()))
    }
}
