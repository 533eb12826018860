//! Value types of a plan file. Each one validates itself while it is deserialized, so that a
//! bad value is reported with the file, line, column and key it came from.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};
use tokio_postgres::config::Host;

use super::interpolate::interpolate;

/// Reads a string and substitutes `${VAR}` from the environment.
fn env_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let raw = String::deserialize(deserializer)?;
    interpolate(&raw, |name| std::env::var(name).ok()).map_err(de::Error::custom)
}

/// A string value after `${VAR}` interpolation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvString(pub String);

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        env_string(deserializer).map(EnvString)
    }
}

/// The migration's name. It becomes part of the publication, slot and subscription names, so
/// it is limited to what a replication slot name allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanName(pub String);

impl<'de> Deserialize<'de> for PlanName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = env_string(deserializer)?;
        let valid = !name.is_empty()
            && name.len() <= 40
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(de::Error::custom(format!(
                "name {name:?} must be 1 to 40 characters of a-z, 0-9 and _ \
                 (it becomes part of replication slot names)"
            )));
        }
        Ok(PlanName(name))
    }
}

/// A PostgreSQL connection URL (or `key=value` connection string).
#[derive(Clone)]
pub struct PgUrl {
    config: tokio_postgres::Config,
}

impl PgUrl {
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or_default()
    }

    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or_default()
    }

    pub fn host(&self) -> String {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        }
    }

    pub fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }
}

impl FromStr for PgUrl {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let config = tokio_postgres::Config::from_str(raw).map_err(|e| {
            format!("not a valid PostgreSQL URL ({e}); expected postgres://user@host:5432/dbname")
        })?;
        if config.get_user().is_none() {
            return Err("the URL names no user; write postgres://user@host/dbname".into());
        }
        if config.get_dbname().is_none() {
            return Err("the URL names no database; write postgres://user@host/dbname".into());
        }
        if config.get_hosts().len() > 1 {
            return Err(
                "the URL names several hosts; switchyard needs exactly one server per side".into(),
            );
        }
        Ok(PgUrl { config })
    }
}

impl<'de> Deserialize<'de> for PgUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        env_string(deserializer)?.parse().map_err(de::Error::custom)
    }
}

/// Shown without the password, so a URL can be logged and printed.
impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            self.user(),
            self.host(),
            self.port(),
            self.dbname()
        )
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A duration written as a string: `"500ms"`, `"30s"`, `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = env_string(deserializer)?;
        humantime::parse_duration(&raw).map(Dur).map_err(|e| {
            de::Error::custom(format!(
                "{raw:?} is not a duration ({e}); write e.g. \"500ms\", \"30s\" or \"1h\""
            ))
        })
    }
}

/// An address to listen on, `host:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub std::net::SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = env_string(deserializer)?;
        raw.parse().map(ListenAddr).map_err(|_| {
            de::Error::custom(format!(
                "{raw:?} is not an address to listen on; write e.g. \"127.0.0.1:6432\""
            ))
        })
    }
}

/// A `schema.table` pattern; `*` matches any run of characters and `?` any one character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    pub schema: String,
    pub table: String,
}

impl TablePattern {
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        glob_match(&self.schema, schema) && glob_match(&self.table, table)
    }
}

impl FromStr for TablePattern {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw.split_once('.') {
            Some((schema, table)) if !schema.is_empty() && !table.is_empty() && !table.contains('.') => {
                Ok(TablePattern { schema: schema.into(), table: table.into() })
            }
            _ => Err(format!("table pattern {raw:?} must be schema.table, e.g. \"public.*\" or \"sales.order_*\"")),
        }
    }
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

impl<'de> Deserialize<'de> for TablePattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        env_string(deserializer)?.parse().map_err(de::Error::custom)
    }
}

fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                backtrack = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    p = star + 1;
                    t = matched + 1;
                    backtrack = Some((star, matched + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "orders"));
        assert!(glob_match("order_*", "order_items"));
        assert!(!glob_match("order_*", "orders"));
        assert!(glob_match("o?ders", "orders"));
        assert!(glob_match("*_2024_*", "sales_2024_q1"));
        assert!(!glob_match("a*b", "acbd"));
    }

    #[test]
    fn patterns_need_a_schema() {
        assert!("orders".parse::<TablePattern>().is_err());
        let p: TablePattern = "public.*".parse().unwrap();
        assert!(p.matches("public", "anything"));
        assert!(!p.matches("sales", "anything"));
    }

    #[test]
    fn urls_need_user_and_database() {
        assert!("postgres://db-old/shop".parse::<PgUrl>().is_err());
        assert!("postgres://m@db-old".parse::<PgUrl>().is_err());
        let url: PgUrl = "postgres://m:pw@db-old:5433/shop".parse().unwrap();
        assert_eq!(url.to_string(), "postgres://m@db-old:5433/shop");
    }
}

/// A share from 0 to 1 (`[proxy.shadow] fraction`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        if (0.0..=1.0).contains(&value) {
            Ok(Fraction(value))
        } else {
            Err(de::Error::custom(format!(
                "{value} is not a fraction: write a number from 0 (off) to 1 (every read), e.g. 0.1"
            )))
        }
    }
}
