//! Password lookup the way libpq does it: `PGPASSWORD`, then `PGPASSFILE` or `~/.pgpass`.
//!
//! The servers open the replication connections themselves and cannot read the coordinator's
//! environment, so switchyard resolves the password and hands it to them.

use std::path::PathBuf;

pub fn resolve_password(host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    if let Ok(password) = std::env::var("PGPASSWORD") {
        return Some(password);
    }
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    lookup(&text, host, port, dbname, user)
}

/// Finds the first matching `host:port:database:user:password` line.
pub fn lookup(text: &str, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    let wanted = [host, port.as_str(), dbname, user];
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(split_fields)
        .filter(|fields| fields.len() == 5)
        .find(|fields| {
            fields[..4].iter().zip(wanted).all(|(field, want)| {
                field == "*" || field == want || (field == "localhost" && want == "127.0.0.1")
            })
        })
        .map(|fields| fields[4].clone())
}

/// Splits on unescaped `:`; `\:` and `\\` are literal.
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(field)) = (chars.next(), fields.last_mut()) {
                    field.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => {
                if let Some(field) = fields.last_mut() {
                    field.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::lookup;

    #[test]
    fn matches_wildcards_and_escapes() {
        let file = "# comment\ndb-old:5432:shop:migrator:pa\\:ss\n*:*:*:other:x\n";
        assert_eq!(
            lookup(file, "db-old", 5432, "shop", "migrator").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(
            lookup(file, "db-new", 5433, "any", "other").as_deref(),
            Some("x")
        );
        assert_eq!(lookup(file, "db-new", 5432, "shop", "migrator"), None);
    }
}
