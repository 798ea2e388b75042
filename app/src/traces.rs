//! OpenTelemetry traces: `tracing` spans exported over OTLP/gRPC, and the W3C trace context
//! carried through gRPC metadata, the outbox row and AMQP headers.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set: then no exporter, no export task, no
//! queue exists, and the spans the code opens stay plain `tracing` spans. On, the standard
//! variables configure it: `OTEL_SERVICE_NAME` (default `order-service`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default
//! `parentbased_traceidratio` with ratio 1.0: a sampled caller's trace is always kept, an
//! unsampled one never, and new traces at the ratio), `OTEL_EXPORTER_OTLP_TIMEOUT`.
//!
//! Export never slows or fails the service: a finished span is put on a bounded queue without
//! waiting ([`QueueProcessor::on_end`]); one tokio task sends batches to the collector, each
//! bounded by the export timeout. A full queue (the collector is slow) and a failed or timed-out
//! export (it is down) drop spans, counted in `otel_spans_dropped_total`. [`Traces::flush`]
//! sends what is still queued within the caller's deadline (the last shutdown step).

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Spans dropped instead of exported (queue full, export failed or timed out), process-wide;
/// every [`crate::metrics::Metrics`] registry exports it.
pub static SPANS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "otel_spans_dropped_total",
        "Finished spans dropped instead of exported: the export queue was full (collector slow) or the export failed or timed out (collector down).",
    )
    .unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
});

/// Spans the collector accepted, process-wide.
pub static SPANS_EXPORTED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "otel_spans_exported_total",
        "Finished spans the OTLP collector accepted.",
    )
    .unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
});

/// The default service name when neither `OTEL_SERVICE_NAME` nor `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES` gives one.
pub const DEFAULT_SERVICE_NAME: &str = "order-service";

/// How traces are exported.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// The OTLP/gRPC collector, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// `service.name`; `None` leaves it to the resource variables (else [`DEFAULT_SERVICE_NAME`]).
    pub service_name: Option<String>,
    /// Which traces are kept.
    pub sampler: SamplerChoice,
    /// Finished spans waiting for export; more are dropped.
    pub queue_size: usize,
    /// Spans per export request.
    pub batch_size: usize,
    /// How long spans gather before an export.
    pub batch_delay: Duration,
    /// Longest one export may take; a slower one fails and its spans are dropped.
    pub export_timeout: Duration,
}

/// `OTEL_TRACES_SAMPLER` values (the spec's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    /// `always_on`.
    AlwaysOn,
    /// `always_off`.
    AlwaysOff,
    /// `traceidratio` with its ratio.
    Ratio(f64),
    /// `parentbased_always_on`.
    ParentAlwaysOn,
    /// `parentbased_always_off`.
    ParentAlwaysOff,
    /// `parentbased_traceidratio` with its ratio (the default, ratio 1.0).
    ParentRatio(f64),
}

impl SamplerChoice {
    /// Parses `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`; unset is
    /// `parentbased_traceidratio` and a missing ratio is 1.0.
    pub fn parse(sampler: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("OTEL_TRACES_SAMPLER_ARG={a:?}: expected a ratio from 0.0 to 1.0")
                    }),
            }
        };
        Ok(match sampler.map(str::trim).filter(|s| !s.is_empty()) {
            None | Some("parentbased_traceidratio") => Self::ParentRatio(ratio()?),
            Some("traceidratio") => Self::Ratio(ratio()?),
            Some("always_on") => Self::AlwaysOn,
            Some("always_off") => Self::AlwaysOff,
            Some("parentbased_always_on") => Self::ParentAlwaysOn,
            Some("parentbased_always_off") => Self::ParentAlwaysOff,
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?}: expected always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ));
            }
        })
    }

    fn sampler(self) -> Sampler {
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::Ratio(r) => Sampler::TraceIdRatioBased(r),
            Self::ParentAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::ParentAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Self::ParentRatio(r) => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r))),
        }
    }
}

impl TraceSettings {
    /// Settings exporting to `endpoint` with the defaults (sampler as if no variable is set).
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            service_name: None,
            sampler: SamplerChoice::ParentRatio(1.0),
            queue_size: 2048,
            batch_size: 512,
            batch_delay: Duration::from_millis(500),
            export_timeout: Duration::from_secs(10),
        }
    }

    /// From the standard variables; `None` (traces off) when `OTEL_EXPORTER_OTLP_ENDPOINT` is
    /// unset or empty, or `OTEL_SDK_DISABLED=true`.
    pub fn from_env() -> Result<Option<Self>, String> {
        let var = |name: &str| std::env::var(name).ok();
        Self::from_vars(&var)
    }

    /// [`TraceSettings::from_env`] over `var` (tests).
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let Some(endpoint) = var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
        else {
            return Ok(None);
        };
        let mut settings = Self::new(endpoint);
        settings.sampler = SamplerChoice::parse(
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )?;
        if let Some(t) = var("OTEL_EXPORTER_OTLP_TIMEOUT").filter(|t| !t.trim().is_empty()) {
            let ms: u64 = t
                .trim()
                .parse()
                .map_err(|_| format!("OTEL_EXPORTER_OTLP_TIMEOUT={t:?}: expected milliseconds"))?;
            settings.export_timeout = Duration::from_millis(ms);
        }
        Ok(Some(settings))
    }
}

/// The installed trace pipeline.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    flush: mpsc::Sender<(Instant, oneshot::Sender<()>)>,
}

static INSTALLED: OnceLock<Traces> = OnceLock::new();

/// The pipeline [`start`] installed, if traces are on.
pub fn installed() -> Option<&'static Traces> {
    INSTALLED.get()
}

/// Builds the exporter and starts the export task (call inside a tokio runtime), sets the
/// W3C trace-context propagator, and installs the pipeline for [`installed`]. A second call
/// returns the first pipeline.
pub fn start(settings: &TraceSettings) -> Result<&'static Traces, String> {
    if let Some(t) = INSTALLED.get() {
        return Ok(t);
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.export_timeout)
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT={}: {e}", settings.endpoint))?;
    let resource = resource(settings.service_name.as_deref());
    exporter.set_resource(&resource);
    let (spans_tx, spans_rx) = mpsc::channel(settings.queue_size.max(1));
    let (flush_tx, flush_rx) = mpsc::channel(4);
    tokio::spawn(export_loop(exporter, spans_rx, flush_rx, settings.clone()));
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(settings.sampler.sampler())
        .with_span_processor(QueueProcessor { queue: spans_tx })
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = INSTALLED.set(Traces {
        provider,
        flush: flush_tx,
    });
    INSTALLED
        .get()
        .ok_or_else(|| "trace pipeline not installed".to_owned())
}

fn resource(service_name: Option<&str>) -> Resource {
    let builder = Resource::builder();
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    match service_name {
        Some(name) => builder.with_service_name(name.to_owned()),
        None if !named_by_env => builder.with_service_name(DEFAULT_SERVICE_NAME),
        None => builder,
    }
    .build()
}

impl Traces {
    /// The tracer the `tracing` layer records into.
    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("order-service")
    }

    /// Exports every span finished so far, giving up at `deadline` (what is left is dropped
    /// and counted). Returns whether everything queued was sent in time.
    pub async fn flush(&self, deadline: Instant) -> bool {
        let (tx, rx) = oneshot::channel();
        let asked = tokio::time::timeout_at(deadline, self.flush.send((deadline, tx))).await;
        matches!(asked, Ok(Ok(())))
            && matches!(tokio::time::timeout_at(deadline, rx).await, Ok(Ok(())))
    }
}

/// Queues finished spans for the export task, never waiting.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            SPANS_DROPPED.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Sends queued spans in batches; a flush request sends everything queued before it.
async fn export_loop(
    exporter: impl SpanExporter,
    mut spans: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<(Instant, oneshot::Sender<()>)>,
    settings: TraceSettings,
) {
    let export = async |batch: Vec<SpanData>, deadline: Instant| {
        let n = batch.len() as u64;
        let limit = deadline.min(Instant::now() + settings.export_timeout);
        match tokio::time::timeout_at(limit, exporter.export(batch)).await {
            Ok(Ok(())) => {
                SPANS_EXPORTED.inc_by(n);
            }
            Ok(Err(e)) => {
                SPANS_DROPPED.inc_by(n);
                tracing::debug!(error = %e, spans = n, "span export failed; spans dropped");
            }
            Err(_) => {
                SPANS_DROPPED.inc_by(n);
                tracing::debug!(spans = n, "span export timed out; spans dropped");
            }
        }
    };
    loop {
        let first = tokio::select! {
            biased;
            flush = flushes.recv() => {
                let Some((deadline, done)) = flush else { break };
                let mut batch = Vec::new();
                while let Ok(span) = spans.try_recv() {
                    batch.push(span);
                }
                for chunk in chunks(batch, settings.batch_size) {
                    if Instant::now() >= deadline {
                        SPANS_DROPPED.inc_by(chunk.len() as u64);
                    } else {
                        export(chunk, deadline).await;
                    }
                }
                let _ = done.send(());
                continue;
            }
            span = spans.recv() => match span {
                Some(span) => span,
                None => break,
            },
        };
        // Let a batch gather (or a flush arrive), then send what is queued.
        let gathered = tokio::time::sleep(settings.batch_delay);
        tokio::pin!(gathered);
        tokio::select! {
            () = &mut gathered => {}
            () = wait_len(&spans, settings.batch_size) => {}
        }
        let mut batch = vec![first];
        while batch.len() < settings.batch_size
            && let Ok(span) = spans.try_recv()
        {
            batch.push(span);
        }
        export(batch, Instant::now() + settings.export_timeout).await;
    }
}

/// Resolves once `queue` holds `n` spans (polled; a full batch is sent early).
async fn wait_len(queue: &mpsc::Receiver<SpanData>, n: usize) {
    while queue.len() + 1 < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn chunks(mut spans: Vec<SpanData>, size: usize) -> Vec<Vec<SpanData>> {
    let mut out = Vec::new();
    while spans.len() > size.max(1) {
        let rest = spans.split_off(size.max(1));
        out.push(std::mem::replace(&mut spans, rest));
    }
    if !spans.is_empty() {
        out.push(spans);
    }
    out
}

// --- trace context propagation ---

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MapCarrier(HashMap<String, String>);

impl Injector for MapCarrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl Extractor for MapCarrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The caller's context from gRPC metadata (`traceparent`, `tracestate`).
pub fn extract_headers(headers: &tonic::codegen::http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The context a `traceparent` value names (an empty context for `None` or a malformed value).
pub fn extract_traceparent(traceparent: Option<&str>) -> Context {
    let mut carrier = MapCarrier(HashMap::new());
    if let Some(tp) = traceparent {
        carrier.0.insert("traceparent".to_owned(), tp.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// The W3C `traceparent` of `span`, when it belongs to a recorded trace (traces on).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    installed()?;
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = MapCarrier(HashMap::new());
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.0.remove("traceparent")
}

/// The current span's `traceparent` (see [`traceparent_of`]).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// AMQP message headers carrying `span`'s `traceparent` (empty with traces off).
pub fn amqp_headers(span: &tracing::Span) -> lapin::types::FieldTable {
    let mut headers = lapin::types::FieldTable::default();
    if let Some(tp) = traceparent_of(span) {
        headers.insert(
            "traceparent".into(),
            lapin::types::AMQPValue::LongString(tp.into()),
        );
    }
    headers
}

/// The producer's context from AMQP message headers (`traceparent`).
pub fn extract_amqp(headers: Option<&lapin::types::FieldTable>) -> Context {
    let traceparent = headers
        .and_then(|h| h.inner().get("traceparent"))
        .and_then(|v| match v {
            lapin::types::AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            _ => None,
        });
    extract_traceparent(traceparent)
}

/// Makes `span` a child of `parent` when `parent` holds a valid span context.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The ids of the trace and span `cx` holds, as hex, when valid.
pub fn ids(cx: &Context) -> Option<(String, String)> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_defaults_to_parent_based_ratio_one() {
        assert_eq!(
            SamplerChoice::parse(None, None),
            Ok(SamplerChoice::ParentRatio(1.0))
        );
        assert_eq!(
            SamplerChoice::parse(Some("parentbased_traceidratio"), Some("0.1")),
            Ok(SamplerChoice::ParentRatio(0.1))
        );
        assert_eq!(
            SamplerChoice::parse(Some("always_off"), None),
            Ok(SamplerChoice::AlwaysOff)
        );
        assert!(SamplerChoice::parse(Some("traceidratio"), Some("2")).is_err());
        assert!(SamplerChoice::parse(Some("sometimes"), None).is_err());
    }

    #[test]
    fn off_without_an_endpoint() {
        let none = |_: &str| None;
        assert!(TraceSettings::from_vars(&none).unwrap().is_none());
        let empty = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(String::new);
        assert!(TraceSettings::from_vars(&empty).unwrap().is_none());
        let disabled = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:4317".to_owned()),
            "OTEL_SDK_DISABLED" => Some("true".to_owned()),
            _ => None,
        };
        assert!(TraceSettings::from_vars(&disabled).unwrap().is_none());
        let on = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:4317".to_owned()),
            "OTEL_TRACES_SAMPLER_ARG" => Some("0.25".to_owned()),
            "OTEL_EXPORTER_OTLP_TIMEOUT" => Some("1500".to_owned()),
            _ => None,
        };
        let s = TraceSettings::from_vars(&on).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://c:4317");
        assert_eq!(s.sampler, SamplerChoice::ParentRatio(0.25));
        assert_eq!(s.export_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn traceparent_round_trip() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = extract_traceparent(Some(tp));
        assert_eq!(
            ids(&cx),
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                "00f067aa0ba902b7".to_owned()
            ))
        );
        assert!(ids(&extract_traceparent(Some("garbage"))).is_none());
        assert!(ids(&extract_traceparent(None)).is_none());
    }

    #[test]
    fn chunks_split_evenly() {
        assert!(chunks(Vec::new(), 3).is_empty());
    }
}
