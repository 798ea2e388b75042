//! Logging: `tracing` to stderr, JSON lines when stderr is not a terminal (containers, Loki)
//! and human text on a terminal; `RUST_LOG` filters (default `info`).
//!
//! A JSON line is one object: `timestamp`, `level`, `message`, the event's fields at the top
//! level, `target`. Every field keeps its type: integers and floats are JSON numbers, booleans
//! are booleans, and a field whose text is a JSON object or array (the agent's `counts`, a list
//! of budgets, the exit summary's `steps`) is written as that object or array, not as a string
//! of escaped JSON. `tracing` fields cannot hold a map or a list themselves, so the code that logs
//! one records it as JSON text (`counts = %json`) and this formatter nests it.
//!
//! With traces on (`traces.rs`), a line written inside a span of a recorded trace also carries
//! `trace_id` and `span_id` (hex, as in the trace backend), after `message`.

use std::fmt;
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};

use quiesce_protocol::log::Fields;
use serde_json::Value;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::traces::Traces;

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) {
    init_with_traces(format, None);
}

/// [`init`], recording the service's spans (target `order_service`, INFO and up, whatever
/// `RUST_LOG` says) into `traces` when given.
pub fn init_with_traces(format: LogFormat, traces: Option<&Traces>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let format = JsonLine::default();
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .event_format(format.clone())
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    // Each layer has its own filter; with traces off there is no second layer at all (an
    // absent layer would make every callsite "sometimes" and enable what no one writes).
    let logs = tracing_subscriber::registry().with(fmt.with_filter(filter));
    let dispatch = match traces {
        Some(t) => Dispatch::new(
            logs.with(
                tracing_opentelemetry::layer()
                    .with_tracer(t.tracer())
                    .with_tracked_inactivity(false)
                    .with_filter(Targets::new().with_target("order_service", Level::INFO)),
            ),
        ),
        None => Dispatch::new(logs),
    };
    format.attach(&dispatch);
    let _ = tracing::dispatcher::set_global_default(dispatch);
}

/// The JSON line format described in the module docs. For the trace ids it needs the
/// subscriber it formats for: [`JsonLine::attach`] it. (Inside an event the formatter cannot ask
/// `tracing` for the current dispatcher: it is busy dispatching that event.)
#[derive(Debug, Clone, Default)]
pub struct JsonLine {
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl JsonLine {
    /// Tells this format (and its clones) which subscriber it writes for.
    pub fn attach(&self, dispatch: &Dispatch) {
        let _ = self.dispatch.set(dispatch.downgrade());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let dispatch = self.dispatch.get().and_then(WeakDispatch::upgrade);
        let ids = dispatch.and_then(|d| trace_ids(ctx, &d));
        writer.write_str(&json_line(event, ids))?;
        writer.write_char('\n')
    }
}

/// The trace and span ids of the innermost span around the event that belongs to a recorded
/// trace (spans the trace layer does not record are skipped).
fn trace_ids<S, N>(ctx: &FmtContext<'_, S, N>, dispatch: &Dispatch) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let spans: Vec<tracing::span::Id> = ctx.event_scope()?.map(|span| span.id()).collect();
    spans.iter().find_map(|id| {
        tracing_opentelemetry::get_otel_context(id, dispatch).and_then(|cx| crate::traces::ids(&cx))
    })
}

/// One event as a JSON object, fields in the order they were given.
fn json_line(event: &Event<'_>, ids: Option<(String, String)>) -> String {
    let meta = event.metadata();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut fields = Fields(vec![
        ("timestamp", Value::String(now)),
        ("level", Value::String(meta.level().as_str().to_owned())),
    ]);
    event.record(&mut fields);
    if let Some((trace_id, span_id)) = ids {
        fields.0.push(("trace_id", Value::String(trace_id)));
        fields.0.push(("span_id", Value::String(span_id)));
    }
    fields
        .0
        .push(("target", Value::String(meta.target().to_owned())));
    fields.to_json_object()
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
            .event_format(JsonLine::default())
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
        assert!(v.get("trace_id").is_none(), "no span, no trace id: {v}");
    }

    #[test]
    fn lines_inside_a_recorded_span_carry_its_trace_and_span_ids() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;

        let buffer = Buffer::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let format = JsonLine::default();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(buffer.clone())
                    .event_format(format.clone()),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let dispatch = Dispatch::new(subscriber);
        format.attach(&dispatch);
        let expected = tracing::dispatcher::with_default(&dispatch, || {
            let outer = tracing::info_span!("outer");
            let _outer = outer.enter();
            let inner = tracing::info_span!("inner");
            let _inner = inner.enter();
            tracing::info!("inside");
            crate::traces::ids(&inner.context()).expect("a recorded span")
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim_end()).expect("one JSON line");
        assert_eq!(v["message"], "inside");
        assert_eq!(v["trace_id"], expected.0.as_str());
        assert_eq!(v["span_id"], expected.1.as_str(), "the innermost span");
        assert_eq!(v["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(v["span_id"].as_str().unwrap().len(), 16);
    }
}
