//! The cutover and the rollback: one runner, two directions (see the module comment of
//! `cutover`).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;

use super::gates::{self, Gates};
use super::proxies::{self, ProxyAdmin};
use super::{fence, reset_timeouts, reverse_name, set_pause_timeouts, set_subscription_commit};
use super::{CutoverError, Direction, Step, Steps};
use crate::pg::catalog::{self, Selection};
use crate::pg::{PgError, Server, Side};
use crate::plan::{OnDrainTimeout, Plan};
use crate::replication;
use crate::state::{self, Event, Fence, LockGuard, Phase, State, StateStore, Switch};
use crate::sync::sequences;
use crate::{Error, Result};

mod finalize;
mod pause_clock;
mod pausing;
mod proxy_calls;
mod recovery;
mod server_steps;

pub use finalize::{finalize, Finalized};
use pause_clock::PauseClock;
use proxy_calls::*;
use server_steps::*;

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
    /// An undo the state store could not record (it did not answer).
    unrecorded: Option<String>,
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
    let proxies = proxies::from_plan(plan)
        .map_err(CutoverError::Proxy)?
        .into_iter()
        .map(|proxy| proxy.fenced_by(lock.generation()))
        .collect();
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
        unrecorded: None,
    };
    if dry_run {
        // A dry run changes nothing, not even to finish or undo an earlier run.
        if let Some(earlier) = checked.state.recovery().switch() {
            return Err(CutoverError::InterruptedBeforeDryRun(earlier).into());
        }
    } else {
        checked.recover().await?;
    }
    // Run again after it finished (its "done" recorded, the answer lost with its terminal,
    // say): nothing to do, as for an interrupted run that is finished now. Not "run sync".
    if !checked.finished_earlier
        && checked.state.phase == direction.committed_phase()
        && checked.state.recovery() == state::Recovery::Nothing
    {
        checked.finished_earlier = true;
        checked.recovered = Some(format!(
            "the {} was finished by an earlier run (the applications are on the {}, switch epoch {}): nothing to do",
            direction.name(),
            direction.to(),
            checked.state.backend.epoch
        ));
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
        Err(CutoverError::WrongPhase {
            phase,
            direction: self.direction,
        }
        .into())
    }

    fn save(&mut self, event: Event) -> Result<()> {
        self.state.note(event);
        self.store.save(&mut self.state)?;
        Ok(())
    }

    fn server(&self, side: Side) -> &Server {
        match side {
            Side::Source => &self.source,
            Side::Target => &self.target,
        }
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
            return Err(CutoverError::GatesNotMet {
                direction,
                failures,
            }
            .into());
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
        self.save(Event::Begin(state::Step::Switch(direction)))?;
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
        // The commit point: from here on the switch is finished, never undone. (The phase
        // check before the run makes this move one the table allows.)
        if let Err(e) = self.state.set_phase(direction.committed_phase()) {
            let error = self.give_up(steps, e.into()).await;
            report.pause_coordinator_ms = Some(paused_at.elapsed().as_secs_f64() * 1000.0);
            return Err(error);
        }
        self.state.backend = Switch {
            backend: direction.to(),
            epoch: self.state.backend.epoch + 1,
        };
        let epoch = self.state.backend.epoch;
        let (state, store) = (&mut self.state, self.store);
        steps
            .run_now(&format!("record the switch in the state (epoch {epoch})"), || {
                state.note(Event::Switch {
                    to: direction.to(),
                    epoch,
                });
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
        self.save(Event::Done(state::Step::Switch(direction)))?;
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
            self.save(Event::ReverseRecorded)?;
            let tables =
                replication::published_tables(&self.source, &self.plan.replication_name()).await?;
            let (target, target_endpoint) = (&self.target, &self.plan.target);
            // Both wait for others, bounded so that a long transaction there fails the
            // cutover with a reason instead of hanging it. The publication waits for a lock
            // on each table, and while it waits in the lock queue it holds up the writers
            // behind it: 5 s. The slot waits for every transaction that has written, in any
            // database of the target's cluster, to end (a logical slot needs a consistent
            // start), and holds no lock anyone else waits for: it may wait the whole minute.
            // Outside the pause, the applications see neither.
            target
                .execute(
                    "bound the preparation",
                    "SET lock_timeout = '5s'; SET statement_timeout = '60s'",
                )
                .await?;
            steps
                .run("create the reverse publication and slot on the target", async {
                    replication::create_reverse_publication(target, &name, &tables).await?;
                    target
                        .execute("let the slot wait", "SET lock_timeout = '60s'")
                        .await?;
                    let creating = replication::create_slot(target, &name);
                    let lsn = crate::pg::slot_wait::report_while(Side::Target, target_endpoint, creating).await.map_err(|e| {
                        PgError::Tool(format!("{e} (creating a slot waits until every transaction that has written, in any database of the target's cluster, has ended: look for long ones with a backend_xid in pg_stat_activity there)"))
                    })?;
                    target
                        .execute("bound the preparation", "SET lock_timeout = '5s'")
                        .await?;
                    Ok::<_, PgError>(((), format!("{name} at {lsn}")))
                })
                .await?;
            let (source, conninfo) = (&self.source, crate::pg::peer_conninfo(&self.plan.target));
            steps
                .run(
                    "create the source's subscription to the target, disabled",
                    async {
                        replication::create_reverse_subscription(source, &name, &conninfo).await?;
                        Ok::<_, PgError>(((), format!("{name}, copy_data = false")))
                    },
                )
                .await?;
        }
        if self.plan.proxy.cache.is_some() {
            // The proxies' read cache moves to the new primary at the switch: its slot there
            // must exist before the commit point, so that every write after it is seen. Made
            // here, outside the pause (creating a slot waits for open transactions).
            let (plan, to) = (self.plan, direction.to());
            steps
                .run(
                    &format!(
                        "create the read cache's publication, slot and event trigger on the {to}"
                    ),
                    async {
                        crate::cache_setup::setup(plan, to)
                            .await
                            .map(|report| ((), report.done.join("; ")))
                            .map_err(|e| PgError::Tool(e.to_string()))
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
            replication::advance_slot(&self.target, &reverse_name(self.plan)).await?;
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
            state.note(Event::Fence(from));
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
                let cache_role = self.plan.proxy.cache.as_ref().map(|c| c.replication_user.as_str());
                let ended =
                    fence::end_sessions(server, &proxy_pids, cache_role, &deadline, timeout).await?;
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

    /// Stops the forward stream, skips the reverse slot past what it wrote on the target, and
    /// subscribes the source to the target.
    async fn turn_around(&mut self, steps: &mut Steps<'_>) -> Result<()> {
        let forward = self.plan.replication_name();
        let reverse = reverse_name(self.plan);
        let (source, target) = (&self.source, &self.target);
        steps
            .run("disable the forward subscription", async {
                replication::set_enabled(target, &forward, false).await?;
                wait_workers(target, &forward, Workers::AllGone, Duration::from_secs(5)).await?;
                Ok::<_, PgError>(((), "its worker exited".to_string()))
            })
            .await?;
        let lsn = steps
            .run(
                "advance the reverse slot to the target's current WAL",
                async {
                    let (lsn, text) = replication::advance_slot(target, &reverse).await?;
                    Ok::<_, PgError>((lsn, text))
                },
            )
            .await?;
        steps
            .run(
                "record where the reverse replication starts, on the source",
                async {
                    replication::start_origin_at(source, &reverse, &lsn).await?;
                    Ok::<_, PgError>(((), format!("{reverse} from {lsn}")))
                },
            )
            .await?;
        steps
            .run("start the source's subscription to the target", async {
                replication::set_enabled(source, &reverse, true).await?;
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
            .map_err(CutoverError::Proxy)?;
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
            self.save(Event::Unfence(to.backend))?;
        }
        let pause_ms = steps
            .run("resume the proxies", resume_all(&self.proxies))
            .await
            .map_err(CutoverError::Proxy)?;
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
                        replication::drop_reverse(source, target, &name).await?;
                        Ok::<_, PgError>(((), name.clone()))
                    })
                    .await?;
                self.state.created.reverse = None;
            }
        }
        if self.plan.proxy.cache.is_some() {
            // The old primary's cache slot would only retain WAL there; a rollback makes it
            // again. Not fatal: the cache no longer reads it.
            let from = direction.from();
            match crate::cache_setup::drop(self.plan, from).await {
                Ok(done) => tracing::info!("read cache on the {from}: {}", done.join("; ")),
                Err(e) => tracing::warn!(
                    "could not drop the read cache's slot on the {from} ({e}): run `switchyard cache drop` once the migration is over"
                ),
            }
        }
        self.store.save(&mut self.state)?;
        Ok(())
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
