//! Supervisor metrics in Prometheus text format on `/metrics` (served from the probe thread).
//!
//! - `quiesce_health_status{service}`: 1 SERVING, 0 NOT_SERVING
//! - `quiesce_shutdown_step_duration_seconds{step}`: duration of each step of the last shutdown
//! - `quiesce_step_budget_seconds{step}`: each step's budget in the resolved config ([`Metrics::budgets`])
//! - `quiesce_shutdown_step_outcome_total{step,outcome}`, `quiesce_shutdown_steps_timed_out_total`
//! - `quiesce_child_exits_total{reason}`: exited / signaled
//! - `quiesce_zombies_reaped_total`, `quiesce_signals_received_total{signal}`
//! - `quiesce_control_rtt_seconds{verb}`: control protocol round trips
//! - `quiesce_build_info{version}`, and the `process_*` family
//! - `quiesce_listener_connections{server}`, `quiesce_listener_refused_total{server,limit}`,
//!   `quiesce_listener_timeouts_total{server}`: the probe and metrics servers' caps at work
//!   ([`crate::health::limits`])

use std::convert::Infallible;
use std::net::TcpListener;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

use crate::config::Config;
use crate::state::{Outcome, StepRecord};
use crate::steps::STEPS;

/// The supervisor's metrics, or none at all when `/metrics` is not served: then nothing is registered and
/// every update is a no-op, so a signal-mode run does not build a registry nobody reads.
#[derive(Debug)]
pub struct Metrics(Option<Families>);

/// Updates that pass straight to the families when metrics are on.
macro_rules! delegate {
    ($($(#[$m:meta])* fn $name:ident(&self $(, $a:ident: $t:ty)*);)*) => {
        $($(#[$m])* pub fn $name(&self $(, $a: $t)*) {
            if let Some(f) = &self.0 {
                f.$name($($a),*)
            }
        })*
    };
}

impl Metrics {
    /// Every family registered (`/metrics` is served).
    pub fn new() -> Metrics {
        Metrics(Some(Families::new()))
    }

    /// No metrics: nothing registered, every update a no-op.
    pub fn off() -> Metrics {
        Metrics(None)
    }

    pub fn render(&self) -> Vec<u8> {
        self.0.as_ref().map(Families::render).unwrap_or_default()
    }

    delegate! {
        /// Adds the `process_*` family. Only when `/metrics` is served: the collector reads /proc at start-up.
        fn with_process_metrics(&self);
        /// Sets `quiesce_step_budget_seconds` for every row of the step table from the resolved config, once
        /// at start-up (the dashboards and the 80 %-of-budget alert compare the step durations with it).
        fn budgets(&self, cfg: &Config);
        fn step(&self, r: &StepRecord);
        fn health(&self, service: &str, serving: bool);
        fn child_exit(&self, reason: &str);
        fn reaped(&self, n: u64);
        fn signal(&self, name: &str);
        fn rtt(&self, verb: &str, secs: f64);
        fn connections(&self, server: &str, delta: f64);
        fn refused(&self, server: &str, limit: &str);
        fn timed_out(&self, server: &str);
    }
}

#[derive(Debug)]
struct Families {
    registry: Registry,
    health: GaugeVec,
    step_duration: GaugeVec,
    step_budget: GaugeVec,
    step_outcome: IntCounterVec,
    steps_timed_out: IntCounter,
    child_exits: IntCounterVec,
    zombies: IntCounter,
    signals: IntCounterVec,
    rtt: HistogramVec,
    listener_open: GaugeVec,
    listener_refused: IntCounterVec,
    listener_timeouts: IntCounterVec,
    _build: Gauge,
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = must(GaugeVec::new(Opts::new(name, help), labels));
    must(registry.register(Box::new(g.clone())));
    g
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = must(IntCounterVec::new(Opts::new(name, help), labels));
    must(registry.register(Box::new(c.clone())));
    c
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = must(IntCounter::new(name, help));
    must(registry.register(Box::new(c.clone())));
    c
}

fn rtt_histogram(registry: &Registry) -> HistogramVec {
    let h = must(HistogramVec::new(
        HistogramOpts::new(
            "quiesce_control_rtt_seconds",
            "Round-trip time of control protocol requests.",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["verb"],
    ));
    must(registry.register(Box::new(h.clone())));
    h
}

fn build_info(registry: &Registry) -> Gauge {
    let build = must(Gauge::with_opts(
        Opts::new("quiesce_build_info", "Build information.")
            .const_label("version", env!("CARGO_PKG_VERSION")),
    ));
    build.set(1.0);
    must(registry.register(Box::new(build.clone())));
    build
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Registration fails only on duplicate or malformed names, which are constants here.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Families {
    fn new() -> Families {
        let registry = Registry::new();
        let r = &registry;
        Families {
            health: gauge_vec(
                r,
                "quiesce_health_status",
                "Health status served to probes per service (1 SERVING, 0 NOT_SERVING).",
                &["service"],
            ),
            step_duration: gauge_vec(
                r,
                "quiesce_shutdown_step_duration_seconds",
                "Duration of each step of the last shutdown.",
                &["step"],
            ),
            step_budget: gauge_vec(
                r,
                "quiesce_step_budget_seconds",
                "Budget of each shutdown step in the resolved config (prestop_delay, steps.*).",
                &["step"],
            ),
            step_outcome: counter_vec(
                r,
                "quiesce_shutdown_step_outcome_total",
                "Shutdown steps by outcome (ok, timeout, error, skipped).",
                &["step", "outcome"],
            ),
            steps_timed_out: counter(
                r,
                "quiesce_shutdown_steps_timed_out_total",
                "Shutdown steps that passed their deadline.",
            ),
            child_exits: counter_vec(
                r,
                "quiesce_child_exits_total",
                "Exits of the supervised app by reason (exited, signaled).",
                &["reason"],
            ),
            zombies: counter(
                r,
                "quiesce_zombies_reaped_total",
                "Processes reaped by the supervisor.",
            ),
            signals: counter_vec(
                r,
                "quiesce_signals_received_total",
                "Signals received by the supervisor.",
                &["signal"],
            ),
            rtt: rtt_histogram(r),
            listener_open: gauge_vec(
                r,
                "quiesce_listener_connections",
                "Open connections to the probe (health) and metrics servers.",
                &["server"],
            ),
            listener_refused: counter_vec(
                r,
                "quiesce_listener_refused_total",
                "Connections or Watch streams refused at a cap (connections, peer_connections, watch_streams).",
                &["server", "limit"],
            ),
            listener_timeouts: counter_vec(
                r,
                "quiesce_listener_timeouts_total",
                "Connections closed because their peer sent nothing, or read nothing, for the idle timeout.",
                &["server"],
            ),
            _build: build_info(r),
            registry,
        }
    }

    fn with_process_metrics(&self) {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = self.registry.register(Box::new(pc)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }

    fn budgets(&self, cfg: &Config) {
        for (step, budget) in STEPS.iter().zip(cfg.budgets) {
            self.step_budget
                .with_label_values(&[step.name])
                .set(budget.as_secs_f64());
        }
    }

    fn step(&self, r: &StepRecord) {
        self.step_duration
            .with_label_values(&[&r.name])
            .set(r.duration_ms as f64 / 1000.0);
        self.step_outcome
            .with_label_values(&[&r.name, r.outcome.as_str()])
            .inc();
        if r.outcome == Outcome::Timeout {
            self.steps_timed_out.inc();
        }
    }

    fn health(&self, service: &str, serving: bool) {
        self.health
            .with_label_values(&[service])
            .set(if serving { 1.0 } else { 0.0 });
    }

    fn child_exit(&self, reason: &str) {
        self.child_exits.with_label_values(&[reason]).inc();
    }

    fn reaped(&self, n: u64) {
        self.zombies.inc_by(n);
    }

    fn signal(&self, name: &str) {
        self.signals.with_label_values(&[name]).inc();
    }

    fn rtt(&self, verb: &str, secs: f64) {
        self.rtt.with_label_values(&[verb]).observe(secs);
    }

    fn connections(&self, server: &str, delta: f64) {
        self.listener_open.with_label_values(&[server]).add(delta);
    }

    fn refused(&self, server: &str, limit: &str) {
        self.listener_refused
            .with_label_values(&[server, limit])
            .inc();
    }

    fn timed_out(&self, server: &str) {
        self.listener_timeouts.with_label_values(&[server]).inc();
    }

    fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// Serves `/metrics` (and 404 elsewhere) with HTTP/1.1 on an already bound listener, within the caps and
/// timeouts of [`crate::health::limits`]: a Prometheus scrape needs one short connection.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    use crate::health::limits::{self, HEADER_READ_TIMEOUT, HTTP1_MAX_BUF};
    let Ok(listener) = crate::health::listener(listener) else {
        tracing::error!("metrics listener unusable");
        return;
    };
    let gate = limits::Gate::new(limits::METRICS, metrics.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper enforces the header timeout only with a timer; it runs from the moment a request is awaited, so
    // it also ends idle keep-alive connections and headers sent a byte at a time.
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(HTTP1_MAX_BUF);
    loop {
        let conn = limits::accept(&listener, &gate).await;
        let metrics = metrics.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let _ = http
                .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                .await;
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let mut resp = if req.uri().path() == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
        if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    } else {
        Response::new(Full::new(Bytes::from_static(
            b"not found: metrics are at /metrics\n",
        )))
    };
    if req.uri().path() != "/metrics" {
        *resp.status_mut() = StatusCode::NOT_FOUND;
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, parse_toml};

    #[test]
    fn budgets_are_exported_per_step_from_the_resolved_config() {
        let toml = "prestop_delay = \"4s\"\n[steps]\nclose_db = \"1500ms\"\n";
        let layer = parse_toml(std::path::Path::new("q.toml"), toml).expect("valid toml");
        let cfg = Config::resolve(layer).expect("a valid config");
        let m = Metrics::new();
        m.budgets(&cfg);
        let text = String::from_utf8(m.render()).expect("utf-8");
        for (step, budget) in STEPS.iter().zip(cfg.budgets) {
            let line = format!(
                "quiesce_step_budget_seconds{{step=\"{}\"}} {}",
                step.name,
                budget.as_secs_f64()
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert!(text.contains("quiesce_step_budget_seconds{step=\"health-not-serving\"} 4\n"));
        assert!(text.contains("quiesce_step_budget_seconds{step=\"drain-in-flight\"} 7\n"));
        assert!(text.contains("quiesce_step_budget_seconds{step=\"close-db\"} 1.5\n"));
    }
}
