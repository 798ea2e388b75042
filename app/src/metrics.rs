//! The service's Prometheus metrics, in one registry per service instance (so several
//! instances in one test process do not collide), named as the reference design's alert rules expect.
//!
//! - `grpc_server_started_total`, `grpc_server_handled_total`, `grpc_server_handling_seconds`,
//!   `grpc_server_in_flight` — the RPC layer (`grpc/layer.rs`)
//! - `outbox_unsent_events_total`, `outbox_published_total`, `outbox_relay_lag_seconds`,
//!   `circuit_breaker_state{breaker,state}` — the outbox poller
//! - `mq_consumer_messages_total{outcome}` — the payment consumer
//! - `saga_stuck_total`, `orders_expired_total`, `cron_runs_total` — the expiry job
//! - `otel_spans_dropped_total`, `otel_spans_exported_total` — trace export (`traces.rs`;
//!   process-wide counters, registered in every instance's registry)
//! - `db_pool_connections{state}`, `db_pool_max_connections` — the database pool, read from the
//!   pool at each scrape ([`Metrics::register_pool`])

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the service exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// RPCs started, by type/service/method.
    pub grpc_started: IntCounterVec,
    /// RPCs finished, by type/service/method/code.
    pub grpc_handled: IntCounterVec,
    /// RPC latency until the response headers.
    pub grpc_handling_seconds: HistogramVec,
    /// RPCs being handled right now.
    pub grpc_in_flight: IntGauge,
    /// Outbox rows not yet confirmed by the broker.
    pub outbox_unsent: IntGauge,
    /// Events published and confirmed.
    pub outbox_published: IntCounter,
    /// Batches that failed to publish (the breaker counts these).
    pub outbox_publish_failures: IntCounter,
    /// Time from the outbox row's commit to the broker's confirm.
    pub outbox_relay_lag: HistogramVec,
    /// 1 for the breaker's current state, 0 for the others.
    pub circuit_breaker_state: IntGaugeVec,
    /// Payment messages by outcome (applied, duplicate, ignored, dead_lettered, requeued).
    pub consumer_messages: IntCounterVec,
    /// Pending orders older than `stuck_after`.
    pub saga_stuck: IntGauge,
    /// Orders the expiry job expired.
    pub orders_expired: IntCounter,
    /// Expiry job runs, by result.
    pub cron_runs: IntCounterVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric names and labels below are constants; a failure here is a programming error
    // caught by the first test that builds `Metrics`.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

/// RPC latency buckets (seconds): 0.5 ms to 10 s.
const RPC_LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Outbox relay lag buckets (seconds): 5 ms to 60 s.
const RELAY_LAG_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const RPC_LABELS: &[&str] = &["grpc_type", "grpc_service", "grpc_method"];

/// Registers `metric` in `registry` and returns it (a clone shares the same values).
fn registered<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    let metric = must(metric);
    must(registry.register(Box::new(metric.clone())));
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(registry, IntCounter::new(name, help))
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    registered(registry, IntGauge::new(name, help))
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    registered(registry, HistogramVec::new(opts, labels))
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        for shared in [
            &crate::traces::SPANS_DROPPED,
            &crate::traces::SPANS_EXPORTED,
        ] {
            must(r.register(Box::new(IntCounter::clone(shared))));
        }
        Self {
            grpc_started: counter_vec(
                &r,
                "grpc_server_started_total",
                "Total number of RPCs started on the server.",
                RPC_LABELS,
            ),
            grpc_handled: counter_vec(
                &r,
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
                &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            ),
            grpc_handling_seconds: histogram_vec(
                &r,
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
                &RPC_LATENCY_BUCKETS,
                RPC_LABELS,
            ),
            grpc_in_flight: gauge(&r, "grpc_server_in_flight", "RPCs being handled right now."),
            outbox_unsent: gauge(
                &r,
                "outbox_unsent_events_total",
                "Outbox events committed but not yet confirmed by the broker.",
            ),
            outbox_published: counter(
                &r,
                "outbox_published_total",
                "Outbox events published and confirmed by the broker.",
            ),
            outbox_publish_failures: counter(
                &r,
                "outbox_publish_failures_total",
                "Outbox batches whose publishing failed (broker down, nack, timeout).",
            ),
            outbox_relay_lag: histogram_vec(
                &r,
                "outbox_relay_lag_seconds",
                "Time from an outbox event's commit to the broker's publish confirm.",
                &RELAY_LAG_BUCKETS,
                &["event_type"],
            ),
            circuit_breaker_state: gauge_vec(
                &r,
                "circuit_breaker_state",
                "1 for the circuit breaker's current state (closed, open, half_open), 0 otherwise.",
                &["breaker", "state"],
            ),
            consumer_messages: counter_vec(
                &r,
                "mq_consumer_messages_total",
                "Payment messages handled, by outcome.",
                &["outcome"],
            ),
            saga_stuck: gauge(
                &r,
                "saga_stuck_total",
                "Orders waiting for payment longer than stuck_after.",
            ),
            orders_expired: counter(
                &r,
                "orders_expired_total",
                "Orders expired by the expiry job.",
            ),
            cron_runs: counter_vec(
                &r,
                "cron_runs_total",
                "Expiry job runs, by result.",
                &["result"],
            ),
            registry: r,
        }
    }

    /// Exports the pool's connections (`db_pool_connections{state="idle"|"in_use"}`) and its
    /// size limit (`db_pool_max_connections`), read from the pool when scraped, so they never go
    /// stale and cost nothing between scrapes.
    pub fn register_pool(&self, pool: sqlx::PgPool, max_connections: u32) {
        let collector = PoolCollector {
            connections: must(IntGaugeVec::new(
                Opts::new(
                    "db_pool_connections",
                    "Database pool connections, by state (idle, in_use).",
                ),
                &["state"],
            )),
            max: must(IntGauge::new(
                "db_pool_max_connections",
                "The database pool's size limit (db_max_connections).",
            )),
            pool,
        };
        collector.max.set(i64::from(max_connections));
        must(self.registry.register(Box::new(collector)));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `new` rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The pool's state as gauges, refreshed by each scrape ([`Metrics::register_pool`]).
struct PoolCollector {
    pool: sqlx::PgPool,
    connections: IntGaugeVec,
    max: IntGauge,
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut out = self.connections.desc();
        out.extend(self.max.desc());
        out
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let open = i64::from(self.pool.size());
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(i64::MAX);
        self.connections.with_label_values(&["idle"]).set(idle);
        self.connections
            .with_label_values(&["in_use"])
            .set((open - idle).max(0));
        let mut out = self.connections.collect();
        out.extend(self.max.collect());
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_alert_rule_names() {
        let m = Metrics::new();
        m.grpc_handled
            .with_label_values(&["unary", "order.v1.OrderService", "GetOrder", "OK"])
            .inc();
        m.grpc_handling_seconds
            .with_label_values(&["unary", "order.v1.OrderService", "GetOrder"])
            .observe(0.01);
        m.circuit_breaker_state
            .with_label_values(&["outbox_publisher", "open"])
            .set(1);
        m.saga_stuck.set(3);
        m.outbox_unsent.set(2);
        let text = m.render();
        for needle in [
            "grpc_server_handled_total{grpc_code=\"OK\"",
            "grpc_server_handling_seconds_bucket{",
            "circuit_breaker_state{breaker=\"outbox_publisher\",state=\"open\"} 1",
            "saga_stuck_total 3",
            "outbox_unsent_events_total 2",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
