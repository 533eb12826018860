//! Cacheability decisions, remembered per (statement, role, `search_path`) and made in a
//! task of their own on a catalog connection to the primary.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::{analyze, catalog, connect, lock, Bypass, Cache};
use crate::pg::Side;
use crate::plan::Endpoint;

/// Decisions remembered at most; past it the map starts over (a workload of ever-new
/// statement texts, literals inlined, would otherwise grow it without bound).
const MAX_DECISIONS: usize = 10_000;

/// Whether a statement can be cached, remembered per (statement, role, `search_path`).
#[derive(Debug, Clone)]
pub(super) enum Decision {
    /// Being decided: the statement goes to the database meanwhile.
    Pending,
    Cacheable {
        /// Tables whose versions gate its answers ([`catalog::table_key`]).
        tables: Arc<[String]>,
        /// The schema epoch it was decided in.
        schema: String,
        at: Instant,
    },
    Refused {
        reason: Arc<str>,
        at: Instant,
    },
}

pub(super) type DecisionKey = (Arc<str>, Arc<str>, Option<Arc<str>>);

/// A statement to decide.
pub(super) struct Ask {
    pub(super) key: DecisionKey,
    pub(super) standard_conforming_strings: bool,
}

impl Cache {
    /// The remembered decision for a statement, or why the cache is not used for it (and
    /// the decision asked for, when there is none or it is due again).
    pub(super) fn decision(
        &self,
        sql: &str,
        role: &Arc<str>,
        settings: &BTreeMap<String, String>,
    ) -> Result<(Arc<[String]>, String), Bypass> {
        let search_path = settings.get("search_path").map(|s| Arc::from(s.as_str()));
        let key: DecisionKey = (Arc::from(sql), role.clone(), search_path);
        let mut decisions = lock(&self.decisions);
        let recheck = self.settings.recheck.0;
        match decisions.get(&key) {
            Some(Decision::Pending) => return Err(Bypass::Deciding),
            Some(Decision::Cacheable { tables, schema, at }) if at.elapsed() < recheck => {
                return Ok((tables.clone(), schema.clone()))
            }
            Some(Decision::Refused { at, .. }) if at.elapsed() < recheck => {
                return Err(Bypass::NotCacheable)
            }
            _ => {}
        }
        if decisions.len() >= MAX_DECISIONS {
            decisions.clear();
        }
        decisions.insert(key.clone(), Decision::Pending);
        let standard_conforming_strings = settings
            .get("standard_conforming_strings")
            .is_none_or(|v| !v.trim_matches('\'').eq_ignore_ascii_case("off"));
        let _ = self.asks.send(Ask {
            key,
            standard_conforming_strings,
        });
        Err(Bypass::Deciding)
    }

    /// Decides the statements sessions ask about, one at a time, on a catalog connection to
    /// the primary `endpoint` as the invalidator's role (reconnected when it breaks).
    pub async fn decide_asked(self: Arc<Self>, primary: impl Fn() -> (Side, Endpoint)) {
        let Some(mut asked) = lock(&self.asked).take() else {
            return;
        };
        // The catalog of the primary, reconnected when the primary changes (a switch).
        let mut client: Option<(Side, tokio_postgres::Client)> = None;
        while let Some(ask) = asked.recv().await {
            let (sql, role, search_path) = &ask.key;
            let decided = match analyze::analyze(sql, ask.standard_conforming_strings) {
                Err(reason) => Some(Err::<(), _>(reason)),
                Ok(shape) => {
                    let (side, endpoint) = primary();
                    if client
                        .as_ref()
                        .is_none_or(|(on, c)| *on != side || c.is_closed())
                    {
                        client = connect(&endpoint, &self.settings)
                            .await
                            .map_err(|e| {
                                tracing::warn!("the cache cannot reach the primary's catalog: {e}");
                            })
                            .ok()
                            .map(|c| (side, c));
                    }
                    let schema = self.schema_epoch().await;
                    match (client.as_mut().map(|(_, c)| c), schema) {
                        (Some(c), Some(schema)) => {
                            let asker = catalog::Asker {
                                role,
                                search_path: search_path.as_deref(),
                                settings: &self.settings,
                                publication: &self.names.publication,
                            };
                            match catalog::decide(c, &shape, &asker).await {
                                Ok(Ok(tables)) => {
                                    lock(&self.decisions).insert(
                                        ask.key.clone(),
                                        Decision::Cacheable {
                                            tables: tables.into(),
                                            schema,
                                            at: Instant::now(),
                                        },
                                    );
                                    continue;
                                }
                                Ok(Err(reason)) => Some(Err(reason)),
                                Err(e) => {
                                    tracing::warn!(
                                        "cacheability check failed: {}",
                                        crate::pg::describe(&e)
                                    );
                                    None
                                }
                            }
                        }
                        _ => None,
                    }
                }
            };
            let mut decisions = lock(&self.decisions);
            match decided {
                Some(Err(reason)) => {
                    tracing::debug!(statement = %sql, "not cacheable: {reason}");
                    decisions.insert(
                        ask.key.clone(),
                        Decision::Refused {
                            reason: reason.into(),
                            at: Instant::now(),
                        },
                    );
                }
                // Not decided (the catalog or Redis could not be asked): asked again next time.
                _ => {
                    decisions.remove(&ask.key);
                }
            }
        }
    }

    /// Drops every decision (a schema change).
    pub fn forget_decisions(&self) {
        lock(&self.decisions).clear();
    }
}
