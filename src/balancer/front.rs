//! The client-facing HTTP/1.1 server.
//!
//! Limits live here: connection count (a connection over the limit is
//! closed on accept), request head size and count, and the head read
//! timeout that defeats slowloris. On shutdown the listener closes first,
//! then in-flight requests get `shutdown_grace` to finish.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::framing::{HeadScanner, ScanningStream};
use super::proxy::{self, Balancer, ClientConn};

#[derive(Debug, Clone)]
pub struct FrontSettings {
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

pub async fn serve_front(bal: Arc<Balancer>, listener: TcpListener, settings: FrontSettings, mut shutdown: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let connection_slots = Arc::new(Semaphore::new(settings.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_header_size(settings.max_header_bytes)
        .keep_alive(true);
    if settings.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        builder.max_headers(settings.max_headers);
    }

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
                let Ok(slot) = connection_slots.clone().try_acquire_owned() else {
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
                let client = Arc::new(ClientConn::new(remote, local, false));
                let scanner = HeadScanner::new(settings.max_header_bytes + SCANNER_HEAD_SLACK, client.framing.clone());
                let stream = ScanningStream::new(stream, scanner);
                let service_bal = bal.clone();
                let service = service_fn(move |req| proxy::handle(service_bal.clone(), client.clone(), req));
                let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                let gauge = bal.metrics.client_connections.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    gauge.inc();
                    if let Err(e) = connection.await {
                        // hyper has already answered malformed requests with 4xx.
                        tracing::info!(%remote, error = %e, "client connection ended with an error");
                    }
                    gauge.dec();
                });
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
