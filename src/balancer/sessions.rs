//! How many sessions each member serves: an estimate of the distinct
//! session ids whose requests reached it in the last minutes.
//!
//! Each member keeps a HyperLogLog sketch per 30 s window (1024 one-byte
//! registers, about 3 % standard error) of the hashes of the session bases
//! it served. A sketch's union with another is the register-wise maximum,
//! so the windows of one balancer, and the sketches of every balancer
//! replica (a browser's requests of one session reach several of them),
//! merge without counting a session twice: the operator merges the
//! replicas' `/sessions.json` into `status.members[].sessions`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// log2 of the number of registers.
pub const PRECISION: u32 = 10;
/// Registers per sketch.
pub const REGISTERS: usize = 1 << PRECISION;
/// Length of one window, ms.
pub const WINDOW_MS: u64 = 30_000;
/// The estimate covers this many windows, 2 minutes: the current one and
/// the ones before it (a session counts as active while it made a request
/// in them). Short, because a session that moved to another node counts on
/// both until it ages out here: after a rebalance the old nodes' numbers
/// fall within 2 minutes; longer would count more idle readers as active,
/// and show a rebalance later.
pub const ACTIVE_WINDOWS: u64 = 4;
const SLOTS: usize = ACTIVE_WINDOWS as usize + 1;

struct Window {
    /// Index of the window (unix ms / WINDOW_MS) the registers are for, + 1
    /// (0: empty).
    index: AtomicU64,
    registers: Box<[AtomicU8]>,
}

/// The per-window sketches of one member.
pub struct SessionSketch {
    windows: [Window; SLOTS],
    /// Held only to reset a slot for a new window.
    rotating: Mutex<()>,
}

impl Default for SessionSketch {
    fn default() -> Self {
        SessionSketch {
            windows: std::array::from_fn(|_| Window {
                index: AtomicU64::new(0),
                registers: (0..REGISTERS).map(|_| AtomicU8::new(0)).collect(),
            }),
            rotating: Mutex::new(()),
        }
    }
}

/// Register index and rank of a 64-bit hash.
fn register_of(hash: u64) -> (usize, u8) {
    let index = (hash >> (64 - PRECISION)) as usize;
    // Rank: position of the first 1 bit in the remaining bits (1-based),
    // capped by their number.
    let rest = hash << PRECISION;
    let rank = (rest.leading_zeros() + 1).min(64 - PRECISION + 1);
    (index, rank as u8)
}

impl SessionSketch {
    /// Counts the session whose base hashes to `hash` at `now_ms` (unix ms).
    pub fn record(&self, hash: u64, now_ms: u64) {
        let index = now_ms / WINDOW_MS + 1;
        let window = &self.windows[(index % SLOTS as u64) as usize];
        if window.index.load(Ordering::Acquire) != index {
            let _guard = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
            if window.index.load(Ordering::Acquire) != index {
                // A request recorded into this window meanwhile may be lost:
                // the estimate is an estimate.
                for r in window.registers.iter() {
                    r.store(0, Ordering::Relaxed);
                }
                window.index.store(index, Ordering::Release);
            }
        }
        let (register, rank) = register_of(hash);
        window.registers[register].fetch_max(rank, Ordering::Relaxed);
    }

    /// The union of the last [`ACTIVE_WINDOWS`] windows.
    pub fn registers(&self, now_ms: u64) -> Vec<u8> {
        let current = now_ms / WINDOW_MS + 1;
        let mut merged = vec![0u8; REGISTERS];
        for window in &self.windows {
            let index = window.index.load(Ordering::Acquire);
            if index == 0 || index > current || current - index >= ACTIVE_WINDOWS {
                continue;
            }
            for (m, r) in merged.iter_mut().zip(window.registers.iter()) {
                *m = (*m).max(r.load(Ordering::Relaxed));
            }
        }
        merged
    }
}

/// Merges `other` into `into` (register-wise maximum). Sketches of another
/// length are left out (`false`).
pub fn merge(into: &mut [u8], other: &[u8]) -> bool {
    if into.len() != other.len() {
        return false;
    }
    for (a, b) in into.iter_mut().zip(other) {
        *a = (*a).max(*b);
    }
    true
}

/// The HyperLogLog estimate of a sketch's distinct count, with the
/// linear-counting correction for small counts (the usual case here: tens
/// to thousands of sessions per node).
pub fn estimate(registers: &[u8]) -> f64 {
    let m = registers.len() as f64;
    if registers.is_empty() {
        return 0.0;
    }
    let alpha = 0.7213 / (1.0 + 1.079 / m);
    let sum: f64 = registers.iter().map(|r| 2f64.powi(-i32::from(*r))).sum();
    let raw = alpha * m * m / sum;
    let zeros = registers.iter().filter(|r| **r == 0).count();
    if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw }
}

/// Text form of a sketch for `/sessions.json`: one hex digit pair per
/// register would be 2 KiB; registers are small, so run-length is not worth
/// it either: base64 of the bytes.
pub fn encode(registers: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(registers)
}

/// The sketch of [`encode`]'s text; `None` for text that is not one.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    (bytes.len() == REGISTERS && bytes.iter().all(|r| u32::from(*r) <= 64 - PRECISION + 1)).then_some(bytes)
}

/// What one balancer replica answers on `/sessions.json`: written by the
/// balancer, read by the operator (one type, so the two cannot drift).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SessionsReport {
    /// log2 of the registers per sketch ([`PRECISION`]).
    pub precision: u32,
    /// The span the sketches cover, seconds.
    pub window_seconds: u64,
    /// Route → [`encode`]d sketch of the sessions seen on that member.
    pub members: BTreeMap<String, String>,
    /// This replica's `clusterapp_balancer_sessions_moved_total`: requests
    /// that moved their session to a newcomer since the replica started.
    #[serde(default)]
    pub sessions_moved: u64,
    /// Routes of the newcomers whose rebalancing window is open now
    /// (sessions may move to them), in route order.
    #[serde(default)]
    pub rebalancing: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u64) -> u64 {
        // the balancer's own session hash of a Tomcat-like id
        crate::balancer::routing::SessionWeigher::new(&format!("{:032X}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .sketch_hash()
    }

    #[test]
    fn estimates_are_within_a_few_percent() {
        for n in [1u64, 10, 100, 1000, 20_000] {
            let s = SessionSketch::default();
            for i in 0..n {
                s.record(hash(i), 5 * WINDOW_MS);
                s.record(hash(i), 5 * WINDOW_MS + 10); // again: counted once
            }
            let e = estimate(&s.registers(5 * WINDOW_MS));
            let error = (e - n as f64).abs() / n as f64;
            assert!(error < 0.08, "{n} sessions estimated as {e:.1}");
        }
    }

    #[test]
    fn replicas_merge_without_counting_a_session_twice() {
        let (a, b) = (SessionSketch::default(), SessionSketch::default());
        for i in 0..600 {
            a.record(hash(i), 0);
        }
        for i in 300..900 {
            b.record(hash(i), 0);
        }
        let mut union = a.registers(0);
        assert!(merge(&mut union, &b.registers(0)));
        let e = estimate(&union);
        assert!((850.0..950.0).contains(&e), "900 distinct sessions estimated as {e:.1}");
        assert!(!merge(&mut union, &[0u8; 16]), "another length is refused");
        let text = encode(&union);
        assert_eq!(decode(&text).as_deref(), Some(union.as_slice()));
        assert_eq!(decode("not base64!"), None);
        assert_eq!(decode(&encode(&[0u8; 16])), None, "wrong length");
        assert_eq!(decode(&encode(&[200u8; REGISTERS])), None, "impossible rank");
    }

    #[test]
    fn sessions_age_out_after_the_active_windows() {
        let s = SessionSketch::default();
        for i in 0..100 {
            s.record(hash(i), 0);
        }
        // The second batch in the last window in which the first still counts.
        let last = ACTIVE_WINDOWS - 1;
        for i in 100..150 {
            s.record(hash(i), last * WINDOW_MS);
        }
        let at = |window: u64| estimate(&s.registers(window * WINDOW_MS)).round() as i64;
        assert!((140..=160).contains(&at(last)), "both windows count: {}", at(last));
        assert!((45..=55).contains(&at(last + 1)), "the first window aged out: {}", at(last + 1));
        assert_eq!(at(last + ACTIVE_WINDOWS), 0, "all aged out");
        // window SLOTS reuses window 0's slot, which starts empty again
        let reuse = SLOTS as u64;
        s.record(hash(1000), reuse * WINDOW_MS);
        assert!((46..=56).contains(&at(reuse)), "the second batch and one new: {}", at(reuse));
    }
}
