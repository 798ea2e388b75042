//! Logs: JSON lines when stderr is not a terminal (Loki-friendly), human text when it is.
//!
//! The supervisor's own `tracing` subscriber, about a hundred lines: it logs from one crate, without spans,
//! so `tracing-subscriber`'s layers, filters and formatters would cost every pod code, memory and start-up
//! time for nothing. A JSON line is one object: `timestamp` (RFC 3339, UTC), `level`, `message`, then the
//! event's fields in order. Every field keeps its type: integers are numbers, booleans booleans, and a field
//! logged as JSON text (a list such as the command, the step counts) is nested as that array or object
//! ([`quiesce_protocol::log::json_text`]), never a string of escaped JSON or Rust debug output.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};

use quiesce_protocol::log::Fields;
use serde_json::Value;
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata};

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: LevelFilter) {
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let _ = tracing::subscriber::set_global_default(Lines { json, level });
}

/// The subscriber: every enabled event becomes one line on stderr.
struct Lines {
    json: bool,
    level: LevelFilter,
}

impl tracing::Subscriber for Lines {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        *meta.level() <= self.level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.level)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let fields = Line::of(event);
        let level = event.metadata().level().as_str();
        let line = if self.json {
            fields.json_line(level)
        } else {
            fields.human_line(level)
        };
        say(&line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// One event's message and fields, typed ([`quiesce_protocol::log::Fields`]).
struct Line {
    message: String,
    fields: Vec<(&'static str, Value)>,
}

impl Line {
    fn of(event: &Event<'_>) -> Line {
        let mut f = Fields::default();
        event.record(&mut f);
        Line {
            message: f.take_message(),
            fields: f.0,
        }
    }

    /// `timestamp`, `level` and `message` first, then the fields in the order they were given.
    fn json_line(self, level: &str) -> String {
        let mut all = vec![
            ("timestamp", Value::String(timestamp())),
            ("level", Value::String(level.to_uppercase())),
            ("message", Value::String(self.message)),
        ];
        all.extend(self.fields);
        Fields(all).to_json_object()
    }

    fn human_line(self, level: &str) -> String {
        let mut out = format!(
            "{} {:>5} {}",
            timestamp(),
            level.to_uppercase(),
            self.message
        );
        for (k, v) in self.fields {
            match v {
                Value::String(s) => {
                    let _ = write!(out, " {k}={s}");
                }
                v => {
                    let _ = write!(out, " {k}={v}");
                }
            }
        }
        out
    }
}

/// Now as RFC 3339 in UTC with microseconds, e.g. `2026-12-02T06:45:44.520482Z`.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_micros())
}

fn rfc3339(secs: u64, micros: u32) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// One line on stderr; ignored if stderr is gone (never panics, unlike `eprintln!`): PID 1 must outlive a
/// closed log pipe, such as a restarting log collector.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(
            rfc3339(1_796_193_944, 520_482),
            "2026-12-02T06:45:44.520482Z"
        );
    }

    #[test]
    fn fields_keep_their_types_and_lists_nest() {
        let line = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        struct Capture(std::sync::Arc<std::sync::Mutex<String>>);
        impl tracing::Subscriber for Capture {
            fn enabled(&self, _: &Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &Attributes<'_>) -> Id {
                Id::from_u64(1)
            }
            fn record(&self, _: &Id, _: &Record<'_>) {}
            fn record_follows_from(&self, _: &Id, _: &Id) {}
            fn event(&self, e: &Event<'_>) {
                *self.0.lock().unwrap() = Line::of(e).json_line("info");
            }
            fn enter(&self, _: &Id) {}
            fn exit(&self, _: &Id) {}
        }
        tracing::subscriber::with_default(Capture(line.clone()), || {
            let argv = ["sh".to_string(), "-c".into(), "exit 0".into()];
            tracing::info!(pid = 7, ok = true, command = %quiesce_protocol::log::json_text(&argv), why = "[not json", "child started");
        });
        let v: Value = serde_json::from_str(&line.lock().unwrap()).expect("one JSON object");
        assert_eq!(v["message"], "child started");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["pid"], 7);
        assert_eq!(v["ok"], true);
        assert_eq!(v["command"], serde_json::json!(["sh", "-c", "exit 0"]));
        assert_eq!(v["why"], "[not json");
    }
}
