//! `order-service`: the reference service run under quiesce. An order API over gRPC backed by
//! PostgreSQL, a transactional outbox relayed to RabbitMQ, a consumer of payment messages, a
//! cron job expiring stale orders, and Redis for idempotency keys — every component the
//! reference design's nine shutdown steps name, each with a stop function that takes a deadline and
//! reports what it did.
//!
//! # Layout
//!
//! | pattern | file |
//! |---|---|
//! | thin binary: config → runtime → [`run`] → exit code | `main.rs` |
//! | configuration (defaults ← TOML ← env/CLI), secrets redacted | `config.rs` |
//! | start-up errors that name the dependency and the fix | `error.rs` |
//! | assembling and starting the components | `app.rs` |
//! | control-protocol agent: steps → stop functions, checks, status | `control.rs` |
//! | gRPC server, stop-accepting + drain | `grpc/mod.rs` |
//! | RPC metrics, in-flight count, cancel-at-deadline (tower layer) | `grpc/layer.rs` |
//! | RPC handlers, validation → status codes, idempotency keys | `grpc/service.rs` |
//! | domain rules (statuses, validation, events) | `domain.rs` |
//! | PostgreSQL connect/create/migrate, pool close | `db/mod.rs` |
//! | order repository; state change + outbox row in one transaction | `db/orders.rs` |
//! | outbox table: claim with SKIP LOCKED, mark sent | `db/outbox.rs` |
//! | exactly-once effect of a message (processed_messages) | `db/payments.rs` |
//! | outbox relay with publisher confirms | `outbox.rs` |
//! | circuit breaker | `breaker.rs` |
//! | payment consumer: manual ack, DLX, requeue, drain on stop | `consumer.rs` |
//! | expiry job and `saga_stuck_total` | `cron.rs` |
//! | RabbitMQ connection and topology | `mq.rs` |
//! | Redis connection and idempotency keys | `redis_store.rs` |
//! | Prometheus metrics / `/metrics` endpoint | `metrics.rs` / `metrics_server.rs` |
//! | helpers over the protocol's step report (deadline reached, counts, soft deadline) | `report.rs` |
//! | stopping a worker task: cancel, wait to the soft deadline, abort | `worker.rs` |
//! | logging (JSON lines with trace ids) | `telemetry.rs` |
//! | OpenTelemetry traces: OTLP export, W3C context propagation | `traces.rs` |

pub mod app;
pub mod breaker;
pub mod config;
pub mod consumer;
pub mod control;
pub mod cron;
pub mod db;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod metrics_server;
pub mod mq;
pub mod outbox;
pub mod redis_store;
pub mod report;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod traces;
pub mod worker;

/// Generated `order.v1` protobuf types, server and client.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("order.v1");
}

use std::future::Future;

pub use app::App;
pub use config::Config;
pub use error::StartError;
pub use quiesce_protocol::wire::StepReply;
use quiesce_protocol::wire::{Outcome as ProtocolOutcome, StepStatus};

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    /// Every step verb with its state and outcome, in order.
    pub steps: Vec<StepStatus>,
    /// Whether a supervisor drove the steps over the control socket.
    pub supervised: bool,
}

impl RunSummary {
    /// The exit code: 0 when every step finished (a deadline reached counts as finished: what it
    /// cut short is in the counts), 1 when a step failed or never ran.
    pub fn exit_code(&self) -> u8 {
        let clean = self
            .steps
            .iter()
            .all(|s| matches!(s.outcome, Some(o) if o != ProtocolOutcome::Error));
        u8::from(!clean)
    }
}

/// Starts the service and serves until it is told to stop:
///
/// - with `QUIESCE_CONTROL_SOCKET` set, the control socket is served and the supervisor drives
///   the steps; the run ends after `close`. If `shutdown` fires first (a signal reached the app
///   directly), the remaining steps run in-process.
/// - without it, the run waits for `shutdown` and then runs every step in-process within
///   `config.shutdown_budget`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, StartError> {
    let budget = config.shutdown_budget;
    let app = App::start(config).await?;
    let agent = control::agent(&app);
    let handle = agent
        .serve_from_env()
        .await
        .map_err(|e| StartError::Control {
            detail: e.to_string(),
        })?;
    tracing::info!(
        grpc = %app.grpc_addr(),
        metrics = %app.metrics_addr().map_or_else(|| "off".to_owned(), |a| a.to_string()),
        control_socket = %handle.as_ref().map_or_else(|| "none".to_owned(), |h| h.path().display().to_string()),
        "order-service ready"
    );
    let supervised = handle.is_some();
    tokio::select! {
        // `closed` resolves once the reply to `close` has been written to the driver.
        () = agent.closed(), if supervised => {}
        () = shutdown => {
            tracing::info!(budget_ms = budget.as_millis() as u64, "stop requested; running the remaining steps in order");
            agent.run_local(budget).await;
        }
    }
    if let Some(handle) = handle {
        handle.shutdown().await;
    }
    Ok(RunSummary {
        steps: agent.status().steps,
        supervised,
    })
}
