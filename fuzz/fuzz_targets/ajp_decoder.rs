//! Any bytes from a member: header check, packet classification and
//! SEND_HEADERS decoding must return errors, never panic, and body chunk
//! offsets must stay inside the payload.
#![no_main]

use clusterapp::balancer::ajp::{
    ContainerPacket, DEFAULT_PACKET_SIZE, decode_container_packet, decode_packet_header, decode_send_headers,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = decode_packet_header([data[0], data[1], data[2], data[3]], DEFAULT_PACKET_SIZE);
    }
    let payload = if data.len() > 4 { &data[4..] } else { data };
    match decode_container_packet(payload) {
        Ok(ContainerPacket::SendHeaders) => {
            let mut headers = http::HeaderMap::new();
            let _ = decode_send_headers(&bytes::Bytes::copy_from_slice(payload), &mut headers);
        }
        Ok(ContainerPacket::SendBodyChunk { offset, len }) => assert!(offset + len <= payload.len()),
        _ => {}
    }
});
