//! The HTTP/1.1 backend (`--backend-protocol http`): a client request's trip
//! to a member's HTTP connector, for Tomcats that should not (or cannot)
//! open an AJP connector.
//!
//! Everything before the choice of a member is shared with AJP
//! ([`super::proxy`]: framing checks, body limits, the session's route), and
//! so is the choice itself and the retry rule ([`Attempts`]): stickiness by
//! jvmRoute, deterministic failover, draining. What differs:
//!
//! * The client's facts travel as headers Tomcat's valves read:
//!   `X-Forwarded-For`/`-Proto`/`-Port` for `RemoteIpValve` (the address,
//!   `isSecure()`/scheme and server port), `X-Forwarded-Host` for
//!   applications that look, and for a TLS client `SSL_CIPHER`,
//!   `SSL_CIPHER_USEKEYSIZE` and `SSL_CLIENT_CERT` for `SSLValve`. A
//!   client's own headers of those names are dropped, never passed on:
//!   Tomcat believes them from whoever reaches its connector.
//! * The probe that proves a member alive is `OPTIONS *` instead of CPing:
//!   Tomcat's `CoyoteAdapter` answers it itself (200 with an `Allow`
//!   header) without running a valve, a filter or an application, and
//!   without touching a session — the HTTP counterpart of a CPong, which
//!   its AJP processor also answers without the engine. (An application
//!   path such as `/health` would cost a servlet, and its answer would be
//!   the application's, not the connector's.)
//! * Connections are hyper client connections, pooled per member like AJP
//!   ones and checked the same way before reuse ([`HttpConnection`]).
//!
//! No-duplicate rule, as for AJP: a request goes out again only when the
//! member cannot have seen it — the connect failed, a new connection did not
//! answer the probe, or hyper handed the request back unwritten (it does so
//! only when nothing of it was serialized onto the connection). Once hyper
//! has taken the request, a failure is a 502, never a replay, not even of a
//! GET: for a session application a GET is not safe (the counter sample
//! counts on GET), and the probe before every reuse already removes the
//! stale keep-alive connection a replay would paper over.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::{BodyError, ProxyBody};
use super::exchange::{Attempts, InFlight, Phase, Retry, Target};
use super::metrics::BackendErrorKind;
use super::pool::{AcquireError, Checked, ConnError, Lease, PoolSettings, PooledConnection};
use super::proxy::{ClientConn, Rejection, answer_head};
use super::state::Balancer;

/// Headers the balancer sets for the member; a client's own are dropped.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
/// `SSLValve`'s default header names (Tomcat 10.1 `SSLValve`: `ssl_client_cert`,
/// `ssl_cipher`, `ssl_session_id`, `ssl_cipher_usekeysize`; it looks them up
/// without regard to case).
pub const SSL_CLIENT_CERT: HeaderName = HeaderName::from_static("ssl_client_cert");
pub const SSL_CIPHER: HeaderName = HeaderName::from_static("ssl_cipher");
pub const SSL_CIPHER_USEKEYSIZE: HeaderName = HeaderName::from_static("ssl_cipher_usekeysize");

/// Most bytes of a probe answer's body read to keep its connection; Tomcat
/// sends none, anything longer is no Tomcat connector and the connection is
/// dropped.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// A pooled HTTP/1.1 connection to a member: hyper's client half, whose
/// connection task runs on its own and ends when this is dropped.
pub struct HttpConnection {
    sender: SendRequest<ForwardedBody>,
    /// `Host` of the probe: the member's address.
    probe_host: HeaderValue,
    idle_since: Instant,
}

impl HttpConnection {
    async fn open(address: SocketAddr, settings: &PoolSettings) -> Result<Self, AcquireError> {
        let stream = match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(AcquireError::Connect(e)),
            Err(_) => return Err(AcquireError::ConnectTimeout(settings.connect_timeout)),
        };
        // Heads are small and answered at once; Nagle would only add delay.
        stream.set_nodelay(true).map_err(AcquireError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AcquireError::Connect(io::Error::other(e)))?;
        tokio::spawn(async move {
            // A broken connection is seen (and counted) by its exchange.
            if let Err(error) = connection.await {
                tracing::debug!(%address, %error, "member HTTP connection ended");
            }
        });
        let probe_host =
            HeaderValue::from_str(&address.to_string()).map_err(|e| AcquireError::Connect(io::Error::other(e)))?;
        Ok(HttpConnection { sender, probe_host, idle_since: Instant::now() })
    }

    /// `OPTIONS *` → a 2xx within `timeout`, its body read, the connection
    /// ready for a request.
    pub async fn probe(&mut self, timeout: Duration) -> Result<(), ConnError> {
        let probe = async {
            self.sender.ready().await?;
            let mut request = Request::new(ForwardedBody::empty());
            *request.method_mut() = Method::OPTIONS;
            *request.uri_mut() = Uri::from_static("*");
            request.headers_mut().insert(HOST, self.probe_host.clone());
            let response = self.sender.send_request(request).await?;
            let status = response.status();
            let mut body = response.into_body();
            let mut read = 0;
            while let Some(frame) = body.frame().await {
                read += frame?.data_ref().map_or(0, Bytes::len);
                if read > MAX_PROBE_BODY {
                    return Err(ConnError::Unexpected("long body in the answer to OPTIONS *"));
                }
            }
            if !status.is_success() {
                return Err(ConnError::ProbeStatus(status.as_u16()));
            }
            self.sender.ready().await?;
            Ok(())
        };
        tokio::time::timeout(timeout, probe).await.map_err(|_| ConnError::Timeout)?
    }
}

impl PooledConnection for HttpConnection {
    fn idle_since(&self) -> Instant {
        self.idle_since
    }

    fn set_idle_since(&mut self, at: Instant) {
        self.idle_since = at;
    }

    fn connect(
        address: SocketAddr,
        settings: &PoolSettings,
    ) -> impl Future<Output = Result<Self, AcquireError>> + Send {
        HttpConnection::open(address, settings)
    }

    async fn check_before_reuse(&mut self, settings: &PoolSettings) -> Result<Checked, String> {
        // hyper's connection task reads while idle, so a member that closed
        // the connection shows here as soon as the reactor saw the FIN.
        if self.sender.is_closed() {
            return Err("the member closed it".into());
        }
        if self.idle_since.elapsed() >= settings.cping_after_idle {
            self.probe(settings.cping_timeout).await.map_err(|e| format!("failed the OPTIONS * probe: {e}"))?;
            return Ok(Checked::Probed);
        }
        // The previous response may still be settling in hyper's task.
        match tokio::time::timeout(settings.cping_timeout, self.sender.ready()).await {
            Ok(Ok(())) => Ok(Checked::Unprobed),
            Ok(Err(e)) => Err(format!("not ready: {e}")),
            Err(_) => Err("not ready in time".into()),
        }
    }

    fn fit_for_pool(&self) -> bool {
        !self.sender.is_closed()
    }

    fn health_probe(&mut self, timeout: Duration) -> impl Future<Output = Result<(), ConnError>> + Send {
        self.probe(timeout)
    }
}

/// How the client's request body fared on its way to the member, shared
/// between the body (inside hyper) and the exchange that reads the outcome.
pub(super) struct BodyWatch {
    started: Instant,
    /// Bytes of the client's body passed on.
    received: AtomicU64,
    /// Milliseconds after `started` of the last body piece: the wait for
    /// the response head times out only while the upload stands still.
    last_progress_ms: AtomicU64,
    /// Why the client's body failed, when it did: the client's fault, not the member's.
    failure: Mutex<Option<Rejection>>,
}

impl BodyWatch {
    fn new() -> Self {
        BodyWatch {
            started: Instant::now(),
            received: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
            failure: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn last_progress(&self) -> Instant {
        self.started + Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed))
    }

    fn fail(&self, rejection: Rejection) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert(rejection);
    }

    fn take_failure(&self) -> Option<Rejection> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The client's request body as hyper sends it to the member: the limit
/// enforced, progress noted, trailers dropped (as over AJP, which has none).
/// Its size hint is the client's, so hyper frames the member's request the
/// way hyper's server framed the client's (`Content-Length` or chunked).
pub struct ForwardedBody {
    incoming: Option<Incoming>,
    limit: Option<u64>,
    watch: Arc<BodyWatch>,
}

impl ForwardedBody {
    fn empty() -> Self {
        ForwardedBody { incoming: None, limit: None, watch: Arc::new(BodyWatch::new()) }
    }
}

impl Body for ForwardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(incoming) = this.incoming.as_mut() else { return Poll::Ready(None) };
            match ready!(Pin::new(incoming).poll_frame(cx)) {
                None => {
                    this.incoming = None;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    this.incoming = None;
                    this.watch.fail(Rejection::ClientBody(e));
                    return Poll::Ready(Some(Err(BodyError("the client's request body failed".into()))));
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    let received =
                        this.watch.received.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                    if this.limit.is_some_and(|limit| received > limit) {
                        this.incoming = None;
                        this.watch.fail(Rejection::BodyTooLarge);
                        return Poll::Ready(Some(Err(BodyError("request body larger than the limit".into()))));
                    }
                    this.watch.last_progress_ms.store(this.watch.now_ms(), Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Request headers that are the client's hop's, not the member's (RFC 9110
/// §7.6.1), or that hyper sets itself from the body (`Content-Length`).
const HOP_BY_HOP_REQUEST: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];

/// Whether a client's request header stays behind. `named` are the
/// headers the client's `Connection` names (lowercase).
fn dropped_request_header(name: &HeaderName, named: &[String]) -> bool {
    let n = name.as_str();
    HOP_BY_HOP_REQUEST.contains(&n)
        // Meant for a proxy, never for the application (Proxy-Authorization too).
        || n.starts_with("proxy-")
        // hyper frames the member's request from the body, which hyper's
        // server already checked against the client's framing.
        || n == "content-length"
        // The front answered the expectation already (hyper sends `100
        // Continue` when the body is first read); the member gets the body
        // at once, so a second `100 Continue` would only cost a round trip.
        || n == "expect"
        // The facts the balancer vouches for: never a client's word.
        || n == "forwarded"
        || n.starts_with("x-forwarded-")
        || n.starts_with("ssl_")
        || n.starts_with("ssl-")
        || named.iter().any(|token| token == n)
}

/// The port in a `Host` value (`name:port`, `[v6]:port`), if it has one.
fn host_port(host: &str) -> Option<u16> {
    let port = match host.strip_prefix('[') {
        // `[v6]:port`: the port follows the bracket.
        Some(v6) => v6.split_once(']')?.1.strip_prefix(':')?,
        None => host.rsplit_once(':')?.1,
    };
    port.parse().ok()
}

/// The headers the member gets: the client's, less hop-by-hop ones and
/// anything claiming facts only the balancer knows, plus those facts.
pub(super) fn forward_headers(client_headers: &HeaderMap, client: &ClientConn) -> HeaderMap {
    let named: Vec<String> = client_headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();
    let mut headers = HeaderMap::with_capacity(client_headers.len() + 8);
    for (name, value) in client_headers {
        if !dropped_request_header(name, &named) {
            headers.append(name.clone(), value.clone());
        }
    }
    // HTTP/1.1 needs a Host; an HTTP/1.0 client may have sent none. Then
    // the member hears the address the client reached, as over AJP.
    let host = match headers.get(HOST) {
        Some(host) => Some(host.clone()),
        None => {
            let local = HeaderValue::from_str(&client.local.to_string()).ok();
            if let Some(local) = &local {
                headers.insert(HOST, local.clone());
            }
            local
        }
    };
    // The port the client addressed: Host's, else the one it connected to —
    // what Tomcat makes the server port of over AJP too.
    let port = host.as_ref().and_then(|h| h.to_str().ok()).and_then(host_port).unwrap_or(client.local.port());
    if let Ok(address) = HeaderValue::from_str(&client.remote_ip) {
        headers.insert(X_FORWARDED_FOR, address);
    }
    let scheme = if client.tls.is_some() { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    headers.insert(X_FORWARDED_PORT, HeaderValue::from(port));
    if let Some(tls) = &client.tls {
        if let Ok(cipher) = HeaderValue::from_str(tls.cipher) {
            headers.insert(SSL_CIPHER, cipher);
        }
        headers.insert(SSL_CIPHER_USEKEYSIZE, HeaderValue::from(tls.key_size));
        // One line, base64 lines joined by spaces, as httpd's mod_headers
        // sends it: SSLValve turns the spaces back into newlines.
        if let Some(pem) = &tls.client_cert_pem
            && let Ok(cert) = HeaderValue::from_str(pem.trim_end().replace(['\r', '\n'], " ").as_str())
        {
            headers.insert(SSL_CLIENT_CERT, cert);
        }
    }
    headers
}

/// The member's request: origin-form target, HTTP/1.1 (keep-alive), the
/// forwarded headers, the client's body.
fn member_request(
    parts: &Parts,
    headers: &HeaderMap,
    client: &ClientConn,
    body: ForwardedBody,
) -> Request<ForwardedBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    // An absolute-form target (`GET http://host/x`) goes on as origin-form;
    // its Host header names the authority.
    let target = parts.uri.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    *request.uri_mut() = target;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = forward_headers(headers, client);
    request
}

/// Whether the member will close the connection after this response.
fn member_closes(response: &Response<Incoming>) -> bool {
    response.version() != Version::HTTP_11
        || response
            .headers()
            .get_all(CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|token| token.trim().eq_ignore_ascii_case("close"))))
}

/// How one attempt ended short of an answer.
enum AttemptOutcome {
    Answered(Response<Incoming>),
    /// The member cannot have seen the request; here it is back for the next attempt.
    Retry(Retry, Request<ForwardedBody>),
}

/// One client request's trip to a member over HTTP, phase by phase like
/// the AJP [`super::exchange::Exchange`] (`CPing` is the `OPTIONS *` probe;
/// `SendRequest` lasts until hyper hands over the response head).
struct HttpExchange {
    bal: Arc<Balancer>,
    at: Attempts,
    lease: Option<Lease<HttpConnection>>,
    _in_flight: Option<InFlight>,
    /// The client's body on its way, shared with hyper's side.
    watch: Arc<BodyWatch>,
    /// Body bytes already added to the member's traffic (`bytraffic`).
    upload_counted: u64,
}

impl HttpExchange {
    async fn send(
        &mut self,
        target: &Target<'_>,
        mut request: Request<ForwardedBody>,
    ) -> Result<Response<Incoming>, Rejection> {
        loop {
            match self.attempt(request).await {
                Ok(AttemptOutcome::Answered(response)) => return Ok(response),
                Ok(AttemptOutcome::Retry(retry, back)) => {
                    request = back;
                    self.at.retry(&self.bal, target, retry).await?;
                }
                Err(rejection) => {
                    if self.at.phase != Phase::Failed {
                        self.at.phase.advance(Phase::Failed);
                    }
                    return Err(rejection);
                }
            }
        }
    }

    async fn attempt(&mut self, request: Request<ForwardedBody>) -> Result<AttemptOutcome, Rejection> {
        let settings = &self.bal.pool_settings;
        let member = self.at.member.clone();
        let mut lease = match member.http_pool.acquire(member.address, settings).await {
            Ok(lease) => lease,
            Err(AcquireError::SlotTimeout(_)) => return Err(Rejection::PoolExhausted(member.route.clone())),
            Err(error) => return Ok(AttemptOutcome::Retry(Retry::Connect(error), request)),
        };
        if !lease.reused {
            self.at.phase.advance(Phase::CPing);
            if let Err(error) = lease.conn.probe(settings.cping_timeout).await {
                return Ok(AttemptOutcome::Retry(Retry::CPing(error), request));
            }
        }
        if self.at.drained_since_chosen() {
            member.http_pool.release(lease);
            return Ok(AttemptOutcome::Retry(Retry::Handoff, request));
        }
        self.at.phase.advance(Phase::SendRequest);
        let in_flight = InFlight::new(member.clone());
        let sent = lease.conn.sender.try_send_request(request);
        let outcome = wait_for_head(sent, &self.watch, self.bal.settings.backend_timeout).await;
        self.count_upload();
        match outcome {
            Some(Ok(response)) => {
                self.lease = Some(lease);
                self._in_flight = Some(in_flight);
                self.at.phase.advance(Phase::ReadHead);
                self.at.phase.advance(Phase::StreamBody);
                Ok(AttemptOutcome::Answered(response))
            }
            Some(Err(mut error)) => {
                if let Some(back) = error.take_message() {
                    // Never serialized onto the connection: the member saw nothing.
                    let error = ConnError::Http(error.into_error());
                    return Ok(AttemptOutcome::Retry(Retry::Write { reused: lease.reused, error }, back));
                }
                if let Some(rejection) = self.watch.take_failure() {
                    // The client's body broke or outgrew the limit; the
                    // member is not to blame, but the connection is mid-request.
                    return Err(rejection);
                }
                // Logged with the route and hyper's reason as the 502 is answered.
                let error = ConnError::Http(error.into_error());
                member.metrics.count_error(error.kind());
                member.metrics.count_response(502);
                Err(Rejection::BadGateway { route: member.route.clone(), error })
            }
            None => {
                member.metrics.count_error(BackendErrorKind::Timeout);
                member.metrics.count_response(502);
                Err(Rejection::GatewayTimeout(member.route.clone()))
            }
        }
    }

    /// Adds the client's body bytes sent since the last call to the
    /// member's traffic (the body may still be going up after the head).
    fn count_upload(&mut self) {
        let received = self.watch.received.load(Ordering::Relaxed);
        self.at.member.traffic_bytes.fetch_add(received - self.upload_counted, Ordering::Relaxed);
        self.upload_counted = received;
    }

    /// The response is complete: the connection goes back to the pool when
    /// the member keeps it open.
    fn finish(&mut self, keep_alive: bool) {
        self.count_upload();
        if let Some(lease) = self.lease.take()
            && keep_alive
        {
            self.at.member.http_pool.release(lease);
        }
        self.at.phase.advance(Phase::Done);
    }

    /// The member broke the response: its connection is dropped.
    fn fail(&mut self, error: &ConnError) {
        self.lease = None;
        self.at.member.metrics.count_error(error.kind());
        self.at.phase.advance(Phase::Failed);
    }
}

/// Waits for the response head while the request body moves: `None` when
/// neither the body nor the member did anything for `timeout`.
async fn wait_for_head<F, T>(sent: F, watch: &BodyWatch, timeout: Duration) -> Option<T>
where
    F: Future<Output = T>,
{
    let mut sent = std::pin::pin!(sent);
    loop {
        let progress = watch.last_progress();
        tokio::select! {
            outcome = &mut sent => return Some(outcome),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(progress + timeout)) => {
                if watch.last_progress() == progress {
                    return None;
                }
            }
        }
    }
}

/// The HTTP side of `proxy`: from the member's choice to the client's response.
pub(super) async fn proxy_http(
    bal: &Arc<Balancer>,
    client: &ClientConn,
    parts: &Parts,
    headers: &HeaderMap,
    incoming: Incoming,
    mut target: Target<'_>,
) -> Result<Response<ProxyBody>, Rejection> {
    let watch = Arc::new(BodyWatch::new());
    let body = ForwardedBody { incoming: Some(incoming), limit: bal.settings.max_body_bytes, watch: watch.clone() };
    let request = member_request(parts, headers, client, body);
    let started = Instant::now();
    let mut exchange = HttpExchange {
        bal: bal.clone(),
        at: Attempts::first(bal, &mut target)?,
        lease: None,
        _in_flight: None,
        watch,
        upload_counted: 0,
    };
    let response = exchange.send(&target, request).await?;
    exchange.at.head_received();
    let keep_alive = !member_closes(&response);
    let (mut head, incoming) = response.into_parts();
    let status = head.status;
    let bodiless = parts.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        // The client's framing is what hyper decoded of the member's, not
        // the member's header: a `Content-Length` next to chunked coding
        // (RFC 9112 §6.3: remove it when forwarding) goes, the decoded
        // length stands.
        head.headers.remove(CONTENT_LENGTH);
        if let Some(length) = incoming.size_hint().exact() {
            head.headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    let mut response = Response::from_parts(head, ProxyBody::Empty);
    answer_head(bal, &exchange.at.member, exchange.at.failed_over, &mut response, started);
    *response.body_mut() = if incoming.is_end_stream() {
        exchange.finish(keep_alive);
        ProxyBody::Empty
    } else {
        ProxyBody::Stream(Box::pin(response_stream(exchange, incoming, keep_alive)))
    };
    Ok(response)
}

/// The member's response body, each piece within the backend timeout; the
/// connection goes back to the pool as soon as the body is complete — before
/// its last bytes go to the client, because hyper stops polling a body once
/// it has sent `Content-Length` bytes.
fn response_stream(
    exchange: HttpExchange,
    incoming: Incoming,
    keep_alive: bool,
) -> impl Stream<Item = Result<Bytes, BodyError>> + Send {
    futures::stream::unfold(Some((exchange, incoming)), move |state| async move {
        let (mut exchange, mut incoming) = state?;
        let timeout = exchange.bal.settings.backend_timeout;
        loop {
            let error = match tokio::time::timeout(timeout, incoming.frame()).await {
                Ok(None) => {
                    exchange.finish(keep_alive);
                    return None;
                }
                Ok(Some(Ok(frame))) => {
                    // Trailers have no place in the client's response here
                    // (AJP has none either); they are dropped.
                    let Ok(data) = frame.into_data() else { continue };
                    exchange.at.member.traffic_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if !incoming.is_end_stream() {
                        return Some((Ok(data), Some((exchange, incoming))));
                    }
                    // The last piece: let hyper see the end, then hand the connection back.
                    match tokio::time::timeout(timeout, incoming.frame()).await {
                        Ok(None) => exchange.finish(keep_alive),
                        _ => exchange.finish(false),
                    }
                    return Some((Ok(data), None));
                }
                Ok(Some(Err(error))) => ConnError::Http(error),
                Err(_) => ConnError::Timeout,
            };
            exchange.fail(&error);
            tracing::warn!(route = %exchange.at.member.route, %error, "member failed mid-response; aborting client connection");
            return Some((Err(BodyError(error.to_string())), None));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::tls::TlsFacts;

    fn client(tls: Option<TlsFacts>) -> ClientConn {
        ClientConn::new("192.0.2.7:51000".parse().expect("addr"), "10.1.2.3:8443".parse().expect("addr"), tls)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    fn all<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        h.get_all(name).iter().map(|v| v.to_str().expect("text")).collect()
    }

    #[test]
    fn the_clients_claims_are_dropped_and_the_balancers_facts_set() {
        let sent = headers(&[
            ("host", "shop.example:8443"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("X-Forwarded-Port", "1"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-by", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6;proto=https"),
            ("ssl_client_cert", "-----BEGIN CERTIFICATE----- forged -----END CERTIFICATE-----"),
            ("ssl_cipher", "NULL"),
            ("ssl-client-cert", "forged"),
            ("ssl_session_id", "forged"),
            ("x-app", "kept"),
            ("cookie", "JSESSIONID=abc.s1"),
        ]);
        let out = forward_headers(&sent, &client(None));
        assert_eq!(all(&out, "x-forwarded-for"), ["192.0.2.7"], "only the address the balancer saw");
        assert_eq!(all(&out, "x-forwarded-proto"), ["http"]);
        assert_eq!(all(&out, "x-forwarded-port"), ["8443"], "the port the client addressed");
        assert_eq!(all(&out, "x-forwarded-host"), ["shop.example:8443"]);
        for gone in
            ["x-forwarded-by", "forwarded", "ssl_client_cert", "ssl_cipher", "ssl-client-cert", "ssl_session_id"]
        {
            assert!(out.get(gone).is_none(), "{gone} passed on");
        }
        assert_eq!(all(&out, "x-app"), ["kept"]);
        assert_eq!(all(&out, "cookie"), ["JSESSIONID=abc.s1"]);
        assert_eq!(all(&out, "host"), ["shop.example:8443"]);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_stay_behind() {
        let sent = headers(&[
            ("host", "h"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-connection", "keep-alive"),
            ("content-length", "12"),
            ("expect", "100-continue"),
            ("accept", "*/*"),
        ]);
        let out = forward_headers(&sent, &client(None));
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            ["accept", "host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-port", "x-forwarded-proto"]
        );
    }

    #[test]
    fn without_a_host_the_member_hears_the_address_the_client_reached() {
        let out = forward_headers(&HeaderMap::new(), &client(None));
        assert_eq!(all(&out, "host"), ["10.1.2.3:8443"]);
        assert_eq!(all(&out, "x-forwarded-port"), ["8443"]);
        // A Host without a port: the port the client connected to, as over AJP.
        let out = forward_headers(&headers(&[("host", "shop.example")]), &client(None));
        assert_eq!(all(&out, "x-forwarded-port"), ["8443"]);
    }

    #[test]
    fn tls_facts_travel_in_sslvalve_headers() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIBaaaa\nbbbb==\n-----END CERTIFICATE-----\n".to_string();
        let tls = TlsFacts {
            cipher: "TLS_AES_256_GCM_SHA384",
            protocol: "TLSv1.3",
            key_size: 256,
            client_cert_pem: Some(pem),
        };
        let out = forward_headers(&headers(&[("host", "h")]), &client(Some(tls)));
        assert_eq!(all(&out, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&out, "ssl_cipher"), ["TLS_AES_256_GCM_SHA384"]);
        assert_eq!(all(&out, "ssl_cipher_usekeysize"), ["256"]);
        assert_eq!(
            all(&out, "ssl_client_cert"),
            ["-----BEGIN CERTIFICATE----- MIIBaaaa bbbb== -----END CERTIFICATE-----"],
            "one line; SSLValve cuts the 27- and 25-character markers off and turns spaces into newlines"
        );
    }

    #[test]
    fn host_ports() {
        assert_eq!(host_port("a.example:8080"), Some(8080));
        assert_eq!(host_port("a.example"), None);
        assert_eq!(host_port("[::1]:9000"), Some(9000));
        assert_eq!(host_port("[::1]"), None);
        assert_eq!(host_port("a.example:"), None);
        assert_eq!(host_port("a.example:99999"), None);
    }
}

/// The HTTP exchange against fake members on loopback: keep-alive reuse,
/// the no-duplicate rule, failover before the request is written, and
/// malformed answers turned into 502s.
#[cfg(test)]
mod exchange_tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::balancer::proxy::reuse_tests::{SLOW_GRACE_IN_TESTS, request_once, start_balancer_with};
    use crate::balancer::state::Backend;

    /// Reads one request head (up to the blank line); `None` at EOF.
    async fn read_head(conn: &mut TcpStream, buffered: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(end) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffered[..end + 4]).into_owned();
                buffered.drain(..end + 4);
                return Some(head);
            }
            let mut buf = [0u8; 4096];
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buffered.extend_from_slice(&buf[..n]),
            }
        }
    }

    const PROBE_ANSWER: &[u8] =
        b"HTTP/1.1 200 OK\r\nAllow: GET, HEAD, POST, PUT, DELETE, OPTIONS\r\nContent-Length: 0\r\n\r\n";

    /// A member that answers `OPTIONS *` like Tomcat and every other
    /// request with `answer` (bodiless requests only); it counts accepted
    /// connections and non-probe requests, closes after `answer` when
    /// `close_after_answer`, and answers nothing at all once `frozen`.
    async fn fake_member(
        listener: TcpListener,
        answer: &'static [u8],
        close_after_answer: bool,
        accepted: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
        frozen: Arc<AtomicBool>,
    ) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            accepted.fetch_add(1, Ordering::SeqCst);
            let requests = requests.clone();
            let frozen = frozen.clone();
            tokio::spawn(async move {
                let mut buffered = Vec::new();
                while let Some(head) = read_head(&mut conn, &mut buffered).await {
                    if frozen.load(Ordering::SeqCst) {
                        // Reads, never answers, keeps the socket open.
                        if !head.starts_with("OPTIONS") {
                            requests.fetch_add(1, Ordering::SeqCst);
                        }
                        continue;
                    }
                    if head.starts_with("OPTIONS * HTTP/1.1\r\n") {
                        let _ = conn.write_all(PROBE_ANSWER).await;
                        continue;
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let _ = conn.write_all(answer).await;
                    if close_after_answer {
                        return;
                    }
                }
            });
        }
    }

    async fn member(answer: &'static [u8], close: bool) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let (accepted, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let never_frozen = Arc::new(AtomicBool::new(false));
        tokio::spawn(fake_member(listener, answer, close, accepted.clone(), requests.clone(), never_frozen));
        (address, accepted, requests)
    }

    /// Pooled connections reused without the `OPTIONS *` probe (it is
    /// covered by its own test), so the tests see hyper's reuse alone.
    const NO_PROBE_ON_REUSE: Duration = Duration::from_secs(60);

    /// A member whose process froze (a JVM being killed keeps its sockets
    /// open, and the kernel keeps accepting, until its heap is unmapped)
    /// while the balancer holds an idle connection to it. With the probe
    /// before every reuse (the default `--cping-after-idle 0s`) the next
    /// sticky request is never written into that connection: the probe
    /// times out, new connections get no answer to their probes either, and
    /// once the member has been slow for the slow grace it is marked failed
    /// and the request fails over. Without the probe it would sit in the
    /// frozen member until the backend timeout.
    #[tokio::test]
    async fn the_probe_before_reuse_keeps_requests_out_of_a_frozen_member() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let frozen_address = listener.local_addr().expect("addr");
        let frozen = Arc::new(AtomicBool::new(false));
        let frozen_requests = Arc::new(AtomicUsize::new(0));
        tokio::spawn(fake_member(
            listener,
            HELLO,
            false,
            Arc::new(AtomicUsize::new(0)),
            frozen_requests.clone(),
            frozen.clone(),
        ));
        let (good_address, _, good_requests) = member(HELLO, false).await;
        let (bal, front, _shutdown) =
            start_balancer_with(&[("frozen", frozen_address), ("good", good_address)], Backend::Http, Duration::ZERO)
                .await;
        let sticky = b"GET /x HTTP/1.1\r\nHost: t\r\nCookie: JSESSIONID=abc.frozen\r\nConnection: close\r\n\r\n";
        let response = request_once(front, sticky).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let members = bal.members.snapshot();
        let frozen_member = members.iter().find(|m| m.route == "frozen").expect("member");
        assert_eq!(frozen_member.http_pool.idle_count(), 1, "an idle connection to reuse");

        frozen.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let response = request_once(front, sticky).await;
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("hello"), "{response}");
        // Probe timeouts of 1 s until the 2 s grace is over (the first one
        // on the reused connection does not count), not the 5 s backend
        // timeout and more.
        let took = started.elapsed();
        assert!(took >= SLOW_GRACE_IN_TESTS && took < Duration::from_millis(4800), "took {took:?}");
        assert_eq!(frozen_requests.load(Ordering::SeqCst), 1, "the frozen member never got the second request");
        assert_eq!(good_requests.load(Ordering::SeqCst), 1, "it failed over");
        assert!(!frozen_member.is_healthy(), "the frozen member is marked failed");
    }

    const HELLO: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Route: m1\r\n\r\nhello";

    #[tokio::test]
    async fn keep_alive_connections_are_reused() {
        let (address, accepted, requests) = member(HELLO, false).await;
        let (bal, front, _shutdown) = start_balancer_with(&[("m1", address)], Backend::Http, NO_PROBE_ON_REUSE).await;
        for round in 0..3 {
            let response = request_once(front, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
            assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("hello"), "round {round}: {response}");
            let member = bal.members.snapshot()[0].clone();
            for _ in 0..100 {
                if member.http_pool.idle_count() == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(member.http_pool.idle_count(), 1, "round {round}: connection back in the pool");
        }
        assert_eq!(requests.load(Ordering::SeqCst), 3);
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "every request reused the first connection");
    }

    #[tokio::test]
    async fn a_member_that_closes_after_answering_is_not_pooled() {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let (address, accepted, _) = member(answer, true).await;
        let (_bal, front, _shutdown) = start_balancer_with(&[("m1", address)], Backend::Http, NO_PROBE_ON_REUSE).await;
        for _ in 0..2 {
            let response = request_once(front, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
            assert!(response.ends_with("hello"), "{response}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a connection the member closes is never reused");
    }

    /// Malformed answers: a 502 for the client, a log line, no panic.
    #[tokio::test]
    async fn malformed_member_answers_are_502s() {
        for answer in [
            &b"SPDY/9 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"\r\n\r\n",
        ] {
            let (address, _, requests) = member(answer, true).await;
            let (bal, front, _shutdown) =
                start_balancer_with(&[("m1", address)], Backend::Http, NO_PROBE_ON_REUSE).await;
            let response = request_once(front, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
            let shown = String::from_utf8_lossy(answer);
            // A bad chunk arrives after a good head, which may or may not
            // have reached the client: either way the client's connection
            // closes without a complete response.
            if shown.contains("chunked") {
                let cut =
                    response.is_empty() || (response.starts_with("HTTP/1.1 200") && !response.ends_with("0\r\n\r\n"));
                assert!(cut, "{shown:?}: {response}");
            } else {
                assert!(response.starts_with("HTTP/1.1 502"), "{shown:?}: {response}");
            }
            assert_eq!(requests.load(Ordering::SeqCst), 1, "{shown:?}: sent once, never again");
            assert!(bal.members.snapshot()[0].is_healthy(), "a bad answer is no dead member");
        }
    }

    /// A body shorter than its `Content-Length`: the client's response is
    /// cut off (its connection closed), never padded or passed as complete.
    #[tokio::test]
    async fn a_truncated_body_cuts_the_clients_response() {
        let (address, _, _) = member(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", true).await;
        let (_bal, front, _shutdown) = start_balancer_with(&[("m1", address)], Backend::Http, NO_PROBE_ON_REUSE).await;
        let response = request_once(front, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("content-length: 100") && response.ends_with("short"), "{response}");
    }

    /// Once a request reached the member, a failure is a 502: never a replay,
    /// not even of a GET.
    #[tokio::test]
    async fn a_written_request_is_never_sent_again() {
        let (address, _, requests) = member(b"", true).await;
        let (_bal, front, _shutdown) = start_balancer_with(&[("m1", address)], Backend::Http, NO_PROBE_ON_REUSE).await;
        let response = request_once(front, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 502"), "{response}");
        assert_eq!(requests.load(Ordering::SeqCst), 1, "the member got the request once");
    }

    /// A member that accepts connections but never answers the probe (a
    /// dying JVM's listening socket) never gets the request. A request of
    /// its session waits for it during the slow grace and then goes to the
    /// other member, which marks the mute one failed.
    #[tokio::test]
    async fn no_answer_to_the_probe_sends_the_request_elsewhere() {
        let mute = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mute_address = mute.local_addr().expect("addr");
        let mute_requests = Arc::new(AtomicUsize::new(0));
        let counted = mute_requests.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut conn, _)) = mute.accept().await {
                let mut buffered = Vec::new();
                if let Some(head) = read_head(&mut conn, &mut buffered).await
                    && !head.starts_with("OPTIONS")
                {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                held.push(conn);
            }
        });
        let (good_address, _, good_requests) = member(HELLO, false).await;
        let (bal, front, _shutdown) =
            start_balancer_with(&[("mute", mute_address), ("good", good_address)], Backend::Http, NO_PROBE_ON_REUSE)
                .await;
        let request = b"GET /x HTTP/1.1\r\nHost: t\r\nCookie: JSESSIONID=abc.mute\r\nConnection: close\r\n\r\n";
        let started = Instant::now();
        let response = request_once(front, request).await;
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("hello"), "{response}");
        assert!(started.elapsed() >= SLOW_GRACE_IN_TESTS, "it waited for the slow member: {:?}", started.elapsed());
        assert_eq!(mute_requests.load(Ordering::SeqCst), 0, "the mute member never got the request");
        assert_eq!(good_requests.load(Ordering::SeqCst), 1);
        let members = bal.members.snapshot();
        assert!(!members.iter().find(|m| m.route == "mute").expect("mute").is_healthy());
    }

    /// What the member receives: the forwarded facts, the client's framing
    /// (a chunked upload stays chunked, a sized one keeps its length), no
    /// client claims.
    #[tokio::test]
    async fn the_member_sees_the_forwarded_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let heads_tx = heads_tx.clone();
                tokio::spawn(async move {
                    let mut buffered = Vec::new();
                    while let Some(head) = read_head(&mut conn, &mut buffered).await {
                        if head.starts_with("OPTIONS") {
                            let _ = conn.write_all(PROBE_ANSWER).await;
                            continue;
                        }
                        // Enough of the body for the test's small uploads.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let mut buf = [0u8; 4096];
                        let n = conn.try_read(&mut buf).unwrap_or(0);
                        buffered.extend_from_slice(&buf[..n]);
                        let _ = heads_tx.send(format!("{head}{}", String::from_utf8_lossy(&buffered)));
                        buffered.clear();
                        let _ = conn.write_all(HELLO).await;
                    }
                });
            }
        });
        let (_bal, front, _shutdown) = start_balancer_with(&[("m1", address)], Backend::Http, NO_PROBE_ON_REUSE).await;
        let request = b"POST /a/b?c=d HTTP/1.1\r\nHost: shop.test:8080\r\nX-Forwarded-For: 6.6.6.6\r\nSSL_CLIENT_CERT: forged\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let response = request_once(front, request).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let seen = heads.recv().await.expect("the member's view").to_ascii_lowercase();
        assert!(seen.starts_with("post /a/b?c=d http/1.1\r\n"), "{seen}");
        for line in [
            "host: shop.test:8080",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-port: 8080",
            "content-length: 5",
        ] {
            assert!(seen.contains(&format!("\r\n{line}\r\n")), "{line} missing: {seen}");
        }
        assert!(!seen.contains("6.6.6.6") && !seen.contains("forged") && !seen.contains("connection: close"), "{seen}");
        assert!(seen.ends_with("\r\n\r\nhello"), "{seen}");

        let chunked = b"PUT /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let response = request_once(front, chunked).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let seen = heads.recv().await.expect("the member's view").to_ascii_lowercase();
        assert!(seen.contains("\r\ntransfer-encoding: chunked\r\n") && !seen.contains("content-length"), "{seen}");
        assert!(seen.ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{seen}");
    }
}
