//! The PostgreSQL wire protocol, as much of it as a pooler must understand.

pub mod backend;
pub mod codec;
pub mod frontend;
pub mod startup;
pub mod tags;

pub use codec::{body, tag, Frame, PgCodec};

use bytes::{BufMut, Bytes, BytesMut};

/// Builds a typed message: type byte, length (filled in last), body.
pub(crate) fn message(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u8(tag);
    buf.put_u32(0);
    body(&mut buf);
    let len = (buf.len() - 1) as u32;
    buf[1..5].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// Writes a NUL-terminated string.
pub(crate) fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// A NUL-terminated UTF-8 string at the front of `buf`, borrowed; `buf` moves past it.
pub(crate) fn read_cstr<'a>(buf: &mut &'a [u8]) -> Option<&'a str> {
    let mut rest = *buf;
    let text = std::str::from_utf8(read_cbytes(&mut rest)?).ok()?;
    *buf = rest;
    Some(text)
}

/// The same, as bytes in whatever encoding they came.
pub(crate) fn read_cbytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    // Most statement and portal names are empty (the unnamed ones): no search for those.
    let end = match buf.first() {
        Some(0) => 0,
        _ => memchr::memchr(0, buf)?,
    };
    let bytes = &buf[..end];
    *buf = &buf[end + 1..];
    Some(bytes)
}
