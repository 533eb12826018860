//! Messages the proxy itself sends to clients (everything else is forwarded from a server).

use bytes::{BufMut, Bytes};

use super::{message, put_cstr};

pub fn authentication_ok() -> Bytes {
    message(b'R', |b| b.put_u32(0))
}

pub fn authentication_sasl(mechanisms: &[&str]) -> Bytes {
    message(b'R', |b| {
        b.put_u32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    })
}

pub fn authentication_sasl_continue(data: &[u8]) -> Bytes {
    message(b'R', |b| {
        b.put_u32(11);
        b.put_slice(data);
    })
}

pub fn authentication_sasl_final(data: &[u8]) -> Bytes {
    message(b'R', |b| {
        b.put_u32(12);
        b.put_slice(data);
    })
}

pub fn parameter_status(name: &str, value: &str) -> Bytes {
    message(b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    })
}

pub fn backend_key_data(process_id: i32, secret_key: i32) -> Bytes {
    message(b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    })
}

pub fn ready_for_query(status: u8) -> Bytes {
    message(b'Z', |b| b.put_u8(status))
}

pub fn parse_complete() -> Bytes {
    message(b'1', |_| {})
}

/// `ERROR` or `FATAL` with a SQLSTATE, as PostgreSQL itself would send it.
pub fn error_response(severity: &str, code: &str, text: &str) -> Bytes {
    message(b'E', |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', text),
        ] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    })
}

/// The single byte that answers SSLRequest and GSSENCRequest with "no".
pub fn refuse_encryption() -> Bytes {
    Bytes::from_static(b"N")
}

/// Whether an ErrorResponse is FATAL or PANIC: the server closes the connection after it.
pub fn is_fatal(body: &[u8]) -> bool {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        if field == b'V' || field == b'S' {
            let severity = &tail[..end];
            return severity == b"FATAL" || severity == b"PANIC";
        }
        if field == 0 {
            break;
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    false
}

/// Reads SQLSTATE and message out of an ErrorResponse body, for logs and metrics.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut text) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => code = value,
            b'M' => text = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    (code, text)
}

/// The command tags of the CommandComplete messages in a run of server messages (the codec
/// hands rows and completions over as one frame).
pub fn command_tags(mut frames: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || loop {
        let kind = *frames.first()?;
        let len = u32::from_be_bytes(frames.get(1..5)?.try_into().ok()?) as usize;
        let message = frames.get(5..1 + len)?;
        frames = &frames[1 + len..];
        if kind == b'C' {
            let end = message
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(message.len());
            return Some(&message[..end]);
        }
    })
}

/// The messages of a run the codec batched ([`super::codec::passes_through`]), each with its
/// tag and length.
pub fn messages(mut run: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = u32::from_be_bytes(run.get(1..5)?.try_into().ok()?) as usize + 1;
        let message = run.get(..len)?;
        run = &run[len..];
        Some(message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_command_tags_in_a_run_of_messages() {
        let run = b"D\0\0\0\x06\0\0C\0\0\0\x0dROLLBACK\0C\0\0\0\x08SET\0";
        let tags: Vec<&[u8]> = command_tags(run).collect();
        assert_eq!(tags, [&b"ROLLBACK"[..], b"SET"]);
    }

    #[test]
    fn lengths_cover_the_body() {
        let rfq = ready_for_query(b'I');
        assert_eq!(&rfq[..], b"Z\0\0\0\x05I");
        let err = error_response(
            "FATAL",
            "28P01",
            "password authentication failed for user \"app\"",
        );
        assert_eq!(
            u32::from_be_bytes([err[1], err[2], err[3], err[4]]) as usize,
            err.len() - 1
        );
        assert_eq!(
            error_fields(&err[5..]),
            (
                "28P01".to_string(),
                "password authentication failed for user \"app\"".to_string()
            )
        );
        assert!(is_fatal(&err[5..]));
        assert!(!is_fatal(
            &error_response("ERROR", "57014", "canceled")[5..]
        ));
    }
}
