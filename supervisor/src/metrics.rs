//! Supervisor metrics in Prometheus text format on `/metrics` (served from the probe thread).
//!
//! - `quiesce_health_status{service}`: 1 SERVING, 0 NOT_SERVING
//! - `quiesce_shutdown_step_duration_seconds{step}`: duration of each step of the last shutdown
//! - `quiesce_shutdown_step_outcome_total{step,outcome}`, `quiesce_shutdown_steps_timed_out_total`
//! - `quiesce_child_exits_total{reason}`: exited / signaled
//! - `quiesce_zombies_reaped_total`, `quiesce_signals_received_total{signal}`
//! - `quiesce_control_rtt_seconds{verb}`: control protocol round trips
//! - `quiesce_build_info{version}`, and the `process_*` family

use std::convert::Infallible;
use std::net::TcpListener;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

use crate::state::{StepOutcome, StepRecord};

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    health: GaugeVec,
    step_duration: GaugeVec,
    step_outcome: IntCounterVec,
    steps_timed_out: IntCounter,
    child_exits: IntCounterVec,
    zombies: IntCounter,
    signals: IntCounterVec,
    rtt: HistogramVec,
    _build: Gauge,
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

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = must(GaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let health = gauge_vec(
            "quiesce_health_status",
            "Health status served to probes per service (1 SERVING, 0 NOT_SERVING).",
            &["service"],
        );
        let step_duration = gauge_vec(
            "quiesce_shutdown_step_duration_seconds",
            "Duration of each step of the last shutdown.",
            &["step"],
        );
        let step_outcome = counter_vec(
            "quiesce_shutdown_step_outcome_total",
            "Shutdown steps by outcome (ok, timeout, error, skipped).",
            &["step", "outcome"],
        );
        let child_exits = counter_vec(
            "quiesce_child_exits_total",
            "Exits of the supervised app by reason (exited, signaled).",
            &["reason"],
        );
        let signals = counter_vec(
            "quiesce_signals_received_total",
            "Signals received by the supervisor.",
            &["signal"],
        );
        let steps_timed_out = must(IntCounter::new(
            "quiesce_shutdown_steps_timed_out_total",
            "Shutdown steps that passed their deadline.",
        ));
        must(registry.register(Box::new(steps_timed_out.clone())));
        let zombies = must(IntCounter::new(
            "quiesce_zombies_reaped_total",
            "Processes reaped by the supervisor.",
        ));
        must(registry.register(Box::new(zombies.clone())));
        let rtt = must(HistogramVec::new(
            HistogramOpts::new(
                "quiesce_control_rtt_seconds",
                "Round-trip time of control protocol requests.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["verb"],
        ));
        must(registry.register(Box::new(rtt.clone())));
        let build = must(Gauge::with_opts(
            Opts::new("quiesce_build_info", "Build information.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        ));
        build.set(1.0);
        must(registry.register(Box::new(build.clone())));
        Metrics {
            registry,
            health,
            step_duration,
            step_outcome,
            steps_timed_out,
            child_exits,
            zombies,
            signals,
            rtt,
            _build: build,
        }
    }

    /// Adds the `process_*` family. Only when `/metrics` is served: the collector reads /proc at start-up.
    pub fn with_process_metrics(&self) {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = self.registry.register(Box::new(pc)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }

    pub fn step(&self, r: &StepRecord) {
        self.step_duration
            .with_label_values(&[&r.name])
            .set(r.duration_ms as f64 / 1000.0);
        self.step_outcome
            .with_label_values(&[&r.name, r.outcome.as_str()])
            .inc();
        if r.outcome == StepOutcome::Timeout {
            self.steps_timed_out.inc();
        }
    }

    pub fn health(&self, service: &str, serving: bool) {
        self.health
            .with_label_values(&[service])
            .set(if serving { 1.0 } else { 0.0 });
    }

    pub fn child_exit(&self, reason: &str) {
        self.child_exits.with_label_values(&[reason]).inc();
    }

    pub fn reaped(&self, n: u64) {
        self.zombies.inc_by(n);
    }

    pub fn signal(&self, name: &str) {
        self.signals.with_label_values(&[name]).inc();
    }

    pub fn rtt(&self, verb: &str, secs: f64) {
        self.rtt.with_label_values(&[verb]).observe(secs);
    }

    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// Serves `/metrics` (and 404 elsewhere) with HTTP/1.1 on an already bound listener.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    let Ok(listener) = listener
        .set_nonblocking(true)
        .and_then(|_| tokio::net::TcpListener::from_std(listener))
    else {
        tracing::error!("metrics listener unusable");
        return;
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
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
