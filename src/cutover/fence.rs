//! The fence: on the old primary, no role but the coordinator's may write the migrated tables,
//! and sessions outside the proxies are ended. The revoked grants are recorded first, so they
//! can be given back exactly (table and column grants, with their grant option).

use std::time::{Duration, Instant};

use crate::pg::{PgError, Server, TableName};
use crate::state::Grant;

const WRITE_PRIVILEGES: &str = "'INSERT','UPDATE','DELETE','TRUNCATE'";

/// Every write grant on `tables` held by a role other than the coordinator's, including the
/// owner's implicit ones (a NULL ACL means the owner's defaults) and column grants.
pub async fn read_grants(server: &Server, tables: &[TableName]) -> Result<Vec<Grant>, PgError> {
    let names: Vec<String> = tables.iter().map(TableName::sql).collect();
    let query = format!(
        "WITH t AS (SELECT c.oid, c.relowner, c.relacl FROM pg_class c WHERE c.oid = ANY($1::text[]::regclass[])),
              acl AS (
                SELECT t.oid, NULL::int2 AS attnum, a.* FROM t, aclexplode(coalesce(t.relacl, acldefault('r', t.relowner))) a
                UNION ALL
                SELECT t.oid, at.attnum, a.* FROM t JOIN pg_attribute at ON at.attrelid = t.oid AND at.attacl IS NOT NULL AND NOT at.attisdropped,
                       aclexplode(at.attacl) a)
         SELECT (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = acl.oid),
                (SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = acl.oid AND attnum = acl.attnum),
                CASE WHEN acl.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(acl.grantee)) END,
                acl.privilege_type, acl.is_grantable
           FROM acl
          WHERE acl.privilege_type IN ({WRITE_PRIVILEGES})
            AND acl.grantee <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
          ORDER BY 1, 2 NULLS FIRST, 3, 4"
    );
    let rows = server
        .query("read the write grants", &query, &[&names])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Grant {
            table: r.get(0),
            column: r.get(1),
            grantee: r.get(2),
            privilege: r.get(3),
            grantable: r.get(4),
        })
        .collect())
}

/// Tells the proxies' read cache (its event trigger) that this transaction's GRANTs and
/// REVOKEs are of write privileges only: no answer a reader gets changes, so its cached
/// answers stay valid through the fence (the cache stays warm across the cutover).
const WRITE_GRANTS_ONLY: &str = "PERFORM set_config('switchyard.write_grants_only', 'on', true);";

/// One `REVOKE` of every write privilege on `tables` from every grantee in `grants` (a table
/// REVOKE takes the column grants with it).
pub fn revoke_sql(tables: &[TableName], grants: &[Grant]) -> Option<String> {
    let mut grantees: Vec<&str> = grants.iter().map(|g| g.grantee.as_str()).collect();
    grantees.sort_unstable();
    grantees.dedup();
    if grantees.is_empty() || tables.is_empty() {
        return None;
    }
    let tables: Vec<String> = tables.iter().map(TableName::sql).collect();
    Some(format!(
        "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE {} FROM {} CASCADE",
        tables.join(", "),
        grantees.join(", ")
    ))
}

/// `statement` (the REVOKE) in one DO block that refuses to run, or to commit, after
/// `deadline` on the server's own clock (the pause's budget): a coordinator that stalls after
/// it decided to fence cannot fence once the proxies may have resumed.
pub fn before_deadline(statement: &str, deadline: &str) -> String {
    let check = format!(
        "IF clock_timestamp() > {}::timestamptz THEN RAISE EXCEPTION 'switchyard: the pause ran past its budget before the fence took hold: nothing revoked' USING ERRCODE = '57014'; END IF;",
        crate::pg::sql::literal(deadline)
    );
    format!(
        "DO $switchyard$\nBEGIN\n  {check}\n  {WRITE_GRANTS_ONLY}\n  EXECUTE {};\n  {check}\nEND\n$switchyard$",
        crate::pg::sql::literal(statement)
    )
}

/// One round trip that gives `grants` back, each on its own: a role dropped or a table renamed
/// since the fence only warns, and every other grant still comes back.
pub fn restore_sql(grants: &[Grant]) -> String {
    let each: Vec<String> = grant_statements(grants)
        .iter()
        .map(|g| {
            format!(
                "  BEGIN EXECUTE {}; EXCEPTION WHEN undefined_object OR undefined_table OR undefined_column THEN RAISE WARNING 'switchyard: cannot give back: %', SQLERRM; END;",
                crate::pg::sql::literal(g)
            )
        })
        .collect();
    format!(
        "DO $switchyard$\nBEGIN\n  {WRITE_GRANTS_ONLY}\n{}\nEND\n$switchyard$",
        each.join("\n")
    )
}

fn grant_statements(grants: &[Grant]) -> Vec<String> {
    grants
        .iter()
        .map(|g| {
            let privilege = match &g.column {
                Some(column) => format!("{} ({column})", g.privilege),
                None => g.privilege.clone(),
            };
            let option = if g.grantable {
                " WITH GRANT OPTION"
            } else {
                ""
            };
            format!(
                "GRANT {privilege} ON TABLE {} TO {}{option}",
                g.table, g.grantee
            )
        })
        .collect()
}

/// Roles among `roles` (names) and the grantees of `grants` that can still write one of
/// `tables`: a fence that did not hold (a coordinator that is neither superuser nor owner
/// revokes nothing, with only a warning). Superusers are not looked at: the gates refuse them
/// as application roles.
pub async fn still_writable(
    server: &Server,
    roles: &[String],
    grants: &[Grant],
    tables: &[TableName],
) -> Result<Vec<String>, PgError> {
    let grantees: Vec<&str> = grants.iter().map(|g| g.grantee.as_str()).collect();
    let tables: Vec<String> = tables.iter().map(TableName::sql).collect();
    let rows = server
        .query(
            "check the fence",
            "SELECT r.rolname || ' on ' || t.tbl FROM pg_roles r, unnest($3::text[]) AS t(tbl)
              WHERE (r.rolname = ANY($1) OR quote_ident(r.rolname) = ANY($2))
                AND NOT r.rolsuper AND r.rolname <> current_user
                AND (has_table_privilege(r.oid, t.tbl, 'INSERT, UPDATE, DELETE, TRUNCATE')
                     OR has_any_column_privilege(r.oid, t.tbl, 'INSERT, UPDATE'))
              LIMIT 10",
            &[&roles, &grantees, &tables],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn restore(server: &Server, grants: &[Grant]) -> Result<(), PgError> {
    if grants.is_empty() {
        return Ok(());
    }
    server
        .execute("give the write grants back", &restore_sql(grants))
        .await
}

/// Ends every client session in this database but this one and the idle server connections
/// of the proxies (`proxy_pids`, as the paused proxies listed them: no connection opens while
/// they are paused), all at once, then waits until they are gone. Other sessions of the
/// coordinator's role go too: a superuser's batch job could write past the fence.
/// Replication connections (WAL senders, apply workers) are never touched, nor the proxies'
/// read cache's own sessions (`cache_role` connected as `switchyard-cache`: it only reads,
/// and after the switch it reads the old primary's stream to its end). Returns how many were
/// ended.
pub async fn end_sessions(
    server: &Server,
    proxy_pids: &[i32],
    cache_role: Option<&str>,
    deadline: &str,
    timeout: Duration,
) -> Result<usize, PgError> {
    let rows = server
        .query(
            "end the sessions outside the proxies",
            // Materialized first: left in the view's WHERE, the terminate could be evaluated
            // before the other conditions, on any session, this one included.
            "WITH victims AS MATERIALIZED (
                 SELECT pid FROM pg_stat_activity
                  WHERE datname = current_database() AND backend_type = 'client backend'
                    AND pid <> pg_backend_pid()
                    AND NOT (pid = ANY($1) AND state = 'idle')
                    AND NOT (usename = $3 AND application_name = 'switchyard-cache')
                    -- Not once the pause's budget is spent (see before_deadline).
                    AND clock_timestamp() <= $2::text::timestamptz)
             SELECT pid FROM victims WHERE pg_terminate_backend(pid)",
            &[&proxy_pids, &deadline, &cache_role.unwrap_or("")],
        )
        .await?;
    let pids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    if pids.is_empty() {
        return Ok(0);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left: i64 = server
            .query_one(
                "wait for the ended sessions to go",
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(pids.len());
        }
        if Instant::now() >= deadline {
            return Err(PgError::Tool(format!(
                "{}: {left} ended sessions were still there after {timeout:?}",
                server.side
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revoke_checks_the_deadline_before_and_after() {
        let sql = before_deadline(
            "REVOKE INSERT ON TABLE public.t FROM app",
            "2026-12-06 12:00:00+00",
        );
        assert!(sql.starts_with("DO $switchyard$"), "{sql}");
        assert_eq!(
            sql.matches("clock_timestamp() > '2026-12-06 12:00:00+00'")
                .count(),
            2,
            "{sql}"
        );
        assert!(
            sql.contains("EXECUTE 'REVOKE INSERT ON TABLE public.t FROM app'"),
            "{sql}"
        );
    }

    #[test]
    fn revoke_and_restore_statements() {
        let grants = vec![
            Grant {
                table: "public.orders".into(),
                column: None,
                grantee: "app".into(),
                privilege: "INSERT".into(),
                grantable: false,
            },
            Grant {
                table: "public.orders".into(),
                column: Some("note".into()),
                grantee: "PUBLIC".into(),
                privilege: "UPDATE".into(),
                grantable: true,
            },
        ];
        let tables = [TableName::new("public", "orders")];
        assert_eq!(
            revoke_sql(&tables, &grants).unwrap(),
            "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE \"public\".\"orders\" FROM PUBLIC, app CASCADE"
        );
        assert_eq!(
            grant_statements(&grants),
            [
                "GRANT INSERT ON TABLE public.orders TO app",
                "GRANT UPDATE (note) ON TABLE public.orders TO PUBLIC WITH GRANT OPTION"
            ]
        );
        let restore = restore_sql(&grants);
        assert!(restore.starts_with("DO $switchyard$"), "{restore}");
        assert!(
            restore.contains("EXECUTE 'GRANT INSERT ON TABLE public.orders TO app';"),
            "{restore}"
        );
        assert!(revoke_sql(&tables, &[]).is_none());
    }
}
