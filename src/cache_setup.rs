//! The proxies' read cache's objects on a server (`switchyard cache setup | drop`, the
//! cutover, `abort`, `finalize`), made and removed as the coordinator's role (a superuser:
//! event triggers need one). Here rather than in `proxy::cache`: the coordinator's commands
//! make these objects, and the library's layers do not depend on the proxy.
//!
//! On the primary: the cache's role (REPLICATION, LOGIN, SELECT on the cached tables), a
//! publication of the tables `[proxy.cache] tables` / `exclude` match that have a primary key
//! or replica identity (kept in step with the patterns by running setup again), its logical
//! slot, and an event trigger on `ddl_command_end` and `sql_drop` that emits a transactional
//! logical message into the same stream the invalidator reads.

use crate::pg::{Server, Side};
use crate::plan::{CacheSettings, Plan};
use crate::Error;

use crate::pg::sql::ident as quote_ident;

/// Names of the cache's objects on the primary, per plan.
#[derive(Debug, Clone)]
pub struct Names {
    pub publication: String,
    pub slot: String,
    pub event_trigger: String,
    /// The prefix of the logical messages the event trigger emits.
    pub message_prefix: String,
}

impl Names {
    pub fn of(plan: &Plan) -> Names {
        let name = &plan.name.0;
        Names {
            publication: format!("switchyard_cache_{name}"),
            slot: format!("switchyard_cache_{name}"),
            event_trigger: format!("switchyard_cache_{name}"),
            message_prefix: format!("switchyard_cache_{name}"),
        }
    }
}

/// The tables the publication holds: permanent tables (partitions included) that the
/// patterns match and that have a primary key or a replica identity.
const CANDIDATES: &str = "SELECT n.nspname::text, c.relname::text FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
       AND (c.relreplident = 'f' OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
            AND (i.indisprimary OR i.indisreplident))) \
     ORDER BY 1, 2";

const ROLE_ATTRIBUTES: &str = "SELECT rolreplication, rolcanlogin FROM pg_roles WHERE rolname = $1";

/// What setup did, line by line.
#[derive(Debug, Default, serde::Serialize)]
pub struct SetupReport {
    pub done: Vec<String>,
    pub tables: Vec<String>,
}

pub fn cache_settings(plan: &Plan) -> Result<&CacheSettings, Error> {
    plan.proxy.cache.as_ref().ok_or_else(|| {
        Error::Refused(format!(
            "{}: there is no [proxy.cache] section: the cache is off",
            plan.path.display()
        ))
    })
}

/// Makes (or brings in step) the cache's objects on `side`'s server.
///
/// The event trigger leaves out what cannot change an answer: subscription commands (the
/// cutover's own), commands on temporary objects only (a session's own, never cached: an
/// application that makes temporary tables would otherwise empty the cache each time), and
/// the fence's GRANTs and REVOKEs of write privileges (flagged by
/// `switchyard.write_grants_only` in their transaction), so that the cache stays warm across
/// a cutover. Any other DDL, and any GRANT or REVOKE an application makes, bumps the schema
/// epoch.
pub async fn setup(plan: &Plan, side: Side) -> Result<SetupReport, Error> {
    let settings = cache_settings(plan)?;
    let names = Names::of(plan);
    let endpoint = match side {
        Side::Source => &plan.source,
        Side::Target => &plan.target,
    };
    let server = Server::connect(side, endpoint).await?;
    let mut report = SetupReport::default();

    let role = &settings.replication_user;
    let password = std::env::var(&settings.replication_password_env.0).map_err(|_| {
        Error::Refused(format!(
            "[proxy.cache] replication_password_env: environment variable {} is not set",
            settings.replication_password_env.0
        ))
    })?;
    let attributes = server
        .query("look up the cache's role", ROLE_ATTRIBUTES, &[role])
        .await?;
    match attributes.first() {
        None => {
            server
                .execute_secret(
                    "create the cache's role",
                    &format!(
                        "CREATE ROLE {} LOGIN REPLICATION PASSWORD {}",
                        quote_ident(role),
                        quote_literal(&password)
                    ),
                )
                .await?;
            report
                .done
                .push(format!("created role {role} (LOGIN REPLICATION)"));
        }
        Some(row) => {
            let (replication, login): (bool, bool) = (row.get(0), row.get(1));
            if !replication || !login {
                return Err(Error::Refused(format!(
                    "role {role} ([proxy.cache] replication_user) exists without LOGIN and REPLICATION: \
                     ALTER ROLE {} LOGIN REPLICATION, or name another role",
                    quote_ident(role)
                )));
            }
        }
    }

    let mut tables = Vec::new();
    let mut schemas = std::collections::BTreeSet::new();
    for row in server
        .query("list the tables to cache", CANDIDATES, &[])
        .await?
    {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        if settings.covers(&schema, &table) {
            tables.push(format!("{}.{}", quote_ident(&schema), quote_ident(&table)));
            report.tables.push(format!("{schema}.{table}"));
            schemas.insert(quote_ident(&schema));
        }
    }
    if !schemas.is_empty() {
        // Without USAGE a schema is skipped in the search_path: the cache could not resolve
        // a name the way the application does.
        let schemas: Vec<String> = schemas.into_iter().collect();
        server
            .execute(
                "grant the cache's role USAGE on the cached tables' schemas",
                &format!(
                    "GRANT USAGE ON SCHEMA {} TO {}",
                    schemas.join(", "),
                    quote_ident(role)
                ),
            )
            .await?;
    }
    if !tables.is_empty() {
        server
            .execute(
                "grant the cache's role SELECT on the cached tables",
                &format!(
                    "GRANT SELECT ON {} TO {}",
                    tables.join(", "),
                    quote_ident(role)
                ),
            )
            .await?;
    }
    let exists = crate::replication::publication_exists(&server, &names.publication).await?;
    let publication = quote_ident(&names.publication);
    let sql = match (exists, tables.is_empty()) {
        (false, true) => format!("CREATE PUBLICATION {publication}"),
        (false, false) => format!("CREATE PUBLICATION {publication} FOR TABLE {}", tables.join(", ")),
        (true, true) => format!(
            "DO $switchyard$ DECLARE t record; BEGIN FOR t IN SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = {} LOOP EXECUTE format('ALTER PUBLICATION %I DROP TABLE %I.%I', {}, t.schemaname, t.tablename); END LOOP; END $switchyard$",
            quote_literal(&names.publication),
            quote_literal(&names.publication)
        ),
        (true, false) => format!("ALTER PUBLICATION {publication} SET TABLE {}", tables.join(", ")),
    };
    server
        .execute("create the cache's publication", &sql)
        .await?;
    report.done.push(format!(
        "publication {} holds {} table(s)",
        names.publication,
        tables.len()
    ));

    if !crate::replication::slot_exists(&server, &names.slot).await? {
        server
            .query(
                "create the cache's slot",
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&names.slot],
            )
            .await?;
        report
            .done
            .push(format!("created logical slot {}", names.slot));
    }

    let function = format!(
        "public.{}",
        quote_ident(&format!("{}_ddl", names.event_trigger))
    );
    server
        .execute(
            "create the cache's event trigger function",
            &format!(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS event_trigger LANGUAGE plpgsql AS \
                 $switchyard$ BEGIN \
                   IF tg_tag IN ('GRANT', 'REVOKE') \
                      AND current_setting('switchyard.write_grants_only', true) = 'on' THEN RETURN; END IF; \
                   IF tg_tag LIKE '% SUBSCRIPTION' THEN RETURN; END IF; \
                   IF tg_event = 'ddl_command_end' AND NOT EXISTS ( \
                        SELECT 1 FROM pg_event_trigger_ddl_commands() c \
                         WHERE c.schema_name IS NULL OR c.schema_name NOT LIKE 'pg\\_temp%') THEN RETURN; END IF; \
                   IF tg_event = 'sql_drop' AND NOT EXISTS ( \
                        SELECT 1 FROM pg_event_trigger_dropped_objects() d WHERE NOT d.is_temporary) THEN RETURN; END IF; \
                   PERFORM pg_logical_emit_message(true, {}, tg_tag); END $switchyard$",
                quote_literal(&names.message_prefix)
            ),
        )
        .await?;
    for (suffix, event) in [("ddl", "ddl_command_end"), ("drop", "sql_drop")] {
        let trigger = format!("{}_{suffix}", names.event_trigger);
        let exists = server
            .query(
                "look up the cache's event trigger",
                "SELECT 1 FROM pg_event_trigger WHERE evtname = $1",
                &[&trigger],
            )
            .await?;
        if exists.is_empty() {
            server
                .execute(
                    "create the cache's event trigger",
                    &format!(
                        "CREATE EVENT TRIGGER {} ON {event} EXECUTE FUNCTION {function}()",
                        quote_ident(&trigger)
                    ),
                )
                .await?;
            report
                .done
                .push(format!("created event trigger {trigger} ({event})"));
        }
    }
    Ok(report)
}

/// Removes the cache's slot, publication and event triggers from `side`'s server (`abort`,
/// `finalize`, or by hand). The role stays: it may be shared.
pub async fn drop(plan: &Plan, side: Side) -> Result<Vec<String>, Error> {
    let names = Names::of(plan);
    let endpoint = match side {
        Side::Source => &plan.source,
        Side::Target => &plan.target,
    };
    let server = Server::connect(side, endpoint).await?;
    let mut done = Vec::new();
    for suffix in ["ddl", "drop"] {
        let trigger = format!("{}_{suffix}", names.event_trigger);
        server
            .execute(
                "drop the cache's event trigger",
                &format!("DROP EVENT TRIGGER IF EXISTS {}", quote_ident(&trigger)),
            )
            .await?;
    }
    server
        .execute(
            "drop the cache's event trigger function",
            &format!(
                "DROP FUNCTION IF EXISTS public.{}()",
                quote_ident(&format!("{}_ddl", names.event_trigger))
            ),
        )
        .await?;
    done.push("dropped the cache's event triggers".to_string());
    if crate::replication::drop_publication(&server, &names.publication).await? {
        done.push(format!("dropped publication {}", names.publication));
    }
    if crate::replication::slot_exists(&server, &names.slot).await? {
        // A consumer holds it while a proxy runs: it is ended first.
        server
            .query(
                "end the cache's consumer",
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&names.slot],
            )
            .await?;
        for attempt in 0..50 {
            match server
                .query(
                    "drop the cache's slot",
                    "SELECT pg_drop_replication_slot($1)",
                    &[&names.slot],
                )
                .await
            {
                Ok(_) => break,
                Err(_) if attempt < 49 => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
        done.push(format!("dropped slot {}", names.slot));
    }
    Ok(done)
}

fn quote_literal(text: &str) -> String {
    crate::pg::sql::literal(text)
}
