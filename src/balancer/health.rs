//! Active health checks: every member gets a CPing (with the HTTP backend:
//! an `OPTIONS *` request, see [`super::http_backend`]) each interval, over an
//! idle pooled connection when there is one (so the check also keeps the
//! pool warm and proves it alive), else over a new connection that then
//! joins the pool. A failing member stops getting requests until it answers
//! again: at once when it is gone (refused, reset), after the slow grace
//! when it only times out ([`Member::note_failure`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::member::{Failure, Member};
use super::pool::{Pool, PoolSettings, PooledConnection};
use super::state::{Backend, Balancer};

/// One probe of a member over a pooled connection (or a new one that then
/// joins the pool); the error says what the failure tells of the member, and why.
async fn probe<C: PooledConnection>(
    pool: &Pool<C>,
    address: SocketAddr,
    settings: &PoolSettings,
) -> Result<(), (Failure, String)> {
    let mut conn = match pool.take_idle() {
        Some(conn) => conn,
        None => C::connect(address, settings).await.map_err(|e| (e.failure(), e.to_string()))?,
    };
    conn.health_probe(settings.cping_timeout).await.map_err(|e| (e.failure(), e.to_string()))?;
    pool.offer(conn);
    Ok(())
}

pub async fn check_member(bal: &Balancer, member: &Arc<Member>) -> bool {
    let settings = &bal.pool_settings;
    let result = match bal.backend {
        Backend::Ajp(_) => probe(&member.pool, member.address, settings).await,
        Backend::Http => probe(&member.http_pool, member.address, settings).await,
    };
    match result {
        Ok(()) => {
            if member.note_success() {
                tracing::info!(route = %member.route, address = %member.address, "member answers its health check again");
            }
            true
        }
        Err((failure, error)) => {
            bal.note_failure(member, failure, &error);
            false
        }
    }
}

pub async fn run_health_checks(bal: Arc<Balancer>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let snapshot = bal.members.snapshot();
        // A terminating member's drain timeout is logged and published
        // within one interval even when no request asks for it.
        let now = std::time::Instant::now();
        for member in snapshot.iter() {
            member.drain_expired_at(now);
        }
        let checks = snapshot.iter().map(|m| check_member(&bal, m));
        futures::future::join_all(checks).await;
    }
}
