//! Pausing the proxies and keeping the pause within its budget.

use super::*;

impl Checked<'_> {
    /// [`PauseClock::check`] of the pause under way.
    pub(super) fn pause_check(&self, what: &str) -> Result<()> {
        self.pause
            .as_ref()
            .map_or(Ok(()), |clock| clock.check(what))
    }

    /// The pause's deadline on the old primary's clock.
    pub(super) fn server_deadline(&self) -> String {
        self.pause.as_ref().map_or_else(
            || "-infinity".to_string(),
            |clock| clock.server_deadline.clone(),
        )
    }

    pub(super) async fn still_paused(&mut self, steps: &mut Steps<'_>) -> Result<()> {
        let proxies = &self.proxies;
        steps
            .run("check the proxies are still paused", async {
                let answers =
                    join_all(proxies.iter().map(|p| p.status(Duration::from_secs(2)))).await;
                let answers = first_error(answers)?;
                if let Some((proxy, _)) = proxies
                    .iter()
                    .zip(&answers)
                    .find(|(_, a)| !a.paused)
                {
                    return Err(format!(
                        "proxy {} is no longer paused (its max_pause ran out): raise [proxy] max_pause",
                        proxy.address
                    ));
                }
                Ok(((), format!("{} proxies", proxies.len())))
            })
            .await
            .map_err(|e| CutoverError::Proxy(e).into())
    }

    /// Pauses every proxy and waits for their transactions to finish, ending them when
    /// `on_drain_timeout = "cancel"`. Returns the backend pids of the proxies' server
    /// connections to the old primary: the fence spares them.
    pub(super) async fn pause(&mut self, steps: &mut Steps<'_>) -> Result<Vec<i32>> {
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
            .map_err(CutoverError::Proxy)?;
        let proxy_pids = drained.server_pids(from);
        if drained.idle {
            return Ok(proxy_pids);
        }
        let running = drained.running;
        // Each as the proxy listed it, in JSON.
        let listed: Vec<String> = running
            .iter()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
            .collect();
        if self.plan.cutover.on_drain_timeout == OnDrainTimeout::Abort {
            return Err(CutoverError::StillRunning {
                drain,
                running: listed,
            }
            .into());
        }
        let pids: Vec<i32> = running.iter().map(|r| r.server_pid).collect();
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
}
