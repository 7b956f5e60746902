//! Packets the web server sends: `FORWARD_REQUEST`, request body chunks, CPing.
//!
//! Encoders append to a caller-owned `BytesMut` (one per backend connection,
//! reused for every request) so the hot path does not allocate.

use bytes::{BufMut, BytesMut};
use http::HeaderMap;
use http::header::{CONNECTION, HeaderName};

use super::{
    MAGIC_TO_CONTAINER, METHOD_STORED, PACKET_HEADER_LEN, attribute, method_code, request_header_code, to_container,
};

/// Why a request cannot be expressed as one AJP packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// Request line, headers and attributes together exceed the packet size
    /// (httpd's mod_proxy_ajp fails the same request; the client gets 431).
    #[error("request headers need {needed} bytes, the AJP packet size allows {limit}")]
    HeadersTooLarge { needed: usize, limit: usize },
    /// More headers than a `u16` count can carry.
    #[error("too many request headers ({0})")]
    TooManyHeaders(usize),
}

/// TLS facts forwarded when the balancer terminated TLS itself.
#[derive(Debug, Clone, Copy)]
pub struct SslAttributes<'a> {
    pub cipher: &'a str,
    pub protocol: &'a str,
    pub key_size: u16,
    /// The client's certificate, PEM (Tomcat's `X509Certificate` attribute).
    pub client_cert: Option<&'a str>,
}

/// Everything `FORWARD_REQUEST` carries. Borrowed, so building one does not allocate.
#[derive(Debug)]
pub struct ForwardRequest<'a> {
    pub method: &'a str,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub protocol: &'a str,
    /// The path as the client sent it (not decoded), without the query.
    pub request_uri: &'a str,
    pub query_string: Option<&'a str>,
    pub remote_addr: &'a str,
    pub remote_port: u16,
    /// Becomes Tomcat's `localName` (and server name when there is no `Host`).
    pub local_name: &'a str,
    pub local_addr: &'a str,
    pub local_port: u16,
    pub is_ssl: bool,
    /// Client headers; hop-by-hop ones are skipped while encoding.
    pub headers: &'a HeaderMap,
    /// The member's route (`jvmRoute`), informational for Tomcat.
    pub route: Option<&'a str>,
    /// The connector's `secret`.
    pub secret: &'a str,
    pub ssl: Option<SslAttributes<'a>>,
}

/// Largest request body slice one body packet can carry for `packet_size`.
pub const fn max_body_chunk_len(packet_size: usize) -> usize {
    packet_size - PACKET_HEADER_LEN - 2
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are meaningful only on the client's
/// connection; AJP frames the body itself, so `Transfer-Encoding` goes too.
/// `connection_listed` says whether the request has a `Connection` header
/// at all, so the common request without one costs no lookup per header.
fn is_hop_by_hop(name: &HeaderName, headers: &HeaderMap, connection_listed: bool) -> bool {
    const HOP: [&str; 7] =
        ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];
    let n = name.as_str();
    if HOP.contains(&n) {
        return true;
    }
    // Headers the client named in `Connection` are hop-by-hop as well.
    connection_listed
        && headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str().map(|s| s.split(',').any(|token| token.trim().eq_ignore_ascii_case(n))).unwrap_or(false)
        })
}

fn put_string(buf: &mut BytesMut, s: &[u8]) {
    // Callers check the packet size afterwards; a string longer than the
    // largest packet can never fit, so the truncating cast cannot reach the wire.
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
    buf.put_u8(0);
}

/// Appends a complete `FORWARD_REQUEST` packet to `buf`.
pub fn encode_forward_request(
    buf: &mut BytesMut,
    req: &ForwardRequest<'_>,
    packet_size: usize,
) -> Result<(), EncodeError> {
    let start = buf.len();
    buf.put_slice(&MAGIC_TO_CONTAINER);
    buf.put_u16(0); // length, patched below
    buf.put_u8(to_container::FORWARD_REQUEST);
    let stored_method = match method_code(req.method) {
        Some(code) => {
            buf.put_u8(code);
            None
        }
        None => {
            buf.put_u8(METHOD_STORED);
            Some(req.method)
        }
    };
    put_string(buf, req.protocol.as_bytes());
    put_string(buf, req.request_uri.as_bytes());
    put_string(buf, req.remote_addr.as_bytes());
    // remote_host: the address again; Tomcat only resolves it when asked and
    // enableLookups is on, which would then do the lookup itself.
    put_string(buf, req.remote_addr.as_bytes());
    put_string(buf, req.local_name.as_bytes());
    buf.put_u16(req.local_port);
    buf.put_u8(u8::from(req.is_ssl));

    let count_at = buf.len();
    buf.put_u16(0); // header count, patched below
    let mut count: usize = 0;
    let connection_listed = req.headers.contains_key(CONNECTION);
    for (name, value) in req.headers.iter() {
        if is_hop_by_hop(name, req.headers, connection_listed) {
            continue;
        }
        match request_header_code(name.as_str()) {
            Some(code) => buf.put_u16(code),
            None => put_string(buf, name.as_str().as_bytes()),
        }
        put_string(buf, value.as_bytes());
        count += 1;
        if buf.len() - start > packet_size {
            return Err(EncodeError::HeadersTooLarge { needed: buf.len() - start, limit: packet_size });
        }
    }
    let count16 = u16::try_from(count).map_err(|_| EncodeError::TooManyHeaders(count))?;
    buf[count_at..count_at + 2].copy_from_slice(&count16.to_be_bytes());

    if let Some(query) = req.query_string {
        buf.put_u8(attribute::QUERY_STRING);
        put_string(buf, query.as_bytes());
    }
    if let Some(route) = req.route {
        buf.put_u8(attribute::ROUTE);
        put_string(buf, route.as_bytes());
    }
    if let Some(method) = stored_method {
        buf.put_u8(attribute::STORED_METHOD);
        put_string(buf, method.as_bytes());
    }
    buf.put_u8(attribute::REQ_ATTRIBUTE);
    put_string(buf, attribute::NAME_REMOTE_PORT.as_bytes());
    let mut port_text = [0u8; 5];
    put_string(buf, format_port(req.remote_port, &mut port_text));
    buf.put_u8(attribute::REQ_ATTRIBUTE);
    put_string(buf, attribute::NAME_LOCAL_ADDR.as_bytes());
    put_string(buf, req.local_addr.as_bytes());
    if let Some(ssl) = req.ssl {
        if let Some(cert) = ssl.client_cert {
            buf.put_u8(attribute::SSL_CERT);
            put_string(buf, cert.as_bytes());
        }
        buf.put_u8(attribute::SSL_CIPHER);
        put_string(buf, ssl.cipher.as_bytes());
        buf.put_u8(attribute::SSL_KEY_SIZE);
        buf.put_u16(ssl.key_size);
        buf.put_u8(attribute::REQ_ATTRIBUTE);
        put_string(buf, attribute::NAME_SSL_PROTOCOL.as_bytes());
        put_string(buf, ssl.protocol.as_bytes());
    }
    buf.put_u8(attribute::SECRET);
    put_string(buf, req.secret.as_bytes());
    buf.put_u8(attribute::ARE_DONE);

    let total = buf.len() - start;
    if total > packet_size {
        return Err(EncodeError::HeadersTooLarge { needed: total, limit: packet_size });
    }
    let payload = (total - PACKET_HEADER_LEN) as u16;
    buf[start + 2..start + 4].copy_from_slice(&payload.to_be_bytes());
    Ok(())
}

/// Decimal text of a port without allocating.
fn format_port(port: u16, out: &mut [u8; 5]) -> &[u8] {
    let mut n = port;
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &out[i..]
}

/// Appends a request body packet carrying `data` (at most
/// [`max_body_chunk_len`] bytes; the caller slices).
pub fn encode_body_chunk(buf: &mut BytesMut, data: &[u8]) {
    debug_assert!(!data.is_empty(), "an empty body packet means end of body; use encode_empty_body_chunk");
    buf.put_slice(&MAGIC_TO_CONTAINER);
    buf.put_u16(data.len() as u16 + 2);
    buf.put_u16(data.len() as u16);
    buf.put_slice(data);
}

/// Appends the empty body packet that tells the container the body has ended.
pub fn encode_empty_body_chunk(buf: &mut BytesMut) {
    buf.put_slice(&MAGIC_TO_CONTAINER);
    buf.put_u16(0);
}

/// Appends a CPing packet (the container answers CPong).
pub fn encode_cping(buf: &mut BytesMut) {
    buf.put_slice(&MAGIC_TO_CONTAINER);
    buf.put_u16(1);
    buf.put_u8(to_container::CPING);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn request<'a>(method: &'a str, headers: &'a HeaderMap) -> ForwardRequest<'a> {
        ForwardRequest {
            method,
            protocol: "HTTP/1.1",
            request_uri: "/counter/x;jsessionid=A.s1",
            query_string: Some("a=1&b=2"),
            remote_addr: "127.0.0.9",
            remote_port: 40123,
            local_name: "127.0.0.1",
            local_addr: "127.0.0.1",
            local_port: 8080,
            is_ssl: false,
            headers,
            route: Some("s1"),
            secret: "s3cret",
            ssl: None,
        }
    }

    /// A reader over the encoded packet, written here independently of the
    /// encoder so the test checks the wire layout, not the encoder against itself.
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn u8(&mut self) -> u8 {
            let b = self.0[0];
            self.0 = &self.0[1..];
            b
        }
        fn u16(&mut self) -> u16 {
            let v = u16::from_be_bytes([self.0[0], self.0[1]]);
            self.0 = &self.0[2..];
            v
        }
        fn string(&mut self) -> &'a str {
            let len = self.u16() as usize;
            let s = std::str::from_utf8(&self.0[..len]).expect("utf8");
            assert_eq!(self.0[len], 0, "string terminator");
            self.0 = &self.0[len + 1..];
            s
        }
    }

    #[test]
    fn forward_request_layout() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.test:8080"));
        headers.insert("x-custom", HeaderValue::from_static("v"));
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-drop"));
        headers.insert("x-drop", HeaderValue::from_static("hop"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("content-length", HeaderValue::from_static("5"));
        let mut buf = BytesMut::new();
        encode_forward_request(&mut buf, &request("POST", &headers), 8192).expect("encode");

        assert_eq!(&buf[..2], &[0x12, 0x34]);
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        assert_eq!(len, buf.len() - 4);
        let mut r = Reader(&buf[4..]);
        assert_eq!(r.u8(), 2, "FORWARD_REQUEST");
        assert_eq!(r.u8(), 4, "POST");
        assert_eq!(r.string(), "HTTP/1.1");
        assert_eq!(r.string(), "/counter/x;jsessionid=A.s1");
        assert_eq!(r.string(), "127.0.0.9");
        assert_eq!(r.string(), "127.0.0.9");
        assert_eq!(r.string(), "127.0.0.1");
        assert_eq!(r.u16(), 8080);
        assert_eq!(r.u8(), 0, "is_ssl");
        assert_eq!(r.u16(), 3, "host, x-custom, content-length; hop-by-hop dropped");
        let mut seen = Vec::new();
        for _ in 0..3 {
            let code = u16::from_be_bytes([r.0[0], r.0[1]]);
            let name = if code & 0xFF00 == 0xA000 {
                r.u16();
                format!("code:{code:#06x}")
            } else {
                r.string().to_string()
            };
            seen.push((name, r.string().to_string()));
        }
        assert!(seen.contains(&("code:0xa00b".into(), "example.test:8080".into())));
        assert!(seen.contains(&("x-custom".into(), "v".into())));
        assert!(seen.contains(&("code:0xa008".into(), "5".into())));
        assert_eq!(r.u8(), attribute::QUERY_STRING);
        assert_eq!(r.string(), "a=1&b=2");
        assert_eq!(r.u8(), attribute::ROUTE);
        assert_eq!(r.string(), "s1");
        assert_eq!(r.u8(), attribute::REQ_ATTRIBUTE);
        assert_eq!(r.string(), "AJP_REMOTE_PORT");
        assert_eq!(r.string(), "40123");
        assert_eq!(r.u8(), attribute::REQ_ATTRIBUTE);
        assert_eq!(r.string(), "AJP_LOCAL_ADDR");
        assert_eq!(r.string(), "127.0.0.1");
        assert_eq!(r.u8(), attribute::SECRET);
        assert_eq!(r.string(), "s3cret");
        assert_eq!(r.u8(), attribute::ARE_DONE);
        assert!(r.0.is_empty());
    }

    #[test]
    fn unknown_method_is_stored_by_name() {
        let headers = HeaderMap::new();
        let mut buf = BytesMut::new();
        encode_forward_request(&mut buf, &request("PATCH", &headers), 8192).expect("encode");
        assert_eq!(buf[5], METHOD_STORED);
        let needle = b"\x0d\x00\x05PATCH\x00";
        assert!(buf.windows(needle.len()).any(|w| w == needle), "stored method attribute");
    }

    #[test]
    fn every_coded_method_round_trips_its_code() {
        assert_eq!(method_code("OPTIONS"), Some(1));
        assert_eq!(method_code("GET"), Some(2));
        assert_eq!(method_code("HEAD"), Some(3));
        assert_eq!(method_code("DELETE"), Some(6));
        assert_eq!(method_code("MKACTIVITY"), Some(27));
        assert_eq!(method_code("get"), None, "methods are case-sensitive");
    }

    #[test]
    fn oversized_headers_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert("x-big", HeaderValue::from_str(&"a".repeat(9000)).expect("value"));
        let mut buf = BytesMut::new();
        let err = encode_forward_request(&mut buf, &request("GET", &headers), 8192).unwrap_err();
        assert!(matches!(err, EncodeError::HeadersTooLarge { limit: 8192, .. }));
        // The same request fits a larger negotiated packet size.
        let mut buf = BytesMut::new();
        encode_forward_request(&mut buf, &request("GET", &headers), 16384).expect("fits 16k");
    }

    #[test]
    fn ssl_attributes_are_sent_when_tls_is_terminated_here() {
        let headers = HeaderMap::new();
        let mut req = request("GET", &headers);
        req.is_ssl = true;
        req.ssl = Some(SslAttributes {
            cipher: "TLS_AES_128_GCM_SHA256",
            protocol: "TLSv1.3",
            key_size: 128,
            client_cert: None,
        });
        let mut buf = BytesMut::new();
        encode_forward_request(&mut buf, &req, 8192).expect("encode");
        let cipher = b"\x08\x00\x16TLS_AES_128_GCM_SHA256\x00\x0b\x00\x80";
        assert!(buf.windows(cipher.len()).any(|w| w == cipher));
        assert!(buf.windows(16).any(|w| w == b"AJP_SSL_PROTOCOL"));
        let without_cert = buf.len();

        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        req.ssl = Some(SslAttributes {
            cipher: "TLS_AES_128_GCM_SHA256",
            protocol: "TLSv1.3",
            key_size: 128,
            client_cert: Some(pem),
        });
        buf.clear();
        encode_forward_request(&mut buf, &req, 8192).expect("encode");
        let mut cert = vec![super::attribute::SSL_CERT, 0, pem.len() as u8];
        cert.extend_from_slice(pem.as_bytes());
        cert.push(0);
        assert!(buf.windows(cert.len()).any(|w| w == cert.as_slice()));
        assert_eq!(buf.len() - without_cert, cert.len(), "the certificate adds exactly its attribute");
    }

    #[test]
    fn body_packets() {
        let mut buf = BytesMut::new();
        encode_body_chunk(&mut buf, b"hello");
        assert_eq!(&buf[..], b"\x12\x34\x00\x07\x00\x05hello");
        buf.clear();
        encode_empty_body_chunk(&mut buf);
        assert_eq!(&buf[..], b"\x12\x34\x00\x00");
        buf.clear();
        encode_cping(&mut buf);
        assert_eq!(&buf[..], b"\x12\x34\x00\x01\x0a");
        assert_eq!(max_body_chunk_len(8192), 8186);
    }

    #[test]
    fn port_text() {
        let mut b = [0u8; 5];
        assert_eq!(format_port(0, &mut b), b"0");
        assert_eq!(format_port(65535, &mut b), b"65535");
        assert_eq!(format_port(8009, &mut b), b"8009");
    }
}
