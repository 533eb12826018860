//! Session settings in transaction pooling. A client's settings — from its startup packet, from
//! `SET name = value` / `SET name TO value` / `RESET` statements, and every change the server
//! reports with ParameterStatus — are remembered per client and re-applied (or reset) on
//! whichever server connection runs its next transaction. A change this module does not
//! recognise (SET ROLE, ...) makes the session close that server connection instead.

use std::collections::BTreeMap;

use crate::pg::sql;

/// What a simple query does to the session's settings, when it is one statement we recognise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingChange {
    Set { name: String, value_sql: String },
    Reset(String),
    ResetAll,
}

/// Recognises `SET [SESSION] name {=|TO} value`, `RESET name`, `RESET ALL` and `DISCARD ALL`.
pub fn recognise(query: &str) -> Option<SettingChange> {
    let text = query.trim().trim_end_matches(';').trim();
    if text.contains(';') {
        return None;
    }
    let lower = text.to_ascii_lowercase();
    if lower == "reset all" || lower == "discard all" {
        return Some(SettingChange::ResetAll);
    }
    if let Some(change) = session_characteristic(&lower) {
        return Some(change);
    }
    if let Some(rest) = lower.strip_prefix("reset ") {
        let name = rest.trim();
        return is_name(name).then(|| SettingChange::Reset(name.to_string()));
    }
    let rest = lower.strip_prefix("set ")?;
    let rest = rest.strip_prefix("session ").unwrap_or(rest).trim_start();
    if rest.starts_with("local ")
        || rest.starts_with("transaction")
        || rest.starts_with("session characteristics")
        || rest.starts_with("role")
        || rest.starts_with("session authorization")
    {
        return None;
    }
    let name_len = rest
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(rest.len());
    let name = &rest[..name_len];
    if !is_name(name) {
        return None;
    }
    let after = rest[name_len..].trim_start();
    let value_at = if after.starts_with('=') {
        1
    } else if after.starts_with("to ") || after.starts_with("to\t") {
        2
    } else {
        return None;
    };
    // The value as the client wrote it (original case), from the same offset.
    let offset = text.len() - after.len() + value_at;
    let value_sql = text[offset..].trim();
    if value_sql.is_empty() {
        return None;
    }
    Some(SettingChange::Set {
        name: name.to_string(),
        value_sql: value_sql.to_string(),
    })
}

/// `SET SESSION CHARACTERISTICS AS TRANSACTION` with one mode, as the setting it is the same
/// as (`default_transaction_isolation`, `_read_only`, `_deferrable`). pgjdbc's
/// `setTransactionIsolation` sends it (and `setReadOnly` with readOnlyMode=always): left
/// unrecognised, the server connection was closed after that one statement, and the client's
/// next transactions ran at the default isolation level, silently. Several modes at once stay
/// unrecognised (the connection is closed after them).
fn session_characteristic(lower: &str) -> Option<SettingChange> {
    let words: Vec<&str> = lower.split_whitespace().collect();
    let ["set", "session", "characteristics", "as", "transaction", mode @ ..] = words.as_slice()
    else {
        return None;
    };
    let (name, value) = match mode {
        ["isolation", "level", "serializable"] => ("default_transaction_isolation", "serializable"),
        ["isolation", "level", "repeatable", "read"] => {
            ("default_transaction_isolation", "repeatable read")
        }
        ["isolation", "level", "read", "committed"] => {
            ("default_transaction_isolation", "read committed")
        }
        ["isolation", "level", "read", "uncommitted"] => {
            ("default_transaction_isolation", "read uncommitted")
        }
        ["read", "only"] => ("default_transaction_read_only", "on"),
        ["read", "write"] => ("default_transaction_read_only", "off"),
        ["deferrable"] => ("default_transaction_deferrable", "on"),
        ["not", "deferrable"] => ("default_transaction_deferrable", "off"),
        _ => return None,
    };
    Some(SettingChange::Set {
        name: name.to_string(),
        value_sql: format!("'{value}'"),
    })
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Startup parameters that are not settings.
pub fn passed_to_server(name: &str) -> bool {
    !matches!(
        name,
        "user" | "database" | "options" | "replication" | "fallback_application_name"
    ) && !name.starts_with("_pq_.")
}

/// Settings a session cannot change through the proxy, as with `SET ROLE`: the server
/// connection logs in as the client's role and no other.
fn unfollowable(name: &str) -> bool {
    matches!(name, "role" | "session_authorization")
}

/// The settings a client's startup packet asks for, name (lower case) → value as SQL: the
/// `-c name=value` and `--name=value` switches of its `options`, then its other parameters
/// (which win, as in PostgreSQL), and `fallback_application_name` when it names no
/// application. An option the proxy cannot follow is refused with the reason: a session
/// that silently lacked its `statement_timeout` is worse than one that fails to connect.
pub fn startup_settings(params: &[(String, String)]) -> Result<BTreeMap<String, String>, String> {
    let mut settings = BTreeMap::new();
    let mut fallback = None;
    for (name, value) in params {
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            "options" => {
                for (name, value) in options(value)? {
                    settings.insert(name, sql::literal(&value));
                }
            }
            "fallback_application_name" => fallback = Some(value),
            _ if passed_to_server(&name) => {
                if unfollowable(&name) {
                    return Err(format!(
                        "the startup parameter \"{name}\" cannot be followed through the switchyard proxy"
                    ));
                }
                settings.insert(name, sql::literal(value));
            }
            _ => {}
        }
    }
    if let Some(fallback) = fallback {
        settings
            .entry("application_name".to_string())
            .or_insert_with(|| sql::literal(fallback));
    }
    Ok(settings)
}

/// The `-c name=value` / `--name=value` pairs of an `options` startup parameter, split as
/// PostgreSQL splits it (at whitespace; a backslash takes the next character as it is).
fn options(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = text.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                word.extend(chars.next());
                in_word = true;
            }
            c if c.is_ascii_whitespace() => {
                if std::mem::take(&mut in_word) {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut pairs = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let pair = if word == "-c" {
            words
                .next()
                .ok_or_else(|| "the startup option -c needs name=value".to_string())?
        } else if let Some(pair) = word.strip_prefix("-c") {
            pair.to_string()
        } else if let Some(pair) = word.strip_prefix("--") {
            pair.to_string()
        } else {
            return Err(format!(
                "the startup option \"{word}\" is not supported through the switchyard proxy (only -c name=value and --name=value)"
            ));
        };
        let Some((name, value)) = pair.split_once('=') else {
            return Err(format!(
                "the startup option \"{pair}\" needs a value (name=value)"
            ));
        };
        // As PostgreSQL reads them: dashes in a name are underscores.
        let name = name.replace('-', "_").to_ascii_lowercase();
        if !is_name(&name) || unfollowable(&name) {
            return Err(format!(
                "the startup option \"{name}\" cannot be followed through the switchyard proxy"
            ));
        }
        pairs.push((name, value.to_string()));
    }
    Ok(pairs)
}

/// Setting changes a client sent that may not last: a change becomes the session's only once
/// the transaction it ran in has committed. PostgreSQL undoes a SET that failed, one in a
/// transaction that rolled back, and one in a query or pipeline that failed as a whole (an
/// implicit transaction); keeping those made a refused `SET statement_timeout = 'bogus'`
/// fail the client's later queries on other connections, and a rolled-back `SET` follow it.
///
/// Changes are kept with the sync group they were sent in ([`super::replies::Replies`]
/// numbers them), so that a transaction's end settles only what went before it.
#[derive(Debug, Default)]
pub struct Pending {
    entries: Vec<Staged>,
}

#[derive(Debug)]
struct Staged {
    group: u64,
    /// How many statements that end or open a transaction were sent in its group before it:
    /// a COMMIT or ROLLBACK in the same query or pipeline ends only the changes before it.
    after_control: u32,
    change: SettingChange,
    undone: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A change run in sync group `group` (a simple Query, or an Execute), after
    /// `after_control` statements of that group that end or open a transaction.
    pub fn stage(&mut self, group: u64, after_control: u32, change: SettingChange) {
        self.entries.push(Staged {
            group,
            after_control,
            change,
            undone: false,
        });
    }

    /// The statement number `control` (counted from 0) of group `group` that ends or opens a
    /// transaction completed as a COMMIT (`committed`) or a ROLLBACK: the changes sent
    /// before it are over, and those that lasted are returned, in the order they were made.
    /// (`SET a; ROLLBACK; SET b` in one query leaves `b`, `SET a; COMMIT; SELECT 1/0` leaves
    /// `a`, as PostgreSQL does.)
    pub fn end_transaction(
        &mut self,
        group: u64,
        control: u32,
        committed: bool,
    ) -> Vec<SettingChange> {
        let mut lasted = Vec::new();
        let mut kept = Vec::new();
        for entry in self.entries.drain(..) {
            let before =
                entry.group < group || (entry.group == group && entry.after_control <= control);
            if !before {
                kept.push(entry);
            } else if committed && !entry.undone {
                lasted.push(entry.change);
            }
        }
        self.entries = kept;
        lasted
    }

    /// Whether a change was made in sync group `group`.
    pub fn has_group(&self, group: u64) -> bool {
        self.entries.iter().any(|entry| entry.group == group)
    }

    /// The transaction that group `group` belongs to failed or rolled back: what it changed
    /// so far will not last.
    pub fn undo(&mut self, group: u64) {
        for entry in &mut self.entries {
            if entry.group <= group {
                entry.undone = true;
            }
        }
    }

    /// Group `group` ended outside a transaction block: its transaction (and every earlier
    /// one) is over. Returns the changes that lasted, in the order they were made.
    pub fn settle(&mut self, group: u64) -> Vec<SettingChange> {
        let mut lasted = Vec::new();
        let mut kept = Vec::new();
        for entry in self.entries.drain(..) {
            if entry.group > group {
                kept.push(entry);
            } else if !entry.undone {
                lasted.push(entry.change);
            }
        }
        self.entries = kept;
        lasted
    }

    /// The connection was lost under the transaction: none of it lasted.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// A tag for a state of a session's settings, unique in the process: a server connection whose
/// settings carry the tag of the client's is in step with it, so the check before each
/// transaction is one comparison of two numbers, not of two maps (a client that set anything,
/// as every one that sends `application_name` at login, paid that on every transaction).
pub fn new_tag() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One statement of [`reconcile`]: the setting it changes, and the SQL.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    pub name: String,
    pub statement: String,
}

/// The statements that make a server connection's settings (`applied`, name → value SQL)
/// equal to a client's (`wanted`), updating `applied`. Empty when they already are.
pub fn reconcile(
    wanted: &BTreeMap<String, String>,
    applied: &mut BTreeMap<String, String>,
) -> Vec<Change> {
    // The common case, a client that changed nothing: no work per transaction.
    if wanted == applied {
        return Vec::new();
    }
    let mut changes = Vec::new();
    applied.retain(|name, _| {
        let keep = wanted.contains_key(name);
        if !keep {
            changes.push(Change {
                name: name.clone(),
                statement: format!("RESET {}", sql::ident(name)),
            });
        }
        keep
    });
    for (name, value) in wanted {
        if applied.get(name) != Some(value) {
            changes.push(Change {
                name: name.clone(),
                statement: format!("SET {} = {value}", sql::ident(name)),
            });
            applied.insert(name.clone(), value.clone());
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_plain_forms_only() {
        assert_eq!(
            recognise("SET search_path = app, public"),
            Some(SettingChange::Set {
                name: "search_path".into(),
                value_sql: "app, public".into()
            })
        );
        assert_eq!(
            recognise("set session TimeZone TO 'Europe/Berlin';"),
            Some(SettingChange::Set {
                name: "timezone".into(),
                value_sql: "'Europe/Berlin'".into()
            })
        );
        assert_eq!(
            recognise("RESET work_mem"),
            Some(SettingChange::Reset("work_mem".into()))
        );
        assert_eq!(recognise("DISCARD ALL"), Some(SettingChange::ResetAll));
        assert_eq!(recognise("SET LOCAL work_mem = '1MB'"), None);
        assert_eq!(
            recognise("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            None
        );
        assert_eq!(recognise("SET a = 1; SELECT 1"), None);
        assert_eq!(recognise("SELECT 1"), None);
        assert_eq!(recognise("SET ROLE admin"), None);
    }

    #[test]
    fn session_characteristics_are_the_default_transaction_settings() {
        let set = |name: &str, value: &str| {
            Some(SettingChange::Set {
                name: name.into(),
                value_sql: value.into(),
            })
        };
        // As pgjdbc sends them.
        assert_eq!(
            recognise("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            set("default_transaction_isolation", "'serializable'")
        );
        assert_eq!(
            recognise(
                "set session characteristics as transaction isolation level  read committed;"
            ),
            set("default_transaction_isolation", "'read committed'")
        );
        assert_eq!(
            recognise("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            set("default_transaction_read_only", "'on'")
        );
        assert_eq!(
            recognise("SET SESSION CHARACTERISTICS AS TRANSACTION NOT DEFERRABLE"),
            set("default_transaction_deferrable", "'off'")
        );
        assert_eq!(
            recognise(
                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"
            ),
            None
        );
        assert_eq!(
            recognise("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL CHAOS"),
            None
        );
    }

    #[test]
    fn startup_options_become_settings_and_the_parameters_win() {
        let params = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let settings = startup_settings(&params(&[
            ("user", "app"),
            (
                "options",
                "-c search_path=myschema -cstatement_timeout=1234 --work-mem=8MB -c x.y=a\\ b",
            ),
            ("statement_timeout", "99"),
            ("fallback_application_name", "psql"),
        ]))
        .unwrap();
        let expected: BTreeMap<String, String> = [
            ("search_path", "'myschema'"),
            ("statement_timeout", "'99'"),
            ("work_mem", "'8MB'"),
            ("x.y", "'a b'"),
            ("application_name", "'psql'"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(settings, expected);
        let named = startup_settings(&params(&[
            ("application_name", "app"),
            ("fallback_application_name", "psql"),
        ]))
        .unwrap();
        assert_eq!(named["application_name"], "'app'");
        for refused in ["-B 100", "-c role=admin", "-c statement_timeout", "--"] {
            assert!(
                startup_settings(&params(&[("options", refused)])).is_err(),
                "{refused}"
            );
        }
    }

    #[test]
    fn a_change_lasts_only_if_its_transaction_commits() {
        let change = |value: &str| SettingChange::Set {
            name: "statement_timeout".into(),
            value_sql: value.into(),
        };
        let mut pending = Pending::default();
        // Group 0 fails (a refused value), group 1 commits, group 2 is still running.
        pending.stage(0, 0, change("'bogus'"));
        pending.undo(0);
        assert_eq!(pending.settle(0), []);
        pending.stage(1, 0, change("'1s'"));
        pending.stage(2, 0, change("'2s'"));
        assert_eq!(pending.settle(1), [change("'1s'")]);
        assert!(!pending.is_empty(), "the later group is not settled yet");
        // Group 2 is a transaction block rolled back in group 3.
        pending.undo(3);
        assert_eq!(pending.settle(3), []);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_commit_or_rollback_ends_only_the_changes_sent_before_it() {
        let change = |value: &str| SettingChange::Set {
            name: "statement_timeout".into(),
            value_sql: value.into(),
        };
        // `SET '1s'; ROLLBACK; SET '2s'; COMMIT; SET '3s'` in group 4.
        let mut pending = Pending::default();
        pending.stage(4, 0, change("'1s'"));
        pending.stage(4, 1, change("'2s'"));
        pending.stage(4, 2, change("'3s'"));
        assert_eq!(pending.end_transaction(4, 0, false), []);
        assert_eq!(pending.end_transaction(4, 1, true), [change("'2s'")]);
        // The last is still the open transaction's.
        assert_eq!(pending.settle(4), [change("'3s'")]);
        assert!(pending.is_empty());
    }

    #[test]
    fn reconcile_sets_what_differs_and_resets_what_is_extra() {
        let wanted = BTreeMap::from([("timezone".to_string(), "'UTC'".to_string())]);
        let mut applied = BTreeMap::from([("work_mem".to_string(), "'64MB'".to_string())]);
        let statements: Vec<_> = reconcile(&wanted, &mut applied)
            .into_iter()
            .map(|change| change.statement)
            .collect();
        assert_eq!(
            statements,
            ["RESET \"work_mem\"", "SET \"timezone\" = 'UTC'"]
        );
        assert_eq!(reconcile(&wanted, &mut applied), []);
    }
}
