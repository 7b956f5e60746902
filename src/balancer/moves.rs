//! A moving session's first request goes alone.
//!
//! When a session's requests leave its member (failover, rebalancing), the
//! member they go to adopts the session at its first request there: Tomcat's
//! `JvmRouteBinderValve` renames it (`ID.old` → `ID.new`), and under
//! BackupManager the node first fetches it from its backup node. Neither is
//! safe for parallel requests of the session on that node: a request that
//! looks for the session while the rename is under way finds neither id,
//! and Tomcat then gives it a new, empty session (the user's state is gone;
//! `tests/e2e/seed.rs` says where in Tomcat's source). Once the first
//! request has answered, the node holds the session under its new id, and
//! the valve points a request that still carries the old id at it.
//!
//! So on this balancer the first request of a moving session goes alone:
//! the session's other requests wait until its response head is back (the
//! session is *adopted*), then go too, and so does every later request with
//! the old id, at once. A first request that fails without an answer lets
//! the next waiting one go first. A wait never outlasts `max_wait` (the
//! backend timeout): a request that waited that long goes anyway.
//!
//! A request that set out for the session's own member and had to leave it
//! (its connect failed: the member died before this replica noticed) takes
//! the turn too, at that retry ([`Attempts::retry`](super::exchange::Attempts)):
//! otherwise the session's first request and such a retry meet on the new
//! member (seen with `replication: backup`: two threads of the new member
//! renamed the session at once and it was gone).
//!
//! This orders the requests that reach one balancer replica. Two replicas
//! can each send a first request; the browser's connections are spread
//! over them, so parallel requests still meet on the new node, but two at
//! most instead of every one the browser had in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long an adopted session is remembered: requests that carry its old
/// id (sent before the client saw the new cookie) go at once meanwhile.
const ADOPTED_MEMORY: Duration = Duration::from_secs(60);

/// Sessions tracked at most; past it a moving session's requests are not
/// ordered (a mass failover of more sessions than this at once).
const MAX_TRACKED: usize = 65_536;

enum MoveState {
    /// Its first request is out; dropping the sender wakes the waiters.
    FirstOut(watch::Sender<()>),
    Adopted(Instant),
}

/// The moving sessions of this balancer, by requested session id.
pub struct SessionMoves {
    sessions: Mutex<Moves>,
}

struct Moves {
    by_id: HashMap<Box<str>, MoveState>,
    /// Size at which forgotten adoptions are swept out next.
    sweep_at: usize,
}

/// The turn of a moving session's first request: call
/// [`adopted`](FirstMove::adopted) when the new member answered; dropping
/// it otherwise lets the next waiting request go first.
pub struct FirstMove {
    moves: Arc<SessionMoves>,
    id: Box<str>,
    adopted: bool,
}

impl FirstMove {
    pub fn adopted(mut self) {
        self.adopted = true;
    }
}

impl Drop for FirstMove {
    fn drop(&mut self) {
        let mut moves = self.moves.lock();
        // Replacing or removing the entry drops its sender: the waiters wake.
        if self.adopted {
            moves.by_id.insert(std::mem::take(&mut self.id), MoveState::Adopted(Instant::now()));
        } else {
            moves.by_id.remove(&self.id);
        }
    }
}

impl Default for SessionMoves {
    fn default() -> Self {
        SessionMoves { sessions: Mutex::new(Moves { by_id: HashMap::new(), sweep_at: 1024 }) }
    }
}

impl SessionMoves {
    fn lock(&self) -> std::sync::MutexGuard<'_, Moves> {
        // A panic elsewhere while holding it leaves the map usable.
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for the turn of a request of the moving session `session_id`:
    /// `Some` when it is the session's first request (it goes alone), `None`
    /// when it may go now (the session was adopted, or `max_wait` passed).
    pub async fn turn(self: &Arc<Self>, session_id: &str, max_wait: Duration) -> Option<FirstMove> {
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            let mut first_out = {
                let mut moves = self.lock();
                let now = Instant::now();
                match moves.by_id.get(session_id) {
                    Some(MoveState::Adopted(at)) if now.duration_since(*at) < ADOPTED_MEMORY => return None,
                    Some(MoveState::FirstOut(sender)) => sender.subscribe(),
                    _ => {
                        moves.sweep(now);
                        if moves.by_id.len() >= MAX_TRACKED {
                            return None;
                        }
                        let (sender, _) = watch::channel(());
                        moves.by_id.insert(session_id.into(), MoveState::FirstOut(sender));
                        return Some(FirstMove { moves: Arc::clone(self), id: session_id.into(), adopted: false });
                    }
                }
            };
            // Err: the first request ended (its sender was dropped), even
            // before this subscription; look again.
            if tokio::time::timeout_at(deadline, first_out.changed()).await.is_err() {
                return None;
            }
        }
    }

    /// Sessions being moved or remembered as adopted.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.lock().by_id.len()
    }
}

impl Moves {
    /// Forgets old adoptions once the map has doubled since the last sweep,
    /// so the sweeps cost O(1) per insert.
    fn sweep(&mut self, now: Instant) {
        if self.by_id.len() < self.sweep_at {
            return;
        }
        self.by_id.retain(|_, state| match state {
            MoveState::Adopted(at) => now.duration_since(*at) < ADOPTED_MEMORY,
            MoveState::FirstOut(_) => true,
        });
        self.sweep_at = (self.by_id.len() * 2).max(1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn the_first_request_goes_alone_and_the_others_follow_its_answer() {
        let moves = Arc::new(SessionMoves::default());
        let first = moves.turn("abc.shop-1", WAIT).await.expect("the first request has the turn");
        let gone = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let (moves, gone) = (moves.clone(), gone.clone());
            waiters.push(tokio::spawn(async move {
                let turn = moves.turn("abc.shop-1", WAIT).await;
                gone.fetch_add(1, Ordering::SeqCst);
                turn.is_none()
            }));
        }
        // Another session is not held up.
        assert!(moves.turn("xyz.shop-1", WAIT).await.is_some());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(gone.load(Ordering::SeqCst), 0, "no request went while the first was out");
        first.adopted();
        for waiter in waiters {
            assert!(waiter.await.expect("task"), "after the answer the others go, none of them first");
        }
        assert!(moves.turn("abc.shop-1", WAIT).await.is_none(), "a late request with the old id goes at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_request_that_fails_lets_the_next_one_go_first() {
        let moves = Arc::new(SessionMoves::default());
        let first = moves.turn("abc.shop-1", WAIT).await.expect("turn");
        let next = {
            let moves = moves.clone();
            tokio::spawn(async move { moves.turn("abc.shop-1", WAIT).await.map(|turn| turn.adopted()).is_some() })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(first);
        assert!(next.await.expect("task"), "the waiting request became the first");
        assert!(moves.turn("abc.shop-1", WAIT).await.is_none(), "and its answer adopted the session");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_max_wait() {
        let moves = Arc::new(SessionMoves::default());
        let _first = moves.turn("abc.shop-1", WAIT).await.expect("turn");
        let started = tokio::time::Instant::now();
        assert!(moves.turn("abc.shop-1", WAIT).await.is_none());
        assert_eq!(started.elapsed(), WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn adoptions_are_forgotten_after_a_minute_and_swept_out() {
        let moves = Arc::new(SessionMoves::default());
        for i in 0..2000 {
            moves.turn(&format!("s{i}.shop-1"), WAIT).await.expect("turn").adopted();
        }
        assert_eq!(moves.tracked(), 2000);
        // Age every adoption past the memory (std's clock, which tokio's
        // paused clock does not move), as if the map had doubled since.
        {
            let mut locked = moves.lock();
            let long_ago = Instant::now().checked_sub(ADOPTED_MEMORY).expect("uptime over a minute");
            for state in locked.by_id.values_mut() {
                *state = MoveState::Adopted(long_ago);
            }
            locked.sweep_at = 0;
        }
        let again = moves.turn("s0.shop-1", WAIT).await;
        assert!(again.is_some(), "a forgotten adoption moves again");
        assert_eq!(moves.tracked(), 1, "the sweep dropped the forgotten ones");
    }
}
