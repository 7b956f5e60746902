//! Admin server: `/metrics`, `/healthz`, `/readyz`, the status page `/`
//! and its data `/status.json`, and `/sessions.json` (each member's sketch
//! of its recent sessions, for the operator to merge across replicas).
//!
//! A member's `state` there is what routing acts on: `ready`, `draining`,
//! `drained` (terminating past the drain timeout: takes nothing) or `down`.
//!
//! Session ids are credentials, so the status page shows only a prefix and
//! the route of recently created sessions.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use super::body::ProxyBody;
use super::routing::unix_now_ms;
use super::sessions;
use super::state::Balancer;

const STATUS_PAGE: &str = include_str!("status.html");

/// Characters of a session id the status page shows.
const SESSION_ID_PREFIX: usize = 6;

fn masked_session_id(id: &str) -> String {
    let (secret_part, route) = match id.split_once('.') {
        Some((s, r)) => (s, Some(r)),
        None => (id, None),
    };
    let shown: String = secret_part.chars().take(SESSION_ID_PREFIX).collect();
    match route {
        Some(r) => format!("{shown}….{r}"),
        None => format!("{shown}…"),
    }
}

/// Each member's session sketch of the last minutes (`/sessions.json`):
/// what the operator merges over the balancer replicas, with the moves of
/// sessions to newcomers (for its rebalancing events).
pub fn sessions_report(bal: &Balancer) -> sessions::SessionsReport {
    let now_ms = unix_now_ms();
    let snapshot = bal.members.snapshot();
    sessions::SessionsReport {
        precision: sessions::PRECISION,
        window_seconds: sessions::ACTIVE_WINDOWS * sessions::WINDOW_MS / 1000,
        members: snapshot.iter().map(|m| (m.route.clone(), sessions::encode(&m.sessions.registers(now_ms)))).collect(),
        sessions_moved: bal.metrics.sessions_moved.get(),
        rebalancing: {
            let mut routes: Vec<String> = snapshot
                .iter()
                .filter(|m| bal.router.rebalance_window_open(m, now_ms))
                .map(|m| m.route.clone())
                .collect();
            routes.sort();
            routes.dedup();
            routes
        },
    }
}

fn refresh_session_gauges(bal: &Balancer) {
    let now_ms = unix_now_ms();
    for m in bal.members.snapshot().iter() {
        let estimate = sessions::estimate(&m.sessions.registers(now_ms)).round() as i64;
        bal.metrics.set_member_sessions(&m.route, estimate);
    }
}

pub fn status_json(bal: &Balancer) -> serde_json::Value {
    let now = std::time::Instant::now();
    let now_ms = unix_now_ms();
    let members: Vec<_> = bal
        .members
        .snapshot()
        .iter()
        .map(|m| {
            let recent: Vec<_> = m
                .recent_sessions()
                .into_iter()
                .map(|(id, at)| json!({"id": masked_session_id(&id), "at": at}))
                .collect();
            json!({
                "route": m.route,
                "address": m.address.to_string(),
                "state": m.routing_state(now),
                "terminating": m.is_terminating(),
                "drain_remaining_seconds": m.drain_remaining(now).map(|d| d.as_secs_f64()),
                "healthy": m.is_healthy(),
                "in_flight": m.in_flight(),
                "requests": m.metrics.requests_total(),
                "errors": m.metrics.errors_total(),
                "new_sessions": m.new_sessions.load(Ordering::Relaxed),
                "sessions": sessions::estimate(&m.sessions.registers(now_ms)).round() as i64,
                "traffic_bytes": m.traffic_bytes.load(Ordering::Relaxed),
                // One of the two pools is always empty (one backend protocol per process).
                "pool_idle": m.pool.idle_count() + m.http_pool.idle_count(),
                "pool_busy": m.pool.busy_count() + m.http_pool.busy_count(),
                "recent_sessions": recent,
            })
        })
        .collect();
    json!({
        "members": members,
        "method": bal.router.method,
        "failover": bal.router.failover,
        "drain_timeout_seconds": bal.members.drain_timeout().as_secs_f64(),
        "synced": bal.members.is_synced(),
        "shutting_down": bal.is_shutting_down(),
        "client_connections": bal.metrics.client_connections.get(),
        "failovers": bal.metrics.failovers.get(),
        "sessions_moved": bal.metrics.sessions_moved.get(),
        "rebalance_ramp_seconds": bal.router.rebalance_ramp.map(|d| d.as_secs_f64()),
    })
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn route_admin(bal: Arc<Balancer>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            refresh_session_gauges(&bal);
            respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", bal.metrics.encode())
        }
        "/sessions.json" => match serde_json::to_string(&sessions_report(&bal)) {
            Ok(body) => respond(StatusCode::OK, "application/json", body),
            Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
        },
        "/healthz" | "/livez" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if bal.is_shutting_down() {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n")
            } else if !bal.members.is_synced() {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "membership not loaded yet\n")
            } else {
                respond(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        "/status.json" => respond(StatusCode::OK, "application/json", status_json(&bal).to_string()),
        "/" | "/balancer-manager" => respond(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// Serves until the process exits: during the graceful shutdown after
/// SIGTERM, `/readyz` answers 503 (and `/metrics` still works) while the
/// front finishes the requests in flight.
pub async fn serve_admin(bal: Arc<Balancer>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let bal = bal.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| route_admin(bal.clone(), req));
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_masked() {
        assert_eq!(masked_session_id("0123456789ABCDEF.s1"), "012345….s1");
        assert_eq!(masked_session_id("0123456789"), "012345…");
    }
}
