//! Deterministic crash points, for the crash tests: with `SWITCHYARD_FAULTS=on` and
//! `SWITCHYARD_CRASH_AFTER="fence the source"`, the process kills itself (SIGKILL: no
//! destructor, no flush, as a power cut or the OOM killer would) right after the state store
//! saved a log entry that begins with that text. Every step of `sync`, `cutover`, `rollback`
//! and `finalize` is recorded in the log before and after it runs, so each is a crash point,
//! and a test stops depending on when it sends a signal.
//!
//! Refused unless asked for twice: `SWITCHYARD_CRASH_AFTER` without `SWITCHYARD_FAULTS=on` is
//! an error at start ([`check`]), so a stray variable in an operator's shell cannot make a
//! cutover die half-way.

use super::LogEntry;

const ENABLE: &str = "SWITCHYARD_FAULTS";
const CRASH_AFTER: &str = "SWITCHYARD_CRASH_AFTER";

/// Called once at start: a crash point that is set but not enabled is refused.
pub fn check() -> Result<(), String> {
    match (std::env::var(CRASH_AFTER), std::env::var(ENABLE)) {
        (Ok(point), Ok(on)) if on == "on" => {
            tracing::warn!(
                point,
                "fault injection is on: this process kills itself after that step"
            );
            Ok(())
        }
        (Ok(_), _) => Err(format!(
            "{CRASH_AFTER} is set but {ENABLE} is not \"on\": crash points are for tests only; unset {CRASH_AFTER}"
        )),
        (Err(_), _) => Ok(()),
    }
}

/// After a save: dies if one of the entries it added is the crash point.
pub(super) fn after_save(added: &[LogEntry]) {
    let Ok(point) = std::env::var(CRASH_AFTER) else {
        return;
    };
    if std::env::var(ENABLE).as_deref() != Ok("on") || point.is_empty() {
        return;
    }
    if added
        .iter()
        .any(|entry| entry.event.to_string().starts_with(&point))
    {
        tracing::warn!(point, "crash point reached: killing this process");
        // SAFETY: signalling this process itself.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
