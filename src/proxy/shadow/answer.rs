//! One side's answer to a replayed read, as the server sent it, and the exact comparison of
//! two answers: the columns (names and type names: OIDs differ between servers), the rows as
//! a multiset, the order of the `ORDER BY` keys, and errors by SQLSTATE.
//!
//! Values are compared as the bytes the server sent, in the format the client asked for:
//! both servers were sent the same messages with the same session settings.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::statement::SortKey;
use crate::admin_api::shadow as api;
use crate::proxy::protocol::backend;
use crate::proxy::protocol::tags::*;

/// One value: `None` is NULL.
pub type Value = Option<Bytes>;
pub type Row = Vec<Value>;

/// The first OID a user-defined object gets: below it, the same OID is the same built-in
/// type on every server version.
const FIRST_NORMAL_OID: u32 = 16384;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
    pub command: Option<String>,
    /// SQLSTATE and message.
    pub error: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// 1 for binary.
    pub format: i16,
    /// `format_type()` on the answering server, for user-defined types (filled by the
    /// caller before comparing).
    pub type_name: Option<String>,
}

impl Answer {
    /// Reads the messages of one answer (anything up to its ReadyForQuery): RowDescription,
    /// DataRows, CommandComplete, ErrorResponse; the rest (ParseComplete, notices) is skipped.
    pub fn read(messages: &[u8]) -> Answer {
        let mut answer = Answer::default();
        for message in backend::messages(messages) {
            let body = &message[5..];
            match message[0] {
                ROW_DESCRIPTION => answer.columns = row_description(body).unwrap_or_default(),
                DATA_ROW => {
                    if let Some(row) = data_row(body) {
                        answer.rows.push(row);
                    }
                }
                COMMAND_COMPLETE => {
                    answer.command = Some(
                        String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body))
                            .into_owned(),
                    )
                }
                ERROR_RESPONSE => {
                    let (code, text) = backend::error_fields(body);
                    answer.error = Some((code.to_string(), text.to_string()));
                }
                _ => {}
            }
        }
        answer
    }

    /// User-defined type OIDs whose names must be asked before comparing.
    pub fn unnamed_types(&self) -> impl Iterator<Item = u32> + '_ {
        self.columns
            .iter()
            .filter(|c| c.type_oid >= FIRST_NORMAL_OID && c.type_name.is_none())
            .map(|c| c.type_oid)
    }

    pub fn name_types(&mut self, names: &BTreeMap<u32, String>) {
        for column in &mut self.columns {
            if column.type_oid >= FIRST_NORMAL_OID {
                column.type_name = names.get(&column.type_oid).cloned();
            }
        }
    }

    /// The answer for the report, as text.
    pub fn to_api(&self) -> api::Answer {
        api::Answer {
            columns: self
                .columns
                .iter()
                .map(|c| api::Column {
                    name: c.name.clone(),
                    type_name: c
                        .type_name
                        .clone()
                        .unwrap_or_else(|| builtin_type_name(c.type_oid)),
                })
                .collect(),
            rows: self
                .rows
                .iter()
                .take(api::Answer::ROWS_KEPT)
                .map(|row| self.row_text(row))
                .collect(),
            row_count: self.rows.len() as u64,
            command: self.command.clone(),
            error: self.error.as_ref().map(|(code, message)| api::AnswerError {
                code: code.clone(),
                message: message.clone(),
            }),
        }
    }

    pub fn row_text(&self, row: &Row) -> Vec<Option<String>> {
        row.iter()
            .enumerate()
            .map(|(i, value)| {
                // Without a RowDescription (a named statement's Execute: the client described
                // it when it prepared it) the format is not known: control bytes say binary.
                let binary = match self.columns.get(i) {
                    Some(column) => column.format == 1,
                    None => value
                        .as_ref()
                        .is_some_and(|v| v.iter().any(|&b| b < 0x20 && !b"\t\n\r".contains(&b))),
                };
                value.as_ref().map(|v| value_text(v, binary))
            })
            .collect()
    }
}

/// A value as text: binary ones (and text that is not UTF-8) as `\x` hex.
pub fn value_text(value: &[u8], binary: bool) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if !binary => text.to_string(),
        _ => {
            let mut hex = String::with_capacity(2 + value.len() * 2);
            hex.push_str("\\x");
            for byte in value {
                hex.push_str(&format!("{byte:02x}"));
            }
            hex
        }
    }
}

/// A built-in type's OID as the report shows it (the same on both servers).
fn builtin_type_name(oid: u32) -> String {
    tokio_postgres::types::Type::from_oid(oid)
        .map(|t| t.name().to_string())
        .unwrap_or_else(|| format!("oid {oid}"))
}

/// The SQLSTATE of the answer's error, if it has one, read from its messages as they are.
pub fn error_code(messages: &[u8]) -> Option<String> {
    backend::messages(messages)
        .find(|m| m[0] == ERROR_RESPONSE)
        .map(|m| backend::error_fields(&m[5..]).0)
}

/// Whether two answers are the same as they stand, byte for byte where they must be: each
/// RowDescription's names, built-in type OIDs, modifiers and formats (not the table OIDs and
/// column numbers, which differ between servers), every DataRow and completion in the same
/// order. The common case of a replay, decided without reading either answer into rows
/// ([`Answer::read`] and the comparison were a fifth of the proxy's work on a replay).
/// `false` says "compare properly", not "different": an error, a user-defined type, rows in
/// another order go the long way.
pub fn same_as_sent(old: &[u8], new: &[u8]) -> bool {
    let significant = |m: &&[u8]| {
        !matches!(
            m[0],
            PARSE_COMPLETE | BIND_COMPLETE | NOTICE_RESPONSE | PARAMETER_STATUS
        )
    };
    let mut old = backend::messages(old).filter(significant);
    let mut new = backend::messages(new).filter(significant);
    loop {
        match (old.next(), new.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) => {
                let same = match (a[0], b[0]) {
                    (ROW_DESCRIPTION, ROW_DESCRIPTION) => same_description(&a[5..], &b[5..]),
                    (DATA_ROW, DATA_ROW)
                    | (COMMAND_COMPLETE, COMMAND_COMPLETE)
                    | (EMPTY_QUERY_RESPONSE, EMPTY_QUERY_RESPONSE)
                    | (NO_DATA, NO_DATA) => a == b,
                    _ => false,
                };
                if !same {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// Two RowDescriptions alike but for the table OIDs and column numbers, with built-in types
/// only.
fn same_description(a: &[u8], b: &[u8]) -> bool {
    if a.get(..2).is_none() || a.get(..2) != b.get(..2) {
        return false;
    }
    let (mut a, mut b) = (&a[2..], &b[2..]);
    while !a.is_empty() || !b.is_empty() {
        match (description_field(a), description_field(b)) {
            (Some((a_name, a_type, a_rest)), Some((b_name, b_type, b_rest)))
                if a_name == b_name && a_type == b_type =>
            {
                (a, b) = (a_rest, b_rest);
            }
            _ => return false,
        }
    }
    true
}

/// A RowDescription field: its name, its type (OID, size, modifier, format: `None` for a
/// user-defined type), and the fields after it.
fn description_field(field: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let end = field.iter().position(|&c| c == 0)?;
    // name\0, table OID (4), column number (2), type OID (4), size (2), modifier (4),
    // format (2).
    let whole = field.get(..end + 19)?;
    let type_oid = u32::from_be_bytes(whole[end + 7..end + 11].try_into().ok()?);
    if type_oid >= FIRST_NORMAL_OID {
        return None;
    }
    Some((&whole[..end], &whole[end + 7..], &field[end + 19..]))
}

fn row_description(body: &[u8]) -> Option<Vec<Column>> {
    let count = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut rest = &body[2..];
    let mut columns = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let end = rest.iter().position(|&b| b == 0)?;
        let name = String::from_utf8_lossy(&rest[..end]).into_owned();
        let fixed = rest.get(end + 1..end + 19)?;
        columns.push(Column {
            name,
            type_oid: u32::from_be_bytes(fixed[6..10].try_into().ok()?),
            format: i16::from_be_bytes(fixed[16..18].try_into().ok()?),
            type_name: None,
        });
        rest = &rest[end + 19..];
    }
    Some(columns)
}

fn data_row(body: &[u8]) -> Option<Row> {
    let count = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut at = 2;
    let mut row = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            row.push(Some(Bytes::copy_from_slice(body.get(at..at + len)?)));
            at += len;
        }
    }
    Some(row)
}

/// How two answers differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub reason: String,
    pub only_old: Vec<Row>,
    pub only_new: Vec<Row>,
    /// The rows differ only where a `LIMIT` cut through rows tied on the `ORDER BY` keys
    /// (or the keys are not output columns, so ties cannot be told): either server may
    /// return either row, and the answer is not determined by the data.
    pub undetermined: bool,
}

/// Compares the old server's answer with the new one's: `None` when they are the same.
/// `limited`: the statement has a `LIMIT` or `OFFSET` (with an `ORDER BY`: without one it is
/// not compared at all).
pub fn compare(old: &Answer, new: &Answer, order: &[SortKey], limited: bool) -> Option<Difference> {
    let differ = |reason: String| {
        Some(Difference {
            reason,
            only_old: Vec::new(),
            only_new: Vec::new(),
            undetermined: false,
        })
    };
    match (&old.error, &new.error) {
        (Some((a, _)), Some((b, _))) if a == b => return None,
        (Some((a, am)), Some((b, bm))) => {
            return differ(format!(
                "different errors: {a} ({am}) on the old server, {b} ({bm}) on the new"
            ))
        }
        (Some((code, message)), None) => {
            return differ(format!(
                "an error on the old server only: {code} ({message})"
            ))
        }
        (None, Some((code, message))) => {
            return differ(format!(
                "an error on the new server only: {code} ({message})"
            ))
        }
        (None, None) => {}
    }
    if old.columns.len() != new.columns.len() {
        return differ(format!(
            "{} columns on the old server, {} on the new",
            old.columns.len(),
            new.columns.len()
        ));
    }
    for (a, b) in old.columns.iter().zip(&new.columns) {
        if a.name != b.name {
            return differ(format!(
                "column {:?} is called {:?} on the new server",
                a.name, b.name
            ));
        }
        let same_type = match (
            a.type_oid >= FIRST_NORMAL_OID,
            b.type_oid >= FIRST_NORMAL_OID,
        ) {
            (false, false) => a.type_oid == b.type_oid,
            _ => a.type_name.is_some() && a.type_name == b.type_name,
        };
        if !same_type {
            return differ(format!(
                "column {:?} has type {} on the old server, {} on the new",
                a.name,
                a.type_name
                    .clone()
                    .unwrap_or_else(|| builtin_type_name(a.type_oid)),
                b.type_name
                    .clone()
                    .unwrap_or_else(|| builtin_type_name(b.type_oid)),
            ));
        }
    }
    let keys = key_columns(order, &old.columns);
    let (only_old, only_new) = multiset_difference(&old.rows, &new.rows);
    if !only_old.is_empty() || !only_new.is_empty() {
        let undetermined =
            limited && cut_through_ties(&keys, order.len(), old, new, &only_old, &only_new);
        return Some(Difference {
            undetermined,
            reason: format!(
                "{} rows on the old server, {}; {} only on the old, {} only on the new",
                old.rows.len(),
                new.rows.len(),
                only_old.len(),
                only_new.len()
            ),
            only_old,
            only_new,
        });
    }
    if !keys.is_empty() {
        let sequence = |rows: &[Row]| -> Vec<Vec<Value>> {
            rows.iter()
                .map(|row| {
                    keys.iter()
                        .map(|&k| row.get(k).cloned().flatten())
                        .collect()
                })
                .collect()
        };
        if let Some(at) = sequence(&old.rows)
            .iter()
            .zip(sequence(&new.rows).iter())
            .position(|(a, b)| a != b)
        {
            return Some(Difference {
                reason: format!(
                    "the same rows in a different ORDER BY order, from row {}",
                    at + 1
                ),
                only_old: vec![old.rows[at].clone()],
                only_new: vec![new.rows[at].clone()],
                undetermined: false,
            });
        }
    }
    None
}

/// Whether every differing row is tied, on the `ORDER BY` keys, with the last row of its
/// answer (where the `LIMIT` cut), and the two last rows are tied with each other. True as
/// well when not every key is an output column: ties cannot be told then.
fn cut_through_ties(
    keys: &[usize],
    all_keys: usize,
    old: &Answer,
    new: &Answer,
    only_old: &[Row],
    only_new: &[Row],
) -> bool {
    if keys.len() < all_keys || keys.is_empty() {
        return true;
    }
    let key = |row: &Row| -> Vec<Value> {
        keys.iter()
            .map(|&k| row.get(k).cloned().flatten())
            .collect()
    };
    let (Some(last_old), Some(last_new)) = (old.rows.last(), new.rows.last()) else {
        return false;
    };
    let boundary = key(last_old);
    boundary == key(last_new)
        && only_old
            .iter()
            .chain(only_new)
            .all(|row| key(row) == boundary)
}

/// The output columns of the `ORDER BY` keys, up to the first that is not one (the order by
/// the keys before it can still be checked).
fn key_columns(order: &[SortKey], columns: &[Column]) -> Vec<usize> {
    let mut keys = Vec::new();
    for key in order {
        let index = match key {
            SortKey::Position(i) if *i < columns.len() => *i,
            SortKey::Name(name) => match columns.iter().position(|c| &c.name == name) {
                Some(i) => i,
                None => break,
            },
            _ => break,
        };
        keys.push(index);
    }
    keys
}

/// Rows only in `old` and only in `new`, counted with their repeats.
fn multiset_difference(old: &[Row], new: &[Row]) -> (Vec<Row>, Vec<Row>) {
    let mut counts: BTreeMap<&Row, i64> = BTreeMap::new();
    for row in old {
        *counts.entry(row).or_default() += 1;
    }
    for row in new {
        *counts.entry(row).or_default() -= 1;
    }
    let (mut only_old, mut only_new) = (Vec::new(), Vec::new());
    for (row, count) in counts {
        for _ in 0..count.max(0) {
            only_old.push(row.clone());
        }
        for _ in 0..(-count).max(0) {
            only_new.push(row.clone());
        }
    }
    (only_old, only_new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(rows: &[&[&str]]) -> Answer {
        Answer {
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 23,
                    format: 0,
                    type_name: None,
                },
                Column {
                    name: "name".into(),
                    type_oid: 25,
                    format: 0,
                    type_name: None,
                },
            ],
            rows: rows
                .iter()
                .map(|r| r.iter().map(|v| Some(Bytes::from(v.to_string()))).collect())
                .collect(),
            command: Some(format!("SELECT {}", rows.len())),
            error: None,
        }
    }

    #[test]
    fn rows_in_another_order_are_equal_without_order_by() {
        let a = answer(&[&["1", "a"], &["2", "b"]]);
        let b = answer(&[&["2", "b"], &["1", "a"]]);
        assert_eq!(compare(&a, &b, &[], false), None);
        // With ORDER BY id the order counts; rows tied on the key may come in any order.
        let d = compare(&a, &b, &[SortKey::Name("id".into())], false).expect("a different order");
        assert!(
            d.reason.contains("different ORDER BY order"),
            "{}",
            d.reason
        );
        let tied_a = answer(&[&["1", "a"], &["1", "b"]]);
        let tied_b = answer(&[&["1", "b"], &["1", "a"]]);
        assert_eq!(
            compare(&tied_a, &tied_b, &[SortKey::Position(0)], false),
            None
        );
    }

    #[test]
    fn the_differing_rows_are_named() {
        let a = answer(&[&["1", "a"], &["2", "b"], &["2", "b"]]);
        let b = answer(&[&["1", "a"], &["2", "b"], &["3", "c"]]);
        let d = compare(&a, &b, &[], false).expect("differs");
        assert_eq!(d.only_old, vec![a.rows[1].clone()]);
        assert_eq!(d.only_new, vec![b.rows[2].clone()]);
    }

    #[test]
    fn a_limit_through_tied_rows_is_not_a_difference() {
        // ORDER BY id LIMIT 2: two rows tie on id 2 at the cut; each server kept another.
        let a = answer(&[&["1", "a"], &["2", "b"]]);
        let b = answer(&[&["1", "a"], &["2", "c"]]);
        let key = [SortKey::Position(0)];
        assert!(compare(&a, &b, &key, true).unwrap().undetermined);
        // Not tied: a real difference.
        let c = answer(&[&["1", "a"], &["3", "c"]]);
        assert!(!compare(&a, &c, &key, true).unwrap().undetermined);
        // Without a LIMIT, every difference counts.
        assert!(!compare(&a, &b, &key, false).unwrap().undetermined);
    }

    #[test]
    fn errors_are_compared_by_sqlstate() {
        let mut a = answer(&[]);
        a.error = Some(("22007".into(), "invalid input syntax".into()));
        let b = answer(&[&["1", "a"]]);
        assert!(compare(&a, &b, &[], false)
            .unwrap()
            .reason
            .contains("old server only"));
        let mut c = answer(&[]);
        c.error = Some(("22007".into(), "worded otherwise".into()));
        assert_eq!(compare(&a, &c, &[], false), None);
    }

    #[test]
    fn user_types_are_compared_by_name() {
        let mut a = answer(&[]);
        let mut b = answer(&[]);
        a.columns[1].type_oid = 16500;
        b.columns[1].type_oid = 17000;
        a.columns[1].type_name = Some("mood".into());
        b.columns[1].type_name = Some("mood".into());
        assert_eq!(compare(&a, &b, &[], false), None);
        b.columns[1].type_name = Some("feeling".into());
        assert!(compare(&a, &b, &[], false).is_some());
    }

    #[test]
    fn messages_are_read() {
        // RowDescription (one int4 column "n"), one DataRow, CommandComplete.
        let mut bytes = vec![b'T'];
        let mut body = vec![0, 1];
        body.extend_from_slice(b"n\0");
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&23u32.to_be_bytes());
        body.extend_from_slice(&[0, 4, 255, 255, 255, 255, 0, 0]);
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&[b'D', 0, 0, 0, 11, 0, 1, 0, 0, 0, 1, b'7']);
        bytes.extend_from_slice(&[b'C', 0, 0, 0, 13]);
        bytes.extend_from_slice(b"SELECT 1\0");
        let answer = Answer::read(&bytes);
        assert_eq!(answer.columns[0].name, "n");
        assert_eq!(answer.columns[0].type_oid, 23);
        assert_eq!(answer.rows, vec![vec![Some(Bytes::from_static(b"7"))]]);
        assert_eq!(answer.command.as_deref(), Some("SELECT 1"));
    }

    /// One column `n` of `type_oid` from table `table_oid`, then `values` as rows, then the
    /// completion.
    fn wire(table_oid: u32, type_oid: u32, values: &[&str]) -> Vec<u8> {
        let mut bytes = vec![PARSE_COMPLETE, 0, 0, 0, 4, b'T'];
        let mut body = vec![0, 1];
        body.extend_from_slice(b"n\0");
        body.extend_from_slice(&table_oid.to_be_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend_from_slice(&type_oid.to_be_bytes());
        body.extend_from_slice(&[0, 4, 255, 255, 255, 255, 0, 0]);
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(&body);
        for value in values {
            bytes.push(b'D');
            bytes.extend_from_slice(&(10 + value.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 1]);
            bytes.extend_from_slice(&(value.len() as u32).to_be_bytes());
            bytes.extend_from_slice(value.as_bytes());
        }
        let tag = format!("SELECT {}\0", values.len());
        bytes.push(b'C');
        bytes.extend_from_slice(&(4 + tag.len() as u32).to_be_bytes());
        bytes.extend_from_slice(tag.as_bytes());
        bytes
    }

    #[test]
    fn answers_the_same_as_sent_are_told_without_reading_them() {
        let old = wire(16400, 23, &["1", "2"]);
        // Another table OID (another server), no ParseComplete: the same.
        assert!(same_as_sent(&old, &wire(17000, 23, &["1", "2"])[5..]));
        for other in [
            wire(16400, 20, &["1", "2"]),
            wire(16400, 23, &["2", "1"]),
            wire(16400, 23, &["1"]),
            wire(16400, 23, &["1", "3"]),
        ] {
            assert!(!same_as_sent(&old, &other));
        }
        // A user-defined type: its OID says nothing across servers, the long way.
        let user = wire(16400, 16500, &["x"]);
        assert!(!same_as_sent(&user, &user));
        // Rows in another order: not the same as sent, equal as a multiset.
        let (a, b) = (wire(1, 23, &["1", "2"]), wire(1, 23, &["2", "1"]));
        assert!(!same_as_sent(&a, &b));
        assert_eq!(
            compare(&Answer::read(&a), &Answer::read(&b), &[], false),
            None
        );
        assert_eq!(error_code(&a), None);
    }
}
