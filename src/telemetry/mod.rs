//! Telemetry: structured logs through `tracing` (human-readable, coloured only on a terminal, JSON with
//! CRM_ANALYTICS_LOG_FORMAT=json; RUST_LOG filters, default info) and Prometheus metrics,
//! kept apart from the pipeline's logic; the metrics listener of processes without the API.

pub mod metrics;
pub mod server;

use std::io::IsTerminal;
use tracing_subscriber::{fmt, EnvFilter};

pub fn init_logging() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=error"));
    let json =
        std::env::var("CRM_ANALYTICS_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colour codes only on a terminal: in a file or a pipe they are noise.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().try_init()
    };
}
