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

use std::io;
use std::net::SocketAddr;
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
            ConnError::Timeout => BackendErrorKind::Timeout,
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
            ConnError::Timeout => Failure::Slow,
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

/// What the pool needs of a connection kind.
pub trait PooledConnection: Send + Sized + 'static {
    /// When the connection last went idle.
    fn idle_since(&self) -> Instant;
    fn set_idle_since(&mut self, at: Instant);
    /// A new connection (not yet proven alive: the exchange probes it).
    fn connect(address: SocketAddr, settings: &PoolSettings)
    -> impl Future<Output = Result<Self, AcquireError>> + Send;
    /// Checks an idle connection before it is handed out again; an error
    /// says why it is dropped instead.
    fn check_before_reuse(&mut self, settings: &PoolSettings) -> impl Future<Output = Result<(), String>> + Send;
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

    async fn check_before_reuse(&mut self, settings: &PoolSettings) -> Result<(), String> {
        if !self.read_buf.is_empty() {
            return Err("unsolicited bytes".into());
        }
        if self.idle_since.elapsed() >= settings.cping_after_idle {
            // The CPing also finds a connection the member closed (EOF
            // or reset at once), so no separate probe is spent on it.
            return self.cping(settings.cping_timeout).await.map_err(|e| format!("failed CPing: {e}"));
        }
        if self.closed_while_idle() {
            return Err("the member closed it".into());
        }
        Ok(())
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
            if let Err(why) = conn.check_before_reuse(settings).await {
                tracing::debug!(%address, %why, "dropping pooled connection");
                continue;
            }
            return Ok(Lease { conn, reused: true, _slot: slot });
        }
        let conn = C::connect(address, settings).await?;
        Ok(Lease { conn, reused: false, _slot: slot })
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
