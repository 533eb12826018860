//! The preflight's checks of the two servers: versions, tools, replication capacity, encoding,
//! disk, and the transactions on the source that creating the slot would wait for.

use super::*;

pub(super) fn setting_i64(settings: &HashMap<String, String>, name: &str) -> i64 {
    settings.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub(super) fn check_versions(c: &mut Checker, source: &Server, target: &Server) {
    if source.major() < 10 {
        c.add(
            Severity::Block,
            "source_version",
            "source",
            format!("PostgreSQL {} has no logical replication", source.major()),
            Some("upgrade the source to PostgreSQL 10 or later".into()),
        );
    }
    if target.major() < source.major() {
        c.add(
            Severity::Block,
            "target_version",
            "target",
            format!(
                "the target runs PostgreSQL {}, older than the source's {}",
                target.major(),
                source.major()
            ),
            Some("use a target of the same or a newer major version".into()),
        );
    }
}

pub(super) fn check_tools(
    c: &mut Checker,
    source: &Server,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let pg_dump = match tools::find("pg_dump", source.major()) {
        Ok((path, _)) => path,
        Err(e) => {
            c.add(
                Severity::Block,
                "pg_dump",
                "coordinator",
                e.to_string(),
                None,
            );
            "pg_dump".into()
        }
    };
    let pg_restore = match tools::find("pg_restore", source.major()) {
        Ok((path, _)) => path,
        Err(e) => {
            c.add(
                Severity::Block,
                "pg_restore",
                "coordinator",
                e.to_string(),
                None,
            );
            "pg_restore".into()
        }
    };
    (pg_dump, pg_restore)
}

pub(super) async fn count(
    server: &Server,
    context: &str,
    query: &str,
    name: &str,
) -> Result<i64, PgError> {
    Ok(server.query_one(context, query, &[&name]).await?.get(0))
}

/// Counts rows of `query`, which takes this migration's slot name ($1) and its table-sync slot
/// pattern ($2) so as to leave them out.
pub(super) async fn count_others(
    server: &Server,
    context: &str,
    query: &str,
    ours: [&String; 2],
) -> Result<i64, PgError> {
    Ok(server
        .query_one(context, query, &[ours[0], ours[1]])
        .await?
        .get(0))
}

pub(super) async fn check_source_capacity(
    c: &mut Checker,
    source: &Server,
    s: &HashMap<String, String>,
    ours: [&String; 2],
    copy_workers: i64,
) -> Result<(), PgError> {
    if s.get("wal_level").map(String::as_str) != Some("logical") {
        c.add(
            Severity::Block,
            "wal_level",
            "source",
            format!(
                "wal_level is {}, logical replication needs logical",
                s.get("wal_level").map_or("unknown", String::as_str)
            ),
            Some("ALTER SYSTEM SET wal_level = logical;  -- then restart the source".into()),
        );
    }
    let used_slots = count_others(
        source,
        "count replication slots",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name <> $1 AND slot_name NOT LIKE $2",
        ours,
    )
    .await?;
    let free_slots = setting_i64(s, "max_replication_slots") - used_slots;
    let senders = count_others(
        source,
        "count WAL senders",
        "SELECT count(*) FROM pg_stat_replication WHERE application_name <> $1 AND application_name NOT LIKE $2",
        ours,
    )
    .await?;
    let free_senders = setting_i64(s, "max_wal_senders") - senders;
    for (what, free, setting) in [
        ("replication slots", free_slots, "max_replication_slots"),
        ("WAL senders", free_senders, "max_wal_senders"),
    ] {
        let needed = 1 + copy_workers;
        if free < 1 {
            c.add(
                Severity::Block,
                "source_capacity",
                "source",
                format!(
                    "no free {what} ({setting} = {})",
                    s.get(setting).map_or("?", String::as_str)
                ),
                Some(format!(
                    "ALTER SYSTEM SET {setting} = {};  -- then restart the source",
                    setting_i64(s, setting) + needed
                )),
            );
        } else if free < needed {
            c.add(Severity::Warn, "source_capacity", "source", format!("{free} free {what}: the initial copy uses up to {needed} at once, so tables will copy fewer at a time"), Some(format!("ALTER SYSTEM SET {setting} = {};  -- then restart the source", setting_i64(s, setting) + needed - free)));
        }
    }
    Ok(())
}

pub(super) async fn check_target_capacity(
    c: &mut Checker,
    target: &Server,
    s: &HashMap<String, String>,
    ours: &str,
    copy_workers: i64,
) -> Result<(), PgError> {
    let running = count(
        target,
        "count subscription workers",
        "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND subname <> $1",
        ours,
    )
    .await?;
    let free_workers = setting_i64(s, "max_logical_replication_workers") - running;
    if free_workers < 1 {
        c.add(
            Severity::Block,
            "target_capacity",
            "target",
            "no free logical replication worker on the target",
            Some(
                "ALTER SYSTEM SET max_logical_replication_workers = 8;  -- then restart the target"
                    .into(),
            ),
        );
    } else if free_workers < 1 + copy_workers {
        c.add(
            Severity::Warn,
            "target_capacity",
            "target",
            format!(
                "{free_workers} free logical replication workers: tables will copy {} at a time",
                free_workers - 1
            ),
            None,
        );
    }
    // Before PostgreSQL 18 replication origins are limited by max_replication_slots.
    let origin_limit = if target.major() >= 18 {
        "max_active_replication_origins"
    } else {
        "max_replication_slots"
    };
    let origins = count(target, "count replication origins", "SELECT count(*) FROM pg_replication_origin WHERE roname NOT LIKE 'pg\\_' || coalesce((SELECT oid::text FROM pg_subscription WHERE subname = $1), '-') || '%'", ours).await?;
    if setting_i64(s, origin_limit) - origins < 1 + copy_workers {
        c.add(
            Severity::Block,
            "target_capacity",
            "target",
            format!("{origin_limit} = {} leaves too few replication origins for one subscription and {copy_workers} table copies", s.get(origin_limit).map_or("?", String::as_str)),
            Some(format!("ALTER SYSTEM SET {origin_limit} = {};  -- then restart the target", origins + 2 + copy_workers)),
        );
    }
    if setting_i64(s, "max_worker_processes")
        < setting_i64(s, "max_logical_replication_workers") + 1
    {
        c.add(Severity::Warn, "target_capacity", "target", "max_worker_processes is lower than max_logical_replication_workers + 1: workers may fail to start", Some("raise max_worker_processes on the target".into()));
    }
    Ok(())
}

/// The database's encoding and collation (`lc_collate` is no setting since PostgreSQL 16).
pub(super) async fn database_locale(server: &Server) -> Result<HashMap<String, String>, PgError> {
    let row = server
        .query_one(
            "read the database's locale",
            "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(HashMap::from([
        ("database_encoding".to_string(), row.get(0)),
        ("database_collate".to_string(), row.get(1)),
        ("database_ctype".to_string(), row.get(2)),
    ]))
}

pub(super) fn check_encoding(
    c: &mut Checker,
    src: &HashMap<String, String>,
    tgt: &HashMap<String, String>,
) {
    let get = |s: &HashMap<String, String>, key: &str| s.get(key).cloned().unwrap_or_default();
    let (src_enc, tgt_enc) = (get(src, "database_encoding"), get(tgt, "database_encoding"));
    if src_enc != tgt_enc {
        c.add(
            Severity::Block,
            "encoding",
            "target",
            format!("the source database is encoded {src_enc}, the target {tgt_enc}"),
            Some(format!(
                "create the target database with ENCODING '{src_enc}'"
            )),
        );
    }
    let (src_coll, tgt_coll) = (get(src, "database_collate"), get(tgt, "database_collate"));
    if src_coll != tgt_coll {
        c.add(Severity::Warn, "collation", "target", format!("collation differs: source {src_coll}, target {tgt_coll}; text sorts and unique indexes on text may behave differently"), None);
    }
}

pub(super) fn check_disk(
    c: &mut Checker,
    s: &HashMap<String, String>,
    source_free: Option<i64>,
    target_free: Option<i64>,
    total_bytes: i64,
) {
    let keep_mb = setting_i64(s, "max_slot_wal_keep_size");
    if keep_mb < 0 {
        c.add(Severity::Info, "wal_retention", "source", "max_slot_wal_keep_size is unlimited: if replication stalls, the slot keeps WAL until the disk fills; `switchyard status` warns past [sync] retained_wal_warn_bytes", None);
    } else if keep_mb * 1024 * 1024 < total_bytes {
        c.add(Severity::Warn, "wal_retention", "source", format!("max_slot_wal_keep_size = {keep_mb}MB is smaller than the data to copy: writes during a long copy can invalidate the slot"), Some("raise max_slot_wal_keep_size on the source for the duration of the copy".into()));
    }
    match source_free {
        Some(free) if free < total_bytes / 2 => c.add(Severity::Warn, "disk_headroom", "source", format!("only {} free for WAL on the source; WAL retained during the copy may fill it", human_bytes(free)), None),
        Some(_) => {}
        None => c.add(Severity::Info, "disk_headroom", "source", "free disk space could not be read (needs superuser and a shell on the server); check it by hand", None),
    }
    if let Some(free) = target_free.filter(|&free| free < total_bytes) {
        c.add(
            Severity::Block,
            "disk_headroom",
            "target",
            format!(
                "the target has {} free but the selected tables take {}",
                human_bytes(free),
                human_bytes(total_bytes)
            ),
            Some("give the target more disk".into()),
        );
    }
}

/// Free space of the file system that holds `pg_wal`, read with `df` through
/// `COPY ... FROM PROGRAM` inside a transaction that is rolled back. `None` where the server
/// does not allow it (not a superuser, a managed service).
pub(super) async fn free_disk_bytes(server: &Server) -> Option<i64> {
    let dir = server
        .simple_column("read data_directory", "SHOW data_directory")
        .await
        .ok()?
        .into_iter()
        .next()??;
    let command = format!("df -Pk '{}/pg_wal'", dir.replace('\'', ""));
    let setup = format!(
        "BEGIN; CREATE TEMP TABLE switchyard_df (line text) ON COMMIT DROP; COPY switchyard_df FROM PROGRAM {}",
        sql::literal(&command)
    );
    let result = match server.execute("read free disk space", &setup).await {
        Ok(()) => server
            .simple_column("read free disk space", "SELECT line FROM switchyard_df")
            .await
            .ok(),
        Err(e) => {
            tracing::debug!("cannot read free disk space on the {}: {e}", server.side);
            None
        }
    };
    let _ = server.execute("roll back", "ROLLBACK").await;
    let lines = result?;
    let data_line = lines.into_iter().flatten().nth(1)?;
    let available_kb: i64 = data_line.split_whitespace().nth(3)?.parse().ok()?;
    Some(available_kb * 1024)
}

/// Transactions open on the source for more than a minute, and prepared transactions:
/// creating the replication slot waits for every one of them to end.
pub(super) async fn check_long_transactions(
    c: &mut Checker,
    source: &Server,
) -> Result<(), PgError> {
    let prepared = source
        .query("look for prepared transactions", "SELECT gid, extract(epoch FROM now() - prepared)::int8 FROM pg_prepared_xacts ORDER BY prepared", &[])
        .await?;
    for row in &prepared {
        let (gid, secs): (String, i64) = (row.get(0), row.get(1));
        c.add(
            Severity::Block,
            "prepared_transaction",
            format!("prepared transaction {gid}"),
            format!("prepared {secs} s ago and still open: creating the replication slot would wait for it for ever"),
            Some(format!("COMMIT PREPARED {};  -- or ROLLBACK PREPARED, on the source", sql::literal(&gid))),
        );
    }
    let rows = source
        .query(
            "look for long transactions",
            "SELECT pid, usename::text, extract(epoch FROM now() - xact_start)::int8
               FROM pg_stat_activity
              WHERE xact_start < now() - interval '1 minute' AND pid <> pg_backend_pid()
                AND backend_type = 'client backend'
              ORDER BY xact_start",
            &[],
        )
        .await?;
    for row in &rows {
        let (pid, user, secs): (i32, Option<String>, i64) = (row.get(0), row.get(1), row.get(2));
        c.add(
            Severity::Warn,
            "long_transaction",
            format!("pid {pid}"),
            format!("a transaction of {} has been open for {secs} s; creating the slot waits until it ends", user.unwrap_or_default()),
            Some(format!("let it finish, or SELECT pg_terminate_backend({pid});  -- on the source")),
        );
    }
    Ok(())
}

/// Warns when `setting` on the source leaves fewer than two free beyond `used`: one for the
/// migration, one for the read cache.
fn cache_needs_one(
    c: &mut Checker,
    src: &HashMap<String, String>,
    setting: &str,
    used: i64,
    need: &str,
) {
    let limit = setting_i64(src, setting);
    if limit - used < 2 {
        c.add(
            Severity::Warn,
            "cache_capacity",
            "source",
            format!("{need}: too few free"),
            Some(format!(
                "ALTER SYSTEM SET {setting} = {};  -- then restart the source",
                limit + 1
            )),
        );
    }
}

/// `[proxy.cache]`: the proxies' read cache holds a logical slot and a WAL sender of its own on
/// the primary (the target's is made at the cutover), beyond the migration's.
pub(super) async fn check_cache(
    c: &mut Checker,
    source: &Server,
    src: &HashMap<String, String>,
    tgt: &HashMap<String, String>,
    plan: &crate::plan::Plan,
) -> Result<(), PgError> {
    let slot = crate::cache_setup::Names::of(plan).slot;
    let exists: i64 = source
        .query_one(
            "look up the read cache's slot",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .get(0);
    if exists == 0 {
        let used: i64 = source
            .query_one(
                "count replication slots",
                "SELECT count(*) FROM pg_replication_slots",
                &[],
            )
            .await?
            .get(0);
        // The migration's own slot comes on top of what is used now.
        cache_needs_one(
            c,
            src,
            "max_replication_slots",
            used,
            "the read cache needs a replication slot of its own besides the migration's",
        );
    }
    let senders: i64 = source
        .query_one(
            "count WAL senders",
            "SELECT count(*) FROM pg_stat_replication WHERE application_name <> 'switchyard-cache'",
            &[],
        )
        .await?
        .get(0);
    // The migration's sender and the cache's, on top of the others.
    cache_needs_one(
        c,
        src,
        "max_wal_senders",
        senders,
        "the read cache's invalidator needs a WAL sender of its own besides the migration's",
    );
    for (side, settings) in [("source", src), ("target", tgt)] {
        if setting_i64(settings, "max_slot_wal_keep_size") < 0 {
            c.add(
                Severity::Info,
                "cache_wal_retention",
                side,
                "max_slot_wal_keep_size is unlimited: while no proxy consumes the read cache's slot (every proxy stopped), it keeps WAL until the disk fills; `switchyard cache drop` removes it".to_string(),
                None,
            );
        }
    }
    Ok(())
}
