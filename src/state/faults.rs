//! Deterministic crash points, for the crash tests: with `SWITCHYARD_FAULTS=on` and
//! `SWITCHYARD_CRASH_AFTER="fence the source"`, the process kills itself (SIGKILL: no
//! destructor, no flush, as a power cut or the OOM killer would) right after the state store
//! saved a log entry that begins with that text. Every step of `sync`, `cutover`, `rollback`
//! and `finalize` is recorded in the log before and after it runs, so each is a crash point,
//! and a test stops depending on when it sends a signal. `SWITCHYARD_STOP_AFTER` stops the
//! process instead (SIGSTOP: frozen, as in a long GC pause or a suspended VM) until a
//! SIGCONT.
//!
//! Refused unless asked for twice: `SWITCHYARD_CRASH_AFTER` without `SWITCHYARD_FAULTS=on` is
//! an error at start ([`check`]), so a stray variable in an operator's shell cannot make a
//! cutover die half-way.

use super::LogEntry;

const ENABLE: &str = "SWITCHYARD_FAULTS";
const CRASH_AFTER: &str = "SWITCHYARD_CRASH_AFTER";
const STOP_AFTER: &str = "SWITCHYARD_STOP_AFTER";

/// Called once at start: a crash point that is set but not enabled is refused.
pub fn check() -> Result<(), String> {
    let enabled = std::env::var(ENABLE).as_deref() == Ok("on");
    for variable in [CRASH_AFTER, STOP_AFTER] {
        match std::env::var(variable) {
            Ok(point) if enabled => tracing::warn!(
                point,
                "fault injection is on: this process {} after that step",
                if variable == CRASH_AFTER { "kills" } else { "stops" }
            ),
            Ok(_) => {
                return Err(format!(
                    "{variable} is set but {ENABLE} is not \"on\": crash points are for tests only; unset {variable}"
                ))
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// After a save: dies (or stops) if one of the entries it added is the crash point.
pub(super) fn after_save(added: &[LogEntry]) {
    if std::env::var(ENABLE).as_deref() != Ok("on") {
        return;
    }
    for (variable, signal) in [(CRASH_AFTER, libc::SIGKILL), (STOP_AFTER, libc::SIGSTOP)] {
        let Ok(point) = std::env::var(variable) else {
            continue;
        };
        if !point.is_empty()
            && added
                .iter()
                .any(|entry| entry.event.to_string().starts_with(&point))
        {
            tracing::warn!(point, "crash point reached: signalling this process");
            // SAFETY: signalling this process itself.
            unsafe { libc::kill(libc::getpid(), signal) };
        }
    }
}
