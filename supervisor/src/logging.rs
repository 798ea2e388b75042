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
        .with_writer(|| Stderr)
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

/// stderr that never fails: PID 1 must outlive a closed log pipe (a restarting log collector), so a
/// write error drops the line instead of reaching tracing's `eprintln!`, which would panic.
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One line on stderr for the supervisor's own failures; ignored if stderr is gone (never panics,
/// unlike `eprintln!`).
pub fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}
