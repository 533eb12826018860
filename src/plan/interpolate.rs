//! `${VAR}` substitution in plan values.

/// Replaces every `${VAR}` in `value` with the variable's value from `lookup`.
///
/// A `$` that is not followed by `{` is kept as it is, so passwords and URLs that contain a
/// dollar sign need no escaping. `$${` escapes a literal `${`.
pub fn interpolate(value: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(open) = after.strip_prefix('{') {
            let close = open
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {value:?}"))?;
            let name = &open[..close];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable name"
                ));
            }
            let resolved = lookup(name).ok_or_else(|| {
                format!("environment variable {name} is not set (used as `${{{name}}}`)")
            })?;
            out.push_str(&resolved);
            rest = &open[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::interpolate;

    fn env(name: &str) -> Option<String> {
        match name {
            "PW" => Some("s3cret".into()),
            "HOST" => Some("db-old".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_variables_anywhere() {
        let out = interpolate("postgres://m:${PW}@${HOST}:5432/shop", env).unwrap();
        assert_eq!(out, "postgres://m:s3cret@db-old:5432/shop");
    }

    #[test]
    fn missing_variable_is_named() {
        let err = interpolate("x${NOPE}y", env).unwrap_err();
        assert!(err.contains("NOPE"), "{err}");
    }

    #[test]
    fn lone_dollar_and_escape_are_kept() {
        assert_eq!(interpolate("a$b", env).unwrap(), "a$b");
        assert_eq!(interpolate("a$${PW}", env).unwrap(), "a${PW}");
    }

    #[test]
    fn unclosed_brace_is_an_error() {
        assert!(interpolate("${PW", env).is_err());
    }
}
