//! Persistent backend connections, pooled per member: AJP connections
//! ([`AjpConnection`], this module) or HTTP/1.1 keep-alive connections
//! (`super::http_backend::HttpConnection`). The pool itself — slots, the
//! idle list, most-recently-used first — is the same for both; what makes a
//! connection fit for reuse is each kind's own ([`PooledConnection`]).
//!
//! An AJP connection goes back to the pool only after `END_RESPONSE` with
//! reuse = 1. Before reuse it is checked: a peer that closed it (Tomcat
//! restarted, node killed) fails the CPing at once; one idle for
//! `cping_after_idle` or longer (default 0: every reuse, httpd's `ping=`)
//! is asked for a CPong, and so is every new connection (by the exchange,
//! before its first request); one reused sooner is checked by a
//! non-blocking read (only as fresh as the reactor's last turn). So a
//! request is never written into a dead connection that could then not be
//! retried: a SIGKILLed JVM closes its sockets only after it has unmapped
//! its heap, and until then writes into them succeed.
//!
//! A request on a connection reused without a CPing is watched instead
//! ([`AjpConnection::await_first_reply`]), with what the kernel knows: a
//! reset before any reply means the request sat unread in the member's
//! socket when it closed, so the exchange sends it again. None of its bytes
//! acknowledged within the CPing timeout means the host or the network to
//! it is gone, but not that the request did not arrive (the acknowledgement
//! may be what was lost): it gets a 504 then, not a second run. A member
//! whose host acknowledged the request is waited for, however late it
//! answers. So a request is never executed twice.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ajp::{self, ContainerPacket, DecodeError, PACKET_HEADER_LEN};
use super::member::Failure;
use super::metrics::BackendErrorKind;

/// A failed exchange on a backend connection. The connection is dropped.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection i/o: {0}")]
    Io(#[from] io::Error),
    #[error("invalid AJP packet: {0}")]
    Protocol(#[from] DecodeError),
    #[error("unexpected {0} packet")]
    Unexpected(&'static str),
    #[error("member closed the connection")]
    Closed,
    #[error("no packet within the timeout")]
    Timeout,
    /// [`FirstReply::Unacknowledged`]: the request may have reached the
    /// member, so it is not sent again.
    #[error(
        "the member's host acknowledged none of the request within {0:?}; it may still have got it, so it is not sent again"
    )]
    Unacknowledged(Duration),
    /// The HTTP backend: hyper refused the member's response (malformed
    /// head, bad framing) or the connection broke.
    #[error("HTTP backend: {0}")]
    Http(#[from] hyper::Error),
    /// The HTTP backend's health probe got an answer that is no success.
    #[error("health probe answered {0}")]
    ProbeStatus(u16),
}

impl ConnError {
    /// The error's kind in the members' error counter.
    pub fn kind(&self) -> BackendErrorKind {
        match self {
            ConnError::Protocol(_) | ConnError::Unexpected(_) | ConnError::ProbeStatus(_) => BackendErrorKind::Protocol,
            // hyper could not parse the member's response: its protocol, not the network.
            ConnError::Http(e) if e.is_parse() || e.is_parse_status() => BackendErrorKind::Protocol,
            ConnError::Timeout | ConnError::Unacknowledged(_) => BackendErrorKind::Timeout,
            ConnError::Http(_) | ConnError::Io(_) | ConnError::Closed => BackendErrorKind::Io,
        }
    }
}

/// What an i/o error of a connect or probe says about the member: a
/// timeout of the system's own is [`Failure::Slow`], anything else (refused,
/// reset, unreachable) [`Failure::Gone`].
fn io_failure(error: &io::Error) -> Failure {
    match error.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Slow,
        _ => Failure::Gone,
    }
}

impl ConnError {
    /// What this error of a new connection's probe (or a health check)
    /// says about the member.
    pub fn failure(&self) -> Failure {
        match self {
            ConnError::Timeout | ConnError::Unacknowledged(_) => Failure::Slow,
            ConnError::Io(e) => io_failure(e),
            ConnError::Http(e) if e.is_timeout() => Failure::Slow,
            ConnError::Protocol(_)
            | ConnError::Unexpected(_)
            | ConnError::Closed
            | ConnError::Http(_)
            | ConnError::ProbeStatus(_) => Failure::Gone,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("no free connection slot within {0:?}")]
    SlotTimeout(Duration),
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
}

impl AcquireError {
    /// What failing to get a connection says about the member.
    pub fn failure(&self) -> Failure {
        match self {
            AcquireError::Connect(e) => io_failure(e),
            AcquireError::ConnectTimeout(_) | AcquireError::SlotTimeout(_) => Failure::Slow,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub packet_size: usize,
    pub connect_timeout: Duration,
    /// How long a member whose connects and probes only time out keeps its
    /// sessions ([`super::member::Member::note_failure`]).
    pub slow_grace: Duration,
    pub cping_after_idle: Duration,
    pub cping_timeout: Duration,
    pub slot_wait: Duration,
}

pub struct AjpConnection {
    stream: TcpStream,
    read_buf: BytesMut,
    /// Outgoing packets are encoded here and written with one call.
    pub write_buf: BytesMut,
    packet_size: usize,
    idle_since: Instant,
}

impl AjpConnection {
    pub async fn connect(address: SocketAddr, settings: &PoolSettings) -> Result<Self, AcquireError> {
        let stream = match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(AcquireError::Connect(e)),
            Err(_) => return Err(AcquireError::ConnectTimeout(settings.connect_timeout)),
        };
        // Packets are small and request/response; Nagle would only add delay.
        stream.set_nodelay(true).map_err(AcquireError::Connect)?;
        Ok(AjpConnection {
            stream,
            read_buf: BytesMut::with_capacity(settings.packet_size),
            write_buf: BytesMut::with_capacity(settings.packet_size),
            packet_size: settings.packet_size,
            idle_since: Instant::now(),
        })
    }

    pub fn packet_size(&self) -> usize {
        self.packet_size
    }

    /// Writes and clears `write_buf`.
    pub async fn send(&mut self) -> io::Result<()> {
        let result = self.stream.write_all(&self.write_buf).await;
        self.write_buf.clear();
        result
    }

    /// Reads one container packet and returns its payload (header stripped).
    pub async fn read_packet(&mut self) -> Result<Bytes, ConnError> {
        self.fill(PACKET_HEADER_LEN).await?;
        let header = [self.read_buf[0], self.read_buf[1], self.read_buf[2], self.read_buf[3]];
        let header = ajp::decode_packet_header(header, self.packet_size)?;
        let total = PACKET_HEADER_LEN + header.payload_len;
        self.fill(total).await?;
        let mut packet = self.read_buf.split_to(total);
        packet.advance(PACKET_HEADER_LEN);
        Ok(packet.freeze())
    }

    /// The next packet when it is already complete in the read buffer and
    /// its type byte passes `wanted`; otherwise `None` and nothing is
    /// consumed. Costs no syscall: it lets the exchange finish a response
    /// whose last packets arrived together with earlier ones.
    pub fn buffered_packet(&mut self, wanted: impl Fn(u8) -> bool) -> Result<Option<Bytes>, ConnError> {
        if self.read_buf.len() <= PACKET_HEADER_LEN {
            return Ok(None);
        }
        let header = [self.read_buf[0], self.read_buf[1], self.read_buf[2], self.read_buf[3]];
        let header = ajp::decode_packet_header(header, self.packet_size)?;
        let total = PACKET_HEADER_LEN + header.payload_len;
        if self.read_buf.len() < total || !wanted(self.read_buf[PACKET_HEADER_LEN]) {
            return Ok(None);
        }
        let mut packet = self.read_buf.split_to(total);
        packet.advance(PACKET_HEADER_LEN);
        Ok(Some(packet.freeze()))
    }

    async fn fill(&mut self, needed: usize) -> Result<(), ConnError> {
        while self.read_buf.len() < needed {
            self.read_buf.reserve(self.packet_size);
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ConnError::Closed);
            }
        }
        Ok(())
    }

    /// CPing → CPong within `timeout`.
    pub async fn cping(&mut self, timeout: Duration) -> Result<(), ConnError> {
        self.write_buf.clear();
        ajp::encode_cping(&mut self.write_buf);
        let exchange = async {
            self.send().await?;
            let payload = self.read_packet().await?;
            match ajp::decode_container_packet(&payload)? {
                ContainerPacket::CPong => Ok(()),
                _ => Err(ConnError::Unexpected("non-CPong reply to CPing")),
            }
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| ConnError::Timeout)?
    }

    /// Bytes written on this connection that the member's kernel has not
    /// acknowledged yet, sent or not (Linux `SIOCOUTQ`).
    pub fn unacknowledged_bytes(&self) -> io::Result<usize> {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one c_int through the
        // pointer, which points at `queued`; the descriptor is this
        // stream's, open for the call.
        let result = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(queued).unwrap_or(0))
    }

    /// Makes dropping this connection a reset (`SO_LINGER` 0): the kernel
    /// stops retransmitting what the member never acknowledged, so a
    /// request given up on cannot still arrive there later.
    pub fn reset_on_close(&self) {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: SO_LINGER reads one `linger` of the size passed; the
        // descriptor is this stream's, open for the call.
        let result = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if result < 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "SO_LINGER 0 refused; the close is a FIN");
        }
    }

    /// Waits up to `within` for the first reply to a request of `written`
    /// bytes just written on a connection reused without a probe, and says
    /// whether the member can have read it ([`FirstReply`]). Consumes
    /// nothing: the exchange then reads the reply as usual. The wait costs
    /// a request nothing when the reply comes sooner; only a member that
    /// stays silent for `within` is asked for more (one ioctl).
    pub async fn await_first_reply(&mut self, within: Duration, written: usize) -> FirstReply {
        if !self.read_buf.is_empty() {
            return FirstReply::Arrived;
        }
        let mut probe = [0u8; 1];
        match tokio::time::timeout(within, self.stream.peek(&mut probe)).await {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => FirstReply::Reset,
            // Bytes, EOF or another error: the read that follows reports it.
            Ok(_) => FirstReply::Arrived,
            Err(_) => match self.unacknowledged_bytes() {
                // Acknowledgements are cumulative: as many bytes outstanding
                // as were written means not one of the request's arrived.
                Ok(outstanding) if outstanding >= written => FirstReply::Unacknowledged,
                Ok(_) => FirstReply::Acknowledged,
                // Cannot tell: wait for the answer, as for an acknowledged one.
                Err(error) => {
                    tracing::debug!(%error, "SIOCOUTQ failed; waiting for the reply");
                    FirstReply::Acknowledged
                }
            },
        }
    }

    /// True when the member closed the connection (or sent something
    /// unsolicited) while it sat idle. Costs one non-blocking syscall.
    fn closed_while_idle(&self) -> bool {
        if !self.read_buf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        // Anything but "nothing to read yet" (data, EOF, an error) means
        // the connection is no longer a clean idle one.
        !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// How an idle connection was found fit for reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The member answered a probe on it just now (CPong, or the HTTP
    /// probe's answer): a live container was there a moment ago.
    Probed,
    /// Only found not closed (a non-blocking read, or hyper's state). The
    /// host may have vanished without closing it; the AJP exchange then
    /// watches the request's first reply ([`AjpConnection::await_first_reply`]).
    Unprobed,
}

/// What the first moments after a request was written on a connection
/// say about whether the member can have read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstReply {
    /// Bytes arrived, or the member closed the connection cleanly (EOF):
    /// the exchange reads on and sees which.
    Arrived,
    /// No reply yet, but the member's kernel acknowledged the request: it
    /// reached the host, which may act on it however late it answers (a
    /// long GC pause), so the exchange waits for the answer.
    Acknowledged,
    /// No reply, and the member's kernel acknowledged none of the
    /// request's bytes within the wait: the host vanished, or the network
    /// to it, without closing the connection. Whether the request reached
    /// it is unknown — a cut network drops the acknowledgement of a
    /// request that arrived (Linux delays it, to send it with the reply) —
    /// so the request is not sent again; it is answered 504 at once
    /// instead of after the backend timeout.
    Unacknowledged,
    /// The member's kernel reset the connection before any reply. A reset
    /// at close means the socket still held bytes nobody read: those of
    /// this request, the only ones sent since the last complete exchange
    /// (the JVM died, or closed the idle connection, before reading it).
    Reset,
}

/// What the pool needs of a connection kind.
pub trait PooledConnection: Send + Sized + 'static {
    /// When the connection last went idle.
    fn idle_since(&self) -> Instant;
    fn set_idle_since(&mut self, at: Instant);
    /// A new connection (not yet proven alive: the exchange probes it).
    fn connect(address: SocketAddr, settings: &PoolSettings)
    -> impl Future<Output = Result<Self, AcquireError>> + Send;
    /// Checks an idle connection before it is handed out again: how, or
    /// (an error) why it is dropped instead.
    fn check_before_reuse(&mut self, settings: &PoolSettings) -> impl Future<Output = Result<Checked, String>> + Send;
    /// Whether a connection the exchange hands back is in step for another
    /// request (checked again on the way out of the pool).
    fn fit_for_pool(&self) -> bool;
    /// The cheapest exchange that proves a live container on the other
    /// end, within `timeout`: CPing/CPong, or HTTP's `OPTIONS *`.
    fn health_probe(&mut self, timeout: Duration) -> impl Future<Output = Result<(), ConnError>> + Send;
}

impl PooledConnection for AjpConnection {
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
        AjpConnection::connect(address, settings)
    }

    async fn check_before_reuse(&mut self, settings: &PoolSettings) -> Result<Checked, String> {
        if !self.read_buf.is_empty() {
            return Err("unsolicited bytes".into());
        }
        if self.idle_since.elapsed() >= settings.cping_after_idle {
            // The CPing also finds a connection the member closed (EOF
            // or reset at once), so no separate probe is spent on it.
            self.cping(settings.cping_timeout).await.map_err(|e| format!("failed CPing: {e}"))?;
            return Ok(Checked::Probed);
        }
        if self.closed_while_idle() {
            return Err("the member closed it".into());
        }
        Ok(Checked::Unprobed)
    }

    fn fit_for_pool(&self) -> bool {
        // Bytes after END_RESPONSE: the stream is out of step; never reuse.
        self.read_buf.is_empty()
    }

    fn health_probe(&mut self, timeout: Duration) -> impl Future<Output = Result<(), ConnError>> + Send {
        self.cping(timeout)
    }
}

/// The connections of one member.
pub struct Pool<C = AjpConnection> {
    idle: Mutex<Vec<C>>,
    slots: Arc<Semaphore>,
    max: usize,
}

/// A connection checked out of a pool, holding one of the member's slots.
pub struct Lease<C = AjpConnection> {
    pub conn: C,
    pub reused: bool,
    /// Reused without a probe ([`Checked::Unprobed`]); a new connection is
    /// probed by the exchange, so this is false for it.
    pub unprobed: bool,
    _slot: OwnedSemaphorePermit,
}

impl<C: PooledConnection> Pool<C> {
    pub fn new(max: usize) -> Self {
        Pool { idle: Mutex::new(Vec::new()), slots: Arc::new(Semaphore::new(max)), max }
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn busy_count(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    fn pop_idle(&self) -> Option<C> {
        // Most recently used first: it is the least likely to have gone stale.
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// An idle connection that passed its checks (`reused`), or a new one
    /// that the caller still has to probe (CPing, or the HTTP health
    /// request): a killed Tomcat's listening socket can complete handshakes
    /// until the dying process's files are closed, so only an answer proves
    /// a live container (the exchange's `CPing` phase; a failure there
    /// counts as a failed connect).
    pub async fn acquire(&self, address: SocketAddr, settings: &PoolSettings) -> Result<Lease<C>, AcquireError> {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => tokio::time::timeout(settings.slot_wait, self.slots.clone().acquire_owned())
                .await
                .map_err(|_| AcquireError::SlotTimeout(settings.slot_wait))?
                .map_err(|_| AcquireError::SlotTimeout(settings.slot_wait))?,
        };
        while let Some(mut conn) = self.pop_idle() {
            match conn.check_before_reuse(settings).await {
                Ok(checked) => {
                    return Ok(Lease { conn, reused: true, unprobed: checked == Checked::Unprobed, _slot: slot });
                }
                Err(why) => tracing::debug!(%address, %why, "dropping pooled connection"),
            }
        }
        let conn = C::connect(address, settings).await?;
        Ok(Lease { conn, reused: false, unprobed: false, _slot: slot })
    }

    /// Returns a connection whose exchange ended cleanly (AJP:
    /// `END_RESPONSE` with reuse = 1; HTTP: a complete keep-alive response).
    pub fn release(&self, lease: Lease<C>) {
        let mut conn = lease.conn;
        if !conn.fit_for_pool() {
            return;
        }
        conn.set_idle_since(Instant::now());
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max {
            idle.push(conn);
        }
    }

    /// Puts a connection opened by the health checker into the pool.
    pub fn offer(&self, mut conn: C) {
        conn.set_idle_since(Instant::now());
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max {
            idle.push(conn);
        }
    }

    /// Takes an idle connection for the health checker, if any.
    pub fn take_idle(&self) -> Option<C> {
        self.pop_idle()
    }

    /// Drops every idle connection (the member failed).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn settings() -> PoolSettings {
        PoolSettings {
            packet_size: ajp::DEFAULT_PACKET_SIZE,
            connect_timeout: Duration::from_secs(1),
            slow_grace: Duration::from_secs(5),
            cping_after_idle: Duration::from_secs(1),
            cping_timeout: Duration::from_millis(300),
            slot_wait: Duration::from_secs(1),
        }
    }

    /// A connection to a fresh listener on 127.0.0.1 and the member's end of it.
    async fn connected() -> (AjpConnection, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let settings = settings();
        let (conn, accepted) = tokio::join!(AjpConnection::connect(address, &settings), listener.accept());
        (conn.expect("connect"), accepted.expect("accept").0)
    }

    /// Writes a stand-in request of `len` bytes; returns how many were written.
    async fn write_request(conn: &mut AjpConnection, len: usize) -> usize {
        conn.write_buf.clear();
        conn.write_buf.extend_from_slice(&vec![b'r'; len]);
        conn.send().await.expect("write");
        len
    }

    /// The member's side has `len` bytes waiting (so its close resets).
    async fn until_received(member: &TcpStream, len: usize) {
        let mut buf = vec![0u8; len];
        for _ in 0..200 {
            if member.peek(&mut buf).await.expect("peek") >= len {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the request never reached the member's socket");
    }

    /// A JVM killed with the request unread in its socket: the close is a
    /// reset, which says the request was never read.
    #[tokio::test]
    async fn a_close_with_the_request_unread_is_a_reset() {
        let (mut conn, member) = connected().await;
        let written = write_request(&mut conn, 120).await;
        until_received(&member, written).await;
        drop(member);
        assert_eq!(conn.await_first_reply(Duration::from_secs(2), written).await, FirstReply::Reset);
    }

    /// A member that read the request and then closed may have acted on
    /// it: that is no reset, and the exchange's read reports it.
    #[tokio::test]
    async fn a_close_after_reading_is_left_to_the_read() {
        let (mut conn, mut member) = connected().await;
        let written = write_request(&mut conn, 120).await;
        let mut request = vec![0u8; written];
        member.read_exact(&mut request).await.expect("read the request");
        drop(member);
        assert_eq!(conn.await_first_reply(Duration::from_secs(2), written).await, FirstReply::Arrived);
        assert!(matches!(conn.read_packet().await, Err(ConnError::Closed)));
    }

    /// A reply is not consumed by the wait.
    #[tokio::test]
    async fn a_reply_is_left_for_the_read() {
        let (mut conn, mut member) = connected().await;
        let written = write_request(&mut conn, 10).await;
        member.write_all(b"AB\x00\x01\x09").await.expect("CPong");
        assert_eq!(conn.await_first_reply(Duration::from_secs(2), written).await, FirstReply::Arrived);
        assert_eq!(&conn.read_packet().await.expect("the packet")[..], &[9]);
    }

    /// A member that got the request and is silent (a GC pause) is waited
    /// for: its host acknowledged the request, so it may still act on it.
    #[tokio::test]
    async fn a_silent_member_that_acknowledged_is_waited_for() {
        let (mut conn, member) = connected().await;
        let written = write_request(&mut conn, 120).await;
        let started = Instant::now();
        assert_eq!(conn.await_first_reply(Duration::from_millis(200), written).await, FirstReply::Acknowledged);
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(member);
    }

    /// A host that vanished without closing (its traffic dropped): none of
    /// the request is acknowledged, so it never reached the container. Runs
    /// on a thread in a network namespace of its own, whose loopback goes
    /// down under the connection; the namespace goes with the thread.
    #[test]
    fn a_vanished_host_acknowledges_nothing() {
        let outcome = std::thread::spawn(|| {
            // SAFETY: unshare of the network namespace affects this thread only.
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(unshared, 0, "unshare(CLONE_NEWNET) needs root: {}", io::Error::last_os_error());
            let ip = |state: &str| {
                let status = std::process::Command::new("ip").args(["link", "set", "lo", state]).status();
                assert!(status.expect("running ip (iproute2)").success(), "ip link set lo {state}");
            };
            ip("up");
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let (mut conn, member) = connected().await;
                ip("down");
                let written = write_request(&mut conn, 120).await;
                let outcome = conn.await_first_reply(Duration::from_millis(500), written).await;
                conn.reset_on_close();
                drop(member);
                outcome
            })
        })
        .join()
        .expect("the namespace thread");
        assert_eq!(outcome, FirstReply::Unacknowledged);
    }
}
