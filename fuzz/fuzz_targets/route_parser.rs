//! Any request path and Cookie header: the session parser must not panic,
//! and the base and route it returns must come from the input.
#![no_main]

use clusterapp::balancer::routing::{SessionWeigher, session_of_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: (&str, &[u8])| {
    let (path, cookie) = data;
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_bytes(cookie) {
        headers.insert(http::header::COOKIE, value);
    }
    if let Some(session) = session_of_request(path, &headers, "JSESSIONID", "jsessionid") {
        assert!(!session.route.is_empty());
        let id = format!("{}.{}", session.base, session.route);
        assert!(path.contains(&id) || cookie.windows(id.len()).any(|w| w == id.as_bytes()));
        let _ = SessionWeigher::new(session.base).weight(session.route);
    }
});
