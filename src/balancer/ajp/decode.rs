//! Packets the container sends: `SEND_HEADERS`, `SEND_BODY_CHUNK`,
//! `END_RESPONSE`, `GET_BODY_CHUNK`, `CPONG_REPLY`.
//!
//! Decoding is two steps so the connection can read exactly one packet from
//! the socket: [`decode_packet_header`] checks magic and length against the
//! packet size, then [`decode_container_packet`] validates the payload.
//! Body chunks are returned as offsets into the payload so the caller can
//! slice its `Bytes` without copying; response header values are slices of
//! the payload too (a reference count each, not an allocation and a copy).

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::{MAGIC_FROM_CONTAINER, PACKET_HEADER_LEN, RESPONSE_HEADER_CODES, from_container};

/// A packet from the container that breaks the protocol. The connection it
/// came from can no longer be trusted and is closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("bad packet magic {0:02x?}")]
    BadMagic([u8; 2]),
    #[error("packet payload of {length} bytes exceeds the packet size {packet_size}")]
    TooLong { length: usize, packet_size: usize },
    #[error("empty packet")]
    Empty,
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("string in {0} is not NUL-terminated")]
    MissingTerminator(&'static str),
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    #[error("END_RESPONSE reuse flag is {0}, must be 0 or 1")]
    BadReuseFlag(u8),
    #[error("{0} bytes left over after {1}")]
    TrailingBytes(usize, &'static str),
    #[error("invalid status code {0}")]
    BadStatus(u16),
    #[error("unknown response header code {0:#06x}")]
    UnknownHeaderCode(u16),
    #[error("invalid response header name")]
    BadHeaderName,
    #[error("invalid response header value")]
    BadHeaderValue,
}

/// The 4-byte header of a container packet, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    pub payload_len: usize,
}

/// Validates magic and length of a container packet header.
pub fn decode_packet_header(header: [u8; PACKET_HEADER_LEN], packet_size: usize) -> Result<PacketHeader, DecodeError> {
    if header[..2] != MAGIC_FROM_CONTAINER {
        return Err(DecodeError::BadMagic([header[0], header[1]]));
    }
    let payload_len = u16::from_be_bytes([header[2], header[3]]) as usize;
    if payload_len + PACKET_HEADER_LEN > packet_size {
        return Err(DecodeError::TooLong { length: payload_len, packet_size });
    }
    if payload_len == 0 {
        return Err(DecodeError::Empty);
    }
    Ok(PacketHeader { payload_len })
}

/// One decoded container packet. `SEND_HEADERS` is only classified here;
/// [`decode_send_headers`] builds the header map when the caller needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerPacket {
    SendHeaders,
    /// Body bytes at `payload[offset..offset + len]`; `len == 0` is Tomcat's flush marker.
    SendBodyChunk {
        offset: usize,
        len: usize,
    },
    EndResponse {
        reuse: bool,
    },
    GetBodyChunk {
        requested: usize,
    },
    CPong,
}

/// A cursor over a payload that never reads past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let s = self.bytes.get(self.pos..self.pos + 2).ok_or(DecodeError::Truncated(what))?;
        self.pos += 2;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn peek_u16(&self, what: &'static str) -> Result<u16, DecodeError> {
        let s = self.bytes.get(self.pos..self.pos + 2).ok_or(DecodeError::Truncated(what))?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    /// An AJP string; `None` for the null string (length `0xFFFF`).
    fn string(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, DecodeError> {
        let len = self.u16(what)?;
        if len == 0xFFFF {
            return Ok(None);
        }
        let len = len as usize;
        let s = self.bytes.get(self.pos..self.pos + len).ok_or(DecodeError::Truncated(what))?;
        match self.bytes.get(self.pos + len) {
            Some(0) => {}
            Some(_) => return Err(DecodeError::MissingTerminator(what)),
            None => return Err(DecodeError::Truncated(what)),
        }
        self.pos += len + 1;
        Ok(Some(s))
    }
    fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n, what)),
        }
    }
}

/// Classifies and validates a container packet payload (header stripped).
pub fn decode_container_packet(payload: &[u8]) -> Result<ContainerPacket, DecodeError> {
    let mut c = Cursor::new(payload);
    match c.u8("packet type")? {
        from_container::SEND_HEADERS => Ok(ContainerPacket::SendHeaders),
        from_container::SEND_BODY_CHUNK => {
            let len = c.u16("SEND_BODY_CHUNK length")? as usize;
            let offset = c.pos;
            if c.remaining() < len {
                return Err(DecodeError::Truncated("SEND_BODY_CHUNK data"));
            }
            c.pos += len;
            // Tomcat appends a NUL after the data (its string writer); mod_jk
            // and httpd tolerate both forms, so do we, but nothing else.
            match c.remaining() {
                0 => {}
                1 if payload[c.pos] == 0 => {}
                n => return Err(DecodeError::TrailingBytes(n, "SEND_BODY_CHUNK")),
            }
            Ok(ContainerPacket::SendBodyChunk { offset, len })
        }
        from_container::END_RESPONSE => {
            let reuse = match c.u8("END_RESPONSE reuse flag")? {
                0 => false,
                1 => true,
                other => return Err(DecodeError::BadReuseFlag(other)),
            };
            c.finish("END_RESPONSE")?;
            Ok(ContainerPacket::EndResponse { reuse })
        }
        from_container::GET_BODY_CHUNK => {
            let requested = c.u16("GET_BODY_CHUNK length")? as usize;
            c.finish("GET_BODY_CHUNK")?;
            Ok(ContainerPacket::GetBodyChunk { requested })
        }
        from_container::CPONG_REPLY => {
            c.finish("CPONG_REPLY")?;
            Ok(ContainerPacket::CPong)
        }
        other => Err(DecodeError::UnknownType(other)),
    }
}

/// Decodes a `SEND_HEADERS` payload into a status and header map, appending
/// to `headers` (the caller passes the response's own map). Header values
/// share the payload's buffer.
pub fn decode_send_headers(payload: &Bytes, headers: &mut HeaderMap) -> Result<StatusCode, DecodeError> {
    let mut c = Cursor::new(payload);
    let kind = c.u8("packet type")?;
    debug_assert_eq!(kind, from_container::SEND_HEADERS);
    let code = c.u16("status")?;
    let status = StatusCode::from_u16(code).map_err(|_| DecodeError::BadStatus(code))?;
    // The reason phrase: validated as a string, not used (hyper writes the canonical one).
    c.string("status message")?;
    let count = c.u16("header count")?;
    // The count is the member's word: reserve only what the bytes present
    // can hold (a header takes at least 4), never up to 65535 entries —
    // HeaderMap panics past its maximum size. Found by cargo fuzz.
    headers.reserve((count as usize).min(c.remaining() / 4));
    for _ in 0..count {
        let probe = c.peek_u16("header name")?;
        let name = if probe & 0xFF00 == 0xA000 {
            c.u16("header code")?;
            let index = (probe & 0x00FF) as usize;
            let text = index
                .checked_sub(1)
                .and_then(|i| RESPONSE_HEADER_CODES.get(i))
                .ok_or(DecodeError::UnknownHeaderCode(probe))?;
            HeaderName::from_static(text)
        } else {
            let raw = c.string("header name")?.ok_or(DecodeError::BadHeaderName)?;
            HeaderName::from_bytes(raw).map_err(|_| DecodeError::BadHeaderName)?
        };
        let value = match c.string("header value")? {
            // `raw` is a slice of `payload` (the cursor reads nothing else), as `slice_ref` requires.
            Some(raw) => HeaderValue::from_maybe_shared(payload.slice_ref(raw)),
            None => Ok(HeaderValue::from_static("")),
        };
        let value = value.map_err(|_| DecodeError::BadHeaderValue)?;
        headers.append(name, value);
    }
    c.finish("SEND_HEADERS")?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`decode_send_headers`] on a copy of `payload` in a `Bytes`.
    fn decode(payload: &[u8], headers: &mut HeaderMap) -> Result<StatusCode, DecodeError> {
        decode_send_headers(&Bytes::copy_from_slice(payload), headers)
    }

    fn send_headers(status: u16, headers: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut p = vec![4u8];
        p.extend_from_slice(&status.to_be_bytes());
        p.extend_from_slice(&[0, 2, b'O', b'K', 0]);
        p.extend_from_slice(&(headers.len() as u16).to_be_bytes());
        for (n, v) in headers {
            p.extend_from_slice(n);
            p.extend_from_slice(&(v.len() as u16).to_be_bytes());
            p.extend_from_slice(v);
            p.push(0);
        }
        p
    }

    fn named(name: &str) -> Vec<u8> {
        let mut v = (name.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.push(0);
        v
    }

    #[test]
    fn header_magic_and_length() {
        assert_eq!(decode_packet_header(*b"AB\x00\x02", 8192), Ok(PacketHeader { payload_len: 2 }));
        assert_eq!(decode_packet_header(*b"\x12\x34\x00\x02", 8192), Err(DecodeError::BadMagic([0x12, 0x34])));
        assert_eq!(
            decode_packet_header(*b"AB\x1f\xfd", 8192),
            Err(DecodeError::TooLong { length: 0x1ffd, packet_size: 8192 })
        );
        assert_eq!(decode_packet_header(*b"AB\x1f\xfc", 8192), Ok(PacketHeader { payload_len: 8188 }));
        assert_eq!(decode_packet_header(*b"AB\x00\x00", 8192), Err(DecodeError::Empty));
    }

    #[test]
    fn send_headers_with_coded_and_named_headers() {
        let ct = [0xA0, 0x01];
        let cookie = [0xA0, 0x07];
        let x = named("X-Route");
        let p = send_headers(
            201,
            &[
                (&ct, b"text/html;charset=UTF-8"),
                (&cookie, b"JSESSIONID=ABC.s1; Path=/counter"),
                (&x, b"s1"),
                (&cookie, b"b=2"),
            ],
        );
        assert_eq!(decode_container_packet(&p), Ok(ContainerPacket::SendHeaders));
        let mut h = HeaderMap::new();
        let status = decode(&p, &mut h).expect("decode");
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(h["content-type"], "text/html;charset=UTF-8");
        assert_eq!(h["x-route"], "s1");
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["JSESSIONID=ABC.s1; Path=/counter", "b=2"]);
    }

    #[test]
    fn send_headers_rejections() {
        let bad_code = [0xA0, 0x0C];
        let mut h = HeaderMap::new();
        assert_eq!(
            decode(&send_headers(200, &[(&bad_code, b"v")]), &mut h),
            Err(DecodeError::UnknownHeaderCode(0xA00C))
        );
        let zero_code = [0xA0, 0x00];
        assert_eq!(
            decode(&send_headers(200, &[(&zero_code, b"v")]), &mut h),
            Err(DecodeError::UnknownHeaderCode(0xA000))
        );
        assert_eq!(decode(&send_headers(1000, &[]), &mut h), Err(DecodeError::BadStatus(1000)));
        let bad = named("bad name");
        assert_eq!(decode(&send_headers(200, &[(&bad, b"v")]), &mut h), Err(DecodeError::BadHeaderName));
        let x = named("x");
        assert_eq!(decode(&send_headers(200, &[(&x, b"a\r\nInjected: 1")]), &mut h), Err(DecodeError::BadHeaderValue));
        // Truncated string: claims 10 bytes, has 2.
        let mut p = send_headers(200, &[]);
        p.truncate(3);
        p.extend_from_slice(&[0, 10, b'O', b'K']);
        assert_eq!(decode(&p, &mut h), Err(DecodeError::Truncated("status message")));
        // Missing terminator.
        let mut p = vec![4u8, 0, 200, 0, 2, b'O', b'K', b'X', 0, 0];
        assert_eq!(decode(&p, &mut h), Err(DecodeError::MissingTerminator("status message")));
        // Header count larger than the headers present.
        p = send_headers(200, &[]);
        let n = p.len();
        p[n - 1] = 3;
        assert_eq!(decode(&p, &mut h), Err(DecodeError::Truncated("header name")));
        // A huge header count with nothing behind it: an error, not a panic
        // (the fuzzer's input: count 65530, then one byte).
        let p = [4u8, 0, 254, 255, 255, 255, 250, 4];
        assert_eq!(decode(&p, &mut HeaderMap::new()), Err(DecodeError::Truncated("header name")));
        // Trailing garbage.
        let mut p = send_headers(200, &[]);
        p.push(7);
        assert_eq!(decode(&p, &mut h), Err(DecodeError::TrailingBytes(1, "SEND_HEADERS")));
    }

    #[test]
    fn body_chunk_with_and_without_terminator() {
        assert_eq!(
            decode_container_packet(b"\x03\x00\x03abc\x00"),
            Ok(ContainerPacket::SendBodyChunk { offset: 3, len: 3 })
        );
        assert_eq!(
            decode_container_packet(b"\x03\x00\x03abc"),
            Ok(ContainerPacket::SendBodyChunk { offset: 3, len: 3 })
        );
        assert_eq!(
            decode_container_packet(b"\x03\x00\x00\x00"),
            Ok(ContainerPacket::SendBodyChunk { offset: 3, len: 0 })
        );
        assert_eq!(decode_container_packet(b"\x03\x00\x05abc"), Err(DecodeError::Truncated("SEND_BODY_CHUNK data")));
        assert_eq!(decode_container_packet(b"\x03\x00\x01abc"), Err(DecodeError::TrailingBytes(2, "SEND_BODY_CHUNK")));
        assert_eq!(decode_container_packet(b"\x03\x00\x03abcX"), Err(DecodeError::TrailingBytes(1, "SEND_BODY_CHUNK")));
        assert_eq!(decode_container_packet(b"\x03\x00"), Err(DecodeError::Truncated("SEND_BODY_CHUNK length")));
    }

    #[test]
    fn end_response_reuse_flag() {
        assert_eq!(decode_container_packet(b"\x05\x01"), Ok(ContainerPacket::EndResponse { reuse: true }));
        assert_eq!(decode_container_packet(b"\x05\x00"), Ok(ContainerPacket::EndResponse { reuse: false }));
        assert_eq!(decode_container_packet(b"\x05\x02"), Err(DecodeError::BadReuseFlag(2)));
        assert_eq!(decode_container_packet(b"\x05"), Err(DecodeError::Truncated("END_RESPONSE reuse flag")));
        assert_eq!(decode_container_packet(b"\x05\x01\x00"), Err(DecodeError::TrailingBytes(1, "END_RESPONSE")));
    }

    #[test]
    fn get_body_chunk_cpong_and_unknown() {
        assert_eq!(decode_container_packet(b"\x06\x1f\xfa"), Ok(ContainerPacket::GetBodyChunk { requested: 8186 }));
        assert_eq!(decode_container_packet(b"\x06\x1f"), Err(DecodeError::Truncated("GET_BODY_CHUNK length")));
        assert_eq!(decode_container_packet(b"\x09"), Ok(ContainerPacket::CPong));
        assert_eq!(decode_container_packet(b"\x09\x09"), Err(DecodeError::TrailingBytes(1, "CPONG_REPLY")));
        assert_eq!(decode_container_packet(b"\x07"), Err(DecodeError::UnknownType(7)));
        assert_eq!(decode_container_packet(b""), Err(DecodeError::Truncated("packet type")));
    }

    /// Header values are slices of the payload's buffer, not copies.
    #[test]
    fn header_values_share_the_payload() {
        let x = named("X-Route");
        let payload = Bytes::from(send_headers(200, &[(&x, b"shop-1"), (&[0xA0, 0x01], b"text/plain")]));
        let mut h = HeaderMap::new();
        decode_send_headers(&payload, &mut h).expect("decode");
        let inside = payload.as_ptr_range();
        for value in h.values() {
            assert!(inside.contains(&value.as_bytes().as_ptr()), "{value:?} was copied");
        }
        assert_eq!(h["x-route"], "shop-1");
        assert_eq!(h["content-type"], "text/plain");
    }

    #[test]
    fn null_string_header_value_is_empty() {
        let x = named("x-empty");
        let mut p = send_headers(200, &[]);
        let n = p.len();
        p[n - 1] = 1;
        p.extend_from_slice(&x);
        p.extend_from_slice(&[0xFF, 0xFF]);
        let mut h = HeaderMap::new();
        decode(&p, &mut h).expect("decode");
        assert_eq!(h["x-empty"], "");
    }

    /// The property the `ajp_decoder` fuzz target checks, on stable: random
    /// payloads (with valid type bytes, so decoding gets deep) never panic.
    #[test]
    fn random_payloads_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50_000 {
            let len = (next() % 48) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if !p.is_empty() {
                p[0] = [3, 4, 5, 6, 9][(next() % 5) as usize];
            }
            if p.len() > 6 && next() % 2 == 0 {
                p[5] = 0xA0; // coded header names
            }
            match decode_container_packet(&p) {
                Ok(ContainerPacket::SendHeaders) => {
                    let _ = decode(&p, &mut HeaderMap::new());
                }
                Ok(ContainerPacket::SendBodyChunk { offset, len }) => assert!(offset + len <= p.len()),
                _ => {}
            }
        }
    }
}
