//! Active health checks: every member gets a CPing each interval, over an
//! idle pooled connection when there is one (so the check also keeps the
//! pool warm and proves it alive), else over a new connection that then
//! joins the pool. A failing member stops getting requests until it answers
//! again; a connect failure during a request marks it failed at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::member::Member;
use super::pool::AjpConnection;
use super::state::Balancer;

pub async fn check_member(bal: &Balancer, member: &Arc<Member>) -> bool {
    let settings = &bal.pool_settings;
    let conn = match member.pool.take_idle() {
        Some(conn) => Ok(conn),
        None => AjpConnection::connect(member.address, settings).await,
    };
    let result = match conn {
        Ok(mut conn) => match conn.cping(settings.cping_timeout).await {
            Ok(()) => {
                member.pool.offer(conn);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => {
            if member.set_healthy(true) {
                tracing::info!(route = %member.route, address = %member.address, "member answers CPing again");
            }
            true
        }
        Err(error) => {
            bal.mark_failed(member, &error);
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
