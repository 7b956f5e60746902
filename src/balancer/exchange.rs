//! One client request's trip to a member, as an explicit state machine.
//!
//! `Phase` says where an `Exchange` is, and `Phase::advance` is the
//! only code that moves it, checking (in debug builds) that the move is one
//! of these:
//!
//! ```text
//! Choose      → Checkout
//! Checkout    → SendRequest (idle connection) | CPing (new connection) | Choose (retry)
//! CPing       → SendRequest | Choose (retry)
//! SendRequest → ReadHead | Choose (retry)
//! ReadHead    → StreamBody
//! StreamBody  → Done
//! every phase before Done → Failed
//! ```
//!
//! * `Choose`: the router picks a member, avoiding those this request
//!   already failed on (`tried`).
//! * `Checkout`: a connection from the member's pool — an idle one that
//!   passed the pool's checks, or a new one.
//! * `CPing`: a new connection must answer a CPing: a killed Tomcat's
//!   listening socket can still complete handshakes in the kernel until the
//!   dying process's files are closed, and only a CPong proves a live container.
//! * `SendRequest`: `FORWARD_REQUEST`, plus the first body packet when the
//!   length is known and non-zero (Tomcat expects it right away), in one write.
//!   On a connection reused without a CPing, the phase lasts until the
//!   first reply, or the CPing timeout, says whether the member can have
//!   read the request (`FirstReply`).
//! * `ReadHead`: up to `SEND_HEADERS`; `StreamBody`: `SEND_BODY_CHUNK`s up
//!   to `END_RESPONSE`. The container asks for more of the request body with
//!   `GET_BODY_CHUNK` whenever it wants, before or after its head, so both
//!   phases answer it.
//! * `Done`: `END_RESPONSE` was read (the connection went back to the pool
//!   if the container allowed it), or the whole body arrived and only the
//!   connection was given up. `Failed`: the exchange broke; its connection
//!   is dropped and the client gets an error or a cut body.
//!
//! Retry rule: a request goes out again (to another connection or member)
//! only while the member cannot have processed any of it: the connect
//! failed, a new connection gave no CPong, the write of the first packets
//! failed (Tomcat acts on complete packets only), or the member reset an
//! unprobed connection with a bodiless request still unread in its socket.
//! The kind travels on the `Retry` error and `Exchange::send_request` is
//! the one place that acts on it. Otherwise, once the request is written, a
//! failure is a 502 or 504, never a replay.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::ajp::{self, ContainerPacket, ForwardRequest, from_container};
use super::body::{BodyError, ProxyBody};
use super::member::{Failure, Member, MemberSnapshot};
use super::metrics::BackendErrorKind;
use super::moves::{FirstMove, Turn};
use super::pool::{AcquireError, ConnError, FirstReply, Lease};
use super::proxy::Rejection;
use super::routing::{Choice, NoMember, Router, SessionKey, SessionWeigher, member_key, unix_now_ms};
use super::state::Balancer;

/// Write failures one request survives; the next one is a 502. Connect and
/// CPing failures need no cap of their own: each puts its member on the
/// tried list, so they end when the members do. A write failure on a reused
/// connection does not (the member is fine, its idle connection was stale),
/// but it empties the member's pool, so the retry writes on a new,
/// CPong-checked connection; when a write fails even there (that member
/// goes on the tried list), the next member gets one more chance. A third
/// failure points at something no other connection fixes, and more tries
/// would only hold the client longer before the same 502.
pub(super) const MAX_WRITE_RETRIES: u32 = 2;

/// The most attempts of one request that stay with a slow member (see
/// [`Attempts::after_no_connection`]): 40 connect timeouts of the default
/// 300 ms outlast the default 5 s slow grace, which normally ends them.
pub(super) const MAX_ATTEMPTS_ON_A_SLOW_MEMBER: u32 = 40;

/// Where an exchange is; see the module documentation for the moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Choose,
    Checkout,
    CPing,
    SendRequest,
    ReadHead,
    StreamBody,
    Done,
    Failed,
}

impl Phase {
    pub(super) fn may_become(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Choose, Checkout)
                | (Checkout, CPing | SendRequest | Choose)
                | (CPing, SendRequest | Choose)
                | (SendRequest, ReadHead | Choose)
                | (ReadHead, StreamBody)
                | (StreamBody, Done)
                | (Choose | Checkout | CPing | SendRequest | ReadHead | StreamBody, Failed)
        )
    }

    /// The one place where an exchange changes phase.
    pub(super) fn advance(&mut self, next: Phase) {
        debug_assert!(self.may_become(next), "exchange moved from {self:?} to {next:?}");
        *self = next;
    }
}

/// Why an attempt may be repeated: the member cannot have seen the request.
#[derive(Debug)]
pub(super) enum Retry {
    /// No connection: refused, unreachable or timed out.
    Connect(AcquireError),
    /// A new connection gave no CPong (AJP) or no answer to the health
    /// request (HTTP).
    CPing(ConnError),
    /// Writing the request failed, so Tomcat never got a complete packet
    /// (AJP); hyper handed the request back unwritten (HTTP). Also a
    /// bodiless AJP request on a connection reused without a probe that the
    /// member reset before reading it ([`FirstReply::Reset`]).
    Write { reused: bool, error: ConnError },
    /// The request was going to its session's terminating member, whose
    /// drain deadline passed while the attempt waited for a connection: it
    /// must not go there any more, and goes elsewhere once the handoff pause
    /// is over (see [`DRAIN_HANDOFF_PAUSE`](super::member::DRAIN_HANDOFF_PAUSE)).
    Handoff,
}

/// How one attempt on a member ended, when it did not put the request on the wire.
pub(super) enum AttemptError {
    Retry(Retry),
    Final(Rejection),
}

/// What went wrong once the request is written: the member's side or the client's.
enum ExchangeError {
    Backend(ConnError),
    Client(Rejection),
}

impl From<ConnError> for ExchangeError {
    fn from(e: ConnError) -> Self {
        ExchangeError::Backend(e)
    }
}

/// What routing knows of a request, for its first choice and every retry;
/// the same for both backend protocols.
pub(super) struct Target<'r> {
    /// The member table as the request found it; retries choose from it too.
    pub members: MemberSnapshot,
    pub session: Option<SessionKey<'r>>,
    /// One wall-clock read per request, for the rebalancing schedule and the
    /// session estimate alike.
    pub now_ms: u64,
    /// The router's choice from `members` at `now_ms`, made once: the
    /// proxy reads from it whether the session moves, the first attempt
    /// goes there.
    pub first_choice: Result<(Arc<Member>, Choice), NoMember>,
    /// The turn of this moving session's first request, when the proxy
    /// took it (see [`super::moves`]); the request's [`Attempts`] take it
    /// over, and a retry that moves the session needs no other.
    pub move_turn: Option<FirstMove>,
}

impl<'r> Target<'r> {
    pub(super) fn new(router: &Router, members: MemberSnapshot, session: Option<SessionKey<'r>>) -> Self {
        let now_ms = unix_now_ms();
        let first_choice = router.choose_at(&members, session, &[], now_ms);
        Target { members, session, now_ms, first_choice, move_turn: None }
    }

    /// Whether the first attempt leaves the session's member (a failover or
    /// a rebalancing move).
    pub(super) fn moves_session(&self) -> bool {
        matches!(self.first_choice, Ok((_, Choice::Failover | Choice::Rebalanced)))
    }

    /// How long the session's member has been unhealthy, when it is.
    pub(super) fn unhealthy_for(&self, session: SessionKey<'_>) -> Option<Duration> {
        self.members.iter().find(|m| *m.route == *session.route).and_then(|m| m.unhealthy_for())
    }

    /// The member table and clock of now, after the request waited.
    pub(super) fn refresh(&mut self, router: &Router, members: MemberSnapshot) {
        *self = Target::new(router, members, self.session);
    }

    /// Waits out the handoff pause of the session's member when it is
    /// terminating and its drain deadline has just passed, so the request
    /// fails over only once every request sent to the member before the
    /// deadline has had time to reach it (see [`DRAIN_HANDOFF_PAUSE`](super::member::DRAIN_HANDOFF_PAUSE)).
    pub(super) async fn await_handoff(&mut self, router: &Router) {
        let Some(session) = self.session.filter(|_| router.failover) else { return };
        let Some(member) = self.members.iter().find(|m| m.route == session.route) else { return };
        if let Some(pause) = member.handoff_pause(Instant::now()) {
            tracing::debug!(route = %member.route, ?pause, "request waits for its session's handoff");
            tokio::time::sleep(pause).await;
            let members = self.members.clone();
            self.refresh(router, members);
        }
    }
}

/// The request as every attempt sends it, borrowed from the client's request.
pub(super) struct Outgoing<'r> {
    /// `FORWARD_REQUEST` without its route, which each attempt fills in.
    pub forward: ForwardRequest<'r>,
    pub target: Target<'r>,
}

/// A request's way through its attempts, whatever the backend protocol:
/// the phase, the member of the current attempt, the members it failed on
/// before they saw it, and whether a failover happened on the way. The
/// retry rule lives in [`Attempts::retry`], the one place both exchanges
/// act on a [`Retry`].
pub(super) struct Attempts {
    pub(super) phase: Phase,
    /// The member of the current attempt; once the request is written, the one answering it.
    pub(super) member: Arc<Member>,
    /// Some choice on the way was a failover of the request's session.
    pub(super) failed_over: bool,
    /// Members this request failed on before they saw it, by `member_key`.
    tried: Vec<usize>,
    write_failures: u32,
    /// Attempts that found the member slow and stayed with it.
    slow_attempts: u32,
    /// The member was chosen as the session's own while it was terminating
    /// and still took it: the request must not be written there once its
    /// drain deadline has passed ([`Attempts::drained_since_chosen`]).
    sticky_to_terminating: bool,
    /// The turn of the session's first request on its new member, taken
    /// by the proxy or by a retry that moved the session off its member
    /// (see [`super::moves`]); given up when the request ends.
    move_turn: Option<FirstMove>,
}

impl Attempts {
    /// Chooses the first member; the request is then in `Checkout`.
    /// Takes over the move turn the target holds.
    pub(super) fn first(bal: &Balancer, target: &mut Target<'_>) -> Result<Self, Rejection> {
        let chosen = target.first_choice.clone().map_err(Rejection::NoMember)?;
        let (member, choice) = count_choice(bal, target, chosen, true)?;
        let mut attempts = Attempts {
            phase: Phase::Choose,
            sticky_to_terminating: sticky_to_terminating(&member, choice),
            member,
            failed_over: choice == Choice::Failover,
            tried: Vec::new(),
            write_failures: 0,
            slow_attempts: 0,
            move_turn: target.move_turn.take(),
        };
        attempts.phase.advance(Phase::Checkout);
        Ok(attempts)
    }

    /// The member answered with a response head: a session this request
    /// moved is adopted there, and its waiting requests go.
    pub(super) fn head_received(&mut self) {
        if let Some(turn) = self.move_turn.take() {
            turn.adopted(&self.member.route);
        }
    }

    /// After the current member gave no usable connection: whether the next
    /// attempt may go to it again. A request of a session stays with a
    /// member that is only slow (a timeout, and still healthy: within its
    /// grace): choosing another one would move the session while the
    /// member may still answer another balancer replica, which then sends
    /// the session's parallel requests there — the session would split.
    /// Each such attempt costs a connect or probe timeout, and the grace
    /// ends them; [`MAX_ATTEMPTS_ON_A_SLOW_MEMBER`] is the cap should the
    /// grace be set longer than those attempts take.
    fn after_no_connection(&mut self, target: &Target<'_>, failure: Failure) {
        let stays = failure == Failure::Slow
            && target.session.is_some()
            && self.member.takes_sticky()
            && self.slow_attempts < MAX_ATTEMPTS_ON_A_SLOW_MEMBER;
        if stays {
            self.slow_attempts += 1;
        } else {
            self.tried.push(member_key(&self.member));
        }
    }

    /// The request's connection is ready, but its member's drain deadline
    /// passed since it was chosen as the session's own (the attempt waited
    /// for a pool slot or a connect): writing it now could reach the member
    /// after another replica failed the session over. Checked by both
    /// exchanges right before the write.
    pub(super) fn drained_since_chosen(&self) -> bool {
        self.sticky_to_terminating && self.member.drain_expired_at(Instant::now())
    }

    /// Acts on why an attempt may be repeated and chooses the member of the
    /// next one (`Checkout` again), or gives the final answer (`Failed`).
    pub(super) async fn retry(&mut self, bal: &Balancer, target: &Target<'_>, retry: Retry) -> Result<(), Rejection> {
        let member = &self.member;
        match retry {
            Retry::Handoff => {
                if let Some(pause) = member.handoff_pause(Instant::now()) {
                    tokio::time::sleep(pause).await;
                }
            }
            Retry::Connect(error) => {
                member.metrics.count_error(BackendErrorKind::Connect);
                let failure = error.failure();
                bal.note_failure(member, failure, &error);
                self.after_no_connection(target, failure);
            }
            Retry::CPing(error) => {
                // Counted and acted on like a failed connect: the member is not there.
                member.metrics.count_error(BackendErrorKind::Connect);
                let failure = error.failure();
                bal.note_failure(member, failure, &format_args!("no answer to the probe of a new connection: {error}"));
                self.after_no_connection(target, failure);
            }
            Retry::Write { reused, error } => {
                self.write_failures += 1;
                member.pool.clear();
                member.http_pool.clear();
                tracing::debug!(route = %member.route, reused, %error, "request write failed, retrying");
                if self.write_failures > MAX_WRITE_RETRIES {
                    member.metrics.count_error(BackendErrorKind::Io);
                    let route = member.route.clone();
                    self.phase.advance(Phase::Failed);
                    return Err(Rejection::BadGateway { route, error });
                }
                // A fresh connection failing says the member is in trouble; a stale idle one does not.
                if !reused {
                    self.tried.push(member_key(member));
                }
            }
        }
        self.phase.advance(Phase::Choose);
        let choose_now = |tried: &[usize]| bal.router.choose_at(&target.members, target.session, tried, target.now_ms);
        let mut chosen = choose_now(&self.tried);
        if let (Ok((_, Choice::Failover | Choice::Rebalanced)), Some(session)) = (&chosen, target.session)
            && self.move_turn.is_none()
        {
            // This request set out for the session's own member and now
            // moves the session: it waits for, or takes, the session's
            // first-request turn like a request that chose the move at once.
            // Its head is written already: a session renamed meanwhile is
            // asked for by its old id.
            self.move_turn =
                match bal.moves.turn(session, target.unhealthy_for(session), bal.settings.backend_timeout).await {
                    Turn::First(turn) => Some(turn),
                    Turn::Go | Turn::Renamed(_) => None,
                };
            // Members may have failed while it waited; the snapshot is the same.
            chosen = choose_now(&self.tried);
        }
        let chosen =
            chosen.map_err(Rejection::NoMember).and_then(|c| count_choice(bal, target, c, self.tried.is_empty()));
        match chosen {
            Ok((member, choice)) => {
                self.sticky_to_terminating = sticky_to_terminating(&member, choice);
                self.member = member;
                self.failed_over |= choice == Choice::Failover;
                self.phase.advance(Phase::Checkout);
                Ok(())
            }
            Err(rejection) => {
                self.phase.advance(Phase::Failed);
                Err(rejection)
            }
        }
    }
}

/// The client's request body, handed out in AJP-sized pieces.
pub(super) struct RequestBody {
    incoming: Option<Incoming>,
    leftover: Bytes,
    received: u64,
    limit: Option<u64>,
}

impl RequestBody {
    pub(super) fn new(incoming: Incoming, limit: Option<u64>) -> Self {
        RequestBody { incoming: Some(incoming), leftover: Bytes::new(), received: 0, limit }
    }

    pub(super) async fn next_piece(&mut self, max: usize) -> Result<Option<Bytes>, Rejection> {
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
pub(super) struct InFlight(Arc<Member>);

impl InFlight {
    pub(super) fn new(member: Arc<Member>) -> Self {
        member.metrics.in_flight.inc();
        InFlight(member)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}

/// One packet of the response body phase.
enum BodyPacket {
    Data(Bytes),
    /// An empty `SEND_BODY_CHUNK`: Tomcat's explicit flush.
    Flush,
    End,
    GetBody(usize),
}

/// A client request's trip to a member, from choosing the member to
/// returning (or dropping) the connection.
pub(super) struct Exchange {
    bal: Arc<Balancer>,
    /// Phase, member and retry state.
    at: Attempts,
    /// The connection, from `Checkout` until it is released or dropped.
    lease: Option<Lease>,
    body: RequestBody,
    /// The body piece sent with `FORWARD_REQUEST`, kept until it is written for a retry.
    first_piece: Option<Bytes>,
    /// Counts the request on its member once it is written.
    _in_flight: Option<InFlight>,
    /// Response body bytes still to come, when the head gave a `Content-Length`.
    body_left: Option<u64>,
    /// Why the written request is answered without waiting for the member
    /// ([`FirstReply::Unacknowledged`]); reported by the head's read.
    given_up: Option<ConnError>,
}

impl Exchange {
    /// Chooses the first member; the exchange is then in `Checkout`.
    pub(super) fn start(
        bal: &Arc<Balancer>,
        out: &mut Outgoing<'_>,
        body: RequestBody,
        first_piece: Option<Bytes>,
    ) -> Result<Self, Rejection> {
        Ok(Exchange {
            bal: bal.clone(),
            at: Attempts::first(bal, &mut out.target)?,
            lease: None,
            body,
            first_piece,
            _in_flight: None,
            body_left: None,
            given_up: None,
        })
    }

    /// The member answering the request (once it is written).
    pub(super) fn member(&self) -> &Arc<Member> {
        &self.at.member
    }

    pub(super) fn failed_over(&self) -> bool {
        self.at.failed_over
    }

    /// Takes the exchange from `Checkout` to `ReadHead`; the one place where
    /// a request is retried, by the kind its failure carries.
    pub(super) async fn send_request(&mut self, out: &Outgoing<'_>) -> Result<(), Rejection> {
        loop {
            match self.attempt(out).await {
                Ok(()) => return Ok(()),
                Err(AttemptError::Final(rejection)) => {
                    self.at.phase.advance(Phase::Failed);
                    return Err(rejection);
                }
                Err(AttemptError::Retry(retry)) => self.at.retry(&self.bal, &out.target, retry).await?,
            }
        }
    }

    /// One attempt on the chosen member: `Checkout`, `CPing` for a new
    /// connection, `SendRequest`, and `ReadHead` once the request is written.
    async fn attempt(&mut self, out: &Outgoing<'_>) -> Result<(), AttemptError> {
        let settings = &self.bal.pool_settings;
        let mut lease = match self.at.member.pool.acquire(self.at.member.address, settings).await {
            Ok(lease) => lease,
            Err(AcquireError::SlotTimeout(_)) => {
                return Err(AttemptError::Final(Rejection::PoolExhausted(self.at.member.route.clone())));
            }
            Err(error) => return Err(AttemptError::Retry(Retry::Connect(error))),
        };
        if !lease.reused {
            self.at.phase.advance(Phase::CPing);
            if let Err(error) = lease.conn.cping(settings.cping_timeout).await {
                return Err(AttemptError::Retry(Retry::CPing(error)));
            }
        }
        if self.at.drained_since_chosen() {
            self.at.member.pool.release(lease);
            return Err(AttemptError::Retry(Retry::Handoff));
        }
        self.at.phase.advance(Phase::SendRequest);
        let forward = ForwardRequest { route: Some(&self.at.member.route), ..out.forward };
        lease.conn.write_buf.clear();
        let packet_size = self.bal.settings.packet_size;
        if let Err(e) = ajp::encode_forward_request(&mut lease.conn.write_buf, &forward, packet_size) {
            lease.conn.write_buf.clear();
            self.at.member.pool.release(lease);
            return Err(AttemptError::Final(Rejection::HeadTooLarge(e)));
        }
        if let Some(piece) = &self.first_piece {
            ajp::encode_body_chunk(&mut lease.conn.write_buf, piece);
        }
        let written = lease.conn.write_buf.len();
        if let Err(error) = lease.conn.send().await {
            return Err(AttemptError::Retry(Retry::Write { reused: lease.reused, error: ConnError::Io(error) }));
        }
        if lease.unprobed {
            // No CPong vouches for this connection: watch the request's
            // first moments instead of sending a CPing before it.
            match lease.conn.await_first_reply(settings.cping_timeout, written).await {
                FirstReply::Arrived | FirstReply::Acknowledged => {}
                FirstReply::Unacknowledged => {
                    // The host may have the request (only the acknowledgement
                    // lost): it is not sent again, but answered 504 now
                    // rather than after the backend timeout.
                    lease.conn.reset_on_close();
                    let error = ConnError::Unacknowledged(settings.cping_timeout);
                    // Its other idle connections lead to the same host.
                    self.at.member.pool.clear();
                    self.bal.note_failure(&self.at.member, error.failure(), &error);
                    self.given_up = Some(error);
                }
                // Nothing after the request that the member could have
                // been reading when it reset: it never read the request.
                FirstReply::Reset if self.first_piece.is_none() => {
                    let error = io::Error::new(io::ErrorKind::ConnectionReset, "reset before the request was read");
                    return Err(AttemptError::Retry(Retry::Write { reused: true, error: ConnError::Io(error) }));
                }
                // It may have read the request and not the body after it:
                // the read reports the reset, and the request gets a 502.
                FirstReply::Reset => {}
            }
        }
        // Written: no retry will need the piece again.
        if let Some(piece) = self.first_piece.take() {
            self.at.member.traffic_bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        self.lease = Some(lease);
        self._in_flight = Some(InFlight::new(self.at.member.clone()));
        self.at.phase.advance(Phase::ReadHead);
        Ok(())
    }

    /// Reads up to `SEND_HEADERS` and decodes it into a response with an
    /// empty body: `ReadHead` → `StreamBody`.
    pub(super) async fn read_response_head(&mut self) -> Result<Response<ProxyBody>, Rejection> {
        let head = match self.read_head().await {
            Ok(head) => head,
            Err(ExchangeError::Client(rejection)) => {
                self.abandon();
                return Err(rejection);
            }
            Err(ExchangeError::Backend(error)) => {
                self.fail(&error);
                self.at.member.metrics.count_response(502);
                return Err(match error {
                    ConnError::Timeout | ConnError::Unacknowledged(_) => {
                        Rejection::GatewayTimeout(self.at.member.route.clone())
                    }
                    error => Rejection::BadGateway { route: self.at.member.route.clone(), error },
                });
            }
        };
        let mut response = Response::new(ProxyBody::Empty);
        match ajp::decode_send_headers(&head, response.headers_mut()) {
            Ok(status) => *response.status_mut() = status,
            Err(e) => {
                let error = ConnError::Protocol(e);
                self.fail(&error);
                self.at.member.metrics.count_response(502);
                return Err(Rejection::BadGateway { route: self.at.member.route.clone(), error });
            }
        }
        self.at.phase.advance(Phase::StreamBody);
        self.at.head_received();
        Ok(response)
    }

    /// The response body from the rest of the exchange. A bodiless response
    /// (`bodiless`: HEAD, 1xx, 204, 304) is read on to `END_RESPONSE`, so the
    /// connection goes back to the pool, and gets an empty body.
    /// `content_length` is the response's own, when it has one.
    pub(super) async fn into_body(mut self, bodiless: bool, content_length: Option<u64>) -> ProxyBody {
        if bodiless {
            // Tomcat swallows the body.
            loop {
                match self.next_body_bytes().await {
                    Ok(None) => break,
                    Ok(Some(_)) => continue,
                    Err(ExchangeError::Backend(e)) => {
                        self.fail(&e);
                        break;
                    }
                    Err(ExchangeError::Client(_)) => break,
                }
            }
            return ProxyBody::Empty;
        }
        self.body_left = content_length;
        // Small responses usually arrive whole with the head: hand them over as
        // a complete body, with the connection already back in the pool.
        let mut ready: VecDeque<Bytes> = VecDeque::new();
        let mut broken = None;
        while self.at.phase == Phase::StreamBody {
            match self.buffered_body_packet(|kind| {
                kind == from_container::SEND_BODY_CHUNK || kind == from_container::END_RESPONSE
            }) {
                Ok(Some(BodyPacket::Data(bytes))) => ready.push_back(bytes),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(error) => {
                    self.fail(&error);
                    broken = Some(error);
                    break;
                }
            }
        }
        if let Some(error) = broken {
            tracing::warn!(route = %self.at.member.route, %error, "member failed mid-response; aborting client connection");
            let failed = futures::stream::iter(ready.into_iter().map(Ok))
                .chain(futures::stream::once(async move { Err(BodyError(error.to_string())) }));
            return ProxyBody::Stream(Box::pin(failed));
        }
        if self.at.phase == Phase::StreamBody && !ready.is_empty() {
            self.finish_early().await;
        }
        if self.at.phase == Phase::Done {
            ProxyBody::Chunks(ready)
        } else if ready.is_empty() {
            ProxyBody::Stream(Box::pin(response_stream(self)))
        } else {
            ProxyBody::Stream(Box::pin(futures::stream::iter(ready.into_iter().map(Ok)).chain(response_stream(self))))
        }
    }

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
        self.at.member.traffic_bytes.fetch_add(sent as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads up to the response head.
    async fn read_head(&mut self) -> Result<Bytes, ExchangeError> {
        if let Some(error) = self.given_up.take() {
            return Err(error.into());
        }
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

    /// The next response body bytes; `None` once the exchange is done.
    async fn next_body_bytes(&mut self) -> Result<Option<Bytes>, ExchangeError> {
        if self.at.phase == Phase::Done {
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
                self.at.member.traffic_bytes.fetch_add(len as u64, Ordering::Relaxed);
                if let Some(left) = self.body_left.as_mut() {
                    *left = left.saturating_sub(len as u64);
                }
                Ok(BodyPacket::Data(payload.slice(offset..offset + len)))
            }
            ContainerPacket::GetBodyChunk { requested } => Ok(BodyPacket::GetBody(requested)),
            ContainerPacket::EndResponse { reuse } => {
                if let Some(lease) = self.lease.take()
                    && reuse
                {
                    self.at.member.pool.release(lease);
                }
                self.at.phase.advance(Phase::Done);
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
        if self.at.phase != Phase::StreamBody {
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
        tracing::debug!(route = %self.at.member.route, %error, "member failed after the response body; dropping the connection");
        self.drop_connection(error);
        self.at.phase.advance(Phase::Done);
    }

    /// The member broke the exchange.
    fn fail(&mut self, error: &ConnError) {
        self.drop_connection(error);
        self.at.phase.advance(Phase::Failed);
    }

    /// The client broke the exchange (its body failed or was too large):
    /// the member is not to blame, but the connection is mid-request.
    fn abandon(&mut self) {
        self.lease = None;
        self.at.phase.advance(Phase::Failed);
    }

    fn drop_connection(&mut self, error: &ConnError) {
        self.lease = None;
        self.at.member.metrics.count_error(error.kind());
    }
}

/// A choice of the session's own member while it drains towards a deadline.
fn sticky_to_terminating(member: &Member, choice: Choice) -> bool {
    matches!(choice, Choice::Sticky | Choice::MoveDeferred) && member.is_terminating() && member.takes_sticky()
}

/// Counts what a choice means: a rebalancing move always; the session's
/// visit and a failover only for a request's `first` choice.
fn count_choice(
    bal: &Balancer,
    out: &Target<'_>,
    (member, choice): (Arc<Member>, Choice),
    first: bool,
) -> Result<(Arc<Member>, Choice), Rejection> {
    match choice {
        Choice::Rebalanced => {
            bal.metrics.sessions_moved.inc();
        }
        Choice::MoveDeferred if first => {
            bal.metrics.moves_deferred.inc();
        }
        _ => {}
    }
    // A retry is the same request: its session was counted and its failover logged the first time.
    if first {
        if let Some(session) = out.session {
            member.sessions.record(SessionWeigher::new(session.base).sketch_hash(), out.now_ms);
        }
        if choice == Choice::Failover {
            bal.metrics.failovers.inc();
            if let Some(held_back) = bal.failover_log.allow() {
                tracing::info!(from = out.session.map_or("", |s| s.route), to = %member.route, more_since_last_line = held_back, "sticky member unusable, failing over");
            }
        }
    }
    Ok((member, choice))
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
                tracing::warn!(route = %exchange.at.member.route, %error, "member failed mid-response; aborting client connection");
                Some((Err(BodyError(error.to_string())), None))
            }
            Err(ExchangeError::Client(rejection)) => {
                exchange.abandon();
                tracing::info!(error = %rejection, "client body failed mid-exchange");
                Some((Err(BodyError(rejection.to_string())), None))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_move_only_forward_or_back_to_choose() {
        use Phase::*;
        let all = [Choose, Checkout, CPing, SendRequest, ReadHead, StreamBody, Done, Failed];
        // The happy paths, for a reused and a new connection.
        for path in [
            &[Choose, Checkout, SendRequest, ReadHead, StreamBody, Done][..],
            &[Choose, Checkout, CPing, SendRequest, ReadHead, StreamBody, Done][..],
        ] {
            for step in path.windows(2) {
                assert!(step[0].may_become(step[1]), "{:?} -> {:?}", step[0], step[1]);
            }
        }
        // Only the phases before the request is written lead back to Choose.
        for from in all {
            assert_eq!(from.may_become(Choose), matches!(from, Checkout | CPing | SendRequest), "{from:?}");
        }
        // Done and Failed are final; everything else can fail.
        for to in all {
            assert!(!Done.may_become(to) && !Failed.may_become(to), "{to:?}");
        }
        for from in all {
            assert_eq!(from.may_become(Failed), !matches!(from, Done | Failed), "{from:?}");
        }
    }
}
