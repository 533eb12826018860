//! `switchyard shadow`: the proxies' shadow-read windows gathered into one report.
pub mod html;

pub use html::render_html;
mod gather;
pub use gather::gather;
