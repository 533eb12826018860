//! `switchyard shadow`: the proxies' shadow-read windows gathered into one report.
pub mod html;

pub use html::render_html;

use crate::admin_api::shadow::Report;
use crate::plan::Plan;
use crate::Error;

/// Every proxy's window, merged and judged by the plan's thresholds
/// ([`crate::cutover::proxies::gather_shadow`], which the cutover's gate reads too); `reset`
/// starts a new window on every proxy.
pub async fn gather(plan: &Plan, reset: bool) -> Result<Report, Error> {
    crate::cutover::proxies::gather_shadow(plan, reset)
        .await
        .map_err(Error::Refused)
}
