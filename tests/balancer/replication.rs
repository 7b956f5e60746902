//! What a moved session finds on its new node: a browser's parallel
//! requests of one session, each acknowledged to the user, must all be in
//! the copy the other node holds when the session moves there (failover,
//! drain, rebalancing). Two clustered Tomcats, no balancer: the test sends
//! a burst of parallel requests straight to the session's node, then one
//! request to the other node, which renames the session for itself
//! (`JvmRouteBinderValve`) and must continue from the highest count the
//! burst acknowledged.

use std::net::SocketAddr;

use futures::future::join_all;

use crate::common::http::get;
use crate::common::tomcat::{TomcatNode, TomcatOptions, start_cluster};

const SECRET: &str = "replication-secret";
/// Moves of the session between the two nodes.
const MOVES: usize = 150;
/// Parallel requests before each move: a browser's connections to one site.
const BURST: usize = 6;

fn http_of(node: &TomcatNode) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], node.http_port))
}

fn counter_of(reply: &crate::common::http::Reply) -> u64 {
    reply.header("x-counter").and_then(|c| c.parse().ok()).expect("X-Counter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_session_holds_every_acknowledged_parallel_write() {
    let nodes = start_cluster(&["r1", "r2"], &TomcatOptions::new(SECRET));
    let first = get(http_of(&nodes[0]), "/counter/", None).await;
    assert_eq!(first.status, 200);
    let mut session = first.set_session_id().expect("a new session");
    let mut acknowledged = counter_of(&first);
    let mut here = 0;
    let mut lost = Vec::new();
    for move_number in 0..MOVES {
        let burst = (0..BURST).map(|_| get(http_of(&nodes[here]), "/counter/", Some(&session)));
        for reply in join_all(burst).await {
            assert_eq!(reply.status, 200, "burst answer: {}", reply.text());
            acknowledged = acknowledged.max(counter_of(&reply));
        }
        here = 1 - here;
        let moved = get(http_of(&nodes[here]), "/counter/", Some(&session)).await;
        assert_eq!(moved.status, 200, "move answer: {}", moved.text());
        let count = counter_of(&moved);
        if count != acknowledged + 1 {
            lost.push((move_number, acknowledged, count));
        }
        acknowledged = count;
        session = moved.set_session_id().expect("the moved session is renamed for its new node");
    }
    assert!(
        lost.is_empty(),
        "{} of {MOVES} moves continued from a copy without every acknowledged write \
         (move, highest acknowledged, count after the move): {lost:?}",
        lost.len()
    );
}
