//! The hyper service: one client request in, one response out.
//!
//! This module is the HTTP side of a request: it refuses what must not
//! reach a member (smuggling shapes, bodies over the limit) whatever the
//! backend protocol, then, for AJP, builds the `FORWARD_REQUEST` every
//! attempt sends and hands the trip to the member to an `Exchange` (the AJP
//! side, phase by phase) — for HTTP, [`super::http_backend`] does that part
//! — and turns the answer into the client's response: hop-by-hop headers dropped, new sessions noted,
//! counted. Whatever it refuses becomes a [`Rejection`], answered by the
//! balancer itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue, RETRY_AFTER, SET_COOKIE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};

use super::access::{AccessEntry, ServedBy};
use super::ajp::{self, EncodeError, ForwardRequest, SslAttributes};
use super::body::ProxyBody;
use super::exchange::{Exchange, Outgoing, RequestBody, Target};
use super::framing::FramingVerdicts;
use super::member::Member;
use super::metrics::{Metrics, RejectReason};
use super::moves::Turn;
use super::pool::ConnError;
use super::routing::{NoMember, session_of_request, with_session_cookie};
use super::state::{Backend, Balancer};
use super::tls::TlsFacts;

/// Facts of the client connection, formatted once per connection.
#[derive(Debug)]
pub struct ClientConn {
    /// Smuggling verdicts of this connection's request heads, in order.
    pub framing: Arc<FramingVerdicts>,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub(super) remote_ip: String,
    pub(super) local_ip: String,
    /// What the TLS handshake negotiated, when TLS was terminated here.
    pub tls: Option<TlsFacts>,
}

impl ClientConn {
    pub fn new(remote: SocketAddr, local: SocketAddr, tls: Option<TlsFacts>) -> Self {
        ClientConn {
            framing: Arc::default(),
            remote,
            local,
            remote_ip: remote.ip().to_string(),
            local_ip: local.ip().to_string(),
            tls,
        }
    }

    fn ssl_attributes(&self) -> Option<SslAttributes<'_>> {
        self.tls.as_ref().map(|t| SslAttributes {
            cipher: t.cipher,
            protocol: t.protocol,
            key_size: t.key_size,
            client_cert: t.client_cert_pem.as_deref(),
        })
    }
}

/// A request the balancer answers itself.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("bad request framing: {0}")]
    BadFraming(&'static str),
    #[error("request body larger than the limit")]
    BodyTooLarge,
    #[error("request head does not fit an AJP packet: {0}")]
    HeadTooLarge(EncodeError),
    #[error("no usable member: {0:?}")]
    NoMember(NoMember),
    #[error("no connection slot of member {0}")]
    PoolExhausted(String),
    #[error("member {route}: {error}")]
    BadGateway { route: String, error: ConnError },
    #[error("member {0} did not answer in time")]
    GatewayTimeout(String),
    #[error("client body: {0}")]
    ClientBody(hyper::Error),
}

impl Rejection {
    fn into_response(self, metrics: &Metrics) -> Response<ProxyBody> {
        let (status, reason, close) = match &self {
            Rejection::BadFraming(_) | Rejection::ClientBody(_) => {
                (StatusCode::BAD_REQUEST, RejectReason::BadFraming, true)
            }
            Rejection::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, RejectReason::BodyTooLarge, true),
            Rejection::HeadTooLarge(_) => {
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, RejectReason::HeadTooLarge, false)
            }
            Rejection::NoMember(_) => (StatusCode::SERVICE_UNAVAILABLE, RejectReason::NoMember, false),
            Rejection::PoolExhausted(_) => (StatusCode::SERVICE_UNAVAILABLE, RejectReason::PoolExhausted, false),
            Rejection::BadGateway { .. } => (StatusCode::BAD_GATEWAY, RejectReason::BadGateway, false),
            Rejection::GatewayTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, RejectReason::GatewayTimeout, false),
        };
        metrics.reject(reason);
        match status {
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT | StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(status = status.as_u16(), error = %self, "request failed")
            }
            _ => tracing::info!(status = status.as_u16(), error = %self, "request rejected"),
        }
        let text = status.canonical_reason().unwrap_or("error");
        let mut response = Response::new(ProxyBody::full(Bytes::from(format!("{} {text}\n", status.as_u16()))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if close {
            // The rest of this connection's bytes cannot be trusted.
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// hyper service entry point.
pub async fn handle(
    bal: Arc<Balancer>,
    client: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let entry = bal.settings.access_log.then(|| AccessEntry::start(client.remote, client.tls.is_some(), &req));
    let response = match proxy(&bal, &client, req).await {
        Ok(response) => response,
        Err(rejection) => rejection.into_response(&bal.metrics),
    };
    Ok(match entry {
        Some(entry) => entry.attach(response),
        None => response,
    })
}

/// Refuses the smuggling shape that hyper passes to the service: codings
/// before `chunked` (`gzip, chunked`) or more than one `Transfer-Encoding`.
///
/// The other shapes never get here. hyper refuses invalid or conflicting
/// lengths, bad chunk syntax and a last coding other than `chunked`. With
/// both `Content-Length` and `Transfer-Encoding` it drops the length, and
/// identical duplicate lengths it folds into one, so neither shows in the
/// request it hands over: [`super::framing`] finds those two on the wire.
fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), Rejection> {
    let mut encodings = headers.get_all(TRANSFER_ENCODING).iter();
    match (encodings.next(), encodings.next()) {
        (None, _) => Ok(()),
        (Some(te), None) if te.as_bytes().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(Rejection::BadFraming("Transfer-Encoding other than a single chunked")),
    }
}

fn version_text(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

async fn proxy(
    bal: &Arc<Balancer>,
    client: &ClientConn,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Rejection> {
    // Everything up to the choice of a member is the same for both backend
    // protocols: what the front refuses, it refuses whatever speaks behind it.
    if let Some(reason) = client.framing.take() {
        return Err(Rejection::BadFraming(reason));
    }
    let (parts, incoming) = req.into_parts();
    check_transfer_encoding(&parts.headers)?;
    // The length hyper frames the body by: its `Content-Length` (0 without
    // one), or none for a chunked body.
    let content_length = incoming.size_hint().exact();
    if let (Some(limit), Some(length)) = (bal.settings.max_body_bytes, content_length)
        && length > limit
    {
        return Err(Rejection::BodyTooLarge);
    }
    let settings = &bal.settings;
    let session =
        session_of_request(parts.uri.path(), &parts.headers, &settings.sticky_cookie, &settings.sticky_path_param);
    let mut target = Target::new(&bal.router, bal.members.snapshot(), session);
    target.await_handoff(&bal.router).await;
    let mut renamed_to = None;
    match target.session {
        Some(session) if target.moves_session() => {
            let turn = bal.moves.turn(session, target.unhealthy_for(session), settings.backend_timeout).await;
            // The member table may have changed while the request waited.
            target.refresh(&bal.router, bal.members.snapshot());
            match turn {
                // The request's attempts hold it; the first response head adopts the session.
                Turn::First(first_move) => target.move_turn = Some(first_move),
                Turn::Go => {}
                Turn::Renamed(route) => renamed_to = Some(route),
            }
        }
        Some(session) => bal.moves.saw(session),
        None => {}
    }
    // A request with the session's old id, to the member that renamed the
    // session already, asks for it by its new id (see `super::moves`).
    let renamed_headers = match (renamed_to, target.session, &target.first_choice) {
        (Some(route), Some(session), Ok((member, _))) if *member.route == *route => with_session_cookie(
            &parts.headers,
            &settings.sticky_cookie,
            &format!("{}.{}", session.base, session.route),
            &format!("{}.{route}", session.base),
        ),
        _ => None,
    };
    let headers = renamed_headers.as_ref().unwrap_or(&parts.headers);
    match &bal.backend {
        Backend::Ajp(secret) => proxy_ajp(bal, client, &parts, headers, incoming, target, secret.expose()).await,
        Backend::Http => super::http_backend::proxy_http(bal, client, &parts, headers, incoming, target).await,
    }
}

/// The AJP side of a request: `FORWARD_REQUEST` and an [`Exchange`].
async fn proxy_ajp(
    bal: &Arc<Balancer>,
    client: &ClientConn,
    parts: &http::request::Parts,
    headers: &HeaderMap,
    incoming: Incoming,
    target: Target<'_>,
    secret: &str,
) -> Result<Response<ProxyBody>, Rejection> {
    let settings = &bal.settings;
    let content_length = incoming.size_hint().exact();
    let mut body = RequestBody::new(incoming, settings.max_body_bytes);
    // With a known length Tomcat expects the first body packet right after
    // the request packet; read it first so a retry can send it again.
    let first_piece = match content_length {
        Some(n) if n > 0 => body.next_piece(ajp::max_body_chunk_len(settings.packet_size)).await?,
        _ => None,
    };

    let mut out = Outgoing {
        forward: ForwardRequest {
            method: parts.method.as_str(),
            protocol: version_text(parts.version),
            request_uri: parts.uri.path(),
            query_string: parts.uri.query(),
            remote_addr: &client.remote_ip,
            remote_port: client.remote.port(),
            local_name: &client.local_ip,
            local_addr: &client.local_ip,
            local_port: client.local.port(),
            is_ssl: client.tls.is_some(),
            headers,
            route: None,
            secret,
            ssl: client.ssl_attributes(),
        },
        target,
    };
    let started = Instant::now();
    let mut exchange = Exchange::start(bal, &mut out, body, first_piece)?;
    exchange.send_request(&out).await?;
    let mut response = exchange.read_response_head().await?;
    answer_head(bal, exchange.member(), exchange.failed_over(), &mut response, started);

    let status = response.status();
    let bodiless = parts.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let content_length = if bodiless { None } else { response_content_length(response.headers()) };
    *response.body_mut() = exchange.into_body(bodiless, content_length).await;
    Ok(response)
}

/// What every member's response head goes through before the client sees
/// it, whatever the backend protocol: the access log learns the member,
/// hop-by-hop headers go, a new session is noted, the response is counted.
pub(super) fn answer_head(
    bal: &Balancer,
    member: &Member,
    failed_over: bool,
    response: &mut Response<ProxyBody>,
    started: Instant,
) {
    if bal.settings.access_log {
        response.extensions_mut().insert(ServedBy { route: member.route.clone(), failover: failed_over });
    }
    strip_hop_by_hop(response.headers_mut());
    note_new_session(member, response.headers(), &bal.settings.sticky_cookie);
    member.metrics.count_response(response.status().as_u16());
    member.metrics.latency.observe(started.elapsed().as_secs_f64());
}

/// The response's `Content-Length`, when it has exactly one valid one.
fn response_content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()?.parse().ok()
}

/// Response headers that belong to the member's hop, not the client's.
/// Named constants: removing by `&str` would parse each name per request.
const HOP_BY_HOP_RESPONSE: [HeaderName; 6] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    TRANSFER_ENCODING,
    HeaderName::from_static("proxy-connection"),
    http::header::UPGRADE,
    http::header::TRAILER,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the member named in `Connection` are its hop's too (RFC 9110
    // §7.6.1); Tomcat's HTTP connector can send such, its AJP one cannot.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP_RESPONSE) {
        headers.remove(name);
    }
}

/// Remembers ids of sessions a member just created (for the status page).
fn note_new_session(member: &Member, headers: &HeaderMap, cookie: &str) {
    for value in headers.get_all(SET_COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        if let Some(rest) = text.strip_prefix(cookie).and_then(|r| r.strip_prefix('=')) {
            let id = rest.split(';').next().unwrap_or("");
            if !id.is_empty() {
                member.record_new_session(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    /// Only Transfer-Encoding shapes reach the service (see
    /// `check_transfer_encoding`); the length shapes are refused before it,
    /// as `tests/balancer/malformed.rs` shows on the wire.
    #[test]
    fn framing_rules() {
        assert!(check_transfer_encoding(&headers(&[])).is_ok());
        assert!(check_transfer_encoding(&headers(&[("content-length", "12")])).is_ok());
        assert!(check_transfer_encoding(&headers(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(check_transfer_encoding(&headers(&[("transfer-encoding", "Chunked")])).is_ok());
        for bad in [
            vec![("transfer-encoding", "gzip, chunked")],
            vec![("transfer-encoding", "chunked, chunked")],
            vec![("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
        ] {
            assert!(matches!(check_transfer_encoding(&headers(&bad)), Err(Rejection::BadFraming(_))), "{bad:?}");
        }
    }

    /// The rejection counter's value for one reason, from the /metrics text.
    fn rejected(metrics: &Metrics, reason: &str) -> Option<String> {
        let series = format!("clusterapp_balancer_rejected_total{{reason=\"{reason}\"}} ");
        metrics.encode().lines().find_map(|line| line.strip_prefix(series.as_str()).map(str::to_string))
    }

    /// An overloaded member (no connection slot in time) and no usable
    /// member at all are different troubles for an operator: each has its
    /// own reason in the rejection metric, both answer 503 with Retry-After.
    #[test]
    fn pool_exhausted_and_no_member_are_counted_apart() {
        let metrics = Metrics::new();
        let response = Rejection::PoolExhausted("shop-0".to_string()).into_response(&metrics);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(RETRY_AFTER).map(HeaderValue::as_bytes), Some(&b"1"[..]));
        assert_eq!(rejected(&metrics, "PoolExhausted").as_deref(), Some("1"));
        assert_eq!(rejected(&metrics, "NoMember"), None);
        let response = Rejection::NoMember(NoMember::NoneUsable).into_response(&metrics);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rejected(&metrics, "NoMember").as_deref(), Some("1"));
        assert_eq!(rejected(&metrics, "PoolExhausted").as_deref(), Some("1"));
    }

    #[test]
    fn hop_by_hop_response_headers_are_dropped() {
        let mut h = headers(&[("connection", "close"), ("transfer-encoding", "chunked"), ("x-route", "s1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        // And those the member named in Connection.
        let mut h = headers(&[("connection", "x-private, close"), ("x-private", "1"), ("x-route", "s1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-route"]);
    }
}

/// The exchange against a fake AJP member: a response with a
/// `Content-Length` must leave its connection in the pool, whether
/// `END_RESPONSE` arrives with the body or after it.
#[cfg(test)]
pub(crate) mod reuse_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use super::*;
    use crate::balancer::config::LbMethod;
    use crate::balancer::front::{FrontSettings, serve_front};
    use crate::balancer::member::{DRAIN_HANDOFF_PAUSE, MemberSpec, MemberState};
    use crate::balancer::pool::PoolSettings;
    use crate::balancer::routing::Router;
    use crate::balancer::state::{AjpSecret, Backend, ProxySettings};

    fn packet(payload: &[u8]) -> Vec<u8> {
        let mut p = b"AB".to_vec();
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    /// `SEND_HEADERS` (200, `Content-Length: 5`) and a `SEND_BODY_CHUNK`
    /// "hello": the fake members' answer, before its `END_RESPONSE`.
    fn hello_head_and_body() -> Vec<u8> {
        let mut out = packet(&[4, 0, 200, 0, 2, b'O', b'K', 0, 0, 1, 0xA0, 0x03, 0, 1, b'5', 0]);
        out.extend(packet(&[3, 0, 5, b'h', b'e', b'l', b'l', b'o', 0]));
        out
    }

    /// Answers every FORWARD_REQUEST with 200, `Content-Length: 5`, "hello".
    async fn fake_member(listener: TcpListener, accepted: Arc<AtomicUsize>, split_end: bool) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                while let Some(payload) = read_request_packet(&mut conn).await {
                    if payload.first() == Some(&ajp::to_container::CPING) {
                        let _ = conn.write_all(&packet(&[9])).await;
                        continue;
                    }
                    let (mut out, end) = (hello_head_and_body(), packet(&[5, 1]));
                    if split_end {
                        let _ = conn.write_all(&out).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = conn.write_all(&end).await;
                    } else {
                        out.extend(end);
                        let _ = conn.write_all(&out).await;
                    }
                }
            });
        }
    }

    /// A balancer serving `members` (route, address) on a fresh port; it
    /// stops when the returned sender is dropped.
    /// The slow grace of the test balancers: short, so that a test of a
    /// member that never answers ends soon.
    pub(crate) const SLOW_GRACE_IN_TESTS: Duration = Duration::from_secs(2);

    async fn start_balancer(members: &[(&str, SocketAddr)]) -> (Arc<Balancer>, SocketAddr, watch::Sender<bool>) {
        start_balancer_with(members, Backend::Ajp(AjpSecret::new("s".into())), Duration::from_secs(60)).await
    }

    /// [`start_balancer`] for either backend protocol; a pooled connection
    /// idle for `cping_after_idle` is probed before reuse.
    pub(crate) async fn start_balancer_with(
        members: &[(&str, SocketAddr)],
        backend: Backend,
        cping_after_idle: Duration,
    ) -> (Arc<Balancer>, SocketAddr, watch::Sender<bool>) {
        let settings = ProxySettings {
            packet_size: ajp::DEFAULT_PACKET_SIZE,
            sticky_cookie: "JSESSIONID".into(),
            sticky_path_param: "jsessionid".into(),
            backend_timeout: Duration::from_secs(5),
            max_body_bytes: None,
            drain_timeout: Duration::from_secs(5),
            access_log: false,
        };
        let pool_settings = PoolSettings {
            packet_size: ajp::DEFAULT_PACKET_SIZE,
            connect_timeout: Duration::from_secs(1),
            slow_grace: SLOW_GRACE_IN_TESTS,
            cping_after_idle,
            cping_timeout: Duration::from_secs(1),
            slot_wait: Duration::from_secs(1),
        };
        let bal = Arc::new(Balancer::new(settings, pool_settings, 8, Router::new(LbMethod::Byrequests, true), backend));
        let specs: Vec<MemberSpec> = members
            .iter()
            .map(|(route, address)| MemberSpec {
                route: route.to_string(),
                address: *address,
                state: MemberState::Ready,
                terminating: false,
                ready_since: None,
            })
            .collect();
        bal.members.apply(&specs, &bal.metrics);
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front_address = front.local_addr().expect("addr");
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let front_settings = FrontSettings {
            connection_slots: Arc::new(tokio::sync::Semaphore::new(16)),
            max_connections: 16,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(1),
        };
        tokio::spawn(serve_front(bal.clone(), front, None, front_settings, shutdown_rx));
        (bal, front_address, shutdown_tx)
    }

    async fn requests_use_one_connection(split_end: bool) {
        let member_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let member_address = member_listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        tokio::spawn(fake_member(member_listener, accepted.clone(), split_end));
        let (bal, front_address, _shutdown) = start_balancer(&[("m1", member_address)]).await;

        let mut client = TcpStream::connect(front_address).await.expect("connect");
        for round in 0..3 {
            client.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").await.expect("write");
            let mut seen = Vec::new();
            while !seen.ends_with(b"\r\n\r\nhello") {
                let mut buf = [0u8; 1024];
                let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                    .await
                    .expect("response in time")
                    .expect("read");
                assert!(n > 0, "balancer closed the client connection");
                seen.extend_from_slice(&buf[..n]);
            }
            assert!(seen.starts_with(b"HTTP/1.1 200"), "round {round}: {}", String::from_utf8_lossy(&seen));
            // The connection is back in the pool once the response is complete.
            let member = bal.members.snapshot()[0].clone();
            for _ in 0..100 {
                if member.pool.idle_count() == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(member.pool.idle_count(), 1, "round {round}: connection back in the pool");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "every request reused the first AJP connection");
    }

    /// The payload of the next packet the balancer sends; `None` at EOF.
    async fn read_request_packet(conn: &mut TcpStream) -> Option<Vec<u8>> {
        let mut header = [0u8; 4];
        conn.read_exact(&mut header).await.ok()?;
        let mut payload = vec![0u8; u16::from_be_bytes([header[2], header[3]]) as usize];
        conn.read_exact(&mut payload).await.ok()?;
        Some(payload)
    }

    /// Reads packets, answering CPings when `cpong`, until a
    /// `FORWARD_REQUEST` (counted in `forwards`; true) or the end (false).
    async fn until_forward_request(conn: &mut TcpStream, cpong: bool, forwards: &AtomicUsize) -> bool {
        while let Some(payload) = read_request_packet(conn).await {
            match payload.first() {
                Some(&ajp::to_container::CPING) if cpong => {
                    let _ = conn.write_all(&packet(&[9])).await;
                }
                Some(&ajp::to_container::FORWARD_REQUEST) => {
                    forwards.fetch_add(1, Ordering::SeqCst);
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    /// A member that counts the `FORWARD_REQUEST`s it gets; it answers
    /// CPings when `cpong`, and closes a connection once a request arrived on it.
    async fn member_failing_every_request(listener: TcpListener, forwards: Arc<AtomicUsize>, cpong: bool) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let forwards = forwards.clone();
            tokio::spawn(async move { until_forward_request(&mut conn, cpong, &forwards).await });
        }
    }

    /// One request on its own client connection; the whole response.
    pub(crate) async fn request_once(front: SocketAddr, request: &[u8]) -> String {
        let mut client = TcpStream::connect(front).await.expect("connect");
        client.write_all(request).await.expect("write");
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut seen))
            .await
            .expect("response in time")
            .expect("read");
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// Once the request is written a failure is a 502: the member may have
    /// acted on it, so it is never sent again.
    #[tokio::test]
    async fn a_written_request_is_never_sent_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let forwards = Arc::new(AtomicUsize::new(0));
        tokio::spawn(member_failing_every_request(listener, forwards.clone(), true));
        let (_bal, front, _shutdown) = start_balancer(&[("m1", address)]).await;
        let request = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
        let response = request_once(front, request).await;
        assert!(response.starts_with("HTTP/1.1 502"), "{response}");
        assert_eq!(forwards.load(Ordering::SeqCst), 1, "the member got the request once");
    }

    /// A new connection without a CPong: the request, which the member
    /// never got, goes to another member — one without a session at once
    /// (the member is only slow, not failed), one of the member's session
    /// once the member has been slow for the slow grace (it is failed then).
    #[tokio::test]
    async fn no_cpong_on_a_new_connection_sends_the_request_elsewhere() {
        let mute = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mute_address = mute.local_addr().expect("addr");
        let forwards_to_mute = Arc::new(AtomicUsize::new(0));
        tokio::spawn(member_failing_every_request(mute, forwards_to_mute.clone(), false));
        let good = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let good_address = good.local_addr().expect("addr");
        tokio::spawn(fake_member(good, Arc::new(AtomicUsize::new(0)), false));
        let (bal, front, _shutdown) = start_balancer(&[("mute", mute_address), ("good", good_address)]).await;
        let members = bal.members.snapshot();
        let mute = members.iter().find(|m| m.route == "mute").expect("mute member");

        // The first balanced request goes to the first member, the mute one.
        let started = Instant::now();
        let request = b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        let response = request_once(front, request).await;
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("hello"), "{response}");
        assert!(started.elapsed() < SLOW_GRACE_IN_TESTS, "one probe timeout, no more: {:?}", started.elapsed());
        assert!(mute.is_slow() && mute.is_healthy(), "tried, slow, not failed yet");

        // Sticky to the mute member: waits for it, then fails over.
        let request = b"GET /x HTTP/1.1\r\nHost: t\r\nCookie: JSESSIONID=abc.mute\r\nConnection: close\r\n\r\n";
        let response = request_once(front, request).await;
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("hello"), "{response}");
        assert!(started.elapsed() >= SLOW_GRACE_IN_TESTS, "waited for the grace: {:?}", started.elapsed());
        assert_eq!(forwards_to_mute.load(Ordering::SeqCst), 0, "the mute member never got the request");
        assert!(!mute.is_healthy(), "the mute member is marked failed");
    }

    /// Answers a CPing after `cpong_delay` and every request with 200
    /// "hello" `answer_delay` after it arrived; `arrived` and `answered`
    /// run at those moments.
    async fn answer_requests(
        mut conn: TcpStream,
        cpong_delay: Duration,
        answer_delay: Duration,
        arrived: impl Fn(&[u8]),
        answered: impl Fn(),
    ) {
        while let Some(payload) = read_request_packet(&mut conn).await {
            let reply = match payload.first() {
                Some(&ajp::to_container::CPING) => {
                    tokio::time::sleep(cpong_delay).await;
                    packet(&[9])
                }
                Some(&ajp::to_container::FORWARD_REQUEST) => {
                    arrived(&payload);
                    tokio::time::sleep(answer_delay).await;
                    answered();
                    let mut out = hello_head_and_body();
                    out.extend(packet(&[5, 1]));
                    out
                }
                _ => continue,
            };
            if conn.write_all(&reply).await.is_err() {
                return;
            }
        }
    }

    /// A member that answers a CPing after `cpong_delay` and every
    /// request with 200 "hello"; counts the requests.
    async fn member_answering(listener: TcpListener, cpong_delay: Duration, forwards: Arc<AtomicUsize>) {
        loop {
            let Ok((conn, _)) = listener.accept().await else { return };
            let forwards = forwards.clone();
            let count = move |_: &[u8]| {
                forwards.fetch_add(1, Ordering::SeqCst);
            };
            tokio::spawn(answer_requests(conn, cpong_delay, Duration::ZERO, count, || {}));
        }
    }

    /// A balancer with members "old" (its CPong `old_cpong_delay` late) and
    /// "new", "old" terminating with its drain deadline `deadline_in` from
    /// now; the requests each member got.
    async fn balancer_with_a_terminating_member(
        old_cpong_delay: Duration,
        deadline_in: Duration,
    ) -> (SocketAddr, watch::Sender<bool>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let mut addresses = Vec::new();
        let mut forwards = Vec::new();
        for delay in [old_cpong_delay, Duration::ZERO] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addresses.push(listener.local_addr().expect("addr"));
            let count = Arc::new(AtomicUsize::new(0));
            forwards.push(count.clone());
            tokio::spawn(member_answering(listener, delay, count));
        }
        let (bal, front, shutdown) = start_balancer(&[("old", addresses[0]), ("new", addresses[1])]).await;
        let spec = |route: &str, address, state, terminating| MemberSpec {
            route: route.to_string(),
            address,
            state,
            terminating,
            ready_since: None,
        };
        let specs = [
            spec("old", addresses[0], MemberState::Draining, true),
            spec("new", addresses[1], MemberState::Ready, false),
        ];
        // The drain clock runs from now; then the deletion time moves the deadline to `deadline_in`.
        bal.members.apply(&specs, &bal.metrics);
        bal.members.snapshot()[0].drain_by(Instant::now() + deadline_in);
        (front, shutdown, forwards.remove(0), forwards.remove(0))
    }

    const SESSION_OF_OLD: &[u8] =
        b"GET /x HTTP/1.1\r\nHost: t\r\nCookie: JSESSIONID=abc.old\r\nConnection: close\r\n\r\n";

    /// Right after a terminating member's drain deadline its sessions' requests
    /// wait out the handoff pause, then fail over; its other requests
    /// (without a session) go elsewhere at once.
    #[tokio::test]
    async fn a_drained_members_sessions_wait_out_the_handoff_pause_before_they_fail_over() {
        let (front, _shutdown, to_old, to_new) =
            balancer_with_a_terminating_member(Duration::ZERO, Duration::ZERO).await;
        let started = Instant::now();
        let response = request_once(front, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(started.elapsed() < DRAIN_HANDOFF_PAUSE / 2, "no session, no wait: {:?}", started.elapsed());

        let started = Instant::now();
        let response = request_once(front, SESSION_OF_OLD).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let waited = started.elapsed();
        assert!(waited >= DRAIN_HANDOFF_PAUSE - Duration::from_millis(100), "waited for the handoff: {waited:?}");
        assert_eq!((to_old.load(Ordering::SeqCst), to_new.load(Ordering::SeqCst)), (0, 2), "both went to new");

        // After the pause they fail over at once.
        let started = Instant::now();
        let response = request_once(front, SESSION_OF_OLD).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(started.elapsed() < DRAIN_HANDOFF_PAUSE / 2, "no second wait: {:?}", started.elapsed());
        assert_eq!(to_new.load(Ordering::SeqCst), 3);
    }

    /// A request chosen for its session's terminating member before the
    /// drain deadline, whose connection is ready only after it (here: a
    /// late CPong), is not written there: it goes elsewhere after the pause.
    #[tokio::test]
    async fn a_request_whose_member_drained_while_it_waited_for_a_connection_goes_elsewhere() {
        let deadline_in = Duration::from_millis(300);
        let (front, _shutdown, to_old, to_new) =
            balancer_with_a_terminating_member(Duration::from_millis(700), deadline_in).await;
        let started = Instant::now();
        let response = request_once(front, SESSION_OF_OLD).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert_eq!((to_old.load(Ordering::SeqCst), to_new.load(Ordering::SeqCst)), (0, 1), "never written to old");
        let waited = started.elapsed();
        assert!(
            waited >= deadline_in + DRAIN_HANDOFF_PAUSE - Duration::from_millis(100),
            "failed over after the pause: {waited:?}"
        );
    }

    /// A member that answers every request `delay` after it arrived, noting
    /// when each arrived and when each answer went out.
    async fn member_answering_late(
        listener: TcpListener,
        delay: Duration,
        arrivals: Arc<std::sync::Mutex<Vec<Instant>>>,
        answers: Arc<std::sync::Mutex<Vec<Instant>>>,
    ) {
        loop {
            let Ok((conn, _)) = listener.accept().await else { return };
            let (arrivals, answers) = (arrivals.clone(), answers.clone());
            let arrived = move |_: &[u8]| arrivals.lock().expect("lock").push(Instant::now());
            let answered = move || answers.lock().expect("lock").push(Instant::now());
            tokio::spawn(answer_requests(conn, Duration::ZERO, delay, arrived, answered));
        }
    }

    /// How many of the `expected` requests a [`member_answering_late`]
    /// saw arrive before its first answer went out.
    fn arrived_before_first_answer(
        arrivals: &std::sync::Mutex<Vec<Instant>>,
        answers: &std::sync::Mutex<Vec<Instant>>,
        expected: usize,
    ) -> usize {
        let arrived = arrivals.lock().expect("lock").clone();
        let first_answer = answers.lock().expect("lock")[0];
        assert_eq!(arrived.len(), expected);
        arrived.iter().filter(|at| **at < first_answer).count()
    }

    /// Four parallel requests of a session whose member is gone: the first
    /// reaches the failover member alone, the others only after it answered
    /// (the member adopts the session at its first request). Four of a
    /// session whose member is there go together.
    #[tokio::test]
    async fn a_moving_sessions_first_request_goes_alone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let (arrivals, answers) = (Arc::default(), Arc::default());
        let delay = Duration::from_millis(300);
        tokio::spawn(member_answering_late(listener, delay, Arc::clone(&arrivals), Arc::clone(&answers)));
        let (bal, front, _shutdown) = start_balancer(&[("new", address)]).await;

        for (cookie, moving) in [("abc.gone", true), ("def.new", false)] {
            arrivals.lock().expect("lock").clear();
            answers.lock().expect("lock").clear();
            let request =
                format!("GET /x HTTP/1.1\r\nHost: t\r\nCookie: JSESSIONID={cookie}\r\nConnection: close\r\n\r\n");
            let parallel: Vec<_> = (0..4)
                .map(|_| {
                    let request = request.clone();
                    tokio::spawn(async move { request_once(front, request.as_bytes()).await })
                })
                .collect();
            for response in parallel {
                let response = response.await.expect("task");
                assert!(response.starts_with("HTTP/1.1 200"), "{cookie}: {response}");
            }
            let before_first_answer = arrived_before_first_answer(&arrivals, &answers, 4);
            if moving {
                assert_eq!(before_first_answer, 1, "{cookie}: only the first went before its answer");
            } else {
                assert_eq!(before_first_answer, 4, "{cookie}: a session that stays does not wait");
            }
        }
        assert_eq!(bal.moves.tracked(), 1, "the moved session is remembered as adopted");
    }

    /// Four parallel requests of a session whose member died a moment ago
    /// (nothing listens; the balancer has not noticed yet): each sets out
    /// for it, and those whose connect fails retry on the failover member.
    /// There too only one goes before the first answer: a request that
    /// moves its session at a retry waits for the session's turn.
    #[tokio::test]
    async fn a_session_moved_at_a_retry_sends_its_first_request_alone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let (arrivals, answers) = (Arc::default(), Arc::default());
        tokio::spawn(member_answering_late(
            listener,
            Duration::from_millis(300),
            Arc::clone(&arrivals),
            Arc::clone(&answers),
        ));
        let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dead_address = dead.local_addr().expect("addr");
        drop(dead);
        let (bal, front, _shutdown) = start_balancer(&[("dead", dead_address), ("new", address)]).await;
        let request = "GET /x HTTP/1.1\r\nHost: t\r\nCookie: JSESSIONID=abc.dead\r\nConnection: close\r\n\r\n";
        let parallel: Vec<_> =
            (0..4).map(|_| tokio::spawn(async move { request_once(front, request.as_bytes()).await })).collect();
        for response in parallel {
            let response = response.await.expect("task");
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        }
        let before_first_answer = arrived_before_first_answer(&arrivals, &answers, 4);
        assert_eq!(before_first_answer, 1, "only the first went before its answer");
        assert_eq!(bal.moves.tracked(), 1, "the moved session is remembered as adopted");
    }

    /// A moved session's requests that still carry its old id, once the new
    /// member answered the first one (it renamed the session), go with the
    /// new id in the session cookie, the other cookies as they were: under
    /// BackupManager a stale copy can be back under the old id (see
    /// `super::moves`). A session that stays is not touched.
    #[tokio::test]
    async fn requests_with_a_moved_sessions_old_id_go_with_its_new_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let cookies: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let seen = Arc::clone(&cookies);
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else { return };
                let seen = Arc::clone(&seen);
                let arrived = move |payload: &[u8]| {
                    let text = String::from_utf8_lossy(payload);
                    let cookie = text.split('\0').find(|part| part.contains("JSESSIONID")).unwrap_or("").to_string();
                    seen.lock().expect("lock").push(cookie);
                };
                tokio::spawn(answer_requests(conn, Duration::ZERO, Duration::from_millis(100), arrived, || {}));
            }
        });
        let (_bal, front, _shutdown) = start_balancer(&[("new", address)]).await;
        let request = |cookie: &str| {
            format!("GET /x HTTP/1.1\r\nHost: t\r\nCookie: a=1; JSESSIONID={cookie}; b=2\r\nConnection: close\r\n\r\n")
        };
        // The first request of the moving session, and one sent while it is out.
        let first = tokio::spawn(async move { request_once(front, request("abc.gone").as_bytes()).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let parallel = request_once(front, request("abc.gone").as_bytes()).await;
        assert!(first.await.expect("task").starts_with("HTTP/1.1 200"));
        assert!(parallel.starts_with("HTTP/1.1 200"), "{parallel}");
        // Later ones, and one of a session that stays.
        for cookie in ["abc.gone", "abc.new", "def.new"] {
            let response = request_once(front, request(cookie).as_bytes()).await;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        }
        let got = cookies.lock().expect("lock").clone();
        assert_eq!(
            got.iter().map(|c| c.trim_start_matches(|ch: char| !ch.is_ascii_alphanumeric())).collect::<Vec<_>>(),
            [
                "a=1; JSESSIONID=abc.gone; b=2",
                "a=1; JSESSIONID=abc.new; b=2",
                "a=1; JSESSIONID=abc.new; b=2",
                "a=1; JSESSIONID=abc.new; b=2",
                "a=1; JSESSIONID=def.new; b=2",
            ],
            "what the member got: {got:?}"
        );
    }

    /// A member that answers the first request of each connection and
    /// dies with the second unread in its socket (as a JVM killed while a
    /// request arrives): its close is a reset. Counts the requests it read.
    async fn member_dying_with_the_second_request_unread(listener: TcpListener, forwards: Arc<AtomicUsize>) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let forwards = forwards.clone();
            tokio::spawn(async move {
                if !until_forward_request(&mut conn, true, &forwards).await {
                    return;
                }
                let mut out = packet(&[4, 0, 200, 0, 2, b'O', b'K', 0, 0, 0]);
                out.extend(packet(&[5, 1]));
                let _ = conn.write_all(&out).await;
                // The next request arrives and is never read.
                let _ = conn.peek(&mut [0u8; 1]).await;
            });
        }
    }

    /// On a connection reused without a CPing (idle less than
    /// `cping_after_idle`), a bodiless request that the member reset unread
    /// goes to a new connection; one whose body the member may have been
    /// reading gets a 502, as any written request does.
    #[tokio::test]
    async fn a_reset_before_the_request_was_read_sends_it_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let forwards = Arc::new(AtomicUsize::new(0));
        tokio::spawn(member_dying_with_the_second_request_unread(listener, forwards.clone()));
        let secret = Backend::Ajp(AjpSecret::new("s".into()));
        let (bal, front, _shutdown) = start_balancer_with(&[("m1", address)], secret, Duration::from_secs(60)).await;
        let member = bal.members.snapshot()[0].clone();
        let get = b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

        let response = request_once(front, get).await;
        assert!(response.starts_with("HTTP/1.1 200"), "first: {response}");
        for _ in 0..100 {
            if member.pool.idle_count() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(member.pool.idle_count(), 1, "the connection is back in the pool");

        let response = request_once(front, get).await;
        assert!(response.starts_with("HTTP/1.1 200"), "reset unread, sent again: {response}");
        assert_eq!(forwards.load(Ordering::SeqCst), 2, "each request was read once");

        let post = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
        let response = request_once(front, post).await;
        assert!(response.starts_with("HTTP/1.1 502"), "a request with a body is not sent again: {response}");
        assert_eq!(forwards.load(Ordering::SeqCst), 2);
        assert!(member.is_healthy(), "a reset of a stale connection does not fail the member");
    }

    #[tokio::test]
    async fn content_length_response_keeps_connection_end_in_same_segment() {
        requests_use_one_connection(false).await;
    }

    #[tokio::test]
    async fn content_length_response_keeps_connection_end_in_later_segment() {
        requests_use_one_connection(true).await;
    }
}
