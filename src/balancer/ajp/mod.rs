//! AJP/1.3 ("ajp13") codec: the web-server side of the protocol.
//!
//! The balancer plays the part httpd's `mod_proxy_ajp` plays: it encodes
//! `FORWARD_REQUEST` and request-body packets, and decodes what the servlet
//! container (Tomcat's `AjpProcessor`) sends back. Wire facts, from the
//! AJPv13 connector document:
//!
//! * web server → container packets start with `0x12 0x34`, container → web
//!   server packets with `'A' 'B'`; then a big-endian `u16` payload length;
//! * a string is a `u16` length, the bytes, and a NUL terminator; length
//!   `0xFFFF` is the null string (no bytes, no terminator);
//! * the packet size (header included) is negotiated out of band: both sides
//!   are configured with the same value (`packetSize`, default 8192).
//!
//! Everything received is validated against the configured packet size
//! before it is used; a violation is a [`DecodeError`], never a panic.

mod decode;
mod encode;

pub use decode::{
    ContainerPacket, DecodeError, PacketHeader, decode_container_packet, decode_packet_header, decode_send_headers,
};
pub use encode::{
    EncodeError, ForwardRequest, SslAttributes, encode_body_chunk, encode_cping, encode_empty_body_chunk,
    encode_forward_request, max_body_chunk_len,
};

/// Bytes of every packet header: two magic bytes and a `u16` length.
pub const PACKET_HEADER_LEN: usize = 4;
/// Packet size when none is configured (Tomcat's and httpd's default).
pub const DEFAULT_PACKET_SIZE: usize = 8192;
/// Smallest packet size Tomcat accepts for `packetSize`.
pub const MIN_PACKET_SIZE: usize = 8192;
/// Largest packet size Tomcat accepts for `packetSize`.
pub const MAX_PACKET_SIZE: usize = 65536;

/// Magic of packets the web server sends.
pub const MAGIC_TO_CONTAINER: [u8; 2] = [0x12, 0x34];
/// Magic of packets the container sends.
pub const MAGIC_FROM_CONTAINER: [u8; 2] = [b'A', b'B'];

/// Prefix codes of packets sent to the container.
pub mod to_container {
    pub const FORWARD_REQUEST: u8 = 2;
    pub const CPING: u8 = 10;
}

/// Prefix codes of packets sent by the container.
pub mod from_container {
    pub const SEND_BODY_CHUNK: u8 = 3;
    pub const SEND_HEADERS: u8 = 4;
    pub const END_RESPONSE: u8 = 5;
    pub const GET_BODY_CHUNK: u8 = 6;
    pub const CPONG_REPLY: u8 = 9;
}

/// Request attribute codes of `FORWARD_REQUEST`.
pub mod attribute {
    pub const REMOTE_USER: u8 = 0x03;
    pub const AUTH_TYPE: u8 = 0x04;
    pub const QUERY_STRING: u8 = 0x05;
    pub const ROUTE: u8 = 0x06;
    pub const SSL_CERT: u8 = 0x07;
    pub const SSL_CIPHER: u8 = 0x08;
    pub const SSL_SESSION: u8 = 0x09;
    pub const REQ_ATTRIBUTE: u8 = 0x0A;
    pub const SSL_KEY_SIZE: u8 = 0x0B;
    pub const SECRET: u8 = 0x0C;
    pub const STORED_METHOD: u8 = 0x0D;
    pub const ARE_DONE: u8 = 0xFF;

    /// Named request attributes Tomcat accepts without `allowedRequestAttributesPattern`.
    pub const NAME_REMOTE_PORT: &str = "AJP_REMOTE_PORT";
    pub const NAME_LOCAL_ADDR: &str = "AJP_LOCAL_ADDR";
    pub const NAME_SSL_PROTOCOL: &str = "AJP_SSL_PROTOCOL";
}

/// Method code for a method that has none: the name travels in
/// [`attribute::STORED_METHOD`].
pub const METHOD_STORED: u8 = 0xFF;

/// AJP method codes, in code order starting at 1.
pub const METHOD_NAMES: [&str; 27] = [
    "OPTIONS",
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "TRACE",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "ACL",
    "REPORT",
    "VERSION-CONTROL",
    "CHECKIN",
    "CHECKOUT",
    "UNCHECKOUT",
    "SEARCH",
    "MKWORKSPACE",
    "UPDATE",
    "LABEL",
    "MERGE",
    "BASELINE-CONTROL",
    "MKACTIVITY",
];

/// Request header names that have a code (`0xA0nn`), lower-case, in code order starting at 1.
pub const REQUEST_HEADER_CODES: [&str; 14] = [
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "authorization",
    "connection",
    "content-type",
    "content-length",
    "cookie",
    "cookie2",
    "host",
    "pragma",
    "referer",
    "user-agent",
];

/// Response header names that have a code (`0xA0nn`), in code order starting at 1.
pub const RESPONSE_HEADER_CODES: [&str; 11] = [
    "content-type",
    "content-language",
    "content-length",
    "date",
    "last-modified",
    "location",
    "set-cookie",
    "set-cookie2",
    "servlet-engine",
    "status",
    "www-authenticate",
];

/// The AJP method code of an HTTP method, or `None` when it must be stored by name.
pub fn method_code(method: &str) -> Option<u8> {
    METHOD_NAMES.iter().position(|m| *m == method).map(|i| (i + 1) as u8)
}

/// The `0xA0nn` code of a request header (name already lower-case, as `http` stores it).
pub fn request_header_code(lower_name: &str) -> Option<u16> {
    REQUEST_HEADER_CODES.iter().position(|h| *h == lower_name).map(|i| 0xA000 | (i as u16 + 1))
}
