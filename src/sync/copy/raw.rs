//! The copy's two connections at the protocol level. The rows go from the source's `COPY TO`
//! to the target's `COPY FROM` as the servers framed them: a CopyData message is the same in
//! both directions, so each run of them read from the source is written to the target as it
//! is, without looking inside (the codec hands over runs of CopyData at once). Through a
//! driver, every row would be taken apart and put back together in the coordinator.

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;

use crate::pg::{PgError, Side};
use crate::plan::Endpoint;
use crate::proxy::pool::server::{ServerConn, ServerTarget, ServerTls};
use crate::proxy::protocol::backend::{error_fields, messages};

/// A logged-in raw connection to one server, as the coordinator's role.
pub struct Raw {
    conn: ServerConn,
    side: Side,
}

/// Where and as whom a raw connection logs in; `replication` makes it a walsender.
pub fn login(
    endpoint: &Endpoint,
    replication: Option<&'static str>,
) -> Result<ServerTarget, PgError> {
    let url = &endpoint.url;
    let (_, password) = crate::pg::coordinator_conninfo(url);
    let tls = match url.config().get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => None,
        mode => Some(ServerTls {
            connector: crate::proxy::tls::connector()
                .map_err(|e| PgError::Tool(format!("TLS towards {}: {e}", url.host())))?,
            name: crate::proxy::tls::server_name(&url.host())
                .map_err(|e| PgError::Tool(format!("TLS towards {}: {e}", url.host())))?,
            required: mode == tokio_postgres::config::SslMode::Require,
        }),
    };
    Ok(ServerTarget {
        host: url.host(),
        port: url.port(),
        database: url.dbname().to_string(),
        user: url.user().to_string(),
        password: password.unwrap_or_default(),
        tls,
        pids: Default::default(),
        max_prepared_statements: 0,
        replication,
    })
}

/// What a simple query answered: the DataRows' columns and the last command tag.
#[derive(Debug, Default)]
pub struct Answer {
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
}

impl Raw {
    pub async fn connect(
        side: Side,
        endpoint: &Endpoint,
        replication: Option<&'static str>,
    ) -> Result<Raw, PgError> {
        let target = login(endpoint, replication)?;
        let conn = ServerConn::connect(&target, endpoint.connect_timeout.0)
            .await
            .map_err(|e| PgError::Tool(format!("{side}: connect: {e}")))?;
        Ok(Raw { conn, side })
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> PgError {
        PgError::Tool(format!("{}: {what}: {e}", self.side))
    }

    async fn send_query(&mut self, statement: &str) -> Result<(), PgError> {
        let mut buf = BytesMut::new();
        frontend::query(statement, &mut buf).map_err(|e| self.failed(statement, e))?;
        let frame = buf.freeze();
        self.conn
            .send(frame)
            .await
            .map_err(|e| self.failed(statement, e))
    }

    async fn recv(&mut self, what: &str) -> Result<Bytes, PgError> {
        match self.conn.recv().await {
            Ok(frame) => Ok(frame),
            Err(e) => Err(self.failed(what, e)),
        }
    }

    /// Runs `statement` (one or several, simple protocol) to its ReadyForQuery.
    pub async fn simple(&mut self, statement: &str) -> Result<Answer, PgError> {
        self.send_query(statement).await?;
        self.finish(statement).await
    }

    /// Reads the rest of an answer up to ReadyForQuery; an ErrorResponse in it is the result.
    async fn finish(&mut self, what: &str) -> Result<Answer, PgError> {
        let mut answer = Answer::default();
        let mut error = None;
        loop {
            let frame = self.recv(what).await?;
            for message in messages(&frame) {
                let body = message.get(5..).unwrap_or_default();
                match message[0] {
                    b'D' => answer.rows.push(data_row(body)),
                    b'C' => answer.tag = cstr(body),
                    b'E' => {
                        let (code, text) = error_fields(body);
                        error.get_or_insert(format!("{text} ({code})"));
                    }
                    b'Z' => {
                        return match error {
                            Some(e) => Err(self.failed(what, e)),
                            None => Ok(answer),
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Streams `copy_out` on `source` into `copy_in` on `target`, in the target's open
/// transaction; `streamed` is told each run's bytes. Returns the rows the target took.
pub async fn pipe(
    source: &mut Raw,
    target: &mut Raw,
    copy_out: &str,
    copy_in: &str,
    streamed: &mut (dyn FnMut(u64) + Send),
) -> Result<u64, PgError> {
    target.send_query(copy_in).await?;
    expect_copy(target, copy_in, b'G').await?;
    source.send_query(copy_out).await?;
    // The CopyOutResponse comes in one run with the first rows.
    let mut first = expect_copy(source, copy_out, b'H').await?;
    'rows: loop {
        let frame = match first.take() {
            Some(rest) => rest,
            None => source.recv(copy_out).await?,
        };
        // A run of CopyData, perhaps ended by CopyDone and the completion.
        let mut end = 0;
        let mut done = false;
        for message in messages(&frame) {
            match message[0] {
                b'd' => end += message.len(),
                b'c' => {
                    done = true;
                    break;
                }
                _ => break,
            }
        }
        if end > 0 {
            streamed(end as u64);
            let run = frame.slice(..end);
            target
                .conn
                .send(run)
                .await
                .map_err(|e| target.failed(copy_in, e))?;
        }
        if done {
            break 'rows;
        }
        if end < frame.len() {
            // Neither CopyData nor CopyDone: the source's error.
            let rest = frame.slice(end..);
            return Err(source.error_in(&rest, copy_out).await);
        }
    }
    let mut buf = BytesMut::new();
    frontend::copy_done(&mut buf);
    target
        .conn
        .send(buf.freeze())
        .await
        .map_err(|e| target.failed(copy_in, e))?;
    let copied = target.finish(copy_in).await?;
    source.finish(copy_out).await?;
    copied
        .tag
        .strip_prefix("COPY ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| target.failed(copy_in, format!("unexpected completion {:?}", copied.tag)))
}

/// Reads up to the CopyInResponse (`G`) or CopyOutResponse (`H`), past any notice; returns
/// what came after it in the same run.
async fn expect_copy(raw: &mut Raw, what: &str, response: u8) -> Result<Option<Bytes>, PgError> {
    loop {
        let frame = raw.recv(what).await?;
        let mut at = 0;
        for message in messages(&frame) {
            at += message.len();
            match message[0] {
                tag if tag == response => {
                    return Ok((at < frame.len()).then(|| frame.slice(at..)));
                }
                b'N' => {}
                _ => {
                    let rest = frame.slice(at - message.len()..);
                    return Err(raw.error_in(&rest, what).await);
                }
            }
        }
    }
}

impl Raw {
    /// The error `frame` starts (followed by ReadyForQuery, read here), or a protocol error.
    async fn error_in(&mut self, frame: &Bytes, what: &str) -> PgError {
        let text = match frame.first() {
            Some(b'E') => {
                let (code, text) = error_fields(frame.get(5..).unwrap_or_default());
                format!("{text} ({code})")
            }
            other => format!("unexpected message {:?}", other.map(|&t| t as char)),
        };
        let _ = self.finish(what).await;
        self.failed(what, text)
    }
}

fn cstr(body: &[u8]) -> String {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// A DataRow's columns as text.
pub fn data_row(mut body: &[u8]) -> Vec<Option<String>> {
    use bytes::Buf;
    let mut columns = Vec::new();
    if body.len() < 2 {
        return columns;
    }
    let count = body.get_i16();
    for _ in 0..count {
        if body.len() < 4 {
            break;
        }
        let len = body.get_i32();
        if len < 0 {
            columns.push(None);
            continue;
        }
        let len = (len as usize).min(body.len());
        columns.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
        body.advance(len);
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_row_reads_as_text_columns() {
        let mut body = Vec::new();
        body.extend_from_slice(&3i16.to_be_bytes());
        for value in [Some("slot"), None, Some("0/16B3748")] {
            match value {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        assert_eq!(
            data_row(&body),
            vec![Some("slot".into()), None, Some("0/16B3748".into())]
        );
        // A short body never panics.
        assert_eq!(data_row(&body[..5]), vec![None::<String>; 0]);
    }
}
