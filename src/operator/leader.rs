//! Leader election with a `coordination.k8s.io/v1` Lease, so that several
//! operator replicas are safe: only the holder runs the controller (and so
//! only it writes). Expiry is judged by how long the Lease has not changed
//! as seen by this process's own clock, never by comparing clocks.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

/// Timing of the election.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// A holder that has not renewed for this long has lost the Lease.
    pub lease_duration: Duration,
    /// How often the holder renews, and a candidate retries.
    pub retry_period: Duration,
    /// The holder gives up (stops writing) when renewals failed this long.
    pub renew_deadline: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// One candidate for one Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    /// The other holder's record (holder, renew time) and when we first saw it.
    observed: Option<(String, Option<MicroTime>, Instant)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader Lease {0}: renewals failed past the deadline")]
    Lost(String),
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        LeaseLock { api, name: name.to_string(), identity: identity.to_string(), timing, observed: None }
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    fn our_spec(&self, transitions: i32, acquire: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(acquire.unwrap_or_else(now_micro)),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One election step: `Ok(true)` when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.our_spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another candidate created it first.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let renew = if holder.as_deref() == Some(self.identity.as_str()) {
            self.observed = None;
            self.our_spec(transitions, spec.acquire_time.clone())
        } else {
            if let Some(other) = holder {
                let record = (other, spec.renew_time.clone());
                let first_seen = match &self.observed {
                    Some((h, r, seen)) if (h, r) == (&record.0, &record.1) => *seen,
                    _ => {
                        self.observed = Some((record.0, record.1, Instant::now()));
                        return Ok(false);
                    }
                };
                if first_seen.elapsed() < self.timing.lease_duration {
                    return Ok(false);
                }
            }
            // Released or expired: take it over.
            self.our_spec(transitions + 1, None)
        };
        lease.spec = Some(renew);
        // replace() sends our resourceVersion: a concurrent writer makes it
        // fail with 409 instead of two leaders.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up so that a standby takes over at once (on shutdown).
    pub async fn release(&mut self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            let _ = self.api.replace(&self.name, &PostParams::default(), &lease).await;
        }
    }

    /// Waits until this candidate holds the Lease. A step that takes
    /// longer than the renew deadline is given up and retried (an API
    /// request can hang until the server's own 60 s timeout).
    pub async fn acquire(&mut self) {
        loop {
            match tokio::time::timeout(self.timing.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => return,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, lease = %self.name, "leader election step failed"),
                Err(_) => tracing::warn!(lease = %self.name, "leader election step timed out"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews while leading; returns when leadership is lost: another
    /// holder, or no successful renewal within the renew deadline. Each
    /// renewal is bounded by what is left of that deadline: a renewal that
    /// hangs must not keep us writing after a standby may have taken over.
    pub async fn keep(&mut self) -> LeaderError {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            let budget = self.timing.renew_deadline.saturating_sub(last_renewal.elapsed());
            match tokio::time::timeout(budget, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewal = Instant::now(),
                Ok(Ok(false)) => return LeaderError::Lost(self.name.clone()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.name, "renewing the leader Lease failed");
                    if last_renewal.elapsed() > self.timing.renew_deadline {
                        return LeaderError::Lost(self.name.clone());
                    }
                }
                Err(_) => {
                    tracing::warn!(lease = %self.name, "renewing the leader Lease timed out at the renew deadline");
                    return LeaderError::Lost(self.name.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API server that accepts connections and never answers (what a
    /// request stuck in a loaded kube-apiserver looks like to us).
    /// Returns a client of it and the number of connections it accepted.
    async fn silent_api_server()
    -> (kube::Client, std::sync::Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = tokio::spawn({
            let accepted = accepted.clone();
            async move {
                let mut held = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    held.push(stream);
                }
            }
        });
        let url: http::Uri = format!("http://{address}").parse().expect("url");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("client");
        (client, accepted, server)
    }

    /// A 4 s lease retried every 100 ms, with the given renew deadline.
    fn fast_timing(renew_deadline: Duration) -> LeaseTiming {
        LeaseTiming { lease_duration: Duration::from_secs(4), retry_period: Duration::from_millis(100), renew_deadline }
    }

    #[tokio::test]
    async fn a_hung_renewal_loses_leadership_at_the_renew_deadline() {
        let (client, _, server) = silent_api_server().await;
        let timing = fast_timing(Duration::from_millis(800));
        let mut lock = LeaseLock::new(Api::namespaced(client, "default"), "lease", "me", timing);
        let started = Instant::now();
        let lost = tokio::time::timeout(Duration::from_secs(5), lock.keep()).await;
        assert!(matches!(lost, Ok(LeaderError::Lost(_))), "still leading after 5 s of hung renewals");
        // Given up at the deadline, well before a standby may take over.
        assert!(started.elapsed() < timing.lease_duration, "lost after {:?}", started.elapsed());
        server.abort();
    }

    #[tokio::test]
    async fn a_hung_election_step_is_retried() {
        let (client, accepted, server) = silent_api_server().await;
        let timing = fast_timing(Duration::from_millis(300));
        let mut lock = LeaseLock::new(Api::namespaced(client, "default"), "lease", "me", timing);
        // Never acquired (nobody answers), but each step gives up after the
        // renew deadline and the next one asks again (on a new connection:
        // the abandoned one is closed).
        let acquired = tokio::time::timeout(Duration::from_millis(1500), lock.acquire()).await;
        assert!(acquired.is_err(), "acquired a Lease nobody answered for");
        let steps = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert!(steps >= 3, "{steps} election steps in 1.5 s: one request hung instead of being retried");
        server.abort();
    }
}
