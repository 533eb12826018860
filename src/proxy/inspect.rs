//! The little the proxy reads of a statement's text: its first words. The per-query scan splits
//! at every semicolon without a SQL parser; a semicolon inside a string literal splits too,
//! which only ever makes the proxy more careful (a LISTEN refused, a connection closed instead
//! of reused). Where a wrong split would change what is tracked, `split_statements` minds
//! quotes and gives up on what it cannot read.

/// The first word of a statement (after whitespace): the only part the proxy looks at in
/// most statements, so it is found without decoding characters or allocating.
pub fn first_word(statement: &[u8]) -> &[u8] {
    let rest = skip_whitespace(statement);
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_alphanumeric() && *b != b'_')
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The words after the first one.
fn after_first_word(statement: &[u8]) -> &[u8] {
    let rest = skip_whitespace(statement);
    &rest[first_word(rest).len()..]
}

fn skip_whitespace(text: &[u8]) -> &[u8] {
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    &text[start..]
}

pub fn starts_with_keyword(text: &str, keyword: &str) -> bool {
    first_word(text.as_bytes()).eq_ignore_ascii_case(keyword.as_bytes())
}

/// What a query's statements hold that the proxy must act on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    pub listen: bool,
    pub changes_session: bool,
    pub deallocate: bool,
    /// `CREATE TEMP ...`: an object that lives on the server connection, not the client.
    pub creates_temp: bool,
    /// A statement that ends or opens a transaction (COMMIT, ROLLBACK, BEGIN, a savepoint's):
    /// with a SET in the same query or pipeline, which of them lasts depends on the order.
    pub transaction_control: bool,
}

/// One pass over the first word of each statement: every query goes through here, so the
/// common case (no statement of interest) costs a few comparisons per statement.
pub fn scan(text: &[u8]) -> Scan {
    let mut scan = Scan::default();
    let mut rest = text;
    loop {
        let word = first_word(rest);
        let is = |keyword: &[u8]| word.eq_ignore_ascii_case(keyword);
        match word.len() {
            3 | 5 | 7 if is(b"set") || is(b"reset") || is(b"discard") => {
                scan.changes_session |= changes_session(rest);
            }
            6 if is(b"listen") => scan.listen = true,
            6 if is(b"create") => scan.creates_temp |= creates_temp(rest),
            3 if is(b"end") => scan.transaction_control = true,
            5 if is(b"begin") || is(b"start") || is(b"abort") => scan.transaction_control = true,
            6 if is(b"commit") => scan.transaction_control = true,
            7 if is(b"release") || is(b"prepare") => scan.transaction_control = true,
            8 if is(b"rollback") => scan.transaction_control = true,
            9 if is(b"savepoint") => scan.transaction_control = true,
            10 if is(b"deallocate") => scan.deallocate = true,
            _ => {}
        }
        match memchr::memchr(b';', rest) {
            Some(at) => rest = &rest[at + 1..],
            None => return scan,
        }
    }
}

/// Whether a CREATE statement makes a temporary object (`CREATE [GLOBAL | LOCAL] {TEMP |
/// TEMPORARY} ...`).
fn creates_temp(statement: &[u8]) -> bool {
    let mut rest = after_first_word(statement);
    let mut word = first_word(rest);
    if word.eq_ignore_ascii_case(b"global") || word.eq_ignore_ascii_case(b"local") {
        rest = after_first_word(rest);
        word = first_word(rest);
    }
    word.eq_ignore_ascii_case(b"temp") || word.eq_ignore_ascii_case(b"temporary")
}

/// Whether the query text holds more than one statement (a trailing semicolon makes none).
pub fn is_multi_statement(text: &str) -> bool {
    let bytes = text.as_bytes();
    memchr::memchr_iter(b';', bytes).any(|at| !first_word(&bytes[at + 1..]).is_empty())
}

/// Whether a statement changes the session beyond its transaction: SET (but not SET LOCAL,
/// SET TRANSACTION or SET CONSTRAINTS), RESET, or DISCARD ALL.
pub fn changes_session(statement: &[u8]) -> bool {
    let word = first_word(statement);
    let second = first_word(after_first_word(statement));
    let is = |word: &[u8], keyword: &[u8]| word.eq_ignore_ascii_case(keyword);
    if is(word, b"reset") {
        return true;
    }
    if is(word, b"discard") {
        return is(second, b"all");
    }
    is(word, b"set")
        && ![&b"local"[..], b"transaction", b"constraints"]
            .iter()
            .any(|scoped| is(second, scoped))
}

/// The statements of a query text, split at semicolons outside quotes; `None` when the text
/// holds what this simple reading could get wrong (dollar quotes, backslash escapes,
/// comments).
pub fn split_statements(text: &str) -> Option<Vec<&str>> {
    if text.contains(['$', '\\']) || text.contains("--") || text.contains("/*") {
        return None;
    }
    let mut statements = Vec::new();
    let mut quote = None;
    let mut start = 0;
    for (at, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(open), _) if c == open => quote = None,
            (None, ';') => {
                statements.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    if quote.is_some() {
        return None;
    }
    statements.push(&text[start..]);
    statements.retain(|statement| !statement.trim().is_empty());
    Some(statements)
}

/// What a single `DEALLOCATE` statement drops.
#[derive(Debug, PartialEq, Eq)]
pub enum Deallocate {
    All,
    /// The statement's name as the server would see it: unquoted names folded to lower case.
    Named(String),
}

/// Recognises `DEALLOCATE [PREPARE] {name | ALL}` alone in a query; `None` for anything else
/// (several statements, a name it cannot read).
pub fn deallocate(text: &str) -> Option<Deallocate> {
    let text = text.trim().trim_end_matches(';').trim_end();
    if is_multi_statement(text) || !starts_with_keyword(text, "deallocate") {
        return None;
    }
    let mut rest = std::str::from_utf8(after_first_word(text.as_bytes())).ok()?;
    if starts_with_keyword(rest, "prepare") {
        let after = std::str::from_utf8(after_first_word(rest.as_bytes())).ok()?;
        // `DEALLOCATE prepare` drops a statement named "prepare".
        if !after.trim().is_empty() {
            rest = after;
        }
    }
    let name = identifier(rest.trim())?;
    if name == "all" && !rest.trim().starts_with('"') {
        return Some(Deallocate::All);
    }
    Some(Deallocate::Named(name))
}

/// A whole SQL identifier: quoted (with `""` for a quote) or plain (folded to lower case).
fn identifier(text: &str) -> Option<String> {
    if let Some(quoted) = text.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        let mut pieces = inner.split("\"\"");
        if pieces.clone().any(|piece| piece.contains('"')) {
            return None;
        }
        return Some(pieces.by_ref().collect::<Vec<_>>().join("\""));
    }
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    plain.then(|| text.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_whole_words() {
        assert!(starts_with_keyword("  LISTEN chan", "listen"));
        assert!(!starts_with_keyword("listener_count()", "listen"));
        assert!(starts_with_keyword("listen", "listen"));
        assert!(starts_with_keyword("\n\tSET x = 1", "set"));
        assert!(!starts_with_keyword("settle()", "set"));
    }

    #[test]
    fn listen_is_found_in_any_statement() {
        let listen = |text: &str| scan(text.as_bytes()).listen;
        assert!(listen("LISTEN a"));
        assert!(listen("SELECT 1; listen a;"));
        assert!(listen("SELECT 1;LISTEN a"));
        assert!(!listen("SELECT listen FROM t;"));
        assert!(!listen("SELECT 1; listener()"));
        assert!(!listen(""));
    }

    #[test]
    fn transaction_control_is_found_in_any_statement() {
        let control = |text: &str| scan(text.as_bytes()).transaction_control;
        assert!(control("SET x = 1; COMMIT"));
        assert!(control("begin"));
        assert!(control("SELECT 1; ROLLBACK TO SAVEPOINT a"));
        assert!(!control("SELECT commit FROM t"));
        assert!(!control("SET x = 1"));
    }

    #[test]
    fn temporary_objects_are_found_in_any_statement() {
        let temp = |text: &str| scan(text.as_bytes()).creates_temp;
        assert!(temp("CREATE TEMP TABLE trace(x int)"));
        assert!(temp("SELECT 1; create local temporary table t (x int)"));
        assert!(temp("CREATE GLOBAL TEMPORARY TABLE t (x int)"));
        assert!(temp("create temp view v as select 1"));
        assert!(!temp("CREATE TABLE temp (x int)"));
        assert!(!temp("CREATE TABLE t (temp int)"));
    }

    #[test]
    fn deallocate_is_found_in_any_statement() {
        let deallocate = |text: &str| scan(text.as_bytes()).deallocate;
        assert!(deallocate("DEALLOCATE a"));
        assert!(deallocate("SELECT 1; deallocate all"));
        assert!(!deallocate("SELECT deallocate FROM t"));
    }

    #[test]
    fn session_changes_are_found_in_any_statement() {
        let any_changes_session = |text: &str| scan(text.as_bytes()).changes_session;
        assert!(any_changes_session("SET work_mem = '1GB'"));
        assert!(any_changes_session("select 1; set work_mem to 64"));
        assert!(any_changes_session("SELECT 1;RESET ALL;"));
        assert!(any_changes_session("SELECT 1; SET ROLE app"));
        assert!(any_changes_session("SELECT 1; DISCARD ALL"));
        assert!(!any_changes_session("SELECT 1; DISCARD TEMP"));
        assert!(!any_changes_session(
            "BEGIN; SET LOCAL work_mem = 64; SELECT 1"
        ));
        assert!(!any_changes_session(
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"
        ));
        assert!(!any_changes_session("set constraints all deferred"));
        assert!(!any_changes_session(
            "SELECT settings FROM t; SELECT reset_at FROM t"
        ));
    }

    #[test]
    fn statements_split_outside_quotes() {
        assert_eq!(
            split_statements("SELECT ';'; SET a = 'x;y' ;"),
            Some(vec!["SELECT ';'", " SET a = 'x;y' "])
        );
        assert_eq!(
            split_statements("SELECT \"a;\"\"b\"; SET x TO 1"),
            Some(vec!["SELECT \"a;\"\"b\"", " SET x TO 1"])
        );
        assert_eq!(
            split_statements("SELECT 'it''s'; SELECT 2"),
            Some(vec!["SELECT 'it''s'", " SELECT 2"])
        );
        assert_eq!(split_statements("SELECT $$;$$; SET x = 1"), None);
        assert_eq!(split_statements("SELECT E'\\';'; SET x = 1"), None);
        assert_eq!(split_statements("SELECT 1 -- ;\nSET x = 1"), None);
        assert_eq!(split_statements("SELECT 'open"), None);
    }

    #[test]
    fn multi_statement_ignores_trailing_semicolons() {
        assert!(!is_multi_statement("SELECT 1;"));
        assert!(!is_multi_statement("SELECT 1 ;  \n"));
        assert!(is_multi_statement("SELECT 1; SELECT 2"));
    }

    #[test]
    fn deallocate_names_are_read_as_the_server_reads_them() {
        use Deallocate::*;
        assert_eq!(deallocate("DEALLOCATE s1"), Some(Named("s1".into())));
        assert_eq!(
            deallocate("deallocate PREPARE S1;"),
            Some(Named("s1".into()))
        );
        assert_eq!(
            deallocate("DEALLOCATE \"Mixed\"\"q\""),
            Some(Named("Mixed\"q".into()))
        );
        assert_eq!(
            deallocate("DEALLOCATE _pg3_0"),
            Some(Named("_pg3_0".into()))
        );
        assert_eq!(deallocate("DEALLOCATE ALL"), Some(All));
        assert_eq!(deallocate("DEALLOCATE PREPARE all"), Some(All));
        assert_eq!(deallocate("DEALLOCATE \"all\""), Some(Named("all".into())));
        assert_eq!(
            deallocate("DEALLOCATE prepare"),
            Some(Named("prepare".into()))
        );
        assert_eq!(deallocate("DEALLOCATE s1; SELECT 1"), None);
        assert_eq!(deallocate("DEALLOCATE"), None);
        assert_eq!(deallocate("DEALLOCATE a b"), None);
        assert_eq!(deallocate("SELECT 1"), None);
    }
}
