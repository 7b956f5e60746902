//! The client-facing HTTP/1.1 server.
//!
//! Limits live here: connection count (a connection over the limit is
//! closed on accept), request head size and count, and the head read
//! timeout that defeats slowloris. On shutdown the listener closes first,
//! then in-flight requests get `shutdown_grace` to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::framing::{HeadScanner, ScanningStream};
use super::proxy::{self, ClientConn};
use super::state::{Balancer, LogLimiter};
use super::tls::{self, TlsFacts};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct FrontSettings {
    /// Client connections served at once, shared by the HTTP and HTTPS listeners.
    pub connection_slots: Arc<Semaphore>,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// The scanner follows heads a little past hyper's limit, which refuses them first.
const SCANNER_HEAD_SLACK: usize = 1024;

/// hyper's own default header count; setting it moves the header array to the heap.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Serves one listener: plain HTTP, or HTTPS when `tls` is given.
pub async fn serve_front(
    bal: Arc<Balancer>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    settings: FrontSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_header_size(settings.max_header_bytes)
        .keep_alive(true);
    if settings.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        builder.max_headers(settings.max_headers);
    }
    let builder = Arc::new(builder);
    // Scanners and broken clients fail handshakes by the thousand: one line a second.
    let handshake_failure_log = Arc::new(LogLimiter::new(Duration::from_secs(1)));

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(slot) = settings.connection_slots.clone().try_acquire_owned() else {
                    tracing::warn!(%remote, limit = settings.max_connections, "connection limit reached; closing new connection");
                    continue;
                };
                let local = match stream.local_addr() {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "accepted socket lost its address");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = Accepted {
                    bal: bal.clone(),
                    builder: builder.clone(),
                    watcher: graceful.watcher(),
                    remote,
                    local,
                    scanner_limit: settings.max_header_bytes + SCANNER_HEAD_SLACK,
                };
                match &tls {
                    None => {
                        let first_byte_timeout = settings.header_read_timeout;
                        tokio::spawn(async move {
                            let _slot = slot;
                            conn.serve_after_first_byte(stream, first_byte_timeout).await;
                        });
                    }
                    Some(acceptor) => {
                        let handshake = acceptor.accept(stream);
                        let deadline = settings.header_read_timeout;
                        let failures = bal.metrics.tls_handshake_failures.clone();
                        let failure_log = handshake_failure_log.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            // The head read timeout starts after the handshake; the
                            // handshake gets the same time (a slow handshake is slowloris too).
                            let error = match tokio::time::timeout(deadline, handshake).await {
                                Ok(Ok(stream)) => {
                                    let facts = tls::facts(stream.get_ref().1);
                                    return conn.serve(stream, Some(facts)).await;
                                }
                                Ok(Err(e)) => e.to_string(),
                                Err(_) => format!("no handshake within {deadline:?}"),
                            };
                            failures.inc();
                            if let Some(more) = failure_log.allow() {
                                tracing::info!(%remote, %error, more_since_last_line = more, "TLS handshake failed");
                            }
                        });
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(grace = ?settings.shutdown_grace, "stopped accepting; finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all client connections closed"),
        _ = tokio::time::sleep(settings.shutdown_grace) => tracing::warn!("shutdown grace expired with connections open"),
    }
}

/// An accepted connection on its way to being served.
struct Accepted {
    bal: Arc<Balancer>,
    builder: Arc<http1::Builder>,
    watcher: Watcher,
    remote: SocketAddr,
    local: SocketAddr,
    scanner_limit: usize,
}

impl Accepted {
    /// Serves a plain connection once its client has sent something.
    ///
    /// hyper allocates a connection's buffers when it is built (8 KB for
    /// the heads it writes, 8 KB to read into at its first read, and the
    /// in-flight request's future); waiting for the first byte first keeps
    /// a connection that is open but silent (a browser's spare connection,
    /// a preconnect) at the size of this task. The wait gets the head read
    /// timeout, so a silent client is closed as hyper would close it; a
    /// client that sends its head byte by byte has that time twice.
    async fn serve_after_first_byte(self, stream: TcpStream, first_byte_timeout: Duration) {
        let remote = self.remote;
        let gauge = self.bal.metrics.client_connections.clone();
        gauge.inc();
        // A peek, not `readable()`: tokio takes a socket fresh from accept
        // for readable until a read says otherwise.
        let waited = tokio::time::timeout(first_byte_timeout, stream.peek(&mut [0u8; 1])).await;
        gauge.dec();
        match waited {
            Ok(Ok(0)) => tracing::debug!(%remote, "client closed before its first byte"),
            // Boxed: the task of a silent connection stays this small.
            Ok(Ok(_)) => Box::pin(self.serve(stream, None)).await,
            Ok(Err(e)) => tracing::debug!(%remote, error = %e, "client connection failed before its first byte"),
            Err(_) => tracing::debug!(%remote, timeout = ?first_byte_timeout, "client sent nothing; closing"),
        }
    }

    fn serve<S>(self, stream: S, tls: Option<TlsFacts>) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Accepted { bal, builder, watcher, remote, local, scanner_limit } = self;
        let client = Arc::new(ClientConn::new(remote, local, tls));
        let scanner = HeadScanner::new(scanner_limit, client.framing.clone());
        let stream = ScanningStream::new(stream, scanner);
        let service_bal = bal.clone();
        let service = service_fn(move |req| proxy::handle(service_bal.clone(), client.clone(), req));
        let connection = watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
        let gauge = bal.metrics.client_connections.clone();
        async move {
            gauge.inc();
            if let Err(e) = connection.await {
                // hyper has already answered malformed requests with 4xx.
                tracing::info!(%remote, error = %e, "client connection ended with an error");
            }
            gauge.dec();
        }
    }
}
