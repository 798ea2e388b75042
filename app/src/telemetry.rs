//! Logging: `tracing` to stderr, JSON lines when stderr is not a terminal (containers, Loki)
//! and human text on a terminal; `RUST_LOG` filters (default `info`).
//!
//! A JSON line is one object: `timestamp`, `level`, `message`, the event's fields at the top
//! level, `target`. Every field keeps its type: integers and floats are JSON numbers, booleans
//! are booleans, and a field whose text is a JSON object or array (the agent's `counts`, a list
//! of budgets, the exit summary's `steps`) is written as that object or array, not as a string
//! of escaped JSON. `tracing` fields cannot hold a map or a list themselves, so the code that logs
//! one records it as JSON text (`counts = %json`) and this formatter nests it.

use std::fmt;
use std::io::IsTerminal;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.event_format(JsonLine).try_init()
    } else {
        builder.try_init()
    };
}

/// The JSON line format described in the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str(&json_line(event))?;
        writer.write_char('\n')
    }
}

/// One event as a JSON object, fields in the order they were given.
fn json_line(event: &Event<'_>) -> String {
    let meta = event.metadata();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut fields = Fields(vec![
        ("timestamp", Value::String(now)),
        ("level", Value::String(meta.level().as_str().to_owned())),
    ]);
    event.record(&mut fields);
    fields
        .0
        .push(("target", Value::String(meta.target().to_owned())));
    let mut line = String::from("{");
    for (i, (name, value)) in fields.0.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&Value::String((*name).to_owned()).to_string());
        line.push(':');
        line.push_str(&value.to_string());
    }
    line.push('}');
    line
}

/// The fields of one event, typed.
struct Fields(Vec<(&'static str, Value)>);

impl Fields {
    fn push(&mut self, field: &Field, value: Value) {
        self.0.push((field.name(), value));
    }

    fn text(&mut self, field: &Field, text: String) {
        let value = if field.name() == "message" {
            Value::String(text)
        } else {
            nested(text)
        };
        self.push(field, value);
    }
}

/// `text` as the JSON object or array it spells, or else as a string.
fn nested(text: String) -> Value {
    if (text.starts_with('{') || text.starts_with('['))
        && let Ok(v @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str(&text)
    {
        return v;
    }
    Value::String(text)
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value.to_owned());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.push(field, Value::String(value.to_string()));
    }

    // `%x` (Display) fields and the message arrive here.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text(field, format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn fields_keep_their_types_and_json_text_is_nested() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let counts = r#"{"in_flight":0}"#;
            tracing::info!(
                step = 3u8,
                local = true,
                counts = %counts,
                budgets = "[1000,7000]",
                note = "[not json",
                "sub-step finished"
            );
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim_end()).expect("one JSON line");
        assert_eq!(v["message"], "sub-step finished");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["step"], 3);
        assert_eq!(v["local"], true);
        assert_eq!(v["counts"]["in_flight"], 0);
        assert_eq!(v["budgets"], serde_json::json!([1000, 7000]));
        assert_eq!(v["note"], "[not json");
        assert!(v["timestamp"].is_string() && v["target"].is_string(), "{v}");
    }
}
