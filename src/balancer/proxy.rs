//! One client request → one AJP exchange with a member.
//!
//! The exchange is a small state machine driven by what the container asks
//! for: after `FORWARD_REQUEST` (plus the first body packet when the length
//! is known and non-zero, as Tomcat expects) the container sends
//! `GET_BODY_CHUNK` whenever it wants more of the body, `SEND_HEADERS` once,
//! `SEND_BODY_CHUNK`s, and finally `END_RESPONSE`. Body requests may come
//! before or after the response head, so both phases answer them.
//!
//! Retry rule: a request is retried (another connection or member) only
//! while none of it can have been processed by Tomcat — a failed connect,
//! or a failed write of the first packet (Tomcat acts on complete packets
//! only). After that a failure is a 502, never a replay.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue, RETRY_AFTER, SET_COOKIE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::access::{AccessEntry, ServedBy};
use super::ajp::{self, ContainerPacket, EncodeError, ForwardRequest, SslAttributes, from_container};
use super::body::{BodyError, ProxyBody};
use super::framing::FramingVerdicts;
use super::member::Member;
use super::metrics::{BackendErrorKind, Metrics, RejectReason};
use super::pool::{AcquireError, ConnError, Lease};
use super::routing::{Choice, NoMember, SessionWeigher, member_key, session_of_request, unix_now_ms};
use super::state::Balancer;
use super::tls::TlsFacts;

/// Facts of the client connection, formatted once per connection.
#[derive(Debug)]
pub struct ClientConn {
    /// Smuggling verdicts of this connection's request heads, in order.
    pub framing: Arc<FramingVerdicts>,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    remote_ip: String,
    local_ip: String,
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

/// Refuses the framing shapes used for request smuggling. hyper already
/// refuses malformed lengths and chunk syntax; these shapes it would accept.
pub fn check_framing(headers: &HeaderMap) -> Result<Option<u64>, Rejection> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let content_length = lengths.next();
    if lengths.next().is_some() {
        return Err(Rejection::BadFraming("duplicate Content-Length"));
    }
    let mut encodings = headers.get_all(TRANSFER_ENCODING).iter();
    if let Some(te) = encodings.next() {
        if content_length.is_some() {
            return Err(Rejection::BadFraming("Content-Length with Transfer-Encoding"));
        }
        if encodings.next().is_some() || !te.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(Rejection::BadFraming("Transfer-Encoding other than a single chunked"));
        }
        return Ok(None);
    }
    match content_length {
        None => Ok(Some(0)),
        Some(v) => {
            let text = v.to_str().map_err(|_| Rejection::BadFraming("invalid Content-Length"))?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Rejection::BadFraming("invalid Content-Length"));
            }
            text.parse::<u64>().map(Some).map_err(|_| Rejection::BadFraming("invalid Content-Length"))
        }
    }
}

/// The client's request body, handed out in AJP-sized pieces.
struct RequestBody {
    incoming: Option<Incoming>,
    leftover: Bytes,
    received: u64,
    limit: Option<u64>,
}

impl RequestBody {
    async fn next_piece(&mut self, max: usize) -> Result<Option<Bytes>, Rejection> {
        while self.leftover.is_empty() {
            let Some(incoming) = self.incoming.as_mut() else { return Ok(None) };
            match incoming.frame().await {
                None => {
                    self.incoming = None;
                    return Ok(None);
                }
                Some(Err(e)) => {
                    self.incoming = None;
                    return Err(Rejection::ClientBody(e));
                }
                Some(Ok(frame)) => {
                    // Trailers have no AJP form; they are dropped like httpd does.
                    if let Ok(data) = frame.into_data() {
                        self.received += data.len() as u64;
                        if self.limit.is_some_and(|limit| self.received > limit) {
                            self.incoming = None;
                            return Err(Rejection::BodyTooLarge);
                        }
                        self.leftover = data;
                    }
                }
            }
        }
        let n = max.min(self.leftover.len());
        Ok(Some(self.leftover.split_to(n)))
    }
}

/// Counts a request in flight on a member for as long as it lives.
struct InFlight(Arc<Member>);

impl InFlight {
    fn new(member: Arc<Member>) -> Self {
        member.metrics.in_flight.inc();
        InFlight(member)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}

/// What went wrong mid-exchange: the member's side or the client's.
enum ExchangeError {
    Backend(ConnError),
    Client(Rejection),
}

impl From<ConnError> for ExchangeError {
    fn from(e: ConnError) -> Self {
        ExchangeError::Backend(e)
    }
}

/// A connection in use by one request, with what the exchange needs.
struct Exchange {
    bal: Arc<Balancer>,
    member: Arc<Member>,
    lease: Option<Lease>,
    body: RequestBody,
    _in_flight: InFlight,
    /// Response body bytes still to come, when the head gave a `Content-Length`.
    body_left: Option<u64>,
    /// `END_RESPONSE` was read (or the connection given up after a complete body).
    ended: bool,
}

/// One packet of the response body phase.
enum BodyPacket {
    Data(Bytes),
    /// An empty `SEND_BODY_CHUNK`: Tomcat's explicit flush.
    Flush,
    End,
    GetBody(usize),
}

impl Exchange {
    fn lease(&mut self) -> Result<&mut Lease, ConnError> {
        self.lease.as_mut().ok_or(ConnError::Closed)
    }

    async fn read_packet(&mut self) -> Result<Bytes, ExchangeError> {
        let timeout = self.bal.settings.backend_timeout;
        let lease = self.lease()?;
        match tokio::time::timeout(timeout, lease.conn.read_packet()).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ConnError::Timeout.into()),
        }
    }

    /// Answers `GET_BODY_CHUNK`: the next piece, or the empty packet at the end.
    async fn send_body_piece(&mut self, requested: usize) -> Result<(), ExchangeError> {
        let max = ajp::max_body_chunk_len(self.bal.settings.packet_size);
        let want = if requested == 0 { max } else { requested.min(max) };
        let piece = self.body.next_piece(want).await.map_err(ExchangeError::Client)?;
        let lease = self.lease()?;
        let sent = match &piece {
            Some(data) => {
                ajp::encode_body_chunk(&mut lease.conn.write_buf, data);
                data.len()
            }
            None => {
                ajp::encode_empty_body_chunk(&mut lease.conn.write_buf);
                0
            }
        };
        lease.conn.send().await.map_err(ConnError::Io)?;
        self.member.traffic_bytes.fetch_add(sent as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads up to the response head.
    async fn read_head(&mut self) -> Result<Bytes, ExchangeError> {
        loop {
            let payload = self.read_packet().await?;
            match ajp::decode_container_packet(&payload).map_err(ConnError::Protocol)? {
                ContainerPacket::SendHeaders => return Ok(payload),
                ContainerPacket::GetBodyChunk { requested } => self.send_body_piece(requested).await?,
                ContainerPacket::SendBodyChunk { .. } => {
                    return Err(ConnError::Unexpected("SEND_BODY_CHUNK before SEND_HEADERS").into());
                }
                ContainerPacket::EndResponse { .. } => {
                    return Err(ConnError::Unexpected("END_RESPONSE before SEND_HEADERS").into());
                }
                ContainerPacket::CPong => return Err(ConnError::Unexpected("CPONG during a request").into()),
            }
        }
    }

    /// The next response body bytes; `None` after `END_RESPONSE`.
    async fn next_body_bytes(&mut self) -> Result<Option<Bytes>, ExchangeError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            let payload = self.read_packet().await?;
            match self.body_packet(payload)? {
                BodyPacket::Data(bytes) => {
                    self.finish_early().await;
                    return Ok(Some(bytes));
                }
                BodyPacket::Flush => continue,
                BodyPacket::End => return Ok(None),
                BodyPacket::GetBody(requested) => self.send_body_piece(requested).await?,
            }
        }
    }

    /// Classifies one packet of the body phase; `END_RESPONSE` ends the
    /// exchange here (the connection goes back to the pool when reusable).
    fn body_packet(&mut self, payload: Bytes) -> Result<BodyPacket, ConnError> {
        match ajp::decode_container_packet(&payload)? {
            ContainerPacket::SendBodyChunk { len: 0, .. } => Ok(BodyPacket::Flush), // Tomcat's explicit flush
            ContainerPacket::SendBodyChunk { offset, len } => {
                self.member.traffic_bytes.fetch_add(len as u64, Ordering::Relaxed);
                if let Some(left) = self.body_left.as_mut() {
                    *left = left.saturating_sub(len as u64);
                }
                Ok(BodyPacket::Data(payload.slice(offset..offset + len)))
            }
            ContainerPacket::GetBodyChunk { requested } => Ok(BodyPacket::GetBody(requested)),
            ContainerPacket::EndResponse { reuse } => {
                self.ended = true;
                if let Some(lease) = self.lease.take()
                    && reuse
                {
                    self.member.pool.release(lease);
                }
                Ok(BodyPacket::End)
            }
            ContainerPacket::SendHeaders => Err(ConnError::Unexpected("second SEND_HEADERS")),
            ContainerPacket::CPong => Err(ConnError::Unexpected("CPONG during a request")),
        }
    }

    /// A body-phase packet of a wanted type that is already in the read
    /// buffer (no I/O); `None` when the next packet still has to be read or
    /// is of another type.
    fn buffered_body_packet(&mut self, wanted: impl Fn(u8) -> bool) -> Result<Option<BodyPacket>, ConnError> {
        let Some(lease) = self.lease.as_mut() else { return Ok(None) };
        match lease.conn.buffered_packet(wanted)? {
            Some(payload) => self.body_packet(payload).map(Some),
            None => Ok(None),
        }
    }

    /// Takes `END_RESPONSE` as soon as the body is complete, before its last
    /// bytes go to the client: hyper stops polling a body once it has sent
    /// `Content-Length` bytes, and a connection whose `END_RESPONSE` was never
    /// read cannot go back to the pool. A failure here loses no response
    /// bytes; only the connection is dropped.
    async fn finish_early(&mut self) {
        if self.ended {
            return;
        }
        match self.buffered_body_packet(|kind| kind == from_container::END_RESPONSE) {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(error) => return self.fail_after_body(&error),
        }
        if self.body_left != Some(0) {
            return;
        }
        loop {
            let payload = match self.read_packet().await {
                Ok(payload) => payload,
                Err(ExchangeError::Backend(error)) => return self.fail_after_body(&error),
                Err(ExchangeError::Client(_)) => return self.fail_after_body(&ConnError::Closed),
            };
            match self.body_packet(payload) {
                Ok(BodyPacket::End) => return,
                Ok(BodyPacket::Flush) => continue,
                Ok(BodyPacket::Data(_)) => {
                    return self.fail_after_body(&ConnError::Unexpected("body bytes beyond Content-Length"));
                }
                Ok(BodyPacket::GetBody(requested)) => {
                    if let Err(error) = self.send_body_piece(requested).await {
                        let error = match error {
                            ExchangeError::Backend(error) => error,
                            ExchangeError::Client(_) => ConnError::Closed,
                        };
                        return self.fail_after_body(&error);
                    }
                }
                Err(error) => return self.fail_after_body(&error),
            }
        }
    }

    /// The member failed after the whole body arrived: the client still gets
    /// the complete response, the connection is dropped.
    fn fail_after_body(&mut self, error: &ConnError) {
        tracing::debug!(route = %self.member.route, %error, "member failed after the response body; dropping the connection");
        self.fail(error);
        self.ended = true;
    }

    fn fail(&mut self, error: &ConnError) {
        self.lease = None;
        let kind = match error {
            ConnError::Protocol(_) | ConnError::Unexpected(_) => BackendErrorKind::Protocol,
            ConnError::Timeout => BackendErrorKind::Timeout,
            ConnError::Io(_) | ConnError::Closed => BackendErrorKind::Io,
        };
        self.member.metrics.count_error(kind);
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
    if let Some(reason) = client.framing.take() {
        return Err(Rejection::BadFraming(reason));
    }
    let (parts, incoming) = req.into_parts();
    let content_length = check_framing(&parts.headers)?;
    if let (Some(limit), Some(length)) = (bal.settings.max_body_bytes, content_length)
        && length > limit
    {
        return Err(Rejection::BodyTooLarge);
    }
    let mut body = RequestBody {
        incoming: Some(incoming),
        leftover: Bytes::new(),
        received: 0,
        limit: bal.settings.max_body_bytes,
    };
    let settings = &bal.settings;
    let max_piece = ajp::max_body_chunk_len(settings.packet_size);
    // With a known length Tomcat expects the first body packet right after
    // the request packet; read it first so a retry can send it again.
    let first_piece = match content_length {
        Some(n) if n > 0 => body.next_piece(max_piece).await?,
        _ => None,
    };

    let path = parts.uri.path();
    let session = session_of_request(path, &parts.headers, &settings.sticky_cookie, &settings.sticky_path_param);
    let snapshot = bal.members.snapshot();
    // One wall-clock read per request, for the rebalancing schedule and the
    // session estimate alike.
    let now_ms = unix_now_ms();
    let mut tried: Vec<usize> = Vec::new();
    let mut write_failures = 0;
    let started = Instant::now();

    let mut failed_over = false;
    let (member, lease) = loop {
        let (member, choice) = bal.router.choose_at(&snapshot, session, &tried, now_ms).map_err(Rejection::NoMember)?;
        failed_over |= choice == Choice::Failover;
        if choice == Choice::Rebalanced {
            bal.metrics.sessions_moved.inc();
        }
        if let (Some(session), true) = (session, tried.is_empty()) {
            member.sessions.record(SessionWeigher::new(session.base).sketch_hash(), now_ms);
        }
        if choice == Choice::Failover && tried.is_empty() {
            bal.metrics.failovers.inc();
            if let Some(held_back) = bal.failover_log.allow() {
                tracing::info!(from = session.map_or("", |s| s.route), to = %member.route, more_since_last_line = held_back, "sticky member unusable, failing over");
            }
        }
        let mut lease = match member.pool.acquire(member.address, &bal.pool_settings).await {
            Ok(lease) => lease,
            Err(AcquireError::SlotTimeout(_)) => return Err(Rejection::PoolExhausted(member.route.clone())),
            Err(e) => {
                member.metrics.count_error(BackendErrorKind::Connect);
                bal.mark_failed(&member, &e);
                tried.push(member_key(&member));
                continue;
            }
        };
        let forward = ForwardRequest {
            method: parts.method.as_str(),
            protocol: version_text(parts.version),
            request_uri: path,
            query_string: parts.uri.query(),
            remote_addr: &client.remote_ip,
            remote_port: client.remote.port(),
            local_name: &client.local_ip,
            local_addr: &client.local_ip,
            local_port: client.local.port(),
            is_ssl: client.tls.is_some(),
            headers: &parts.headers,
            route: Some(&member.route),
            secret: bal.secret.expose(),
            ssl: client.ssl_attributes(),
        };
        lease.conn.write_buf.clear();
        if let Err(e) = ajp::encode_forward_request(&mut lease.conn.write_buf, &forward, settings.packet_size) {
            lease.conn.write_buf.clear();
            member.pool.release(lease);
            return Err(Rejection::HeadTooLarge(e));
        }
        if let Some(piece) = &first_piece {
            ajp::encode_body_chunk(&mut lease.conn.write_buf, piece);
        }
        match lease.conn.send().await {
            Ok(()) => break (member, lease),
            Err(e) => {
                // A failed write means Tomcat never got a complete packet, so
                // nothing was processed: safe to try again on a fresh connection.
                write_failures += 1;
                member.pool.clear();
                tracing::debug!(route = %member.route, reused = lease.reused, error = %e, "request write failed, retrying");
                if write_failures > 2 {
                    member.metrics.count_error(BackendErrorKind::Io);
                    return Err(Rejection::BadGateway { route: member.route.clone(), error: ConnError::Io(e) });
                }
                if !lease.reused {
                    tried.push(member_key(&member));
                }
            }
        }
    };
    if let Some(piece) = &first_piece {
        member.traffic_bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
    }

    let mut exchange = Exchange {
        bal: bal.clone(),
        member: member.clone(),
        lease: Some(lease),
        body,
        _in_flight: InFlight::new(member.clone()),
        body_left: None,
        ended: false,
    };
    let head = match exchange.read_head().await {
        Ok(head) => head,
        Err(ExchangeError::Client(rejection)) => {
            exchange.lease = None;
            return Err(rejection);
        }
        Err(ExchangeError::Backend(error)) => {
            exchange.fail(&error);
            member.metrics.count_response(502);
            return Err(match error {
                ConnError::Timeout => Rejection::GatewayTimeout(member.route.clone()),
                error => Rejection::BadGateway { route: member.route.clone(), error },
            });
        }
    };

    let mut response = Response::new(ProxyBody::Empty);
    let status = match ajp::decode_send_headers(&head, response.headers_mut()) {
        Ok(status) => status,
        Err(e) => {
            let error = ConnError::Protocol(e);
            exchange.fail(&error);
            member.metrics.count_response(502);
            return Err(Rejection::BadGateway { route: member.route.clone(), error });
        }
    };
    *response.status_mut() = status;
    if settings.access_log {
        response.extensions_mut().insert(ServedBy { route: member.route.clone(), failover: failed_over });
    }
    strip_hop_by_hop(response.headers_mut());
    note_new_session(&member, response.headers(), &settings.sticky_cookie);
    member.metrics.count_response(status.as_u16());
    member.metrics.latency.observe(started.elapsed().as_secs_f64());

    let bodiless = parts.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if bodiless {
        // Tomcat swallows the body; read on to END_RESPONSE so the
        // connection goes back to the pool.
        loop {
            match exchange.next_body_bytes().await {
                Ok(None) => break,
                Ok(Some(_)) => continue,
                Err(ExchangeError::Backend(e)) => {
                    exchange.fail(&e);
                    break;
                }
                Err(ExchangeError::Client(_)) => break,
            }
        }
        return Ok(response);
    }
    exchange.body_left = response_content_length(response.headers());
    // Small responses usually arrive whole with the head: hand them over as
    // a complete body, with the connection already back in the pool.
    let mut ready: VecDeque<Bytes> = VecDeque::new();
    let mut broken = None;
    while !exchange.ended {
        match exchange.buffered_body_packet(|kind| {
            kind == from_container::SEND_BODY_CHUNK || kind == from_container::END_RESPONSE
        }) {
            Ok(Some(BodyPacket::Data(bytes))) => ready.push_back(bytes),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(error) => {
                exchange.fail(&error);
                broken = Some(error);
                break;
            }
        }
    }
    if let Some(error) = broken {
        tracing::warn!(route = %member.route, %error, "member failed mid-response; aborting client connection");
        let failed = futures::stream::iter(ready.into_iter().map(Ok))
            .chain(futures::stream::once(async move { Err(BodyError(error.to_string())) }));
        *response.body_mut() = ProxyBody::Stream(Box::pin(failed));
        return Ok(response);
    }
    if !exchange.ended && !ready.is_empty() {
        exchange.finish_early().await;
    }
    *response.body_mut() = if exchange.ended {
        ProxyBody::Chunks(ready)
    } else if ready.is_empty() {
        ProxyBody::Stream(Box::pin(response_stream(exchange)))
    } else {
        ProxyBody::Stream(Box::pin(futures::stream::iter(ready.into_iter().map(Ok)).chain(response_stream(exchange))))
    };
    Ok(response)
}

/// Response body from the rest of the exchange.
fn response_stream(exchange: Exchange) -> impl Stream<Item = Result<Bytes, BodyError>> + Send {
    futures::stream::unfold(Some(exchange), |state| async move {
        let mut exchange = state?;
        match exchange.next_body_bytes().await {
            Ok(Some(bytes)) => Some((Ok(bytes), Some(exchange))),
            Ok(None) => None,
            Err(ExchangeError::Backend(error)) => {
                exchange.fail(&error);
                tracing::warn!(route = %exchange.member.route, %error, "member failed mid-response; aborting client connection");
                Some((Err(BodyError(error.to_string())), None))
            }
            Err(ExchangeError::Client(rejection)) => {
                exchange.lease = None;
                tracing::info!(error = %rejection, "client body failed mid-exchange");
                Some((Err(BodyError(rejection.to_string())), None))
            }
        }
    })
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
    for name in &HOP_BY_HOP_RESPONSE {
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

    #[test]
    fn framing_rules() {
        assert_eq!(check_framing(&headers(&[])).ok(), Some(Some(0)));
        assert_eq!(check_framing(&headers(&[("content-length", "12")])).ok(), Some(Some(12)));
        assert_eq!(check_framing(&headers(&[("transfer-encoding", "chunked")])).ok(), Some(None));
        assert_eq!(check_framing(&headers(&[("transfer-encoding", "Chunked")])).ok(), Some(None));
        for bad in [
            vec![("content-length", "1"), ("transfer-encoding", "chunked")],
            vec![("content-length", "1"), ("content-length", "1")],
            vec![("content-length", "+1")],
            vec![("content-length", "1, 1")],
            vec![("transfer-encoding", "gzip, chunked")],
            vec![("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
        ] {
            assert!(matches!(check_framing(&headers(&bad)), Err(Rejection::BadFraming(_))), "{bad:?}");
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
    }
}

/// The exchange against a fake AJP member: a response with a
/// `Content-Length` must leave its connection in the pool, whether
/// `END_RESPONSE` arrives with the body or after it.
#[cfg(test)]
mod reuse_tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use std::time::Duration;

    use crate::balancer::config::LbMethod;
    use crate::balancer::front::{FrontSettings, serve_front};
    use crate::balancer::member::{MemberSpec, MemberState};
    use crate::balancer::pool::PoolSettings;
    use crate::balancer::routing::Router;
    use crate::balancer::state::{AjpSecret, ProxySettings};

    fn packet(payload: &[u8]) -> Vec<u8> {
        let mut p = b"AB".to_vec();
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    /// Answers every FORWARD_REQUEST with 200, `Content-Length: 5`, "hello".
    async fn fake_member(listener: TcpListener, accepted: Arc<AtomicUsize>, split_end: bool) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                loop {
                    let mut header = [0u8; 4];
                    if conn.read_exact(&mut header).await.is_err() {
                        return;
                    }
                    let mut payload = vec![0u8; u16::from_be_bytes([header[2], header[3]]) as usize];
                    if conn.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    if payload.first() == Some(&ajp::to_container::CPING) {
                        let _ = conn.write_all(&packet(&[9])).await;
                        continue;
                    }
                    let mut out = packet(&[4, 0, 200, 0, 2, b'O', b'K', 0, 0, 1, 0xA0, 0x03, 0, 1, b'5', 0]);
                    out.extend(packet(&[3, 0, 5, b'h', b'e', b'l', b'l', b'o', 0]));
                    let end = packet(&[5, 1]);
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

    async fn requests_use_one_connection(split_end: bool) {
        let member_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let member_address = member_listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        tokio::spawn(fake_member(member_listener, accepted.clone(), split_end));

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
            cping_after_idle: Duration::from_secs(60),
            cping_timeout: Duration::from_secs(1),
            slot_wait: Duration::from_secs(1),
        };
        let bal = Arc::new(Balancer::new(
            settings,
            pool_settings,
            8,
            Router::new(LbMethod::Byrequests, true),
            AjpSecret::new("s".into()),
        ));
        bal.members.apply(
            &[MemberSpec {
                route: "m1".into(),
                address: member_address,
                state: MemberState::Ready,
                terminating: false,
                ready_since: None,
            }],
            &bal.metrics,
        );
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front_address = front.local_addr().expect("addr");
        let (_shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let front_settings = FrontSettings {
            connection_slots: Arc::new(tokio::sync::Semaphore::new(16)),
            max_connections: 16,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(1),
        };
        tokio::spawn(serve_front(bal.clone(), front, None, front_settings, shutdown_rx));

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

    #[tokio::test]
    async fn content_length_response_keeps_connection_end_in_same_segment() {
        requests_use_one_connection(false).await;
    }

    #[tokio::test]
    async fn content_length_response_keeps_connection_end_in_later_segment() {
        requests_use_one_connection(true).await;
    }
}
