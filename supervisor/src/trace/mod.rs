//! The shutdown as a trace: one span for the stop, one per row of the shutdown story (the nine
//! steps, and the supervisor's own rows), exported over OTLP/gRPC when the pod's environment
//! names a collector.
//!
//! The trace is made from what the stop records anyway (the step rows of [`crate::state`]), once,
//! after the report is written: nothing on the stop's path waits for a collector. Only the ids
//! exist during the stop: each step's span id is chosen when the stop begins, so the app can be
//! told it before the step runs (the protocol's `traceparent` extension, PROTOCOL.md §5.5) and
//! make its sub-step spans children of it. The export is bounded by
//! [`otlp::DEFAULT_TIMEOUT`] (or `OTEL_EXPORTER_OTLP_TIMEOUT`, if shorter) and by the stop's hard
//! end; a collector that is down costs one warning line.
//!
//! Configured by the standard variables the app reads too (the pod shares one environment):
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (only `grpc`), `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`. `service.name` is
//! always `quiesce`, since `OTEL_SERVICE_NAME` names the app. Every shutdown is sampled: there
//! is one per pod lifetime.

pub mod otlp;
mod settings;

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quiesce_protocol::wire::TraceParent;
use tokio::time::Instant;

pub use settings::Settings;

use crate::state::{Outcome, StepRecord};
use otlp::{KeyValue, Span};

/// Whether the shutdown is exported as a trace, as the environment says.
#[derive(Clone, Debug, Default)]
pub enum Traces {
    /// No endpoint, or turned off (`OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER=none`).
    #[default]
    Off,
    On(std::sync::Arc<Settings>),
    /// A value quiesce cannot use: traces are off, and this says which and what to change.
    Unusable(String),
}

impl Traces {
    /// From the process environment and the config's `env` (which wins, as it does for the app).
    pub fn from_env(overrides: &std::collections::BTreeMap<String, String>) -> Traces {
        match Settings::from_env(overrides) {
            Ok(None) => Traces::Off,
            Ok(Some(s)) => Traces::On(std::sync::Arc::new(s)),
            Err(why) => Traces::Unusable(why),
        }
    }

    /// The warning for a value quiesce cannot use, as the run logs it and `check-config` prints it.
    pub fn problem(&self) -> Option<String> {
        match self {
            Traces::Unusable(why) => Some(format!(
                "the shutdown will not be exported as a trace: {why}"
            )),
            _ => None,
        }
    }

    pub fn settings(&self) -> Option<&std::sync::Arc<Settings>> {
        match self {
            Traces::On(s) => Some(s),
            _ => None,
        }
    }
}

impl std::fmt::Display for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Traces::Off => f.write_str("off (no OTEL_EXPORTER_OTLP_ENDPOINT, or turned off)"),
            Traces::On(s) => write!(
                f,
                "the shutdown, over OTLP/gRPC to {} ({})",
                s.endpoint.authority, s.endpoint_from
            ),
            Traces::Unusable(why) => write!(f, "off: {why}"),
        }
    }
}

/// The ids of one shutdown's trace, chosen when the stop begins.
#[derive(Clone, Debug)]
pub struct Shutdown {
    trace_id: [u8; 16],
    root: [u8; 8],
    /// The span of each of the nine steps, indexed like [`STEPS`].
    steps: [[u8; 8]; 9],
    /// The stop's start, on the wall clock and on the monotonic one.
    wall: SystemTime,
    since: Instant,
}

impl Shutdown {
    /// Fresh ids for a stop that began at `since`.
    pub fn begin(since: Instant) -> Shutdown {
        let wall = SystemTime::now()
            .checked_sub(since.elapsed())
            .unwrap_or_else(SystemTime::now);
        let mut steps = [[0; 8]; 9];
        for id in &mut steps {
            *id = span_id();
        }
        Shutdown {
            trace_id: trace_id(),
            root: span_id(),
            steps,
            wall,
            since,
        }
    }

    /// The trace id, as trace backends show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The context naming step `rows[i]`'s span, one per row: a step verb's `traceparent=`.
    pub fn traceparents(&self, rows: &[usize]) -> Vec<TraceParent> {
        rows.iter()
            .map(|&i| TraceParent::sampled(self.trace_id, self.steps[i]))
            .collect()
    }

    /// The whole trace: the shutdown span (from the stop's start until now) and one child per
    /// recorded row. `budgets` are the configured step budgets, `ended` the exit code and reason.
    pub fn spans(
        &self,
        rows: &[StepRecord],
        budgets: &[Duration; 9],
        attributes: Vec<KeyValue>,
        ended: (i32, &str),
    ) -> Vec<Span> {
        let start = unix_nanos(self.wall);
        let end = unix_nanos(self.wall + self.since.elapsed());
        let mut root_attributes = attributes;
        root_attributes.push(KeyValue::int("quiesce.exit_code", i64::from(ended.0)));
        root_attributes.push(KeyValue::text("quiesce.exit_reason", ended.1));
        let mut spans = vec![Span {
            trace_id: self.trace_id.to_vec(),
            span_id: self.root.to_vec(),
            parent_span_id: Vec::new(),
            name: "shutdown".to_owned(),
            kind: otlp::KIND_INTERNAL,
            start_time_unix_nano: start,
            end_time_unix_nano: end.max(start),
            attributes: root_attributes,
            status: None,
        }];
        let mut used = [false; 9];
        for row in rows {
            // A step's own id the first time it is recorded (the app was told that one), a fresh one
            // for the supervisor's rows (numbered 0).
            let index = usize::from(row.number).checked_sub(1).filter(|&i| i < 9);
            let id = match index {
                Some(i) if !used[i] => {
                    used[i] = true;
                    self.steps[i]
                }
                _ => span_id(),
            };
            let budget = index.map(|i| budgets[i]);
            spans.push(self.step_span(row, id, budget, start));
        }
        spans
    }

    fn step_span(
        &self,
        row: &StepRecord,
        id: [u8; 8],
        budget: Option<Duration>,
        start: u64,
    ) -> Span {
        let began = start.saturating_add(row.started_ms.saturating_mul(1_000_000));
        let mut attributes = vec![
            KeyValue::int("quiesce.step.number", i64::from(row.number)),
            KeyValue::text("quiesce.step.name", row.name.clone()),
            KeyValue::text("quiesce.step.outcome", row.outcome.as_str()),
            KeyValue::count("quiesce.step.duration_ms", row.duration_ms),
        ];
        if let Some(b) = budget {
            attributes.push(KeyValue::count(
                "quiesce.step.budget_ms",
                crate::state::ms(b),
            ));
        }
        for (key, value) in &row.counts {
            attributes.push(KeyValue::count(
                &format!("quiesce.step.counts.{key}"),
                *value,
            ));
        }
        if !row.detail.is_empty() {
            attributes.push(KeyValue::text("quiesce.step.detail", row.detail.clone()));
        }
        let failed = matches!(
            row.outcome,
            Outcome::Timeout | Outcome::Error | Outcome::Unknown
        );
        Span {
            trace_id: self.trace_id.to_vec(),
            span_id: id.to_vec(),
            parent_span_id: self.root.to_vec(),
            name: row.name.clone(),
            kind: otlp::KIND_INTERNAL,
            start_time_unix_nano: began,
            end_time_unix_nano: began.saturating_add(row.duration_ms.saturating_mul(1_000_000)),
            attributes,
            status: failed.then(|| otlp::Status {
                message: format!("{}: {}", row.outcome.as_str(), row.detail),
                code: otlp::STATUS_ERROR,
            }),
        }
    }
}

/// Exports `spans` under `settings`' resource, never past `until`; says how it went in one line.
pub async fn export(settings: &Settings, spans: Vec<Span>, trace_id: &str, until: Instant) {
    let n = spans.len();
    let request = settings.request(spans);
    let limit = until.min(Instant::now() + settings.timeout);
    let allowed_ms = crate::state::ms(limit.saturating_duration_since(Instant::now()));
    if allowed_ms == 0 {
        tracing::warn!(%trace_id, spans = n, "shutdown trace not exported: no time left before the stop's hard end");
        return;
    }
    match tokio::time::timeout_at(limit, otlp::export(settings, &request)).await {
        Ok(Ok(())) => {
            tracing::debug!(%trace_id, spans = n, endpoint = %settings.endpoint.authority, "shutdown trace exported")
        }
        Ok(Err(why)) => {
            tracing::warn!(%trace_id, spans = n, reason = %why, "shutdown trace not exported")
        }
        Err(_) => tracing::warn!(
            %trace_id,
            spans = n,
            timeout_ms = allowed_ms,
            endpoint = %settings.endpoint.authority,
            "shutdown trace not exported: the collector did not answer in time"
        ),
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 random bits, never zero. From the standard library's per-process random hash keys (seeded by
/// the kernel's `getrandom`), so no device file is needed: the supervisor runs in empty images.
fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u64(unix_nanos(SystemTime::now()));
    h.finish().max(1)
}

fn span_id() -> [u8; 8] {
    random_u64().to_be_bytes()
}

fn trace_id() -> [u8; 16] {
    let mut id = [0; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&random_u64().to_be_bytes());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        number: u8,
        name: &str,
        started_ms: u64,
        duration_ms: u64,
        outcome: Outcome,
    ) -> StepRecord {
        StepRecord {
            number,
            name: name.into(),
            outcome,
            started_ms,
            duration_ms,
            counts: [("requests_drained".to_string(), 12)].into(),
            detail: String::new(),
        }
    }

    #[test]
    fn ids_are_random_and_never_zero() {
        let a = Shutdown::begin(Instant::now());
        let b = Shutdown::begin(Instant::now());
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.trace_id, [0; 16]);
        let mut all: Vec<[u8; 8]> = a.steps.to_vec();
        all.push(a.root);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 10, "ten distinct span ids");
    }

    #[test]
    fn each_step_span_has_the_id_the_app_was_told() {
        let t = Shutdown::begin(Instant::now());
        let told = t.traceparents(&[1, 2]);
        let rows = [
            row(1, "health-not-serving", 0, 5000, Outcome::Ok),
            row(2, "stop-accepting", 5000, 1, Outcome::Ok),
            row(3, "drain-in-flight", 5001, 400, Outcome::Timeout),
            row(0, "cleanup", 5401, 2, Outcome::Ok),
        ];
        let budgets = [Duration::from_secs(1); 9];
        let spans = t.spans(
            &rows,
            &budgets,
            vec![],
            (0, "stop by SIGTERM: app exited 0"),
        );
        assert_eq!(spans.len(), 5);
        let root = &spans[0];
        assert_eq!(root.name, "shutdown");
        assert!(root.parent_span_id.is_empty());
        for s in &spans[1..] {
            assert_eq!(s.parent_span_id, root.span_id, "{}", s.name);
            assert_eq!(s.trace_id, root.trace_id);
        }
        assert_eq!(told[0].span_id().to_vec(), spans[2].span_id);
        assert_eq!(told[1].span_id().to_vec(), spans[3].span_id);
        assert_eq!(told[0].trace_id().to_vec(), root.trace_id);
        // Times from the stop's start, in order.
        assert_eq!(
            spans[2].start_time_unix_nano - root.start_time_unix_nano,
            5_000_000_000
        );
        assert_eq!(
            spans[3].end_time_unix_nano - spans[3].start_time_unix_nano,
            400_000_000
        );
        // A timeout is an error status; the supervisor's own row has no budget.
        assert_eq!(
            spans[3].status.as_ref().map(|s| s.code),
            Some(otlp::STATUS_ERROR)
        );
        assert!(spans[2].status.is_none());
        let keys = |s: &Span| {
            s.attributes
                .iter()
                .map(|a| a.key.clone())
                .collect::<Vec<_>>()
        };
        assert!(keys(&spans[2]).contains(&"quiesce.step.budget_ms".to_string()));
        assert!(keys(&spans[2]).contains(&"quiesce.step.counts.requests_drained".to_string()));
        assert!(!keys(&spans[4]).contains(&"quiesce.step.budget_ms".to_string()));
    }
}
