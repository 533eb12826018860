//! The checks before a cutover or rollback pauses anything. Each failure says what to do.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::proxies::ProxyAdmin;
use super::Direction;
use crate::admin_api;
use crate::pg::{catalog, PgError, Server, Side};
use crate::plan::Plan;
use crate::preflight::drift;
use crate::state::State;
use crate::sync::status;

#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub name: &'static str,
    /// `None` when the gate is met; else what is wrong and what to do.
    pub problem: Option<String>,
}

#[derive(Default)]
pub struct Gates(pub Vec<Gate>);

impl Gates {
    fn check(&mut self, name: &'static str, problem: Option<String>) {
        self.0.push(Gate { name, problem });
    }

    pub fn failures(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|g| g.problem.as_ref().map(|p| format!("{}: {p}", g.name)))
            .collect()
    }
}

pub struct Context<'a> {
    pub plan: &'a Plan,
    pub state: &'a State,
    pub source: &'a Server,
    pub target: &'a Server,
    pub proxies: &'a [ProxyAdmin],
    pub skip_validation: bool,
}

pub async fn run(ctx: &Context<'_>, direction: Direction) -> Result<Gates, PgError> {
    let mut gates = Gates::default();
    if direction == Direction::Cutover {
        forward_replication(ctx, &mut gates).await?;
        target_ready(ctx, &mut gates).await?;
        validation(ctx, &mut gates);
        shadow_reads(ctx, &mut gates).await;
        way_back(ctx, &mut gates).await?;
    } else {
        reverse_replication(ctx, &mut gates).await?;
    }
    proxies(ctx, direction, &mut gates).await;
    fenceable(ctx, &mut gates).await?;
    timeouts(ctx, &mut gates);
    Ok(gates)
}

/// `[cutover] shadow` (opt-in): the proxies' window of shadow reads must have enough
/// compared samples, no more divergences than allowed and no fingerprint slower past the
/// ratio on the new server.
async fn shadow_reads(ctx: &Context<'_>, gates: &mut Gates) {
    let Some(gate) = &ctx.plan.cutover.shadow else {
        return;
    };
    let problem = match super::proxies::gather_shadow(ctx.plan, false).await {
        Err(e) => Some(format!("the shadow-read report could not be gathered: {e}")),
        Ok(report) => {
            let problems = report.gate_problems(gate);
            (!problems.is_empty()).then(|| {
                format!(
                    "{}; see `switchyard shadow {} --report DIR`",
                    problems.join("; "),
                    ctx.plan.path.display()
                )
            })
        }
    };
    gates.check("shadow reads meet [cutover] shadow", problem);
}

/// How long the lag gate waits for a lag above the limit to come down, while everything else
/// about the replication is healthy: a burst of writes should not refuse a cutover.
const LAG_PATIENCE: Duration = Duration::from_secs(15);

async fn forward_replication(ctx: &Context<'_>, gates: &mut Gates) -> Result<(), PgError> {
    let max = ctx.plan.sync.max_lag_bytes;
    let started = std::time::Instant::now();
    let status = loop {
        let status = status::read(ctx.plan, ctx.state, ctx.source, ctx.target, false).await?;
        let healthy = status.subscription.is_some()
            && status.all_streaming()
            && status.worker_running
            && !status.slot_lost;
        if status.caught_up(max) || !healthy || started.elapsed() >= LAG_PATIENCE {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let problem = if status.subscription.is_none() {
        Some("no subscription on the target: run `switchyard sync --wait` first".into())
    } else if !status.caught_up(max) {
        let waiting: Vec<&str> = status
            .tables
            .iter()
            .filter(|t| t.state != "streaming")
            .map(|t| t.name.as_str())
            .collect();
        Some(format!(
            "not caught up (lag {} bytes, limit {max}; apply worker {}; tables not streaming: {}): run `switchyard sync --wait` and try again",
            status.lag_bytes.map_or("unknown".into(), |l| l.to_string()),
            if status.worker_running { "running" } else { "not running" },
            if waiting.is_empty() { "none".into() } else { waiting.join(", ") }
        ))
    } else {
        None
    };
    gates.check(
        "replication streaming, lag within [sync] max_lag_bytes",
        problem,
    );
    let drifted = drift::detect(ctx.plan, ctx.source, ctx.target).await?;
    gates.check(
        "no schema drift",
        (!drifted.is_empty()).then(|| {
            let list: Vec<String> = drifted
                .iter()
                .map(|d| format!("{}: {}", d.table, d.detail))
                .collect();
            format!(
                "{}; apply the same DDL on the target (`switchyard status` prints it)",
                list.join("; ")
            )
        }),
    );
    Ok(())
}

async fn target_ready(ctx: &Context<'_>, gates: &mut Gates) -> Result<(), PgError> {
    let schemas: Vec<String> = ctx
        .plan
        .sync
        .tables
        .iter()
        .map(|p| p.schema.clone())
        .collect();
    let invalid = crate::sync::invalid_indexes(ctx.target, &schemas)
        .await
        .map_err(|e| PgError::Tool(e.to_string()))?;
    gates.check(
        "target indexes valid",
        (!invalid.is_empty()).then(|| {
            format!(
                "invalid: {}; REINDEX INDEX CONCURRENTLY each on the target",
                invalid.join(", ")
            )
        }),
    );
    let rows = ctx
        .target
        .query(
            "find tables never analysed",
            "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables
              WHERE schemaname = ANY($1) AND last_analyze IS NULL AND last_autoanalyze IS NULL
                AND n_live_tup > 0",
            &[&schemas],
        )
        .await?;
    let never: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    gates.check(
        "target analysed",
        (!never.is_empty()).then(|| {
            format!(
                "never analysed: {}; run `switchyard sync --wait` (it analyses) or ANALYZE them",
                never.join(", ")
            )
        }),
    );
    Ok(())
}

fn validation(ctx: &Context<'_>, gates: &mut Gates) {
    if ctx.skip_validation {
        gates.check(
            "recent passing validation (skipped: --skip-validation)",
            None,
        );
        return;
    }
    let max_age = ctx.plan.cutover.validation_max_age.0;
    let problem = match &ctx.state.last_validation {
        None => Some("no validation yet: run `switchyard validate` first".to_string()),
        Some(v) if v.verdict != "identical" => Some(format!(
            "the last validation ({}) found the servers {}: fix that and run `switchyard validate` again",
            v.at, v.verdict
        )),
        Some(v) => match humantime::parse_rfc3339_weak(&v.at)
            .ok()
            .and_then(|at| SystemTime::now().duration_since(at).ok())
        {
            Some(age) if age <= max_age => None,
            _ => Some(format!(
                "the last passing validation ({}) is older than [cutover] validation_max_age ({}): run `switchyard validate` again",
                v.at,
                humantime::format_duration(max_age)
            )),
        },
    };
    gates.check("recent passing validation", problem);
}

/// For the way back: the target must publish and the source subscribe.
async fn way_back(ctx: &Context<'_>, gates: &mut Gates) -> Result<(), PgError> {
    let row = ctx
        .target
        .query_one(
            "check the target can publish",
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)::int",
            &[],
        )
        .await?;
    let (wal_level, free_slots, free_senders): (String, i32, i32) =
        (row.get(0), row.get(1), row.get(2));
    let mut problems = Vec::new();
    if wal_level != "logical" {
        problems.push(format!(
            "the target's wal_level is {wal_level}: set wal_level = logical and restart it"
        ));
    }
    if free_slots < 1 {
        problems
            .push("the target has no free replication slot: raise max_replication_slots".into());
    }
    if free_senders < 1 {
        problems.push("the target has no free WAL sender: raise max_wal_senders".into());
    }
    let workers: i32 = ctx
        .source
        .query_one(
            "check the source can subscribe",
            "SELECT current_setting('max_logical_replication_workers')::int",
            &[],
        )
        .await?
        .get(0);
    if workers < 1 {
        problems.push("the source has max_logical_replication_workers = 0: raise it".into());
    }
    gates.check(
        "target can publish, source can subscribe (the way back)",
        (!problems.is_empty()).then(|| problems.join("; ")),
    );
    Ok(())
}

async fn reverse_replication(ctx: &Context<'_>, gates: &mut Gates) -> Result<(), PgError> {
    let name = super::reverse_name(ctx.plan);
    let max = ctx.plan.sync.max_lag_bytes;
    // A worker restarting, or a burst of writes, is waited out for a while.
    let started = std::time::Instant::now();
    let problem = loop {
        let (running, lag) = reverse_state(ctx, &name).await?;
        let problem = match (running, lag) {
            (None, _) | (_, None) => break Some(format!(
                "the reverse replication {name} is gone: the source may miss writes made on the target; a rollback cannot be safe"
            )),
            (Some(false), _) => Some(format!(
                "the reverse subscription {name} on the source is not running: look at the source's log"
            )),
            (Some(true), Some(lag)) if lag > max as i64 => Some(format!(
                "reverse lag {lag} bytes is above [sync] max_lag_bytes ({max}): wait and try again"
            )),
            _ => None,
        };
        if problem.is_none() || started.elapsed() >= LAG_PATIENCE {
            break problem;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    gates.check(
        "reverse replication streaming, lag within [sync] max_lag_bytes",
        problem,
    );
    Ok(())
}

/// Whether the reverse subscription's worker runs on the source, and its slot's lag on the
/// target (`None`s when they are gone).
async fn reverse_state(
    ctx: &Context<'_>,
    name: &str,
) -> Result<(Option<bool>, Option<i64>), PgError> {
    let running: Option<bool> = ctx
        .source
        .query(
            "read the reverse subscription",
            "SELECT s.subenabled AND EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.pid IS NOT NULL)
               FROM pg_subscription s WHERE s.subname = $1",
            &[&name],
        )
        .await?
        .first()
        .map(|r| r.get(0));
    let lag = crate::replication::slot_lag(ctx.target, name).await?;
    Ok((running, lag))
}

async fn proxies(ctx: &Context<'_>, direction: Direction, gates: &mut Gates) {
    let from = direction.from();
    let answers = futures_util::future::join_all(
        ctx.proxies.iter().map(|p| p.status(Duration::from_secs(3))),
    )
    .await;
    let mut problems = Vec::new();
    for (proxy, answer) in ctx.proxies.iter().zip(answers) {
        let status = match answer {
            Ok(status) => status,
            // It answered: starting it or fixing its address is not what it needs.
            Err(e) if e.mismatch => {
                problems.push(e.to_string());
                continue;
            }
            Err(e) => {
                problems.push(format!("{e}: start it, or fix [[cutover.proxies]]"));
                continue;
            }
        };
        let backend = status.backend;
        if Side::from(backend) != from {
            problems.push(format!(
                "proxy {} sends transactions to the {backend}, not the {from}",
                proxy.address
            ));
        }
        if status.pool_mode != admin_api::PoolMode::Transaction {
            problems.push(format!(
                "proxy {} is in session mode: its clients hold server connections for good, so it can never drain; use pool_mode = \"transaction\"",
                proxy.address
            ));
        }
        let max_pause = Duration::from_millis(status.max_pause_ms);
        let wait = Duration::from_millis(status.query_wait_timeout_ms);
        if let Some(problem) = nesting(ctx.plan, max_pause, wait) {
            problems.push(format!("proxy {}: {problem}", proxy.address));
        }
    }
    gates.check(
        "every proxy answers, in transaction mode, on the old primary",
        (!problems.is_empty()).then(|| problems.join("; ")),
    );
}

/// The proxies' application roles must be fenceable on both servers: not superusers, not
/// members of `pg_write_all_data`, not owners of the migrated tables.
async fn fenceable(ctx: &Context<'_>, gates: &mut Gates) -> Result<(), PgError> {
    let roles = ctx.plan.proxy.user_names();
    let mut problems = Vec::new();
    for server in [ctx.source, ctx.target] {
        let tables: Vec<String> = catalog::select(ctx.plan, catalog::tables(server).await?)
            .names()
            .iter()
            .map(|t| t.sql())
            .collect();
        let rows = server
            .query(
                "check the application roles can be fenced",
                "SELECT r.rolname, r.rolsuper, pg_has_role(r.oid, 'pg_write_all_data', 'MEMBER'),
                        (SELECT string_agg(c.oid::regclass::text, ', ') FROM pg_class c
                          WHERE c.oid = ANY($2::text[]::regclass[]) AND pg_has_role(r.oid, c.relowner, 'MEMBER'))
                   FROM pg_roles r WHERE r.rolname = ANY($1)",
                &[&roles, &tables],
            )
            .await?;
        for row in rows {
            let (role, superuser, writes_all, owns): (String, bool, bool, Option<String>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let side = server.side;
            if superuser {
                problems.push(format!(
                    "{role} is a superuser on the {side}: ALTER ROLE {role} NOSUPERUSER"
                ));
            }
            if writes_all {
                problems.push(format!("{role} is a member of pg_write_all_data on the {side}: REVOKE pg_write_all_data FROM {role}"));
            }
            if let Some(owns) = owns {
                problems.push(format!("{role} owns (or is a member of the owner of) {owns} on the {side}: give the tables to another role (ALTER TABLE ... OWNER TO)"));
            }
        }
    }
    gates.check(
        "application roles can be fenced",
        (!problems.is_empty()).then(|| problems.join("; ")),
    );
    Ok(())
}

/// The slack for the pause's other steps (fence, sequences, turning replication around).
const REST_OF_PAUSE: Duration = Duration::from_secs(1);

fn nesting(plan: &Plan, max_pause: Duration, query_wait: Duration) -> Option<String> {
    let c = &plan.cutover;
    let needed = c.drain_timeout.0 + c.catchup_timeout.0 + REST_OF_PAUSE;
    let fmt = |d: Duration| humantime::format_duration(d).to_string();
    if max_pause <= needed {
        return Some(format!(
            "max_pause ({}) must be longer than drain_timeout + catchup_timeout + {} ({})",
            fmt(max_pause),
            fmt(REST_OF_PAUSE),
            fmt(needed)
        ));
    }
    if query_wait <= max_pause {
        return Some(format!(
            "query_wait_timeout ({}) must be longer than max_pause ({}), or clients waiting out the pause get errors",
            fmt(query_wait),
            fmt(max_pause)
        ));
    }
    None
}

fn timeouts(ctx: &Context<'_>, gates: &mut Gates) {
    let p = &ctx.plan.proxy;
    gates.check(
        "timeouts nest",
        nesting(ctx.plan, p.max_pause.0, p.query_wait_timeout.0),
    );
}
