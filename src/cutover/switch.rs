//! The cutover and the rollback: one runner, two directions (see the module comment of
//! `cutover`).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;

use super::gates::{self, Gates};
use super::proxies::{self, ProxyAdmin};
use super::{fence, reset_timeouts, reverse_name, set_pause_timeouts, set_subscription_commit};
use super::{Direction, Step, Steps};
use crate::pg::catalog::{self, Selection};
use crate::pg::{sql, PgError, Server, Side, TableName};
use crate::plan::{OnDrainTimeout, Plan};
use crate::state::{self, Fence, LockGuard, Phase, State, StateStore, Switch};
use crate::sync::{replication, sequences};
use crate::{Error, Result};

/// What `check` found: the gates, and everything the switch needs already open.
pub struct Checked<'a> {
    _lock: LockGuard,
    plan: &'a Plan,
    store: &'a dyn StateStore,
    state: State,
    source: Server,
    target: Server,
    proxies: Vec<ProxyAdmin>,
    direction: Direction,
    pub gates: Gates,
    /// What was done about an earlier run of this command that was interrupted.
    pub recovered: Option<String>,
    /// That earlier run had passed its commit point and is now finished: nothing more to do.
    pub finished_earlier: bool,
    /// The pause under way, as the coordinator keeps time of it.
    pause: Option<PauseClock>,
}

/// The pause as the coordinator keeps time of it. The proxies end a pause by themselves at
/// `max_pause`, whatever the coordinator does: a coordinator that stalled (frozen, swapped
/// out, a slow step) must then not fence a server the applications are using again. Every
/// step that needs the pause checks the clock first, and the fence checks the old primary's
/// own clock in the same statement as its REVOKE, so that a stall between the check and the
/// statement cannot slip through either.
struct PauseClock {
    /// Taken before the first pause request: earlier than any proxy's own start.
    started: Instant,
    /// The budget: `max_pause` less a margin for the step under way and the undo.
    budget: Duration,
    max_pause: Duration,
    /// `started + budget` on the old primary's clock (a timestamptz, as text).
    server_deadline: String,
    /// When the fence took hold (since `started`).
    fenced_at: Option<Duration>,
    /// Transactions that did not finish within `drain_timeout` and were ended: their clients
    /// got an error, not a pause.
    cancelled: usize,
}

impl PauseClock {
    /// The margin kept from `max_pause`: a fifth of it, so a step that begins in time ends
    /// before the proxies resume by themselves.
    fn budget(max_pause: Duration) -> Duration {
        max_pause - max_pause / 5
    }

    /// An error if the pause has used its budget: the step `what` must not begin.
    fn check(&self, what: &str) -> Result<()> {
        let elapsed = self.started.elapsed();
        if elapsed < self.budget {
            return Ok(());
        }
        Err(Error::Refused(format!(
            "the pause lasted {:.1} s before \"{what}\", past its budget of {:.1} s (max_pause {}, less a margin): the coordinator stalled or a step was slow; the proxies resume by themselves at max_pause, so nothing more is done in this pause",
            elapsed.as_secs_f64(),
            self.budget.as_secs_f64(),
            humantime::format_duration(self.max_pause)
        )))
    }

    /// What the applications saw of an undone switch.
    fn seen_by_applications(&self, from: Side) -> String {
        let mut seen = Vec::new();
        if self.cancelled > 0 {
            seen.push(format!(
                "{} transactions that did not finish within drain_timeout were ended (their clients got an error)",
                self.cancelled
            ));
        }
        let elapsed = self.started.elapsed();
        match self.fenced_at {
            Some(fenced) if elapsed >= self.max_pause => seen.push(format!(
                "the proxies' max_pause ({}) ran out while the {from} was fenced (from {:.1} s into the pause): until its grants came back, {:.1} s after the pause began, their writes there failed with 42501 (permission denied)",
                humantime::format_duration(self.max_pause),
                fenced.as_secs_f64(),
                elapsed.as_secs_f64()
            )),
            _ => {}
        }
        if seen.is_empty() {
            "they saw only a pause".to_string()
        } else {
            format!("they saw more than a pause: {}", seen.join("; "))
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub direction: Direction,
    pub steps: Vec<Step>,
    /// The pause as the proxies measured it (the longest of them), in milliseconds.
    pub pause_ms: Option<f64>,
    /// The pause as the coordinator measured it, from the first pause request to the last
    /// resume answer.
    pub pause_coordinator_ms: Option<f64>,
    pub epoch: u64,
    pub dry_run: bool,
}

/// Takes the lock, connects, finishes or undoes an interrupted earlier run (not in a dry run),
/// and runs the gates. Nothing is changed on the servers unless an earlier run left something
/// to finish.
pub async fn check<'a>(
    plan: &'a Plan,
    store: &'a dyn StateStore,
    direction: Direction,
    skip_validation: bool,
    dry_run: bool,
) -> Result<Checked<'a>> {
    let lock = store.lock(direction.name())?;
    let state = state::load_or_new(store, &plan.name.0)?;
    let (source, target) = tokio::join!(
        Server::connect(Side::Source, &plan.source),
        Server::connect(Side::Target, &plan.target)
    );
    let proxies = proxies::from_plan(plan).map_err(Error::Refused)?;
    let mut checked = Checked {
        _lock: lock,
        plan,
        store,
        state,
        source: source?,
        target: target?,
        proxies,
        direction,
        gates: Gates::default(),
        recovered: None,
        finished_earlier: false,
        pause: None,
    };
    if dry_run {
        // A dry run changes nothing, not even to finish or undo an earlier run.
        if let Some(step) = checked
            .state
            .interrupted_step()
            .filter(|s| matches!(*s, "cutover" | "rollback"))
        {
            return Err(Error::Refused(format!(
                "an earlier `{step}` was interrupted: run it again without --dry-run to finish or undo it first"
            )));
        }
    } else {
        checked.recover().await?;
    }
    if checked.finished_earlier {
        return Ok(checked);
    }
    checked.check_phase()?;
    let ctx = gates::Context {
        plan,
        state: &checked.state,
        source: &checked.source,
        target: &checked.target,
        proxies: &checked.proxies,
        skip_validation,
    };
    checked.gates = gates::run(&ctx, direction).await?;
    Ok(checked)
}

impl<'a> Checked<'a> {
    fn check_phase(&self) -> Result<()> {
        let phase = self.state.phase;
        let ok = match self.direction {
            Direction::Cutover => matches!(phase, Phase::Syncing | Phase::Synced),
            Direction::Rollback => phase == Phase::Switched,
        };
        if ok {
            return Ok(());
        }
        let what = match self.direction {
            Direction::Cutover => {
                "a cutover needs a synced migration: run `switchyard sync --wait`"
            }
            Direction::Rollback => {
                "a rollback needs a switched migration (after `switchyard cutover`)"
            }
        };
        Err(Error::Refused(format!("the migration is {phase}: {what}")))
    }

    fn save(&mut self, event: &str) -> Result<()> {
        self.state.note(event);
        self.store.save(&self.state)?;
        Ok(())
    }

    fn server(&self, side: Side) -> &Server {
        match side {
            Side::Source => &self.source,
            Side::Target => &self.target,
        }
    }

    /// An earlier run of a cutover or rollback that did not finish: past its commit point it
    /// is finished (proxies switched and resumed), before it undone.
    async fn recover(&mut self) -> Result<()> {
        let Some(step) = self.state.interrupted_step().map(str::to_string) else {
            return Ok(());
        };
        let earlier = match step.as_str() {
            "cutover" => Direction::Cutover,
            "rollback" => Direction::Rollback,
            _ => return Ok(()),
        };
        let committed = match earlier {
            Direction::Cutover => self.state.phase == Phase::Switched,
            Direction::Rollback => self.state.phase == Phase::RolledBack,
        };
        let mut quiet = |_: &Step| {};
        let mut steps = Steps::new(&mut quiet);
        if committed {
            self.finish(earlier, &mut steps).await?;
            self.save(&format!("done {step}"))?;
            self.finished_earlier = earlier == self.direction;
            self.recovered = Some(format!(
                "an earlier {step} had switched the proxies' epoch to {} and was interrupted: it is finished now",
                self.state.backend.epoch
            ));
        } else {
            let problems = self.undo(earlier, &mut steps).await;
            if !problems.is_empty() {
                return Err(Error::NeedsOperator(format!(
                    "an earlier {step} was interrupted and could not be undone:\n  {}\nfix the cause and run `switchyard {step}` again",
                    problems.join("\n  ")
                )));
            }
            self.save(&format!("done {step} (undone after an interruption)"))?;
            self.recovered = Some(format!(
                "an earlier {step} was interrupted before its switch: it was undone (grants back, proxies resumed on the {})",
                earlier.from()
            ));
        }
        Ok(())
    }

    pub async fn run(
        mut self,
        dry_run: bool,
        observe: &mut (dyn FnMut(&Step) + Send),
    ) -> Result<Report> {
        let direction = self.direction;
        let mut report = Report {
            direction,
            steps: Vec::new(),
            pause_ms: None,
            pause_coordinator_ms: None,
            epoch: self.state.backend.epoch,
            dry_run,
        };
        if self.finished_earlier {
            return Ok(report);
        }
        let failures = self.gates.failures();
        if !failures.is_empty() {
            return Err(Error::Refused(format!(
                "{} refused, nothing changed:\n  {}",
                direction.name(),
                failures.join("\n  ")
            )));
        }
        if dry_run {
            report.steps = planned_steps(direction)
                .iter()
                .map(|name| Step {
                    name: name.to_string(),
                    ms: 0.0,
                    outcome: "would run".into(),
                    in_pause: false,
                })
                .collect();
            return Ok(report);
        }
        let mut steps = Steps::new(observe);
        self.save(&format!("begin {}", direction.name()))?;
        let result = self.switch(&mut steps, &mut report).await;
        report.steps = std::mem::take(&mut steps.done);
        match result {
            Ok(()) => Ok(report),
            Err(e) => Err(e),
        }
    }

    /// Everything from preparation to resume. Errors before the commit point are undone here.
    async fn switch(&mut self, steps: &mut Steps<'_>, report: &mut Report) -> Result<()> {
        let direction = self.direction;
        let from = direction.from();
        let prepared = self.prepare(steps).await;
        let selection = match prepared {
            Ok(selection) => selection,
            Err(e) => return Err(self.give_up(steps, e).await),
        };
        steps.in_pause = true;
        let paused_at = Instant::now();
        if let Err(e) = self.in_pause(steps, &selection).await {
            let error = self.give_up(steps, e).await;
            report.pause_coordinator_ms = Some(paused_at.elapsed().as_secs_f64() * 1000.0);
            return Err(error);
        }
        // The proxies' own deadline (max_pause) may have run out during a slow step: then they
        // resumed on the old primary, and the switch must not happen behind their back.
        if let Err(e) = self.still_paused(steps).await {
            let error = self.give_up(steps, e).await;
            report.pause_coordinator_ms = Some(paused_at.elapsed().as_secs_f64() * 1000.0);
            return Err(error);
        }
        // The commit point: from here on the switch is finished, never undone.
        self.state.backend = Switch {
            backend: direction.to(),
            epoch: self.state.backend.epoch + 1,
        };
        self.state.set_phase(match direction {
            Direction::Cutover => Phase::Switched,
            Direction::Rollback => Phase::RolledBack,
        });
        let epoch = self.state.backend.epoch;
        let (state, store) = (&mut self.state, self.store);
        steps
            .run_now(&format!("record the switch in the state (epoch {epoch})"), || {
                state.note(format!("switch to the {} (epoch {epoch})", direction.to()));
                store.save(state).map(|()| ((), store.describe()))
            })
        .map_err(|e| Error::NeedsOperator(format!("{e}\nthe proxies are still paused on the {from} and resume there by themselves at max_pause; the {from} is fenced: run `switchyard {} ` again", direction.name())))?;
        report.epoch = self.state.backend.epoch;
        let resumed = self.switch_and_resume(steps).await;
        report.pause_coordinator_ms = Some(paused_at.elapsed().as_secs_f64() * 1000.0);
        steps.in_pause = false;
        let pause_ms = resumed.map_err(|e| {
            Error::NeedsOperator(format!(
                "{e}\nthe switch is recorded (epoch {}): run `switchyard {}` again to finish it",
                self.state.backend.epoch,
                direction.name()
            ))
        })?;
        report.pause_ms = pause_ms;
        self.after(direction, steps).await.map_err(|e| {
            Error::NeedsOperator(format!(
                "the applications run on the {}, but cleaning up failed: {e}\nrun `switchyard {}` again to finish",
                direction.to(),
                direction.name()
            ))
        })?;
        self.save(&format!("done {}", direction.name()))?;
        Ok(())
    }

    /// Outside the pause: the way back (cutover), synchronous apply of the replication that
    /// feeds the new primary, the pause's timeouts on both connections.
    async fn prepare(&mut self, steps: &mut Steps<'_>) -> Result<Selection> {
        let direction = self.direction;
        let from = direction.from();
        let selection = catalog::select(self.plan, catalog::tables(self.server(from)).await?);
        if direction == Direction::Cutover {
            let name = reverse_name(self.plan);
            self.state.created.reverse = Some(name.clone());
            self.save("reverse replication recorded")?;
            let tables =
                replication::published_tables(&self.source, &self.plan.replication_name()).await?;
            let target = &self.target;
            // Both wait for others: the publication for a lock on each table, the slot for
            // every transaction open on the target. Bounded, so a long transaction there
            // fails the cutover with a reason instead of hanging it.
            target
                .execute(
                    "bound the preparation",
                    "SET lock_timeout = '5s'; SET statement_timeout = '60s'",
                )
                .await?;
            steps
                .run("create the reverse publication and slot on the target", async {
                    create_reverse_publication(target, &name, &tables).await?;
                    let lsn = create_slot(target, &name).await.map_err(|e| {
                        PgError::Tool(format!("{e} (creating a slot waits until every transaction open on the target has ended: look for long ones in pg_stat_activity there)"))
                    })?;
                    Ok::<_, PgError>(((), format!("{name} at {lsn}")))
                })
                .await?;
            let (source, conninfo) = (&self.source, crate::pg::peer_conninfo(&self.plan.target));
            steps
                .run(
                    "create the source's subscription to the target, disabled",
                    async {
                        create_reverse_subscription(source, &name, &conninfo).await?;
                        Ok::<_, PgError>(((), format!("{name}, copy_data = false")))
                    },
                )
                .await?;
        }
        let (server, feeding) = self.feeding();
        steps
            .run(
                "apply on the new primary with synchronous_commit = on",
                async {
                    set_subscription_commit(server, &feeding, "on").await?;
                    wait_workers(
                        server,
                        &feeding,
                        Workers::ApplyRunning,
                        Duration::from_secs(30),
                    )
                    .await?;
                    Ok::<_, PgError>(((), format!("{feeding} on the {}", server.side)))
                },
            )
            .await?;
        let (from_server, slot) = (self.server(from), self.feeding_slot());
        let settle_max_active = self.plan.cutover.settle_max_active;
        let throttle_for = SETTLE_PATIENCE + self.plan.proxy.max_pause.0;
        let proxies = &self.proxies;
        steps
            .run("let the lag come down before pausing", async {
                if settle_max_active > 0 {
                    throttle_all(proxies, settle_max_active, throttle_for)
                        .await
                        .map_err(PgError::Tool)?;
                }
                settle_lag(from_server, &slot).await
            })
            .await?;
        set_pause_timeouts(&self.source, self.plan).await?;
        set_pause_timeouts(&self.target, self.plan).await?;
        if direction == Direction::Cutover {
            // Decoding up to now outside the pause leaves less for the advance inside it.
            advance_slot(&self.target, &reverse_name(self.plan)).await?;
        }
        Ok(selection)
    }

    /// The subscription that feeds the new primary, and the server it lives on.
    fn feeding(&self) -> (&Server, String) {
        let (side, name) = self.direction.feeding(self.plan);
        (self.server(side), name)
    }

    /// The slot on the old primary that feeds the new one.
    fn feeding_slot(&self) -> String {
        self.feeding().1
    }

    async fn in_pause(&mut self, steps: &mut Steps<'_>, selection: &Selection) -> Result<()> {
        let direction = self.direction;
        let from = direction.from();
        let proxy_pids = self.pause(steps).await?;

        let tables = selection.names();
        let server = self.server(from);
        let grants = steps
            .run(&format!("read the {from}'s write grants"), async {
                let grants = fence::read_grants(server, &tables).await?;
                let text = format!("{} grants", grants.len());
                Ok::<_, PgError>((grants, text))
            })
            .await?;
        // A fence this side already has (an abort that could not give the grants back) keeps
        // what it recorded: those grants are revoked now and would not be read again.
        match self.state.fences.iter_mut().find(|f| f.side == from) {
            Some(fence) => {
                for grant in &grants {
                    if !fence.grants.contains(grant) {
                        fence.grants.push(grant.clone());
                    }
                }
            }
            None => self.state.fences.push(Fence {
                side: from,
                grants: grants.clone(),
            }),
        }
        let (state, store) = (&mut self.state, self.store);
        steps.run_now("record them in the state", || {
            state.note(format!("fence the {from}"));
            store.save(state).map(|()| ((), store.describe()))
        })?;
        // Immediately before the fence: the pause still holds, on every proxy.
        self.pause_check(&format!("fence the {from}"))?;
        self.still_paused(steps).await?;
        let app_roles = self.plan.proxy.user_names();
        let server = self.server(from);
        let timeout = self.plan.cutover.statement_timeout.0;
        let deadline = self.server_deadline();
        let started = self.pause.as_ref().map(|clock| clock.started);
        // When the REVOKE committed, for the report if the step fails after it.
        let fenced_at = std::sync::Mutex::new(None);
        let fenced = steps
            .run(&format!("fence the {from}"), async {
                if let Some(revoke) = fence::revoke_sql(&tables, &grants) {
                    server
                        .execute(
                            "revoke the write grants",
                            &fence::before_deadline(&revoke, &deadline),
                        )
                        .await?;
                }
                if let (Some(started), Ok(mut at)) = (started, fenced_at.lock()) {
                    *at = Some(started.elapsed());
                }
                let leaks = fence::still_writable(server, &app_roles, &grants, &tables).await?;
                if !leaks.is_empty() {
                    return Err(PgError::Tool(format!(
                        "the fence did not hold: {} can still write (the coordinator's role must be a superuser or own the tables)",
                        leaks.join(", ")
                    )));
                }
                let ended = fence::end_sessions(server, &proxy_pids, &deadline, timeout).await?;
                Ok::<_, PgError>((
                    (),
                    format!(
                        "{} grants revoked, {ended} sessions outside the proxies ended",
                        grants.len()
                    ),
                ))
            })
            .await;
        if let Some(clock) = self.pause.as_mut() {
            clock.fenced_at = fenced_at.into_inner().unwrap_or_default();
        }
        fenced?;

        let server = self.server(from);
        let slot = self.feeding_slot();
        let catchup = self.plan.cutover.catchup_timeout.0;
        self.pause_check(&format!(
            "wait until the {} has applied everything",
            direction.to()
        ))?;
        steps
            .run(
                &format!("wait until the {} has applied everything", direction.to()),
                catch_up(server, &slot, catchup),
            )
            .await?;

        self.pause_check(&format!("copy sequences to the {}", direction.to()))?;
        let (from_server, to_server) = (self.server(from), self.server(direction.to()));
        steps
            .run(
                &format!("copy sequences to the {}", direction.to()),
                async {
                    let copied =
                        sequences::copy_sequences(from_server, to_server, selection).await?;
                    Ok::<_, PgError>(((), format!("{} sequences", copied.len())))
                },
            )
            .await?;

        if direction == Direction::Cutover {
            self.pause_check("disable the forward subscription")?;
            self.turn_around(steps).await?;
        }
        Ok(())
    }

    /// [`PauseClock::check`] of the pause under way.
    fn pause_check(&self, what: &str) -> Result<()> {
        self.pause
            .as_ref()
            .map_or(Ok(()), |clock| clock.check(what))
    }

    /// The pause's deadline on the old primary's clock.
    fn server_deadline(&self) -> String {
        self.pause.as_ref().map_or_else(
            || "-infinity".to_string(),
            |clock| clock.server_deadline.clone(),
        )
    }

    async fn still_paused(&mut self, steps: &mut Steps<'_>) -> Result<()> {
        let proxies = &self.proxies;
        steps
            .run("check the proxies are still paused", async {
                let answers =
                    join_all(proxies.iter().map(|p| p.status(Duration::from_secs(2)))).await;
                let answers = first_error(answers)?;
                if let Some((proxy, _)) = proxies
                    .iter()
                    .zip(&answers)
                    .find(|(_, a)| a["paused"].as_bool() != Some(true))
                {
                    return Err(format!(
                        "proxy {} is no longer paused (its max_pause ran out): raise [proxy] max_pause",
                        proxy.address
                    ));
                }
                Ok(((), format!("{} proxies", proxies.len())))
            })
            .await
            .map_err(Error::Refused)
    }

    /// Pauses every proxy and waits for their transactions to finish, ending them when
    /// `on_drain_timeout = "cancel"`. Returns the backend pids of the proxies' server
    /// connections to the old primary: the fence spares them.
    async fn pause(&mut self, steps: &mut Steps<'_>) -> Result<Vec<i32>> {
        let from = self.direction.from();
        let drain = self.plan.cutover.drain_timeout.0;
        let max_pause = self.plan.proxy.max_pause.0;
        let started = Instant::now();
        let budget = PauseClock::budget(max_pause);
        let server_deadline: String = self
            .server(from)
            .query_one(
                "read the server's clock",
                SERVER_DEADLINE,
                &[&(budget.as_secs_f64() * 1000.0)],
            )
            .await?
            .get(0);
        self.pause = Some(PauseClock {
            started,
            budget,
            max_pause,
            server_deadline,
            fenced_at: None,
            cancelled: 0,
        });
        let proxies = &self.proxies;
        let drained = steps
            .run(
                "pause the proxies and let transactions finish",
                pause_all(proxies, drain),
            )
            .await
            .map_err(Error::Refused)?;
        let proxy_pids = drained.server_pids(from);
        if drained.idle {
            return Ok(proxy_pids);
        }
        let running = drained.running;
        let listed: Vec<String> = running.iter().map(|r| r.to_string()).collect();
        if self.plan.cutover.on_drain_timeout == OnDrainTimeout::Abort {
            return Err(Error::Refused(format!(
                "transactions still ran after drain_timeout ({}): {}; set [cutover] on_drain_timeout = \"cancel\" to end them",
                humantime::format_duration(drain),
                listed.join(", ")
            )));
        }
        let pids: Vec<i32> = running
            .iter()
            .filter_map(|r| r["server_pid"].as_i64())
            .map(|p| p as i32)
            .collect();
        let server = self.server(self.direction.from());
        steps
            .run("end the transactions that did not finish", async {
                end_transactions(server, &pids).await?;
                // Asked again only to wait until idle: a proxy already paused keeps the first
                // request's max_pause deadline.
                let (left, _) = pause_all(proxies, Duration::from_secs(1))
                    .await
                    .map_err(PgError::Tool)?;
                if !left.idle {
                    return Err(PgError::Tool(format!(
                        "{} transactions still run after being cancelled",
                        left.running.len().max(1)
                    )));
                }
                Ok(((), format!("{} cancelled or rolled back", pids.len())))
            })
            .await?;
        if let Some(clock) = self.pause.as_mut() {
            clock.cancelled = pids.len().max(1);
        }
        Ok(proxy_pids)
    }

    /// Stops the forward stream, skips the reverse slot past what it wrote on the target, and
    /// subscribes the source to the target.
    async fn turn_around(&mut self, steps: &mut Steps<'_>) -> Result<()> {
        let forward = self.plan.replication_name();
        let reverse = reverse_name(self.plan);
        let (source, target) = (&self.source, &self.target);
        steps
            .run("disable the forward subscription", async {
                target
                    .execute(
                        "disable the forward subscription",
                        &format!("ALTER SUBSCRIPTION {} DISABLE", sql::ident(&forward)),
                    )
                    .await?;
                wait_workers(target, &forward, Workers::AllGone, Duration::from_secs(5)).await?;
                Ok::<_, PgError>(((), "its worker exited".to_string()))
            })
            .await?;
        let lsn = steps
            .run(
                "advance the reverse slot to the target's current WAL",
                async {
                    let (lsn, text) = advance_slot(target, &reverse).await?;
                    Ok::<_, PgError>((lsn, text))
                },
            )
            .await?;
        steps
            .run(
                "record where the reverse replication starts, on the source",
                async {
                    start_origin_at(source, &reverse, &lsn).await?;
                    Ok::<_, PgError>(((), format!("{reverse} from {lsn}")))
                },
            )
            .await?;
        steps
            .run("start the source's subscription to the target", async {
                source
                    .execute(
                        "enable the reverse subscription",
                        &format!("ALTER SUBSCRIPTION {} ENABLE", sql::ident(&reverse)),
                    )
                    .await?;
                Ok::<_, PgError>(((), reverse.clone()))
            })
            .await?;
        Ok(())
    }

    /// Tells every proxy its new backend, restores the new primary's grants when it was fenced
    /// before (rollback), and resumes. Returns the longest pause a proxy measured.
    async fn switch_and_resume(&mut self, steps: &mut Steps<'_>) -> Result<Option<f64>> {
        let to = self.state.backend;
        let proxies = &self.proxies;
        steps
            .run("switch the proxies", async {
                let answers = join_all(proxies.iter().map(|p| p.switch(to))).await;
                first_error(answers)?;
                Ok::<_, String>(((), format!("to the {} (epoch {})", to.backend, to.epoch)))
            })
            .await
            .map_err(Error::Refused)?;
        if let Some(fence) = self.state.fence(to.backend).cloned() {
            let server = self.server(to.backend);
            steps
                .run(
                    &format!("give the {} its write grants back", to.backend),
                    async {
                        fence::restore(server, &fence.grants).await?;
                        Ok::<_, PgError>(((), format!("{} grants", fence.grants.len())))
                    },
                )
                .await?;
            self.state.fences.retain(|f| f.side != to.backend);
            self.save(&format!("unfence the {}", to.backend))?;
        }
        let pause_ms = steps
            .run("resume the proxies", resume_all(&self.proxies))
            .await
            .map_err(Error::Refused)?;
        Ok(Some(pause_ms))
    }

    /// After the switch: drop the replication that fed the new primary (it would only retain
    /// WAL on the old one).
    async fn after(&mut self, direction: Direction, steps: &mut Steps<'_>) -> Result<()> {
        reset_timeouts(&self.source).await;
        reset_timeouts(&self.target).await;
        match direction {
            Direction::Cutover => {
                let name = self.plan.replication_name();
                let (source, target) = (&self.source, &self.target);
                steps
                    .run("drop the forward subscription and its slot", async {
                        replication::drop_subscription(target, &name).await?;
                        let slots = replication::drop_slots(source, &name, None).await?;
                        Ok::<_, PgError>(((), format!("slots dropped: {}", slots.len())))
                    })
                    .await?;
                self.state.created.subscription = None;
            }
            Direction::Rollback => {
                let name = reverse_name(self.plan);
                let (source, target) = (&self.source, &self.target);
                steps
                    .run("drop the reverse replication", async {
                        drop_reverse(source, target, &name).await?;
                        Ok::<_, PgError>(((), name.clone()))
                    })
                    .await?;
                self.state.created.reverse = None;
            }
        }
        self.store.save(&self.state)?;
        Ok(())
    }

    /// A switch recorded (epoch saved) but not finished: switch and resume every proxy, then
    /// clean up.
    async fn finish(&mut self, direction: Direction, steps: &mut Steps<'_>) -> Result<()> {
        set_pause_timeouts(&self.source, self.plan).await?;
        set_pause_timeouts(&self.target, self.plan).await?;
        // The proxies resumed by themselves on the old primary: pause them again, so no
        // transaction is half-way there when they switch. (One that does not finish meets the
        // fence, never the other server.)
        let drain = self.plan.cutover.drain_timeout.0;
        steps
            .run("pause the proxies", pause_all(&self.proxies, drain))
            .await
            .map_err(Error::Refused)?;
        self.switch_and_resume(steps).await?;
        self.after(direction, steps).await
    }

    /// Undoes a switch that did not reach its commit point. Each step runs even when an
    /// earlier one failed; returns what could not be undone.
    async fn undo(&mut self, direction: Direction, steps: &mut Steps<'_>) -> Vec<String> {
        let mut problems = Vec::new();
        let from = direction.from();
        if let Err(e) = self.reconnect_closed().await {
            problems.push(e.to_string());
        }
        reset_timeouts(&self.source).await;
        reset_timeouts(&self.target).await;
        if let Some(fence) = self.state.fence(from).cloned() {
            let server = self.server(from);
            let restored = steps
                .run(&format!("give the {from} its write grants back"), async {
                    fence::restore(server, &fence.grants).await?;
                    Ok::<_, PgError>(((), format!("{} grants", fence.grants.len())))
                })
                .await;
            match restored {
                Ok(()) => {
                    self.state.fences.retain(|f| f.side != from);
                    if let Err(e) = self.save(&format!("unfence the {from}")) {
                        problems.push(e.to_string());
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        let (server, feeding) = direction.feeding(self.plan);
        if direction == Direction::Cutover {
            let name = reverse_name(self.plan);
            let (source, target) = (&self.source, &self.target);
            let dropped = steps
                .run("drop the reverse replication", async {
                    drop_reverse(source, target, &name).await?;
                    target
                        .execute(
                            "enable the forward subscription",
                            &format!("ALTER SUBSCRIPTION {} ENABLE", sql::ident(&feeding)),
                        )
                        .await?;
                    Ok::<_, PgError>(((), "forward subscription enabled again".to_string()))
                })
                .await;
            match dropped {
                Ok(()) => self.state.created.reverse = None,
                Err(e) => problems.push(e.to_string()),
            }
        }
        let (server, feeding) = (self.server(server), feeding);
        if let Err(e) = set_subscription_commit(server, &feeding, "off").await {
            problems.push(e.to_string());
        }
        if let Err(e) = resume_all(&self.proxies).await {
            problems.push(format!(
                "{e}; the proxies resume by themselves at max_pause"
            ));
        }
        if let Err(e) = self.store.save(&self.state) {
            problems.push(e.to_string());
        }
        problems
    }

    /// Connections lost in a failed step are opened again, so the undo can run.
    async fn reconnect_closed(&mut self) -> Result<(), PgError> {
        if self.source.client.is_closed() {
            self.source = Server::connect(Side::Source, &self.plan.source).await?;
        }
        if self.target.client.is_closed() {
            self.target = Server::connect(Side::Target, &self.plan.target).await?;
        }
        Ok(())
    }

    /// Undoes after `cause` and says how it went: exit 1 when everything is back, 3 when not.
    async fn give_up(&mut self, steps: &mut Steps<'_>, cause: Error) -> Error {
        let direction = self.direction;
        let problems = self.undo(direction, steps).await;
        if problems.is_empty() {
            let _ = self.save(&format!("done {} (undone)", direction.name()));
            let seen = self.pause.as_ref().map_or_else(
                || "they saw nothing of it".to_string(),
                |clock| clock.seen_by_applications(direction.from()),
            );
            Error::Refused(format!(
                "{} undone: {cause}\nthe applications run on the {} again; {seen}",
                direction.name(),
                direction.from()
            ))
        } else {
            Error::NeedsOperator(format!(
                "{} failed: {cause}\nand could not be undone:\n  {}\nfix the cause and run `switchyard {}` again (it finishes the undo first), or `switchyard abort`",
                direction.name(),
                problems.join("\n  "),
                direction.name()
            ))
        }
    }
}

fn planned_steps(direction: Direction) -> Vec<&'static str> {
    match direction {
        Direction::Cutover => vec![
            "create the reverse publication and slot on the target",
            "create the source's subscription to the target, disabled",
            "apply on the new primary with synchronous_commit = on",
            "let the lag come down before pausing",
            "pause the proxies and let transactions finish",
            "read the source's write grants",
            "record them in the state",
            "check the proxies are still paused",
            "fence the source",
            "wait until the target has applied everything",
            "copy sequences to the target",
            "disable the forward subscription",
            "advance the reverse slot to the target's current WAL",
            "record where the reverse replication starts, on the source",
            "start the source's subscription to the target",
            "record the switch in the state",
            "switch the proxies",
            "resume the proxies",
            "drop the forward subscription and its slot",
        ],
        Direction::Rollback => vec![
            "apply on the new primary with synchronous_commit = on",
            "let the lag come down before pausing",
            "pause the proxies and let transactions finish",
            "read the target's write grants",
            "record them in the state",
            "check the proxies are still paused",
            "fence the target",
            "wait until the source has applied everything",
            "copy sequences to the source",
            "record the switch in the state",
            "switch the proxies",
            "give the source its write grants back",
            "resume the proxies",
            "drop the reverse replication",
        ],
    }
}

/// Pauses every proxy; returns the transactions still running after `drain`.
/// What the proxies answered to a pause.
struct Drain {
    /// Every proxy said no session holds a server connection.
    idle: bool,
    /// The transactions they listed as still running (a session still waiting for its
    /// server connection is not listed, but makes `idle` false).
    running: Vec<serde_json::Value>,
    /// Each proxy's `server_pids` (per side).
    pids: Vec<serde_json::Value>,
}

impl Drain {
    /// The backend pids of the proxies' server connections to `side`.
    fn server_pids(&self, side: Side) -> Vec<i32> {
        let key = match side {
            Side::Source => "source",
            Side::Target => "target",
        };
        self.pids
            .iter()
            .filter_map(|pids| pids[key].as_array())
            .flatten()
            .filter_map(|pid| pid.as_i64().and_then(|pid| i32::try_from(pid).ok()))
            .collect()
    }
}

async fn pause_all(proxies: &[ProxyAdmin], drain: Duration) -> Result<(Drain, String), String> {
    let answers = join_all(proxies.iter().map(|p| p.pause(drain))).await;
    let answers = first_error(answers)?;
    let idle = answers.iter().all(|a| a["idle"].as_bool() == Some(true));
    let running: Vec<serde_json::Value> = answers
        .iter()
        .flat_map(|a| a["running"].as_array().cloned().unwrap_or_default())
        .collect();
    let pids = answers.iter().map(|a| a["server_pids"].clone()).collect();
    let text = if idle {
        format!("{} proxies paused, no transaction running", proxies.len())
    } else {
        format!("{} transactions still running", running.len().max(1))
    };
    Ok((
        Drain {
            idle,
            running,
            pids,
        },
        text,
    ))
}

/// Throttles every proxy to `max_active` transactions at once until resumed or `timeout`.
async fn throttle_all(
    proxies: &[ProxyAdmin],
    max_active: u32,
    timeout: Duration,
) -> Result<(), String> {
    let answers = join_all(proxies.iter().map(|p| p.throttle(max_active, timeout))).await;
    first_error(answers).map(|_| ())
}

/// Resumes every proxy; returns the longest pause they measured, in ms.
async fn resume_all(proxies: &[ProxyAdmin]) -> Result<(f64, String), String> {
    let answers = join_all(proxies.iter().map(|p| p.resume())).await;
    let answers = first_error(answers)?;
    let longest = answers
        .iter()
        .filter_map(|a| a["last_pause_ms"].as_f64())
        .fold(0.0, f64::max);
    Ok((
        longest,
        format!("{} proxies resumed; pause {longest:.1} ms", proxies.len()),
    ))
}

fn first_error<T>(answers: Vec<Result<T, proxies::ProxyAdminError>>) -> Result<Vec<T>, String> {
    answers
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// Cancels the running queries and ends the transactions left idle (their server connection
/// closes, which rolls them back).
async fn end_transactions(server: &Server, pids: &[i32]) -> Result<(), PgError> {
    server
        .query(
            "end the transactions still running",
            "SELECT CASE WHEN state = 'active' THEN pg_cancel_backend(pid) ELSE pg_terminate_backend(pid) END
               FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&pids],
        )
        .await?;
    Ok(())
}

/// The lag the pause should start from: what is still to apply then is applied inside it.
const SETTLED_LAG_BYTES: i64 = 64 * 1024;
const SETTLE_PATIENCE: Duration = Duration::from_secs(10);

/// Waits, up to a few seconds, until `slot` lags less than [`SETTLED_LAG_BYTES`], so that the
/// catch-up inside the pause starts from little. Under a write load heavier than the apply
/// can follow it gives up waiting and the pause starts anyway (the catch-up has its own
/// timeout).
async fn settle_lag(server: &Server, slot: &str) -> Result<((), String), PgError> {
    let started = Instant::now();
    loop {
        let Some(lag) = replication::slot_lag(server, slot).await? else {
            return Err(PgError::Tool(format!(
                "the slot {slot} is gone from the {}",
                server.side
            )));
        };
        if lag < SETTLED_LAG_BYTES || started.elapsed() >= SETTLE_PATIENCE {
            return Ok(((), format!("{lag} bytes behind")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `slot` on `server` has confirmed the server's current WAL position.
async fn catch_up(server: &Server, slot: &str, timeout: Duration) -> Result<((), String), PgError> {
    let prepared: i64 = server
        .query_one(
            "look for prepared transactions",
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await?
        .get(0);
    if prepared > 0 {
        return Err(PgError::Tool(format!(
            "{prepared} prepared transactions are pending on the {}: COMMIT PREPARED or ROLLBACK PREPARED them first",
            server.side
        )));
    }
    // Applications may commit with synchronous_commit = off: their commits are acknowledged
    // before the WAL holding them is flushed, and a WAL sender sends only flushed WAL. A
    // transaction of our own that writes WAL (a transactional logical message, which
    // pgoutput skips), committed synchronously, flushes everything before it; the position
    // read after it covers every commit an application saw acknowledged.
    server
        .execute(
            "flush the WAL",
            "SELECT pg_logical_emit_message(true, 'switchyard', 'catch-up')",
        )
        .await?;
    let lsn: String = server
        .query_one(
            "read the current WAL position",
            "SELECT pg_current_wal_lsn()::text",
            &[],
        )
        .await?
        .get(0);
    let waited =
        replication::wait_confirmed(server, slot, &lsn, timeout, Duration::from_millis(2)).await?;
    match waited {
        replication::Confirmed::Reached { polls } => {
            Ok(((), format!("{lsn} confirmed after {polls} polls")))
        }
        replication::Confirmed::SlotMissing => Err(PgError::Tool(format!(
            "the slot {slot} is gone from the {}",
            server.side
        ))),
        replication::Confirmed::TimedOut => Err(PgError::Tool(format!(
            "the slot {slot} did not confirm {lsn} within catchup_timeout ({})",
            humantime::format_duration(timeout)
        ))),
    }
}

/// The source's subscription to the target, made before the pause but disabled: creating it
/// asks the target for the publication's tables (a connection and a round trip), which the
/// pause should not wait for. Inside the pause it is only enabled.
async fn create_reverse_subscription(
    source: &Server,
    name: &str,
    target_conninfo: &str,
) -> Result<(), PgError> {
    if replication::subscription_oid(source, name).await?.is_some() {
        return Ok(());
    }
    let statement = format!(
        "CREATE SUBSCRIPTION {sub} CONNECTION {conn} PUBLICATION {sub} \
         WITH (create_slot = false, slot_name = {slot}, copy_data = false, enabled = false, synchronous_commit = 'off')",
        sub = sql::ident(name),
        conn = sql::literal(target_conninfo),
        slot = sql::literal(name),
    );
    source
        .execute_secret("create the reverse subscription", &statement)
        .await
}

async fn create_reverse_publication(
    target: &Server,
    name: &str,
    tables: &[TableName],
) -> Result<(), PgError> {
    if replication::publication_exists(target, name).await? {
        return Ok(());
    }
    let list: Vec<String> = tables.iter().map(TableName::sql).collect();
    target
        .execute(
            "create the reverse publication",
            &format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                sql::ident(name),
                list.join(", ")
            ),
        )
        .await
}

/// Creates the logical slot (waits for every open transaction on the server, so never inside
/// the pause). An existing one is kept.
async fn create_slot(server: &Server, name: &str) -> Result<String, PgError> {
    if replication::slot_exists(server, name).await? {
        return Ok("existing".into());
    }
    let row = server
        .query_one(
            "create the reverse slot",
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await?;
    Ok(row.get(0))
}

/// Moves the slot to the server's current WAL position. Returns the position and how far
/// behind it the slot's restart point is: an advance decodes from there, so that is what
/// makes it slow (the restart point follows logged snapshots of running transactions, every
/// 15 s or at a checkpoint).
async fn advance_slot(server: &Server, name: &str) -> Result<(String, String), PgError> {
    let row = server
        .query_one(
            "advance the reverse slot",
            "SELECT a.end_lsn::text, pg_size_pretty(a.end_lsn - s.restart_lsn)
               FROM pg_replication_slots s, pg_replication_slot_advance($1, pg_current_wal_lsn()) a
              WHERE s.slot_name = $1",
            &[&name],
        )
        .await?;
    let (lsn, decoded): (String, String) = (row.get(0), row.get(1));
    let text = format!("{lsn} (restart point {decoded} behind)");
    Ok((lsn, text))
}

/// The reverse subscription's replication origin on the source, moved to `lsn`: what the
/// source asks the target's slot to start from. A slot advanced by
/// `pg_replication_slot_advance` is written to disk only at the target's next checkpoint, so
/// a crash of the target right after the cutover brings it back before `lsn`, and the
/// source would apply again what it has (a duplicate key, every 5 s, and no way back). The
/// origin's position is WAL-logged on the source at once, and the target's walsender skips
/// every transaction that committed before the position the subscriber asks for. (A
/// `CHECKPOINT` on the target would also do, at the price of a checkpoint inside the pause.)
async fn start_origin_at(source: &Server, subscription: &str, lsn: &str) -> Result<(), PgError> {
    let Some(oid) = replication::subscription_oid(source, subscription).await? else {
        return Err(PgError::Tool(format!(
            "the reverse subscription {subscription} is missing on the source"
        )));
    };
    source
        .query_one(
            "advance the reverse subscription's origin",
            ADVANCE_ORIGIN,
            &[&format!("pg_{oid}"), &lsn],
        )
        .await?;
    Ok(())
}

/// The server's clock plus a number of milliseconds, as a timestamptz in text.
const SERVER_DEADLINE: &str =
    "SELECT (clock_timestamp() + $1::float8 * interval '1 millisecond')::text";

/// A subscription's replication origin is named `pg_<its oid>`; the subscription is disabled,
/// so the origin is not in use.
const ADVANCE_ORIGIN: &str = "SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)";

/// Which of a subscription's workers a wait is about.
#[derive(Clone, Copy)]
enum Workers {
    /// Its apply worker has started.
    ApplyRunning,
    /// All its workers (apply and table sync) have exited.
    AllGone,
}

/// Waits until the subscription `name` on `server` is as `until` says, or `timeout`.
async fn wait_workers(
    server: &Server,
    name: &str,
    until: Workers,
    timeout: Duration,
) -> Result<(), PgError> {
    let (which, wanted, poll, failure) = match until {
        Workers::ApplyRunning => ("AND relid IS NULL", true, 20, "did not start"),
        Workers::AllGone => ("", false, 2, "did not exit"),
    };
    let query = format!(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_subscription WHERE subname = $1 AND pid IS NOT NULL {which})"
    );
    let started = Instant::now();
    loop {
        let running: bool = server
            .query_one("look for the subscription's workers", &query, &[&name])
            .await?
            .get(0);
        if running == wanted {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(PgError::Tool(format!(
                "the workers of {name} on the {} {failure} within {timeout:?}",
                server.side
            )));
        }
        tokio::time::sleep(Duration::from_millis(poll)).await;
    }
}

/// The reverse subscription on the source, its slot and publication on the target.
pub(super) async fn drop_reverse(
    source: &Server,
    target: &Server,
    name: &str,
) -> Result<(), PgError> {
    replication::drop_subscription(source, name).await?;
    replication::drop_slots(target, name, None).await?;
    replication::drop_publication(target, name).await?;
    Ok(())
}

/// What `finalize` did.
#[derive(Debug, Default)]
pub struct Finalized {
    /// One line per step, for the operator.
    pub done: Vec<String>,
    /// The source keeps its write grants revoked (finalize without `--unfence`).
    pub source_fenced: bool,
    /// An earlier finalize had finished it all: this run changed nothing.
    pub already_finished: bool,
}

/// `switchyard finalize`: drops the reverse replication and what is left of the forward one,
/// gives the target its table-copy setting back, and forgets the source's fence (giving the
/// grants back with `unfence`). Every step is idempotent, so a finalize that stopped half-way
/// is carried on by the next one instead of blocking it.
pub async fn finalize(plan: &Plan, store: &dyn StateStore, unfence: bool) -> Result<Finalized> {
    let _lock = store.lock("finalize")?;
    let mut state = state::load_or_new(store, &plan.name.0)?;
    if state.phase == Phase::Finished {
        return Ok(Finalized {
            already_finished: true,
            ..Finalized::default()
        });
    }
    let other_unfinished = state.interrupted_step().filter(|s| *s != "finalize");
    if state.phase != Phase::Switched || other_unfinished.is_some() {
        return Err(Error::Refused(format!(
            "the migration is {}{}: finalize follows a finished cutover",
            state.phase,
            other_unfinished
                .map(|s| format!(" with `{s}` unfinished (run it again first)"))
                .unwrap_or_default()
        )));
    }
    state.note("begin finalize");
    store.save(&state)?;
    let (source, target) = tokio::join!(
        Server::connect(Side::Source, &plan.source),
        Server::connect(Side::Target, &plan.target)
    );
    let (source, target) = (source?, target?);
    finalize_steps(plan, store, &mut state, &source, &target, unfence)
        .await
        .map_err(|e| {
            e.halfway("run `switchyard finalize` again (with the same --unfence choice): it carries on where this run stopped")
        })
}

/// The work of `finalize`, each step recorded as soon as it is done.
async fn finalize_steps(
    plan: &Plan,
    store: &dyn StateStore,
    state: &mut State,
    source: &Server,
    target: &Server,
    unfence: bool,
) -> Result<Finalized> {
    let mut report = Finalized::default();
    let reverse = reverse_name(plan);
    drop_reverse(source, target, &reverse).await?;
    state.created.reverse = None;
    store.save(state)?;
    report
        .done
        .push(format!("dropped the reverse replication {reverse}"));
    let forward = plan.replication_name();
    replication::drop_slots(source, &forward, None).await?;
    if replication::drop_publication(source, &forward).await? {
        report
            .done
            .push(format!("dropped the publication {forward} on the source"));
    }
    state.created.publication = None;
    store.save(state)?;
    if let Some(original) = state.created.original_sync_workers.clone() {
        super::abort::restore_copy_workers(target, &state.created).await?;
        state.created.original_sync_workers = None;
        store.save(state)?;
        report.done.push(format!(
            "set the target's max_sync_workers_per_subscription back to {original}"
        ));
    }
    // Last, so that a run stopped before it still finds the fence recorded.
    if let Some(fence) = state.fence(Side::Source).cloned() {
        if unfence {
            fence::restore(source, &fence.grants).await?;
            report.done.push(format!(
                "gave the source its {} write grants back",
                fence.grants.len()
            ));
        } else {
            report.source_fenced = true;
            report.done.push(format!("the source stays fenced: no role but the coordinator's can write the migrated tables ({} revoked grants are forgotten now; GRANT them by hand if the source must take writes again)", fence.grants.len()));
        }
    }
    state.fences.clear();
    state.created = Default::default();
    state.set_phase(Phase::Finished);
    state.note("done finalize");
    store.save(state)?;
    Ok(report)
}

#[cfg(test)]
mod pause_tests {
    use super::*;

    fn clock(elapsed: Duration, fenced_at: Option<Duration>, cancelled: usize) -> PauseClock {
        let max_pause = Duration::from_secs(10);
        PauseClock {
            started: Instant::now() - elapsed,
            budget: PauseClock::budget(max_pause),
            max_pause,
            server_deadline: String::new(),
            fenced_at,
            cancelled,
        }
    }

    #[test]
    fn a_step_must_begin_within_the_pause_budget() {
        assert!(clock(Duration::from_secs(1), None, 0)
            .check("fence the source")
            .is_ok());
        let late = clock(Duration::from_secs(9), None, 0).check("fence the source");
        assert!(
            matches!(&late, Err(Error::Refused(m)) if m.contains("fence the source") && m.contains("budget")),
            "{late:?}"
        );
    }

    #[test]
    fn the_report_says_what_the_applications_saw() {
        let quick = clock(Duration::from_secs(1), Some(Duration::from_millis(30)), 0);
        assert_eq!(
            quick.seen_by_applications(Side::Source),
            "they saw only a pause"
        );
        // Frozen past max_pause after the fence: writes failed until the grants came back.
        let frozen = clock(Duration::from_secs(13), Some(Duration::from_millis(300)), 0);
        let seen = frozen.seen_by_applications(Side::Source);
        assert!(seen.contains("42501") && seen.contains("source"), "{seen}");
        // Frozen past max_pause before the fence: nothing was fenced, only the pause.
        let unfenced = clock(Duration::from_secs(13), None, 0);
        assert_eq!(
            unfenced.seen_by_applications(Side::Source),
            "they saw only a pause"
        );
        let cancelled = clock(Duration::from_secs(1), None, 2);
        assert!(cancelled
            .seen_by_applications(Side::Source)
            .contains("2 transactions"));
    }
}
