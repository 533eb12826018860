//! Finishing or undoing a switch that an earlier run left half-way, and undoing one that
//! failed before its commit point.

use super::*;

impl Checked<'_> {
    /// An earlier run of a cutover or rollback that did not finish: past its commit point it
    /// is finished (proxies switched and resumed), before it undone.
    pub(super) async fn recover(&mut self) -> Result<()> {
        let (earlier, committed) = match self.state.recovery() {
            state::Recovery::FinishSwitch(earlier) => (earlier, true),
            state::Recovery::UndoSwitch(earlier) => (earlier, false),
            _ => return Ok(()),
        };
        let step = earlier.name();
        let mut quiet = |_: &Step| {};
        let mut steps = Steps::new(&mut quiet);
        if committed {
            self.finish(earlier, &mut steps).await?;
            self.save(Event::Done(state::Step::Switch(earlier)))?;
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
            self.save(Event::Undone(
                state::Step::Switch(earlier),
                state::Undone::AfterInterruption,
            ))?;
            self.recovered = Some(format!(
                "an earlier {step} was interrupted before its switch: it was undone (grants back, proxies resumed on the {})",
                earlier.from()
            ));
        }
        Ok(())
    }

    /// A switch recorded (epoch saved) but not finished: switch and resume every proxy, then
    /// clean up.
    pub(super) async fn finish(
        &mut self,
        direction: Direction,
        steps: &mut Steps<'_>,
    ) -> Result<()> {
        set_pause_timeouts(&self.source, self.plan).await?;
        set_pause_timeouts(&self.target, self.plan).await?;
        // The proxies resumed by themselves on the old primary: pause them again, so no
        // transaction is half-way there when they switch. (One that does not finish meets the
        // fence, never the other server.)
        let drain = self.plan.cutover.drain_timeout.0;
        steps
            .run("pause the proxies", pause_all(&self.proxies, drain))
            .await
            .map_err(CutoverError::Proxy)?;
        self.switch_and_resume(steps).await?;
        self.after(direction, steps).await
    }

    /// Undoes a switch that did not reach its commit point. Each step runs even when an
    /// earlier one failed; returns what could not be undone.
    pub(super) async fn undo(
        &mut self,
        direction: Direction,
        steps: &mut Steps<'_>,
    ) -> Vec<String> {
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
                    if let Err(e) = self.save(Event::Unfence(from)) {
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
                    replication::drop_reverse(source, target, &name).await?;
                    replication::set_enabled(target, &feeding, true).await?;
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
        match self.store.save(&mut self.state) {
            Ok(()) => {}
            // The store does not answer: everything was undone where it matters (servers,
            // proxies); only its record is missing, and the next run, finding the switch
            // begun and never done, undoes it again (each undo step finds what is left).
            Err(e @ state::StateError::Store { .. }) => {
                tracing::warn!("the undo is done but not recorded: {e}");
                self.unrecorded = Some(e.to_string());
            }
            Err(e) => problems.push(e.to_string()),
        }
        problems
    }

    /// Connections lost in a failed step are opened again, so the undo can run.
    pub(super) async fn reconnect_closed(&mut self) -> Result<(), PgError> {
        if self.source.client.is_closed() {
            self.source = Server::connect(Side::Source, &self.plan.source).await?;
        }
        if self.target.client.is_closed() {
            self.target = Server::connect(Side::Target, &self.plan.target).await?;
        }
        Ok(())
    }

    /// Undoes after `cause` and says how it went: exit 1 when everything is back, 3 when not.
    pub(super) async fn give_up(&mut self, steps: &mut Steps<'_>, cause: Error) -> Error {
        let direction = self.direction;
        let problems = self.undo(direction, steps).await;
        if problems.is_empty() {
            if self.unrecorded.is_none() {
                let _ = self.save(Event::Undone(
                    state::Step::Switch(direction),
                    state::Undone::AfterFailure,
                ));
            }
            let mut seen = self.pause.as_ref().map_or_else(
                || "they saw nothing of it".to_string(),
                |clock| clock.seen_by_applications(direction.from()),
            );
            if let Some(unrecorded) = &self.unrecorded {
                seen.push_str(&format!(
                    "
the state store could not record the undo ({unrecorded}): the next `switchyard {}` records it before anything else",
                    direction.name()
                ));
            }
            CutoverError::Undone {
                direction,
                from: direction.from(),
                cause: Box::new(cause),
                seen,
            }
            .into()
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
