//! Any client byte stream, fed in arbitrary pieces: the smuggling scanner
//! must not panic.
#![no_main]

use std::sync::Arc;

use clusterapp::balancer::framing::{FramingVerdicts, HeadScanner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: (u8, &[u8])| {
    let (piece, bytes) = data;
    let verdicts = Arc::new(FramingVerdicts::default());
    let mut scanner = HeadScanner::new(16 * 1024, verdicts.clone());
    for part in bytes.chunks(usize::from(piece).max(1)) {
        scanner.feed(part);
    }
    while verdicts.take().is_some() {}
});
