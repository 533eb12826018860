//! How a row becomes a 64-bit hash inside the database.
//!
//! Each column is hashed by PostgreSQL's typed `hash*extended` function for its type, seeded by
//! the column's position, with a per-column marker for NULL (the functions return NULL for
//! NULL). A column's hash never goes through the value's text form when a typed function
//! exists: text output is what makes checksums slow. A type whose typed hash differs between
//! the two servers' versions (the self-test finds out), that has none, or that could hash by
//! OID (enums, also inside arrays, domains and composites) is hashed from a canonical text
//! form instead. The session settings that fix those text forms are [`SESSION_SETTINGS`].

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::pg::{sql, PgError, Server};

/// Set on every validation connection, so that text forms (timestamps in UTC, shortest exact
/// floats, ISO dates, hex bytea) are the same on both servers.
pub const SESSION_SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'";

/// How a column is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The type's own hash function: equal values hash equal (`1.0` = `1.00`, `-0` = `0`,
    /// `'1 day'` = `'24 hours'`, jsonb key order ignored, timestamps as instants).
    Typed,
    /// A hash of the canonical text form.
    Text,
}

/// A column with the SQL expression that hashes it (never NULL).
#[derive(Debug, Clone, Serialize)]
pub struct ColumnHash {
    pub name: String,
    #[serde(rename = "type")]
    pub type_sql: String,
    pub mode: Mode,
    /// Why the column is not typed, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip)]
    pub expr: String,
}

/// What the catalogs say about a type, enough to choose its hash.
#[derive(Debug, Clone)]
pub struct TypeInfo {
    pub name: String,
    pub schema: String,
    /// `b` base, `e` enum, `c` composite, `d` domain, `r`/`m` range.
    pub kind: char,
    pub base: u32,
    pub element: u32,
    pub is_array: bool,
    /// A composite's fields in order: name and type oid.
    pub fields: Vec<(String, u32)>,
}

/// Every type the given type oids lead to (domain bases, array elements), by oid.
pub async fn resolve_types(
    server: &Server,
    oids: impl IntoIterator<Item = u32>,
) -> Result<HashMap<u32, TypeInfo>, PgError> {
    let mut known: HashMap<u32, TypeInfo> = HashMap::new();
    let mut wanted: BTreeSet<u32> = oids.into_iter().collect();
    while !wanted.is_empty() {
        let list: Vec<u32> = wanted.iter().copied().collect();
        let rows = server
            .query(
                "read column types",
                "SELECT t.oid, t.typname::text, n.nspname::text, t.typtype::text, t.typbasetype, t.typelem,
                        t.typcategory = 'A' AND t.typlen = -1 AND t.typelem <> 0,
                        ARRAY(SELECT a.attname::text FROM pg_attribute a
                               WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
                               ORDER BY a.attnum),
                        ARRAY(SELECT a.atttypid FROM pg_attribute a
                               WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
                               ORDER BY a.attnum)
                   FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                  WHERE t.oid = ANY ($1)",
                &[&list],
            )
            .await?;
        wanted.clear();
        for r in rows {
            let names: Vec<String> = r.get(7);
            let field_types: Vec<u32> = r.get(8);
            let info = TypeInfo {
                name: r.get(1),
                schema: r.get(2),
                kind: r.get::<_, String>(3).chars().next().unwrap_or('b'),
                base: r.get(4),
                element: r.get(5),
                is_array: r.get(6),
                fields: names.into_iter().zip(field_types).collect(),
            };
            let fields = info.fields.iter().map(|(_, oid)| *oid);
            for next in [info.base, info.element].into_iter().chain(fields) {
                if next != 0 && !known.contains_key(&next) {
                    wanted.insert(next);
                }
            }
            known.insert(r.get(0), info);
        }
        wanted.retain(|oid| !known.contains_key(oid));
    }
    Ok(known)
}

/// The typed hash of a built-in scalar type, `{c}` standing for the value and `{s}` for the
/// seed, with values for the self-test.
fn builtin(name: &str) -> Option<(&'static str, &'static [&'static str])> {
    Some(match name {
        "int2" => ("hashint2extended({c}, {s})", &["0", "-32768", "7"]),
        "int4" => ("hashint4extended({c}, {s})", &["0", "-2147483648", "42"]),
        "int8" => (
            "hashint8extended({c}, {s})",
            &["0", "-9223372036854775808", "1234567890123"],
        ),
        "bool" => ("hashint4extended(({c})::int4, {s})", &["true", "false"]),
        "text" | "varchar" => (
            "hashtextextended(({c})::text COLLATE \"C\", {s})",
            &["", "abc", "zufrieden ünïcödé", "x y "],
        ),
        "bpchar" => (
            "hashbpcharextended(({c}) COLLATE \"C\", {s})",
            &["", "ab  ", "ünï"],
        ),
        "name" => ("hashnameextended({c}, {s})", &["pg_class", ""]),
        "char" => ("hashcharextended({c}, {s})", &["a", "Z"]),
        "oid" => ("hashoidextended({c}, {s})", &["0", "4294967295"]),
        "numeric" => (
            "hash_numeric_extended({c}, {s})",
            &["0", "1.0", "1.00", "-12345.678900", "NaN", "1e-20", "9e99"],
        ),
        "float4" => (
            "hashfloat4extended({c}, {s})",
            &["0", "-0", "1.5", "NaN", "Infinity", "3.4e38"],
        ),
        "float8" => (
            "hashfloat8extended({c}, {s})",
            &["0", "-0", "0.1", "NaN", "-Infinity", "1e308", "5e-324"],
        ),
        "date" => (
            "timestamp_hash_extended(({c})::timestamp, {s})",
            &["2024-02-29", "1900-01-01", "infinity"],
        ),
        "timestamp" => (
            "timestamp_hash_extended({c}, {s})",
            &["2024-02-29 12:34:56.789012", "-infinity"],
        ),
        "timestamptz" => (
            // As an instant: its distance from the epoch, which costs half of a conversion to
            // timestamp. (Infinite values cannot be subtracted on PostgreSQL 15.)
            "CASE WHEN isfinite({c}) THEN interval_hash_extended(({c}) - timestamptz 'epoch', {s}) \
             ELSE hashtextextended(({c})::text, {s}) END",
            &[
                "2024-02-29 12:34:56.789012+02",
                "1999-12-31 23:59:59+00",
                "infinity",
            ],
        ),
        "time" => (
            "time_hash_extended({c}, {s})",
            &["00:00", "23:59:59.999999"],
        ),
        "timetz" => ("timetz_hash_extended({c}, {s})", &["12:00+02", "00:00-11"]),
        "interval" => (
            "interval_hash_extended({c}, {s})",
            &["1 day", "24 hours", "1 mon -2 days 03:04:05.6", "0"],
        ),
        "uuid" => (
            "uuid_hash_extended({c}, {s})",
            &[
                "00000000-0000-0000-0000-000000000000",
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            ],
        ),
        "jsonb" => (
            "jsonb_hash_extended({c}, {s})",
            &[
                r#"{"b": [1, 2, {"c": null}], "a": "x"}"#,
                "[]",
                "1.0",
                r#""ü""#,
            ],
        ),
        "inet" | "cidr" => ("hashinetextended(({c})::inet, {s})", &["10.0.0.1/8", "::1"]),
        "macaddr" => ("hashmacaddrextended({c}, {s})", &["08:00:2b:01:02:03"]),
        "pg_lsn" => ("pg_lsn_hash_extended({c}, {s})", &["0/0", "16/B374D848"]),
        _ => return None,
    })
}

/// The text fallback, `{c}` standing for a text: the value's [`canonical_text`], or its
/// plain text form in strict mode.
const TEXT_HASH: &str = "hashtextextended(({c}) COLLATE \"C\", {s})";

/// How deep inside composites and arrays values are made canonical: past it, the plain text.
const CANONICAL_DEPTH: usize = 4;

fn plain_text(value: &str) -> String {
    format!("({value})::text")
}

/// A text form of `value` (of type `oid`) on which equal values agree, as they do in the
/// typed hashes: numerics without trailing zeros (`1.0` = `1.00`; `trim_scale` is in
/// PostgreSQL 13 and later), float zero without its sign (`-0` = `0`), through domains and
/// inside composites and arrays. `None` where the plain text form is canonical already: the
/// session settings ([`SESSION_SETTINGS`]) fix timestamps, float digits, dates and bytea.
fn canonical_text(
    types: &HashMap<u32, TypeInfo>,
    oid: u32,
    value: &str,
    depth: usize,
) -> Option<String> {
    let t = types.get(&oid)?;
    if depth > CANONICAL_DEPTH {
        return None;
    }
    match t.kind {
        // Functions and field access take a domain's value as its base type's.
        'd' => canonical_text(types, t.base, value, depth),
        'c' => canonical_fields(types, &t.fields, value, depth),
        _ if t.is_array => canonical_elements(types, t.element, value, depth),
        _ if t.schema != "pg_catalog" => None,
        _ => match t.name.as_str() {
            "numeric" => Some(format!("trim_scale({value})::text")),
            "float4" | "float8" => Some(format!(
                "CASE WHEN {value} = 0 THEN '0' ELSE ({value})::text END"
            )),
            _ => None,
        },
    }
}

/// A composite's fields, each canonical, as a text array; `None` if no field needs it.
fn canonical_fields(
    types: &HashMap<u32, TypeInfo>,
    fields: &[(String, u32)],
    value: &str,
    depth: usize,
) -> Option<String> {
    let texts: Vec<(String, Option<String>)> = fields
        .iter()
        .map(|(name, oid)| {
            let field = format!("({value}).{}", sql::ident(name));
            let canonical = canonical_text(types, *oid, &field, depth + 1);
            (field, canonical)
        })
        .collect();
    if texts.iter().all(|(_, canonical)| canonical.is_none()) {
        return None;
    }
    let parts: Vec<String> = texts
        .into_iter()
        .map(|(field, canonical)| canonical.unwrap_or_else(|| plain_text(&field)))
        .collect();
    // A composite whose fields are all NULL is not NULL: `num_nulls` tells them apart,
    // `IS NULL` would not.
    Some(format!(
        "CASE WHEN num_nulls({value}) = 1 THEN NULL ELSE ARRAY[{}]::text END",
        parts.join(", ")
    ))
}

/// An array's dimensions, then its elements, each canonical, in order (`generate_series`
/// runs in step with `unnest`); `None` if the elements need nothing.
fn canonical_elements(
    types: &HashMap<u32, TypeInfo>,
    element: u32,
    value: &str,
    depth: usize,
) -> Option<String> {
    let (e, n) = (format!("e{depth}"), format!("n{depth}"));
    let canonical = canonical_text(types, element, &e, depth + 1)?;
    Some(format!(
        "CASE WHEN num_nulls({value}) = 1 THEN NULL ELSE coalesce(array_dims({value}), '') || \
         (SELECT coalesce(array_agg({canonical} ORDER BY {n}), '{{}}') \
            FROM (SELECT unnest({value}) AS {e}, generate_series(1, cardinality({value})) AS {n}) u)::text END"
    ))
}

/// What a column's type calls for, before the self-test.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Choice {
    /// A built-in scalar (named), possibly through a domain (`cast` to the base type).
    Scalar {
        name: String,
        cast: Option<String>,
    },
    /// An array of a built-in scalar.
    Array {
        element: String,
    },
    Text(&'static str),
}

fn choose(types: &HashMap<u32, TypeInfo>, oid: u32) -> Choice {
    let Some(t) = types.get(&oid) else {
        return Choice::Text("unknown type");
    };
    match t.kind {
        'e' => Choice::Text("enum: hashed by label, not by OID"),
        'c' => Choice::Text("composite type"),
        'd' => match choose(types, t.base) {
            Choice::Scalar { name, .. } => Choice::Scalar {
                cast: Some(name.clone()),
                name,
            },
            other => other,
        },
        _ if t.is_array => match types.get(&t.element) {
            Some(e) if e.kind == 'b' && e.schema == "pg_catalog" && builtin(&e.name).is_some() => {
                Choice::Array {
                    element: e.name.clone(),
                }
            }
            _ => Choice::Text("array of a type that could hash by OID or has no hash"),
        },
        _ if t.schema == "pg_catalog" && t.name == "json" => {
            Choice::Text("json compares as text (key order and spacing count)")
        }
        _ if t.schema == "pg_catalog" && builtin(&t.name).is_some() => Choice::Scalar {
            name: t.name.clone(),
            cast: None,
        },
        _ => Choice::Text("no typed hash for this type"),
    }
}

/// Hashes a fixed vector of values of each type on both servers: a type whose hashes differ
/// between the two versions, or whose hash function is missing on one, is hashed as text.
/// Returns the built-in type names that passed.
pub async fn self_test(
    source: &Server,
    target: &Server,
    names: &BTreeSet<String>,
) -> Result<BTreeSet<String>, PgError> {
    let mut passed = BTreeSet::new();
    for name in names {
        let Some((template, values)) = builtin(name) else {
            continue;
        };
        let mut exprs: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let value = format!("{}::{}", sql::literal(v), sql::ident(name));
                fill(template, &value, 1000 + i as i64)
            })
            .collect();
        let array = format!(
            "ARRAY[{}]::{}[]",
            values
                .iter()
                .map(|v| sql::literal(v))
                .collect::<Vec<_>>()
                .join(", "),
            sql::ident(name)
        );
        exprs.push(format!("hash_array_extended({array}, 77)"));
        let query = format!("SELECT ARRAY[{}]::int8[]", exprs.join(", "));
        let (a, b) = tokio::join!(
            source.query_one("hash self-test", &query, &[]),
            target.query_one("hash self-test", &query, &[])
        );
        match (a, b) {
            (Ok(a), Ok(b)) if a.get::<_, Vec<i64>>(0) == b.get::<_, Vec<i64>>(0) => {
                passed.insert(name.clone());
            }
            (Ok(_), Ok(_)) => {
                tracing::warn!(
                    "the typed hash of {name} differs between the servers: hashed as text"
                )
            }
            (a, b) => {
                let error = a
                    .err()
                    .or(b.err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                tracing::warn!("no usable typed hash for {name} ({error}): hashed as text")
            }
        }
    }
    Ok(passed)
}

/// The built-in types the columns would hash with, for the self-test.
pub fn types_to_test(types: &HashMap<u32, TypeInfo>, oids: &[u32]) -> BTreeSet<String> {
    oids.iter()
        .filter_map(|&oid| match choose(types, oid) {
            Choice::Scalar { name, .. } => Some(name),
            Choice::Array { element } => Some(element),
            Choice::Text(_) => None,
        })
        .collect()
}

/// A table column, as its hash is chosen.
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    pub name: &'a str,
    pub type_sql: &'a str,
    pub oid: u32,
    pub not_null: bool,
    /// 1-based: the hash's seed.
    pub position: i64,
}

/// The hash expression of a column at `position` (1-based). `strict` hashes every column's
/// text form, so that `1.0` and `1.00` differ.
pub fn column_hash(
    spec: &Column<'_>,
    types: &HashMap<u32, TypeInfo>,
    passed: &BTreeSet<String>,
    strict: bool,
) -> ColumnHash {
    let Column {
        name,
        type_sql,
        oid,
        not_null,
        position,
    } = *spec;
    let column = sql::ident(name);
    let typed = |template: &str, value: &str| (fill(template, value, position), Mode::Typed, None);
    let text = |note: &str| {
        let canonical = canonical_text(types, oid, &column, 0);
        let value = canonical.unwrap_or_else(|| plain_text(&column));
        (
            fill(TEXT_HASH, &value, position),
            Mode::Text,
            Some(note.to_string()),
        )
    };
    let (hash, mode, note) = match choose(types, oid) {
        // Strict mode compares the text forms themselves: `1.0` and `1.00` differ.
        _ if strict => (
            fill(TEXT_HASH, &plain_text(&column), position),
            Mode::Text,
            Some("strict mode".to_string()),
        ),
        Choice::Scalar { name, cast } if passed.contains(&name) => match builtin(&name) {
            Some((template, _)) => {
                let value = match cast {
                    Some(base) => format!("({column})::{}", sql::ident(&base)),
                    None => column.clone(),
                };
                typed(template, &value)
            }
            None => text("no typed hash for this type"),
        },
        Choice::Array { element } if passed.contains(&element) => {
            typed("hash_array_extended({c}, {s})", &column)
        }
        Choice::Text(why) => text(why),
        _ => text("typed hash failed the self-test"),
    };
    ColumnHash {
        name: name.to_string(),
        type_sql: type_sql.to_string(),
        mode,
        note,
        // A NOT NULL column needs no NULL marker (saves a step per row).
        expr: if not_null {
            format!("({hash})")
        } else {
            format!("coalesce({hash}, {})", null_marker(position))
        },
    }
}

/// Stands for NULL in column `position`: a constant no hash function is likely to return,
/// different per column so that NULLs in different columns do not cancel out.
fn null_marker(position: i64) -> i64 {
    (position.wrapping_add(1)).wrapping_mul(0x2545_f491_4f6c_dd1d_u64 as i64) ^ 0x6a09_e667
}

fn fill(template: &str, value: &str, seed: i64) -> String {
    template
        .replace("{c}", value)
        .replace("{s}", &seed.to_string())
}

/// XOR of column hashes; `0` for none.
pub fn combine<'a>(exprs: impl IntoIterator<Item = &'a str>) -> String {
    let parts: Vec<&str> = exprs.into_iter().collect();
    if parts.is_empty() {
        "0::int8".to_string()
    } else {
        format!("({})", parts.join(" # "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types() -> HashMap<u32, TypeInfo> {
        let t = |name: &str, kind: char, base: u32, element: u32, is_array: bool| TypeInfo {
            name: name.into(),
            schema: if name == "mood" {
                "public"
            } else {
                "pg_catalog"
            }
            .into(),
            kind,
            base,
            element,
            is_array,
            fields: Vec::new(),
        };
        let measure = TypeInfo {
            fields: vec![("n".into(), 1700), ("f".into(), 701), ("mood".into(), 100)],
            ..t("measure", 'c', 0, 0, false)
        };
        HashMap::from([
            (20, t("int8", 'b', 0, 0, false)),
            (1016, t("_int8", 'b', 0, 20, true)),
            (100, t("mood", 'e', 0, 0, false)),
            (101, t("_mood", 'b', 0, 100, true)),
            (102, t("positive_int", 'd', 23, 0, false)),
            (23, t("int4", 'b', 0, 0, false)),
            (1700, t("numeric", 'b', 0, 0, false)),
            (701, t("float8", 'b', 0, 0, false)),
            (103, t("money_amount", 'd', 1700, 0, false)),
            (200, measure),
            (201, t("_measure", 'b', 0, 200, true)),
        ])
    }

    fn hash_of(oid: u32, passed: &[&str], strict: bool) -> ColumnHash {
        let passed = passed.iter().map(|p| p.to_string()).collect();
        column_hash(
            &Column {
                name: "v",
                type_sql: "whatever",
                oid,
                not_null: true,
                position: 1,
            },
            &types(),
            &passed,
            strict,
        )
    }

    /// A numeric or float hashed from its text (a typed hash failed the self-test, or it is
    /// inside a composite or array) keeps the type policy: `1.0` = `1.00`, `-0` = `0`.
    #[test]
    fn text_fallback_is_canonical() {
        let numeric = hash_of(1700, &[], false);
        assert_eq!(numeric.mode, Mode::Text);
        assert_eq!(
            numeric.expr,
            "(hashtextextended((trim_scale(\"v\")::text) COLLATE \"C\", 1))"
        );
        assert_eq!(
            hash_of(103, &[], false).expr,
            numeric.expr,
            "a domain over numeric"
        );
        assert_eq!(
            hash_of(701, &[], false).expr,
            "(hashtextextended((CASE WHEN \"v\" = 0 THEN '0' ELSE (\"v\")::text END) COLLATE \"C\", 1))"
        );
        let composite = hash_of(200, &["numeric", "float8"], false).expr;
        assert!(
            composite.contains(
                "CASE WHEN num_nulls(\"v\") = 1 THEN NULL ELSE ARRAY[trim_scale((\"v\").\"n\")::text, \
                 CASE WHEN (\"v\").\"f\" = 0 THEN '0' ELSE ((\"v\").\"f\")::text END, ((\"v\").\"mood\")::text]::text END"
            ),
            "{composite}"
        );
        let array = hash_of(201, &[], false).expr;
        assert!(
            array.contains("array_agg(CASE WHEN num_nulls(e0) = 1 THEN NULL ELSE ARRAY[trim_scale((e0).\"n\")::text"),
            "{array}"
        );
        assert!(array.contains(
            "FROM (SELECT unnest(\"v\") AS e0, generate_series(1, cardinality(\"v\")) AS n0) u"
        ));
        // Text forms that are canonical already stay as they are.
        assert_eq!(
            hash_of(100, &[], false).expr,
            "(hashtextextended(((\"v\")::text) COLLATE \"C\", 1))"
        );
        // Strict mode compares the plain text forms.
        assert_eq!(
            hash_of(1700, &["numeric"], true).expr,
            "(hashtextextended(((\"v\")::text) COLLATE \"C\", 1))"
        );
        assert!(!hash_of(200, &[], true).expr.contains("trim_scale"));
    }

    #[test]
    fn enums_never_hash_by_oid() {
        let types = types();
        assert!(matches!(choose(&types, 100), Choice::Text(_)));
        assert!(matches!(choose(&types, 101), Choice::Text(_)));
        assert_eq!(
            choose(&types, 1016),
            Choice::Array {
                element: "int8".into()
            }
        );
        assert_eq!(
            choose(&types, 102),
            Choice::Scalar {
                name: "int4".into(),
                cast: Some("int4".into())
            }
        );
    }

    #[test]
    fn expressions_are_seeded_and_null_safe() {
        let types = types();
        let passed = BTreeSet::from(["int8".to_string()]);
        let a = column_hash(
            &Column {
                name: "id",
                type_sql: "bigint",
                oid: 20,
                not_null: false,
                position: 1,
            },
            &types,
            &passed,
            false,
        );
        let b = column_hash(
            &Column {
                name: "id",
                type_sql: "bigint",
                oid: 20,
                not_null: false,
                position: 2,
            },
            &types,
            &passed,
            false,
        );
        assert_eq!(a.mode, Mode::Typed);
        assert!(a.expr.starts_with("coalesce(hashint8extended(\"id\", 1), "));
        assert_ne!(a.expr, b.expr);
        let failed = column_hash(
            &Column {
                name: "n",
                type_sql: "integer",
                oid: 23,
                not_null: false,
                position: 1,
            },
            &types,
            &passed,
            false,
        );
        assert_eq!(failed.mode, Mode::Text);
        let strict = column_hash(
            &Column {
                name: "id",
                type_sql: "bigint",
                oid: 20,
                not_null: false,
                position: 1,
            },
            &types,
            &passed,
            true,
        );
        assert_eq!(strict.mode, Mode::Text);
        assert_ne!(null_marker(1), null_marker(2));
    }
}
