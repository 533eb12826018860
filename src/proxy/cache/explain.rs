//! `switchyard cache explain`: what a running proxy would decide about a statement.

use crate::plan::Plan;
use crate::Error;

/// Whether the cache would serve `sql` for `role` from the cache, and if not the first
/// reason, decided as a running proxy decides (on the source, as the cache's role).
pub async fn explain(
    plan: &Plan,
    sql: &str,
    role: &str,
    search_path: Option<&str>,
) -> Result<Result<usize, String>, Error> {
    let settings = crate::cache_setup::cache_settings(plan)?;
    let names = crate::cache_setup::Names::of(plan);
    let shape = match super::analyze::analyze(sql, true) {
        Ok(shape) => shape,
        Err(reason) => return Ok(Err(reason)),
    };
    let mut client = super::connect(&plan.source, settings).await.map_err(|e| {
        Error::Refused(format!(
            "cannot connect to the source as the cache's role {}: {e}",
            settings.replication_user
        ))
    })?;
    let asker = super::catalog::Asker {
        role,
        search_path,
        settings,
        publication: &names.publication,
    };
    let decided = super::catalog::decide(&mut client, &shape, &asker)
        .await
        .map_err(|e| {
            Error::Refused(format!(
                "the catalog check failed: {}",
                crate::pg::describe(&e)
            ))
        })?;
    Ok(decided.map(|tables| tables.len()))
}
