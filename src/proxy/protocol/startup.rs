//! The first packet a client sends.

use bytes::{Buf, Bytes};

pub const PROTOCOL_3_0: u32 = 196_608;
const CANCEL_REQUEST: u32 = 80_877_102;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;

#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
    Start {
        params: Vec<(String, String)>,
    },
    /// Another protocol version, or a packet that does not parse.
    Unsupported(String),
}

impl Startup {
    pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a whole startup packet (length included).
pub fn parse(packet: &Bytes) -> Startup {
    let mut body = &packet[4..];
    let code = body.get_u32();
    match code {
        SSL_REQUEST => Startup::Ssl,
        GSSENC_REQUEST => Startup::GssEnc,
        CANCEL_REQUEST if body.len() >= 8 => Startup::Cancel {
            process_id: body.get_i32(),
            secret_key: body.get_i32(),
        },
        PROTOCOL_3_0 => match parse_params(body) {
            Some(params) => Startup::Start { params },
            None => Startup::Unsupported("malformed startup packet".into()),
        },
        other => Startup::Unsupported(format!(
            "unsupported frontend protocol {}.{}: server supports 3.0",
            other >> 16,
            other & 0xffff
        )),
    }
}

fn parse_params(mut body: &[u8]) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    loop {
        let key = cstr(&mut body)?;
        if key.is_empty() {
            return Some(params);
        }
        let value = cstr(&mut body)?;
        params.push((key, value));
    }
}

/// Reads a NUL-terminated string, owned, and advances past it.
pub fn cstr(buf: &mut &[u8]) -> Option<String> {
    super::read_cstr(buf).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, rest: &[u8]) -> Bytes {
        let mut v = ((8 + rest.len()) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        Bytes::from(v)
    }

    #[test]
    fn startup_kinds() {
        assert_eq!(parse(&packet(SSL_REQUEST, b"")), Startup::Ssl);
        assert_eq!(parse(&packet(GSSENC_REQUEST, b"")), Startup::GssEnc);
        assert_eq!(
            parse(&packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9])),
            Startup::Cancel {
                process_id: 7,
                secret_key: 9
            }
        );
        let start = parse(&packet(PROTOCOL_3_0, b"user\0app\0database\0shop\0\0"));
        assert_eq!(
            start,
            Startup::Start {
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "shop".into())
                ]
            }
        );
        assert!(matches!(
            parse(&packet(PROTOCOL_3_0, b"user\0app")),
            Startup::Unsupported(_)
        ));
        assert!(
            matches!(parse(&packet(131_072, b"")), Startup::Unsupported(m) if m.contains("2.0"))
        );
    }
}
