//! The pause's time budget, and what the applications saw of an undone switch.

use super::*;

/// The pause as the coordinator keeps time of it. The proxies end a pause by themselves at
/// `max_pause`, whatever the coordinator does: a coordinator that stalled (frozen, swapped
/// out, a slow step) must then not fence a server the applications are using again. Every
/// step that needs the pause checks the clock first, and the fence checks the old primary's
/// own clock in the same statement as its REVOKE, so that a stall between the check and the
/// statement cannot slip through either.
pub(super) struct PauseClock {
    /// Taken before the first pause request: earlier than any proxy's own start.
    pub(super) started: Instant,
    /// The budget: `max_pause` less a margin for the step under way and the undo.
    pub(super) budget: Duration,
    pub(super) max_pause: Duration,
    /// `started + budget` on the old primary's clock (a timestamptz, as text).
    pub(super) server_deadline: String,
    /// When the fence took hold (since `started`).
    pub(super) fenced_at: Option<Duration>,
    /// Transactions that did not finish within `drain_timeout` and were ended: their clients
    /// got an error, not a pause.
    pub(super) cancelled: usize,
}

impl PauseClock {
    /// The margin kept from `max_pause`: a fifth of it, so a step that begins in time ends
    /// before the proxies resume by themselves.
    pub(super) fn budget(max_pause: Duration) -> Duration {
        max_pause - max_pause / 5
    }

    /// An error if the pause has used its budget: the step `what` must not begin.
    pub(super) fn check(&self, what: &str) -> Result<()> {
        let elapsed = self.started.elapsed();
        if elapsed < self.budget {
            return Ok(());
        }
        Err(CutoverError::PauseBudget {
            step: what.to_string(),
            elapsed,
            budget: self.budget,
            max_pause: self.max_pause,
        }
        .into())
    }

    /// What the applications saw of an undone switch.
    pub(super) fn seen_by_applications(&self, from: Side) -> String {
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
            matches!(&late, Err(e @ Error::Cutover(CutoverError::PauseBudget { .. })) if e.to_string().contains("fence the source") && e.to_string().contains("budget")),
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
