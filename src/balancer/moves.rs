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
//! most instead of every one the browser had in flight. So one replica
//! leads each move and the others hold its first request for a pause
//! ([`Peers`]).
//!
//! A request that still carries the old id once the new member renamed the
//! session goes with the new id instead ([`Turn::Renamed`]; the proxy
//! rewrites its session cookie). Tomcat would find the session under the
//! new id too, but it looks for the old id first, and under BackupManager
//! the old id can be back: the dead member's backup node promotes its copy
//! when it notices the death and sends it to a new backup node, which can
//! be the new member, after the rename there removed the old id. A request
//! with the old id then renames that stale copy over the live session (a
//! cluster-wide remove of the new id first, so the session's parallel
//! requests find nothing and get new, empty sessions). A replica knows the
//! rename happened when its own first request was answered, or, when it
//! holds back for another replica's move, when a request of the session
//! with the new member's route reached it meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The member of `route` answered it: the session is `base.route` now.
    Adopted { at: Instant, route: Box<str> },
}

/// What a request of a moving session does now.
#[derive(Debug)]
pub enum Turn {
    /// It is the session's first request here: it goes alone.
    First(FirstMove),
    /// It goes with the id it carries (the first request of the session
    /// was answered, or the wait ended).
    Go,
    /// The session was renamed for the member of this route: the request
    /// goes there with the new id (`base.route`), if it goes there at all.
    Renamed(Box<str>),
}

/// The moving sessions of this balancer, by requested session id.
pub struct SessionMoves {
    sessions: Mutex<Moves>,
    peers: Peers,
    /// Sessions whose first request this replica holds back for another
    /// replica's move (`Moves::held`), read without the lock on every
    /// sticky request.
    holding: AtomicUsize,
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
    /// By session base: sessions this replica holds back for another
    /// replica's move.
    held: HashMap<Box<str>, Held>,
}

/// A session this replica holds back for another replica's move.
struct Held {
    /// Requests of it holding back.
    requests: usize,
    /// The route they carry (of the member the session leaves).
    route: Box<str>,
    /// The route of a request of the session that reached this replica
    /// meanwhile with another route than the held ones: the session was
    /// renamed for it.
    renamed_to: Option<Box<str>>,
}

/// The turn of a moving session's first request: call
/// [`adopted`](FirstMove::adopted) when the new member answered; dropping
/// it otherwise lets the next waiting request go first.
#[derive(Debug)]
pub struct FirstMove {
    moves: Arc<SessionMoves>,
    id: Box<str>,
    /// The route of the member that answered.
    adopted_by: Option<Box<str>>,
}

impl FirstMove {
    /// The member of `route` answered: it renamed the session for itself.
    pub fn adopted(mut self, route: &str) {
        self.adopted_by = Some(route.into());
    }
}

impl Drop for FirstMove {
    fn drop(&mut self) {
        let mut moves = self.moves.lock();
        // Replacing or removing the entry drops its sender: the waiters wake.
        match self.adopted_by.take() {
            Some(route) => {
                moves.by_id.insert(std::mem::take(&mut self.id), MoveState::Adopted { at: Instant::now(), route });
            }
            None => {
                moves.by_id.remove(&self.id);
            }
        }
    }
}

impl std::fmt::Debug for SessionMoves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionMoves").finish_non_exhaustive()
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
    /// This replica leads, and the session's member crashed a moment ago.
    Settling,
}

/// Marks a session held back while its request waits; unmarks it when
/// dropped (also when the waiting request is dropped) and says whether the
/// session was renamed meanwhile.
struct Holding<'m> {
    moves: &'m SessionMoves,
    base: &'m str,
}

impl<'m> Holding<'m> {
    fn start(moves: &'m SessionMoves, session: SessionKey<'m>) -> Self {
        let (base, route) = (session.base, session.route);
        let mut locked = moves.lock();
        let held =
            locked.held.entry(base.into()).or_insert(Held { requests: 0, route: route.into(), renamed_to: None });
        held.requests += 1;
        moves.holding.store(locked.held.len(), Ordering::Relaxed);
        Holding { moves, base }
    }

    /// The route the session was renamed for while this request held back.
    fn renamed_to(&self) -> Option<Box<str>> {
        self.moves.lock().held.get(self.base)?.renamed_to.clone()
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        let mut locked = self.moves.lock();
        if let Some(held) = locked.held.get_mut(self.base) {
            held.requests -= 1;
            if held.requests == 0 {
                locked.held.remove(self.base);
            }
        }
        self.moves.holding.store(locked.held.len(), Ordering::Relaxed);
    }
}

impl SessionMoves {
    /// `pod_name`: this replica's Pod; `follower_pause`: how long a replica
    /// that does not lead a move holds the session's first request (0: not
    /// at all).
    pub fn new(pod_name: Option<String>, follower_pause: Duration) -> Self {
        SessionMoves {
            sessions: Mutex::new(Moves { by_id: HashMap::new(), sweep_at: 1024, held: HashMap::new() }),
            peers: Peers { me: pod_name, ready: RwLock::new(Vec::new()), follower_pause },
            holding: AtomicUsize::new(0),
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

    /// A request of `session` reached this replica on its way to the
    /// session's own member (it does not move the session): while another
    /// request of the session with an older route holds back here, this
    /// says the session was renamed for that route.
    pub fn saw(&self, session: SessionKey<'_>) {
        if self.holding.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(held) = self.lock().held.get_mut(session.base)
            && *held.route != *session.route
        {
            held.renamed_to = Some(session.route.into());
        }
    }

    /// Waits for the turn of a request of the moving `session` (its id is
    /// `base.route`, the same on every replica): [`Turn::First`] when it is
    /// the session's first request here (it goes alone), otherwise when it
    /// may go now (the session was adopted, or `max_wait` passed), and
    /// whether with the session's new id. `old_member_unhealthy_for`: how
    /// long the session's member has been unhealthy, when it is (it
    /// crashed). The one entry for the proxy's first choice and for a retry
    /// that moves the session.
    ///
    /// With a pause (BackupManager), the first request of a session whose
    /// member crashed waits until the member has been unhealthy for the
    /// pause, and a replica that does not lead for one pause more: the
    /// Tomcat nodes notice the death and settle their replicated map first.
    /// A session fetched while a node still counts the dead member in was
    /// seen broken for good: the fetch stored the backup's copy, its send
    /// to the dead member failed, and the copy stayed in the map without
    /// its manager (`AbstractReplicatedMap.get`); every later request of
    /// the session failed with a NullPointerException (a 500).
    pub async fn turn(
        self: &Arc<Self>,
        session: SessionKey<'_>,
        old_member_unhealthy_for: Option<Duration>,
        max_wait: Duration,
    ) -> Turn {
        let session_id = format!("{}.{}", session.base, session.route);
        let now = tokio::time::Instant::now();
        let deadline = now + max_wait;
        let settled_at = match old_member_unhealthy_for {
            Some(unhealthy_for) => now + self.peers.follower_pause.saturating_sub(unhealthy_for),
            None => now,
        }
        .min(deadline);
        let mut held_back = false;
        loop {
            let found = {
                let mut moves = self.lock();
                let now = Instant::now();
                match moves.by_id.get(session_id.as_str()) {
                    Some(MoveState::Adopted { at, route }) if now.duration_since(*at) < ADOPTED_MEMORY => {
                        return Turn::Renamed(route.clone());
                    }
                    Some(MoveState::FirstOut(sender)) => Found::FirstOut(sender.subscribe()),
                    _ if !held_back && self.peers.holds_back(&session_id) => Found::LedElsewhere,
                    _ if tokio::time::Instant::now() < settled_at => Found::Settling,
                    _ => {
                        moves.sweep(now);
                        if moves.by_id.len() >= MAX_TRACKED {
                            return Turn::Go;
                        }
                        let (sender, _) = watch::channel(());
                        moves.by_id.insert(session_id.as_str().into(), MoveState::FirstOut(sender));
                        let id = session_id.into_boxed_str();
                        return Turn::First(FirstMove { moves: Arc::clone(self), id, adopted_by: None });
                    }
                }
            };
            match found {
                // Err: the first request ended (its sender was dropped), even
                // before this subscription; look again.
                Found::FirstOut(mut first_out) => {
                    if tokio::time::timeout_at(deadline, first_out.changed()).await.is_err() {
                        return Turn::Go;
                    }
                }
                // The leading replica's first request goes first; then this
                // one's first request takes its turn here (once), unless the
                // session was seen renamed meanwhile.
                Found::LedElsewhere => {
                    held_back = true;
                    let holding = Holding::start(self, session);
                    let until = (tokio::time::Instant::now().max(settled_at) + self.peers.follower_pause).min(deadline);
                    tokio::time::sleep_until(until).await;
                    if let Some(route) = holding.renamed_to() {
                        self.lock().by_id.insert(
                            session_id.into_boxed_str(),
                            MoveState::Adopted { at: Instant::now(), route: route.clone() },
                        );
                        return Turn::Renamed(route);
                    }
                }
                Found::Settling => tokio::time::sleep_until(settled_at).await,
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
            MoveState::Adopted { at, .. } => now.duration_since(*at) < ADOPTED_MEMORY,
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

    fn key(id: &str) -> SessionKey<'_> {
        SessionKey::of_session_id(id).expect("an id with a route")
    }

    impl Turn {
        fn first(self) -> Option<FirstMove> {
            match self {
                Turn::First(first) => Some(first),
                Turn::Go | Turn::Renamed(_) => None,
            }
        }
    }

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
        let _lead = leader.turn(key(id), None, WAIT).await.first().expect("the leader's first request");
        assert_eq!(started.elapsed(), Duration::ZERO, "the leader does not wait");
        let first = follower.turn(key(id), None, WAIT).await.first().expect("the follower's first request");
        assert_eq!(started.elapsed(), PAUSE, "the follower's waits the pause");
        // A second request there waits for the first one's answer, not for a pause of its own.
        let second = {
            let follower = Arc::clone(&follower);
            tokio::spawn(async move { follower.turn(key(id), None, WAIT).await.first().is_none() })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.adopted("shop-2");
        assert!(second.await.expect("task"), "the second goes once the first was answered");
        assert_eq!(started.elapsed(), PAUSE + Duration::from_millis(10));
        // Without a pause (DeltaManager) no replica holds back.
        let unpaused = replicas(Duration::ZERO);
        let started = tokio::time::Instant::now();
        for moves in &unpaused {
            assert!(moves.turn(key(id), None, WAIT).await.first().is_some());
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A replica that holds back for another's move and meanwhile sees a
    /// request of the session with the new member's route knows the
    /// session was renamed: its held request, and later ones, go with the
    /// new id; nobody renames it again with the old one.
    #[tokio::test(start_paused = true)]
    async fn a_follower_that_saw_the_new_route_sends_the_new_id() {
        let paused = replicas(PAUSE);
        let id = "S7.shop-1";
        let follower = Arc::clone(paused.iter().find(|r| !r.peers.leads(id)).expect("a follower"));
        let held = {
            let follower = Arc::clone(&follower);
            tokio::spawn(async move { follower.turn(key(id), None, WAIT).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        follower.saw(key("S8.shop-2"));
        follower.saw(key("S7.shop-2"));
        follower.saw(key("S7.shop-1"));
        let started = tokio::time::Instant::now();
        assert!(matches!(held.await.expect("task"), Turn::Renamed(route) if &*route == "shop-2"));
        assert_eq!(started.elapsed(), PAUSE - Duration::from_millis(500), "after the pause");
        assert!(matches!(follower.turn(key(id), None, WAIT).await, Turn::Renamed(route) if &*route == "shop-2"));
        assert_eq!(started.elapsed(), PAUSE - Duration::from_millis(500), "later ones at once");
        assert_eq!(follower.holding.load(Ordering::Relaxed), 0, "nothing held any more");
        // Without a request of the new route it takes its own turn.
        let other = follower.turn(key("S9.shop-1"), None, WAIT).await;
        let led = paused.iter().find(|r| r.peers.leads("S9.shop-1")).is_some_and(|r| Arc::ptr_eq(r, &follower));
        assert!(matches!(other, Turn::First(_)), "led here: {led}");
    }

    /// After a crash (the old member unhealthy a moment ago), the leading
    /// replica's first request waits until the member has been unhealthy
    /// for the pause, and a follower's for one pause more; without a pause
    /// nobody waits.
    #[tokio::test(start_paused = true)]
    async fn after_a_crash_the_first_request_waits_for_the_cluster_to_settle() {
        let paused = replicas(PAUSE);
        let id = "S7.shop-1";
        let leader = paused.iter().find(|r| r.peers.leads(id)).expect("a leader");
        let follower = paused.iter().find(|r| !r.peers.leads(id)).expect("a follower");
        let crashed = Some(Duration::from_millis(500));
        let started = tokio::time::Instant::now();
        let lead = leader.turn(key(id), crashed, WAIT).await.first().expect("the leader's first request");
        assert_eq!(started.elapsed(), PAUSE - Duration::from_millis(500));
        lead.adopted("shop-2");
        let started = tokio::time::Instant::now();
        assert!(follower.turn(key(id), crashed, WAIT).await.first().is_some());
        assert_eq!(started.elapsed(), 2 * PAUSE - Duration::from_millis(500));
        let started = tokio::time::Instant::now();
        assert!(leader.turn(key("S8.shop-1"), Some(PAUSE * 3), WAIT).await.first().is_some());
        assert_eq!(started.elapsed(), Duration::ZERO, "long settled");
        let unpaused = replicas(Duration::ZERO);
        assert!(unpaused[0].turn(key(id), crashed, WAIT).await.first().is_some());
        assert_eq!(started.elapsed(), Duration::ZERO, "no pause, no wait");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_request_goes_alone_and_the_others_follow_its_answer() {
        let moves = Arc::new(SessionMoves::default());
        let first = moves.turn(key("abc.shop-1"), None, WAIT).await.first().expect("the first request has the turn");
        let gone = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let (moves, gone) = (moves.clone(), gone.clone());
            waiters.push(tokio::spawn(async move {
                let turn = moves.turn(key("abc.shop-1"), None, WAIT).await.first();
                gone.fetch_add(1, Ordering::SeqCst);
                turn.is_none()
            }));
        }
        // Another session is not held up.
        assert!(moves.turn(key("xyz.shop-1"), None, WAIT).await.first().is_some());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(gone.load(Ordering::SeqCst), 0, "no request went while the first was out");
        first.adopted("shop-2");
        for waiter in waiters {
            assert!(waiter.await.expect("task"), "after the answer the others go, none of them first");
        }
        assert!(
            matches!(moves.turn(key("abc.shop-1"), None, WAIT).await, Turn::Renamed(route) if &*route == "shop-2"),
            "a late request with the old id goes at once, with the new one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_request_that_fails_lets_the_next_one_go_first() {
        let moves = Arc::new(SessionMoves::default());
        let first = moves.turn(key("abc.shop-1"), None, WAIT).await.first().expect("turn");
        let next = {
            let moves = moves.clone();
            tokio::spawn(async move {
                moves.turn(key("abc.shop-1"), None, WAIT).await.first().map(|turn| turn.adopted("shop-2")).is_some()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(first);
        assert!(next.await.expect("task"), "the waiting request became the first");
        assert!(
            moves.turn(key("abc.shop-1"), None, WAIT).await.first().is_none(),
            "and its answer adopted the session"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_max_wait() {
        let moves = Arc::new(SessionMoves::default());
        let _first = moves.turn(key("abc.shop-1"), None, WAIT).await.first().expect("turn");
        let started = tokio::time::Instant::now();
        assert!(moves.turn(key("abc.shop-1"), None, WAIT).await.first().is_none());
        assert_eq!(started.elapsed(), WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn adoptions_are_forgotten_after_a_minute_and_swept_out() {
        let moves = Arc::new(SessionMoves::default());
        for i in 0..2000 {
            moves.turn(key(&format!("s{i}.shop-1")), None, WAIT).await.first().expect("turn").adopted("shop-2");
        }
        assert_eq!(moves.tracked(), 2000);
        // Age every adoption past the memory (std's clock, which tokio's
        // paused clock does not move), as if the map had doubled since.
        {
            let mut locked = moves.lock();
            let long_ago = Instant::now().checked_sub(ADOPTED_MEMORY).expect("uptime over a minute");
            for state in locked.by_id.values_mut() {
                *state = MoveState::Adopted { at: long_ago, route: "shop-2".into() };
            }
            locked.sweep_at = 0;
        }
        let again = moves.turn(key("s0.shop-1"), None, WAIT).await.first();
        assert!(again.is_some(), "a forgotten adoption moves again");
        assert_eq!(moves.tracked(), 1, "the sweep dropped the forgotten ones");
    }
}
