//! Session settings in transaction pooling. A client's settings — from its startup packet, from
//! `SET name = value` / `SET name TO value` / `RESET` statements, and every change the server
//! reports with ParameterStatus — are remembered per client and re-applied (or reset) on
//! whichever server connection runs its next transaction. A change this module does not
//! recognise (SET ROLE, ...) makes the session close that server connection instead.

use std::collections::BTreeMap;

use crate::pg::sql;

/// What a simple query does to the session's settings, when it is one statement we recognise.
#[derive(Debug, PartialEq, Eq)]
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

/// Settings the proxy never passes to a server: `application_name` stays `switchyard-proxy`
/// so the coordinator can tell the proxy's sessions apart.
pub fn passed_to_server(name: &str) -> bool {
    !matches!(
        name,
        "application_name" | "user" | "database" | "options" | "replication"
    )
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
