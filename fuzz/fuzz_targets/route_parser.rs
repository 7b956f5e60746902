//! Any request path and Cookie header: the sticky route parser must not panic
//! and a route it returns must come from the input.
#![no_main]

use clusterapp::balancer::routing::route_of_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: (&str, &[u8])| {
    let (path, cookie) = data;
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_bytes(cookie) {
        headers.insert(http::header::COOKIE, value);
    }
    if let Some(route) = route_of_request(path, &headers, "JSESSIONID", "jsessionid") {
        assert!(!route.is_empty());
        assert!(path.contains(route) || cookie.windows(route.len()).any(|w| w == route.as_bytes()));
    }
});
