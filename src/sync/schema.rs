//! The schema copy: `pg_dump --schema-only` of the schemas that hold the selected tables, then
//! `pg_restore` into the target.
//!
//! For the native copy, all of it in one transaction before any row arrives, so a crash
//! leaves all of it or none, and the table sync finds the keys the apply needs. For the
//! snapshot copy, in two parts around the rows (`Part::Tables`, then `Part::AfterData`):
//! indexes built once over the copied rows cost a fraction of maintaining them row by row.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::pg::{catalog, sql, PgError, Server};
use crate::plan::{Endpoint, PgUrl};
use crate::preflight::Inspection;
use crate::state::SchemaCopy;

/// A schema dump ready to restore, with the record of what the restore will create. The
/// record is saved in the state *before* the restore, so that a run killed right after the
/// restore committed can tell, and `abort --drop-target-data` can undo either way.
pub struct PreparedSchema {
    pub record: SchemaCopy,
    dump: PathBuf,
    list: PathBuf,
    pg_restore: PathBuf,
}

impl Drop for PreparedSchema {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.dump);
        let _ = std::fs::remove_file(&self.list);
    }
}

/// Dumps the schemas that hold the selected tables and plans the restore: schemas that already
/// exist on the target (such as `public`) are not created again.
///
/// With `snapshot`, the schema is read in that exported snapshot (the copy's consistent cut).
pub async fn prepare(
    inspection: &Inspection,
    source: &Endpoint,
    target: &Server,
    snapshot: Option<&str>,
) -> Result<PreparedSchema, PgError> {
    let selection = &inspection.selection;
    let dump = std::env::temp_dir().join(format!(
        "switchyard-{}-{}.dump",
        inspection.report.name,
        std::process::id()
    ));
    let mut prepared = PreparedSchema {
        record: SchemaCopy {
            created_schemas: Vec::new(),
            tables: Vec::new(),
            other_objects: Vec::new(),
            restored: false,
        },
        list: dump.with_extension("list"),
        dump,
        pg_restore: inspection.pg_restore.clone(),
    };
    let mut args: Vec<String> = vec![
        "--schema-only".into(),
        "--no-publications".into(),
        "--no-subscriptions".into(),
        "--format=custom".into(),
        format!("--file={}", prepared.dump.display()),
    ];
    if let Some(snapshot) = snapshot {
        args.push(format!("--snapshot={snapshot}"));
    }
    args.extend(
        selection
            .schemas
            .iter()
            .map(|s| format!("--schema={}", sql::ident(s))),
    );
    args.extend(
        selection
            .excluded
            .iter()
            .map(|t| format!("--exclude-table={}", t.sql())),
    );
    run_tool(&inspection.pg_dump, &args, Some(&source.url)).await?;

    let listing = run_tool(
        &prepared.pg_restore,
        &["--list".to_string(), prepared.dump.display().to_string()],
        None,
    )
    .await?;
    let existing = catalog::schema_names(target).await?;
    // Every entry is restored, whatever its kind, except the creation of schemas that exist.
    let skip = |line: &str| {
        TocEntry::parse(line).is_some_and(|e| e.kind == "SCHEMA" && existing.contains(&e.tag))
    };
    let list_text: String = listing
        .lines()
        .filter(|line| !skip(line))
        .map(|line| format!("{line}\n"))
        .collect();
    let entries: Vec<TocEntry> = listing
        .lines()
        .filter(|line| !skip(line))
        .filter_map(TocEntry::parse)
        .collect();
    let keep: Vec<&TocEntry> = entries.iter().collect();
    std::fs::write(&prepared.list, list_text)
        .map_err(|e| PgError::Tool(format!("cannot write {}: {e}", prepared.list.display())))?;

    let created_schemas: Vec<String> = keep
        .iter()
        .filter(|e| e.kind == "SCHEMA")
        .map(|e| e.tag.clone())
        .collect();
    let created: BTreeSet<&String> = created_schemas.iter().collect();
    prepared.record.other_objects = keep
        .iter()
        .filter(|e| !created.contains(&e.namespace))
        .filter_map(|e| e.drop_target())
        .collect();
    prepared.record.tables = selection.tables.iter().map(|t| t.name.sql()).collect();
    prepared.record.created_schemas = created_schemas;
    Ok(prepared)
}

/// What part of the dump a restore applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// All of it, in one transaction (the native copy: keys and indexes before the rows).
    Whole,
    /// Types, functions, tables, sequences: in one transaction, before the rows.
    Tables,
    /// Primary keys, indexes, constraints, triggers and rules, after the rows, `jobs` at
    /// once; foreign keys are left out (added `NOT VALID` and validated afterwards).
    AfterData { jobs: u32 },
}

/// For the coordinator's own index builds only: more memory per sort (each of `jobs` builds
/// may use it) and parallel workers per build.
const INDEX_BUILD_OPTIONS: &str =
    "-c maintenance_work_mem=512MB -c max_parallel_maintenance_workers=4";

/// Restores `part` of the dump on the target.
pub async fn restore(
    prepared: &mut PreparedSchema,
    target: &Endpoint,
    part: Part,
) -> Result<(), PgError> {
    let mut args = vec!["--exit-on-error".to_string()];
    let mut env = None;
    match part {
        Part::Whole => args.push("--single-transaction".into()),
        Part::Tables => {
            args.push("--single-transaction".into());
            args.push("--section=pre-data".into());
        }
        Part::AfterData { jobs } => {
            let listing = std::fs::read_to_string(&prepared.list).map_err(|e| {
                PgError::Tool(format!("cannot read {}: {e}", prepared.list.display()))
            })?;
            let without_foreign_keys: String = listing
                .lines()
                .filter(|line| TocEntry::parse(line).is_none_or(|e| e.kind != "FK CONSTRAINT"))
                .map(|line| format!("{line}\n"))
                .collect();
            std::fs::write(&prepared.list, without_foreign_keys).map_err(|e| {
                PgError::Tool(format!("cannot write {}: {e}", prepared.list.display()))
            })?;
            args.push("--section=post-data".into());
            args.push(format!("--jobs={}", jobs.max(1)));
            env = Some(("PGOPTIONS", INDEX_BUILD_OPTIONS));
        }
    }
    args.push(format!("--use-list={}", prepared.list.display()));
    args.push(prepared.dump.display().to_string());
    run_tool_with(&prepared.pg_restore, &args, Some(&target.url), env).await?;
    if matches!(part, Part::Whole | Part::Tables) {
        prepared.record.restored = true;
    }
    Ok(())
}

/// Whether a restore recorded as begun has committed: it is one transaction, so one table
/// tells for all.
pub async fn was_restored(target: &Server, record: &SchemaCopy) -> Result<bool, PgError> {
    let Some(table) = record.tables.first() else {
        return Ok(false);
    };
    let row = target
        .query_one(
            "look for a restored table",
            "SELECT to_regclass($1) IS NOT NULL",
            &[table],
        )
        .await?;
    Ok(row.get(0))
}

/// The statements that drop what a restore made (it must have committed: objects of the same
/// names are otherwise someone else's).
pub fn drop_statements(record: &SchemaCopy) -> Vec<String> {
    let tables = record
        .tables
        .iter()
        .map(|t| format!("DROP TABLE IF EXISTS {t} CASCADE"));
    let others = record
        .other_objects
        .iter()
        .map(|o| format!("DROP {o} CASCADE"));
    let schemas = record
        .created_schemas
        .iter()
        .map(|s| format!("DROP SCHEMA IF EXISTS {} CASCADE", sql::ident(s)));
    tables.chain(others).chain(schemas).collect()
}

/// One line of `pg_restore --list`: `215; 1259 16390 TABLE public orders owner`.
#[derive(Debug, PartialEq)]
struct TocEntry {
    kind: String,
    namespace: String,
    tag: String,
}

/// Object kinds the TOC names, longest first so that `MATERIALIZED VIEW` wins over `VIEW`.
const KINDS: &[&str] = &[
    "MATERIALIZED VIEW",
    "FK CONSTRAINT",
    "DEFAULT ACL",
    "TABLE DATA",
    "SEQUENCE OWNED BY",
    "SEQUENCE SET",
    "AGGREGATE",
    "CONSTRAINT",
    "COMMENT",
    "DEFAULT",
    "DOMAIN",
    "EXTENSION",
    "FUNCTION",
    "INDEX",
    "PROCEDURE",
    "SCHEMA",
    "SEQUENCE",
    "TABLE",
    "TRIGGER",
    "TYPE",
    "VIEW",
    "ACL",
    "RULE",
    "POLICY",
    "COLLATION",
    "OPERATOR",
    "CAST",
    "CONVERSION",
    "TEXT SEARCH CONFIGURATION",
    "TEXT SEARCH DICTIONARY",
];

impl TocEntry {
    fn parse(line: &str) -> Option<TocEntry> {
        if line.starts_with(';') || line.trim().is_empty() {
            return None;
        }
        let (_, rest) = line.split_once("; ")?;
        // "<tableoid> <oid> <KIND> <namespace> <tag> <owner>"
        let mut words = rest.splitn(3, ' ');
        let (_, _, rest) = (words.next()?, words.next()?, words.next()?);
        let kind = KINDS.iter().find(|k| rest.starts_with(&format!("{k} ")))?;
        let rest = &rest[kind.len() + 1..];
        let (namespace, rest) = rest.split_once(' ')?;
        let tag = rest.rsplit_once(' ').map_or(rest, |(tag, _owner)| tag);
        Some(TocEntry {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            tag: tag.to_string(),
        })
    }

    /// What follows `DROP` for objects that `abort --drop-target-data` removes from a schema that
    /// existed before (tables are dropped from the table list).
    fn drop_target(&self) -> Option<String> {
        let kind = match self.kind.as_str() {
            "TYPE" | "DOMAIN" | "FUNCTION" | "PROCEDURE" | "AGGREGATE" | "SEQUENCE" | "VIEW"
            | "MATERIALIZED VIEW" => &self.kind,
            _ => return None,
        };
        let (name, args) = match self.tag.find('(') {
            Some(at) => (&self.tag[..at], &self.tag[at..]),
            None => (self.tag.as_str(), ""),
        };
        Some(format!(
            "{kind} IF EXISTS {}.{}{args}",
            sql::ident(&self.namespace),
            sql::ident(name)
        ))
    }
}

/// Runs a PostgreSQL client program, against `url` when given; the password goes in the
/// environment, never on the command line.
async fn run_tool(program: &Path, args: &[String], url: Option<&PgUrl>) -> Result<String, PgError> {
    run_tool_with(program, args, url, None).await
}

async fn run_tool_with(
    program: &Path,
    args: &[String],
    url: Option<&PgUrl>,
    env: Option<(&str, &str)>,
) -> Result<String, PgError> {
    let mut command = Command::new(program);
    command.args(args).kill_on_drop(true);
    if let Some((key, value)) = env {
        command.env(key, value);
    }
    if let Some(url) = url {
        let (conninfo, password) = crate::pg::coordinator_conninfo(url);
        command.arg(format!("--dbname={conninfo}"));
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
    }
    tracing::debug!(program = %program.display(), ?args, "running");
    let output = command
        .output()
        .await
        .map_err(|e| PgError::Tool(format!("cannot run {}: {e}", program.display())))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(PgError::Tool(format!(
            "{} failed ({}): {}",
            program.display(),
            output.status,
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toc_lines_parse() {
        let e = TocEntry::parse("5; 2615 2200 SCHEMA - public pg_database_owner").unwrap();
        assert_eq!(
            (e.kind.as_str(), e.namespace.as_str(), e.tag.as_str()),
            ("SCHEMA", "-", "public")
        );
        let e =
            TocEntry::parse("220; 1255 16400 FUNCTION public add_one(integer) postgres").unwrap();
        assert_eq!(
            e.drop_target().unwrap(),
            "FUNCTION IF EXISTS \"public\".\"add_one\"(integer)"
        );
        let e =
            TocEntry::parse("230; 1259 16500 MATERIALIZED VIEW public totals postgres").unwrap();
        assert_eq!(e.kind, "MATERIALIZED VIEW");
        assert!(TocEntry::parse(";     Dump Version: 1.14-0").is_none());
    }
}
