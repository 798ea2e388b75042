//! Logs: JSON lines when stderr is not a terminal (Loki-friendly), human text when it is.
//!
//! A plain level filter, not `EnvFilter`: the supervisor logs from one crate, and a regex engine would cost
//! every pod memory and start-up time for nothing.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: LevelFilter) {
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}
