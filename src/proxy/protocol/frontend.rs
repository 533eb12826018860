//! The client messages the proxy must look into: Parse, Bind, Describe and Close (to map
//! prepared-statement names) and Query (for SET and LISTEN). Rewritten messages are rebuilt;
//! everything else is forwarded untouched.

use bytes::{BufMut, Bytes};

use super::codec::body;
use super::{message, put_cstr, read_cbytes, read_cstr};

/// Parse: statement name, query, and the rest (parameter types) as it came, borrowed from the
/// frame (the hot path allocates nothing to look at a message). The query stays bytes: it is
/// in the client's encoding, and most Parses need no more than a look at its first words.
pub struct Parse<'a> {
    pub name: &'a str,
    pub query: &'a [u8],
    pub rest: &'a [u8],
}

pub fn parse_message(frame: &Bytes) -> Option<Parse<'_>> {
    let mut buf = body(frame);
    let name = read_cstr(&mut buf)?;
    let query = read_cbytes(&mut buf)?;
    Some(Parse {
        name,
        query,
        rest: buf,
    })
}

/// Rebuilds a Parse under another statement name.
pub fn rename_parse(parse: &Parse<'_>, name: &str) -> Bytes {
    message(b'P', |b| {
        put_cstr(b, name);
        b.put_slice(parse.query);
        b.put_u8(0);
        b.put_slice(parse.rest);
    })
}

/// Bind: (portal, statement), with the offset where the rest starts.
pub fn bind_statement(frame: &Bytes) -> Option<(&str, &str, usize)> {
    let mut buf = body(frame);
    let before = buf.len();
    let portal = read_cstr(&mut buf)?;
    let statement = read_cstr(&mut buf)?;
    Some((portal, statement, 5 + before - buf.len()))
}

pub fn rename_bind(frame: &Bytes, portal: &str, statement: &str, rest_at: usize) -> Bytes {
    message(b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.put_slice(&frame[rest_at..]);
    })
}

/// Describe or Close: ('S' or 'P', name).
pub fn target(frame: &Bytes) -> Option<(u8, &str)> {
    let (&kind, mut rest) = body(frame).split_first()?;
    let name = read_cstr(&mut rest)?;
    Some((kind, name))
}

pub fn rebuild_target(tag: u8, kind: u8, name: &str) -> Bytes {
    message(tag, |b| {
        b.put_u8(kind);
        put_cstr(b, name);
    })
}

/// The text of a simple Query, as bytes (most queries need no more than a look at them).
pub fn query_text(frame: &Bytes) -> Option<&[u8]> {
    let body = body(frame);
    let end = memchr::memchr(0, body)?;
    Some(&body[..end])
}

pub fn query(text: &str) -> Bytes {
    message(b'Q', |b| put_cstr(b, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_bind_round_trip_under_new_names() {
        let parse = message(b'P', |b| {
            put_cstr(b, "s1");
            put_cstr(b, "SELECT $1");
            b.put_slice(&[0, 1, 0, 0, 0, 23]);
        });
        let p = parse_message(&parse).unwrap();
        assert_eq!((p.name, p.query), ("s1", &b"SELECT $1"[..]));
        let renamed = rename_parse(&p, "sy_1");
        let q = parse_message(&renamed).unwrap();
        assert_eq!(
            (q.name, q.query, q.rest),
            ("sy_1", &b"SELECT $1"[..], &[0u8, 1, 0, 0, 0, 23][..])
        );

        let bind = message(b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "s1");
            b.put_slice(&[0, 0, 0, 0, 0, 0]);
        });
        let (portal, statement, rest_at) = bind_statement(&bind).unwrap();
        assert_eq!((portal, statement), ("", "s1"));
        let renamed = rename_bind(&bind, portal, "sy_1", rest_at);
        assert_eq!(bind_statement(&renamed).unwrap().1, "sy_1");
        assert_eq!(&renamed[renamed.len() - 6..], &[0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_parse_in_another_encoding_keeps_its_bytes() {
        // "SELECT 'é'" in LATIN1: not UTF-8, and still a statement to track and rename.
        let query = b"SELECT '\xe9'";
        let parse = message(b'P', |b| {
            put_cstr(b, "s1");
            b.put_slice(query);
            b.put_u8(0);
            b.put_slice(&[0, 0]);
        });
        let p = parse_message(&parse).unwrap();
        assert_eq!((p.name, p.query), ("s1", &query[..]));
        let renamed = rename_parse(&p, "sy_1");
        assert_eq!(parse_message(&renamed).unwrap().query, &query[..]);
    }

    #[test]
    fn describe_and_close_targets() {
        let close = rebuild_target(b'C', b'S', "s1");
        assert_eq!(target(&close), Some((b'S', "s1")));
        assert_eq!(query_text(&query("SET x = 1")), Some(&b"SET x = 1"[..]));
    }
}
