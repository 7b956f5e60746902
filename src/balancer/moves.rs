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
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::routing::{SessionKey, SessionWeigher};

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
    peers: Peers,
}

/// This replica among the balancer replicas: which of them leads a move.
struct Peers {
    /// This replica's Pod name; `None` (not known): it leads every move.
    me: Option<String>,
    /// The names of the ready balancer Pods.
    ready: RwLock<Vec<String>>,
    /// How long a replica that does not lead a session's move holds its
    /// first request there.
    follower_pause: Duration,
}

impl Peers {
    /// Whether this replica leads the move of `session_id`: it is the
    /// ready replica that weighs most for it. A replica that does not know
    /// itself, or is not among the ready ones (starting, stopping, or no
    /// peer watch), leads: holding back is only right when another leads.
    fn leads(&self, session_id: &str) -> bool {
        let Some(me) = &self.me else { return true };
        let ready = self.ready.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !ready.contains(me) {
            return true;
        }
        let weigher = SessionWeigher::new(session_id);
        // Ties (a 64-bit collision) go to the greater name, the same on every replica.
        ready.iter().max_by_key(|name| (weigher.weight(name), name.as_str())) == Some(me)
    }

    fn holds_back(&self, session_id: &str) -> bool {
        !self.follower_pause.is_zero() && !self.leads(session_id)
    }
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
        SessionMoves::new(None, Duration::ZERO)
    }
}

/// What a request found for its moving session.
enum Found {
    /// Another request of the session is out first: wait for its end.
    FirstOut(watch::Receiver<()>),
    /// No request is out, and another replica leads the move.
    LedElsewhere,
}

impl SessionMoves {
    /// `pod_name`: this replica's Pod; `follower_pause`: how long a replica
    /// that does not lead a move holds the session's first request (0: not
    /// at all).
    pub fn new(pod_name: Option<String>, follower_pause: Duration) -> Self {
        SessionMoves {
            sessions: Mutex::new(Moves { by_id: HashMap::new(), sweep_at: 1024 }),
            peers: Peers { me: pod_name, ready: RwLock::new(Vec::new()), follower_pause },
        }
    }

    /// The balancer Pods that are ready now (from the API).
    pub fn set_peers(&self, ready: Vec<String>) {
        *self.peers.ready.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = ready;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Moves> {
        // A panic elsewhere while holding it leaves the map usable.
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`turn`](Self::turn) for the session a request carries (its id is
    /// `base.route`, the same on every replica): the one entry for the
    /// proxy's first choice and for a retry that moves the session.
    pub async fn turn_of(self: &Arc<Self>, session: SessionKey<'_>, max_wait: Duration) -> Option<FirstMove> {
        self.turn(&format!("{}.{}", session.base, session.route), max_wait).await
    }

    /// Waits for the turn of a request of the moving session `session_id`:
    /// `Some` when it is the session's first request (it goes alone), `None`
    /// when it may go now (the session was adopted, or `max_wait` passed).
    pub async fn turn(self: &Arc<Self>, session_id: &str, max_wait: Duration) -> Option<FirstMove> {
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut held_back = false;
        loop {
            let found = {
                let mut moves = self.lock();
                let now = Instant::now();
                match moves.by_id.get(session_id) {
                    Some(MoveState::Adopted(at)) if now.duration_since(*at) < ADOPTED_MEMORY => return None,
                    Some(MoveState::FirstOut(sender)) => Found::FirstOut(sender.subscribe()),
                    _ if !held_back && self.peers.holds_back(session_id) => Found::LedElsewhere,
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
            match found {
                // Err: the first request ended (its sender was dropped), even
                // before this subscription; look again.
                Found::FirstOut(mut first_out) => {
                    if tokio::time::timeout_at(deadline, first_out.changed()).await.is_err() {
                        return None;
                    }
                }
                // The leading replica's first request goes first; then this
                // one's first request takes its turn here (once).
                Found::LedElsewhere => {
                    held_back = true;
                    let until = (tokio::time::Instant::now() + self.peers.follower_pause).min(deadline);
                    tokio::time::sleep_until(until).await;
                }
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
    const PAUSE: Duration = Duration::from_secs(2);

    /// Three balancer replicas that see each other ready.
    fn replicas(pause: Duration) -> Vec<Arc<SessionMoves>> {
        let names = ["shop-balancer-a", "shop-balancer-b", "shop-balancer-c"];
        names
            .iter()
            .map(|me| {
                let moves = Arc::new(SessionMoves::new(Some(me.to_string()), pause));
                moves.set_peers(names.iter().map(|name| name.to_string()).collect());
                moves
            })
            .collect()
    }

    #[test]
    fn one_replica_leads_each_move_and_one_not_among_the_ready_leads_its_own() {
        let replicas = replicas(PAUSE);
        let mut led = [0; 3];
        for i in 0..300 {
            let id = format!("S{i}.shop-1");
            let leaders: Vec<usize> = (0..3).filter(|r| replicas[*r].peers.leads(&id)).collect();
            assert_eq!(leaders.len(), 1, "{id}: {leaders:?}");
            led[leaders[0]] += 1;
        }
        assert!(led.iter().all(|n| *n > 60), "the moves are spread over the replicas: {led:?}");
        let starting = SessionMoves::new(Some("shop-balancer-d".into()), PAUSE);
        starting.set_peers(vec!["shop-balancer-a".into()]);
        assert!(starting.peers.leads("S1.shop-1"), "not among the ready Pods");
        assert!(SessionMoves::new(None, PAUSE).peers.leads("S1.shop-1"), "its own name unknown");
        assert!(SessionMoves::new(Some("x".into()), PAUSE).peers.leads("S1.shop-1"), "no peers known");
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_that_does_not_lead_holds_a_moving_sessions_first_request_for_the_pause() {
        let paused = replicas(PAUSE);
        let id = "S7.shop-1";
        let leader = paused.iter().find(|r| r.peers.leads(id)).expect("a leader");
        let follower = Arc::clone(paused.iter().find(|r| !r.peers.leads(id)).expect("a follower"));
        let started = tokio::time::Instant::now();
        let _lead = leader.turn(id, WAIT).await.expect("the leader's first request");
        assert_eq!(started.elapsed(), Duration::ZERO, "the leader does not wait");
        let first = follower.turn(id, WAIT).await.expect("the follower's first request");
        assert_eq!(started.elapsed(), PAUSE, "the follower's waits the pause");
        // A second request there waits for the first one's answer, not for a pause of its own.
        let second = {
            let follower = Arc::clone(&follower);
            tokio::spawn(async move { follower.turn(id, WAIT).await.is_none() })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.adopted();
        assert!(second.await.expect("task"), "the second goes once the first was answered");
        assert_eq!(started.elapsed(), PAUSE + Duration::from_millis(10));
        // Without a pause (DeltaManager) no replica holds back.
        let unpaused = replicas(Duration::ZERO);
        let started = tokio::time::Instant::now();
        for moves in &unpaused {
            assert!(moves.turn(id, WAIT).await.is_some());
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

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
