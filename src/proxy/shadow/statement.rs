//! What a sampled statement is, from PostgreSQL's own parser (`pg_query`): a single read or
//! not, whether the data alone determines its answer, its fingerprint, and the columns of
//! its top-level `ORDER BY`.
//!
//! Run by the shadow task, never on the client's path. Unlike the cache's walk
//! ([`crate::proxy::cache::analyze`]) this one need not be closed: a construct it misses can
//! only make a read look comparable when it is not, and then its answer changes from one
//! re-run to the next and it is reported "unstable", not as a divergence.

use pg_query::protobuf::{self, node::Node as N};
use pg_query::NodeRef;

/// A sampled statement, analysed.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// pg_query's fingerprint: constants and parameters do not change it.
    pub fingerprint: u64,
    /// The statement with its constants replaced by `$n`.
    pub normalized: String,
    pub kind: Kind,
    /// The tables it reads, as written (`schema.table` or `table`).
    pub tables: Vec<String>,
    /// What was found depends on a constant that normalisation replaces (`ORDER BY 2`): the
    /// analysis holds for this text only, not for every statement of its normalised text.
    pub depends_on_constants: bool,
    /// Every table it reads is one `[proxy.shadow]`'s `tables`/`exclude` select (set by the
    /// caller, which has the settings).
    pub covered: bool,
}

/// The time words a string literal can hold: `'now'::timestamptz` reads the clock.
const TIME_WORDS: [&str; 4] = ["now", "today", "tomorrow", "yesterday"];

/// Whether `sql` holds a quoted time word (`'now'`, `'today'`...): checked on each text,
/// since statements that normalise alike may differ in it.
pub fn quotes_a_time_word(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        b == b'\'' && {
            let rest = &bytes[i + 1..];
            TIME_WORDS.iter().any(|word| {
                rest.len() > word.len()
                    && rest[..word.len()].eq_ignore_ascii_case(word.as_bytes())
                    && rest[word.len()] == b'\''
            })
        }
    })
}

/// A cheap stand-in for normalisation, as the key of the analyses kept: `sql` with its
/// numbers and plain or `E''` string literals replaced by `?`, everything else (identifiers,
/// quoted identifiers, comments, parameters) as written. Built by one pass over the text,
/// without the parser: most samples are statements seen before with other constants
/// (pgbench's `WHERE aid = 4711`), and the parse was most of a replay's cost in the proxy.
/// `None` where a literal could be misread (dollar quoting, nested comments, backslash
/// escapes in plain strings with `standard_conforming_strings` off): then the parser's
/// normalisation is the key.
pub fn literal_shape(sql: &str, standard_conforming_strings: bool) -> Option<String> {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\'' => {
                if !standard_conforming_strings {
                    return None;
                }
                let escapes = i > 0 && matches!(bytes[i - 1], b'e' | b'E');
                i += 1;
                loop {
                    match bytes.get(i)? {
                        b'\\' if escapes => i += 2,
                        b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => break,
                        _ => i += 1,
                    }
                }
                out.push('?');
                i += 1;
            }
            b'"' => {
                let end = i + 1 + bytes[i + 1..].iter().position(|&c| c == b'"')?;
                out.push_str(&sql[i..=end]);
                i = end + 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                let end = bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(bytes.len(), |p| i + p);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let len = sql[i + 2..].find("*/")?;
                if sql[i + 2..i + 2 + len].contains("/*") {
                    return None;
                }
                out.push_str(&sql[i..i + 4 + len]);
                i += 4 + len;
            }
            b'$' if !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => return None,
            b'0'..=b'9' if i == 0 || !ident(bytes[i - 1]) => {
                while let Some(&c) = bytes.get(i) {
                    let exponent_sign =
                        matches!(c, b'+' | b'-') && matches!(bytes[i - 1], b'e' | b'E');
                    if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                out.push('?');
            }
            _ => {
                // A run up to the next byte that may start a literal, a quoted identifier or
                // a comment, copied at once (ASCII bytes are always character boundaries).
                let start = i;
                i += 1;
                while let Some(&c) = bytes.get(i) {
                    let special = matches!(c, b'\'' | b'"' | b'-' | b'/' | b'$')
                        || (c.is_ascii_digit() && !ident(bytes[i - 1]));
                    if special {
                        break;
                    }
                    i += 1;
                }
                out.push_str(&sql[start..i]);
            }
        }
    }
    Some(out)
}

/// PostgreSQL's normalisation of `sql` (constants replaced by `$n`): the key under which an
/// analysis is kept, so that a statement is parsed once, not once per set of constants.
pub fn normalize(sql: &str) -> String {
    pg_query::normalize(sql).unwrap_or_else(|_| sql.to_string())
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A read whose answer the data determines: compared.
    Read { order: Vec<SortKey>, limited: bool },
    /// A read whose answer the data does not determine (the reason): timed, not compared.
    NotComparable(String),
    /// Not a single read (the reason): neither replayed nor compared.
    NotARead(String),
}

/// A top-level `ORDER BY` item, as far as it names an output column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortKey {
    /// `ORDER BY 2`: the second output column.
    Position(usize),
    /// `ORDER BY name`: the output column of that name.
    Name(String),
    /// An expression that is not an output column: the order cannot be checked.
    Other,
}

/// Functions that act on the server beyond the transaction, which
/// `default_transaction_read_only` does not stop: a replay would run them on the other
/// server (psycopg's test suite through the proxy replayed `SELECT pg_terminate_backend($1)`,
/// which on the other server ends whichever backend has that pid there). Prefixes, lower
/// case; `pg_catalog.` or not.
const ACTS_OUTSIDE: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_promote",
    "pg_create_restore_point",
    "pg_backup_",
    "pg_advisory_",
    "pg_try_advisory_",
    "set_config",
    "pg_notify",
    "pg_stat_reset",
    "pg_log_backend_memory_contexts",
    "pg_replication_origin_",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_",
    "pg_replication_slot_advance",
    "pg_logical_slot_get_",
    "pg_logical_emit_message",
    "pg_wal_replay_",
    "pg_file_",
    "lo_",
    "dblink",
];

/// The first function `parsed` calls that acts outside the transaction ([`ACTS_OUTSIDE`]).
fn acts_outside(parsed: &pg_query::ParseResult) -> Option<String> {
    parsed.functions().into_iter().find_map(|function| {
        let name = function
            .rsplit('.')
            .next()
            .unwrap_or(&function)
            .to_lowercase();
        ACTS_OUTSIDE
            .iter()
            .any(|prefix| name.starts_with(prefix))
            .then_some(name)
    })
}

/// Functions whose result depends on the time, the session or chance, not on the data.
/// (`pg_catalog.` or not; `CURRENT_TIMESTAMP` and its kin are SQL value functions, below.)
const NOT_DETERMINED_BY_DATA: &[&str] = &[
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "random",
    "random_normal",
    "setseed",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "uuidv4",
    "uuidv7",
    "nextval",
    "currval",
    "lastval",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_backend_pid",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "inet_server_addr",
    "inet_server_port",
    "inet_client_addr",
    "inet_client_port",
    "version",
    "age",
    "pg_sleep",
];

/// A statement of a captured `READ ONLY` transaction that is not a read, as far as a replay
/// may send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `BEGIN` or `START TRANSACTION` with `READ ONLY`: what a captured transaction opens with.
    BeginReadOnly,
    /// `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `RELEASE` or `ROLLBACK TO`, without `AND CHAIN`.
    Step,
    /// `SET LOCAL` of a setting that neither lifts read-only nor a timeout, or `SHOW`: what
    /// an application sets for one transaction (`search_path`, `work_mem`, a role for row
    /// security). Replayed in its place, so the reads after it resolve as they did for the
    /// client; it ends with the transaction, so the shadow connection keeps nothing of it.
    Setting,
}

/// Settings a replayed transaction may not set: the first two could make it able to write
/// (`SET LOCAL transaction_read_only = off` right after `BEGIN READ ONLY` does), and a
/// `*_timeout` would lift the bound `[proxy.shadow] statement_timeout` puts on a replay.
fn guards_the_replay(name: &str) -> bool {
    name.eq_ignore_ascii_case("transaction_read_only")
        || name.eq_ignore_ascii_case("default_transaction_read_only")
        || name.to_ascii_lowercase().ends_with("_timeout")
}

/// `sql` as one transaction control statement a replayed transaction may hold; `None` for
/// anything else (`SET TRANSACTION READ WRITE` before the first query would make the rest
/// of the transaction able to write, so nothing but these is replayed).
pub fn transaction_control(sql: &str, standard_conforming_strings: bool) -> Option<Control> {
    use protobuf::TransactionStmtKind as T;
    let options = if standard_conforming_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let parsed = pg_query::parse(sql, options).ok()?;
    fn node(raw: &protobuf::RawStmt) -> Option<&N> {
        raw.stmt.as_ref().and_then(|s| s.node.as_ref())
    }
    let stmt = match parsed.protobuf.stmts.as_slice() {
        [raw] => match node(raw)? {
            N::TransactionStmt(stmt) => stmt,
            other => return setting(other).then_some(Control::Setting),
        },
        // Several settings in one query string (`SET LOCAL a = 1; SET LOCAL b = 2`).
        many => {
            let all = many.iter().all(|raw| node(raw).is_some_and(setting));
            return all.then_some(Control::Setting);
        }
    };
    match T::try_from(stmt.kind).ok()? {
        T::TransStmtBegin | T::TransStmtStart if read_only(&stmt.options) => {
            Some(Control::BeginReadOnly)
        }
        T::TransStmtCommit
        | T::TransStmtRollback
        | T::TransStmtSavepoint
        | T::TransStmtRelease
        | T::TransStmtRollbackTo
            if !stmt.chain =>
        {
            Some(Control::Step)
        }
        _ => None,
    }
}

/// Whether `node` is a [`Control::Setting`]: a `SHOW`, or a `SET LOCAL` of a setting that
/// does not guard the replay. `SET LOCAL TRANSACTION ...` (`VarSetMulti`) is not; a plain
/// `SET` or `RESET` is not either: it would outlive the transaction on the shadow connection.
fn setting(node: &N) -> bool {
    use protobuf::VariableSetKind as K;
    match node {
        N::VariableShowStmt(_) => true,
        N::VariableSetStmt(set) => {
            set.is_local
                && matches!(
                    K::try_from(set.kind),
                    Ok(K::VarSetValue | K::VarSetDefault | K::VarSetCurrent)
                )
                && !guards_the_replay(&set.name)
        }
        _ => false,
    }
}

/// Whether a transaction's options say `READ ONLY` (and not `READ WRITE` after it).
fn read_only(options: &[protobuf::Node]) -> bool {
    use protobuf::a_const::Val;
    let mut read_only = false;
    for option in options {
        let Some(N::DefElem(def)) = &option.node else {
            continue;
        };
        if def.defname != "transaction_read_only" {
            continue;
        }
        read_only = match def.arg.as_deref().and_then(|a| a.node.as_ref()) {
            Some(N::AConst(c)) => match &c.val {
                Some(Val::Ival(i)) => i.ival != 0,
                Some(Val::Boolval(b)) => b.boolval,
                _ => false,
            },
            _ => false,
        };
    }
    read_only
}

/// Parses and classifies `sql`.
#[cfg(test)]
pub fn analyze(sql: &str, standard_conforming_strings: bool) -> Statement {
    analyze_normalized(sql, normalize(sql), standard_conforming_strings)
}

/// Parses and classifies `sql`, whose normalised text is `normalized`.
pub fn analyze_normalized(
    sql: &str,
    normalized: String,
    standard_conforming_strings: bool,
) -> Statement {
    let options = if standard_conforming_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let fingerprint = pg_query::fingerprint(sql, options, 0).map_or(0, |f| f.value);
    let mut statement = Statement {
        fingerprint,
        normalized,
        kind: Kind::NotARead(String::new()),
        tables: Vec::new(),
        depends_on_constants: false,
        covered: true,
    };
    let parsed = match pg_query::parse(sql, options) {
        Ok(parsed) => parsed,
        Err(e) => {
            statement.kind = Kind::NotARead(format!("does not parse: {e}"));
            return statement;
        }
    };
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        statement.kind = Kind::NotARead(format!(
            "{} statements in one query",
            parsed.protobuf.stmts.len()
        ));
        return statement;
    };
    let Some(N::SelectStmt(select)) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
        statement.kind = Kind::NotARead("not a SELECT".into());
        return statement;
    };
    if let Some(refusal) = writes(select) {
        statement.kind = Kind::NotARead(refusal);
        return statement;
    }
    if !parsed.dml_tables().is_empty() || !parsed.ddl_tables().is_empty() {
        statement.kind = Kind::NotARead("writes a table".into());
        return statement;
    }
    if let Some(name) = acts_outside(&parsed) {
        statement.kind = Kind::NotARead(format!(
            "calls {name}(), which acts outside the transaction"
        ));
        return statement;
    }
    statement.tables = parsed.select_tables();
    statement.tables.sort();
    statement.tables.dedup();
    statement.kind = match not_determined(&parsed) {
        Some(reason) => Kind::NotComparable(reason),
        None => {
            let limited = select.limit_count.is_some() || select.limit_offset.is_some();
            let order = sort_keys(select);
            statement.depends_on_constants =
                order.iter().any(|key| matches!(key, SortKey::Position(_)));
            if limited && order.is_empty() {
                Kind::NotComparable("LIMIT or OFFSET without ORDER BY".into())
            } else {
                Kind::Read { order, limited }
            }
        }
    };
    statement
}

/// Why a SELECT writes or locks (`INTO`, `FOR UPDATE`, a data-modifying `WITH`), if it does.
fn writes(select: &protobuf::SelectStmt) -> Option<String> {
    if select.into_clause.is_some() {
        return Some("SELECT INTO writes a table".into());
    }
    if !select.locking_clause.is_empty() {
        return Some("has a locking clause (FOR UPDATE/SHARE)".into());
    }
    for cte in select.with_clause.iter().flat_map(|w| &w.ctes) {
        if let Some(N::CommonTableExpr(cte)) = &cte.node {
            if !matches!(
                cte.ctequery.as_deref().and_then(|q| q.node.as_ref()),
                Some(N::SelectStmt(_))
            ) {
                return Some(format!("WITH {} writes", cte.ctename));
            }
        }
    }
    None
}

/// Why the data alone does not determine the answer, if so.
fn not_determined(parsed: &pg_query::ParseResult) -> Option<String> {
    for function in parsed.functions() {
        let name = function
            .rsplit('.')
            .next()
            .unwrap_or(&function)
            .to_lowercase();
        if NOT_DETERMINED_BY_DATA.contains(&name.as_str()) {
            return Some(format!("calls {name}()"));
        }
    }
    for (node, ..) in parsed.protobuf.nodes() {
        match node {
            NodeRef::SqlvalueFunction(_) => {
                return Some("reads the current time or user (CURRENT_TIMESTAMP, ...)".into())
            }
            NodeRef::TypeCast(cast) => {
                if let Some(N::AConst(c)) = cast.arg.as_deref().and_then(|a| a.node.as_ref()) {
                    if let Some(protobuf::a_const::Val::Sval(s)) = &c.val {
                        let text = s.sval.trim().to_lowercase();
                        if TIME_WORDS.contains(&text.as_str()) {
                            return Some(format!("reads the time ('{text}')"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// The top-level `ORDER BY` items.
fn sort_keys(select: &protobuf::SelectStmt) -> Vec<SortKey> {
    select
        .sort_clause
        .iter()
        .map(|item| {
            let Some(N::SortBy(sort)) = &item.node else {
                return SortKey::Other;
            };
            match sort.node.as_deref().and_then(|n| n.node.as_ref()) {
                Some(N::AConst(c)) => match &c.val {
                    Some(protobuf::a_const::Val::Ival(i)) if i.ival >= 1 => {
                        SortKey::Position(i.ival as usize - 1)
                    }
                    _ => SortKey::Other,
                },
                Some(N::ColumnRef(column)) => {
                    match column.fields.last().and_then(|f| f.node.as_ref()) {
                        Some(N::String(name)) => SortKey::Name(name.sval.clone()),
                        _ => SortKey::Other,
                    }
                }
                _ => SortKey::Other,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(sql: &str) -> Kind {
        analyze(sql, true).kind
    }

    #[test]
    fn the_transaction_controls_a_replayed_transaction_may_hold() {
        let control = |sql| transaction_control(sql, true);
        for sql in [
            "BEGIN READ ONLY",
            "begin transaction isolation level repeatable read, read only",
            "START TRANSACTION READ ONLY",
            "BEGIN READ WRITE, READ ONLY",
        ] {
            assert_eq!(control(sql), Some(Control::BeginReadOnly), "{sql}");
        }
        for sql in [
            "COMMIT",
            "END",
            "ROLLBACK",
            "ABORT",
            "SAVEPOINT a",
            "RELEASE a",
            "ROLLBACK TO a",
        ] {
            assert_eq!(control(sql), Some(Control::Step), "{sql}");
        }
        for sql in [
            "SET LOCAL search_path = other, public",
            "set local work_mem to '8MB'",
            "SET LOCAL ROLE reporting",
            "SET LOCAL TimeZone TO DEFAULT",
            "SET LOCAL enable_seqscan FROM CURRENT",
            "SHOW work_mem",
            "SHOW ALL",
            "SET LOCAL search_path = other; SHOW search_path",
        ] {
            assert_eq!(control(sql), Some(Control::Setting), "{sql}");
        }
        for sql in [
            "SET LOCAL transaction_read_only = off",
            "SET LOCAL \"Transaction_Read_Only\" TO DEFAULT",
            "SET LOCAL default_transaction_read_only = off",
            "SET LOCAL TRANSACTION READ WRITE",
            "SET LOCAL statement_timeout = 0",
            "SET LOCAL idle_in_transaction_session_timeout = 0",
            "SET work_mem = '8MB'",
            "SET LOCAL work_mem = '8MB'; SET work_mem = '8MB'",
            "SET LOCAL work_mem = '8MB'; SELECT 1",
            "SET LOCAL work_mem = '8MB'; COMMIT",
            "RESET work_mem",
            "RESET ALL",
            "BEGIN",
            "BEGIN READ ONLY, READ WRITE",
            "START TRANSACTION READ WRITE",
            "COMMIT AND CHAIN",
            "SET TRANSACTION READ WRITE",
            "PREPARE TRANSACTION 'x'",
            "COMMIT; BEGIN",
            "SELECT 1",
        ] {
            assert_eq!(control(sql), None, "{sql}");
        }
    }

    #[test]
    fn functions_that_act_outside_the_transaction_are_not_reads() {
        for sql in [
            "SELECT pg_terminate_backend($1)",
            "SELECT pg_catalog.pg_cancel_backend(42)",
            "SELECT pg_advisory_lock(1)",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT pg_notify('ch', 'x')",
            "SELECT * FROM t WHERE pg_try_advisory_lock(id)",
        ] {
            assert!(matches!(kind(sql), Kind::NotARead(_)), "{sql}");
        }
        assert!(matches!(
            kind("SELECT pg_backend_pid()"),
            Kind::NotComparable(_) | Kind::Read { .. }
        ));
    }

    #[test]
    fn reads_writes_and_the_rest() {
        assert!(matches!(kind("SELECT 1"), Kind::Read { .. }));
        assert!(matches!(
            kind("SELECT * FROM t WHERE id = $1"),
            Kind::Read { .. }
        ));
        assert!(matches!(kind("SELECT * INTO x FROM t"), Kind::NotARead(_)));
        assert!(matches!(
            kind("SELECT * FROM t FOR UPDATE"),
            Kind::NotARead(_)
        ));
        assert!(matches!(
            kind("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d"),
            Kind::NotARead(_)
        ));
        assert!(matches!(kind("UPDATE t SET v = 1"), Kind::NotARead(_)));
        assert!(matches!(kind("SELECT 1; SELECT 2"), Kind::NotARead(_)));
        assert!(matches!(kind("SELECT now()"), Kind::NotComparable(_)));
        assert!(matches!(
            kind("SELECT pg_catalog.random()"),
            Kind::NotComparable(_)
        ));
        assert!(matches!(
            kind("SELECT CURRENT_TIMESTAMP"),
            Kind::NotComparable(_)
        ));
        assert!(matches!(
            kind("SELECT 'now'::timestamptz"),
            Kind::NotComparable(_)
        ));
        assert!(matches!(
            kind("SELECT * FROM t LIMIT 5"),
            Kind::NotComparable(_)
        ));
    }

    #[test]
    fn order_by_keys() {
        assert_eq!(
            kind("SELECT id, name FROM t ORDER BY name, 1, lower(name) LIMIT 3"),
            Kind::Read {
                order: vec![
                    SortKey::Name("name".into()),
                    SortKey::Position(0),
                    SortKey::Other
                ],
                limited: true
            }
        );
    }

    #[test]
    fn time_words_in_quotes() {
        assert!(quotes_a_time_word("SELECT 'NOW'::timestamptz"));
        assert!(quotes_a_time_word("SELECT x FROM t WHERE d > 'today'"));
        assert!(!quotes_a_time_word("SELECT 'nowhere', now FROM t"));
    }

    #[test]
    fn literal_shapes() {
        let shape = |sql: &str| literal_shape(sql, true);
        assert_eq!(
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 4711;"),
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 12;")
        );
        assert_eq!(
            shape("SELECT * FROM t1 WHERE a = 'it''s' AND b = 1.5e-3 AND c = E'x\\'y'").as_deref(),
            Some("SELECT * FROM t1 WHERE a = ? AND b = ? AND c = E?")
        );
        // Identifiers with digits, quoted identifiers, comments and parameters stay.
        assert_eq!(
            shape("SELECT \"col 1\" FROM t2 -- it's 3\nWHERE x = $1 /* 'q' */").as_deref(),
            Some("SELECT \"col 1\" FROM t2 -- it's 3\nWHERE x = $1 /* 'q' */")
        );
        assert_ne!(shape("SELECT * FROM t1"), shape("SELECT * FROM t2"));
        assert_eq!(shape("SELECT $$a$$"), None);
        assert_eq!(shape("SELECT 'unterminated"), None);
        assert_eq!(literal_shape("SELECT 'a\\'", false), None);
    }

    #[test]
    fn fingerprints_ignore_constants() {
        let a = analyze("SELECT * FROM t WHERE id = 1", true);
        let b = analyze("SELECT * FROM t WHERE id = 2", true);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.normalized, "SELECT * FROM t WHERE id = $1");
        assert_eq!(a.tables, ["t"]);
    }
}
