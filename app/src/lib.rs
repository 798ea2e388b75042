//! `order-service`: the reference service run under quiesce. An order API over gRPC backed by
//! PostgreSQL, a transactional outbox relayed to RabbitMQ, a consumer of payment messages, a
//! cron job expiring stale orders, and Redis for idempotency keys — every component the
//! seed's nine shutdown steps name, each with a stop function that takes a deadline and
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
//! | the nine steps as a table; local ordered stop | `shutdown.rs` |
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
//! | stop reports (outcome + counts) | `report.rs` |
//! | logging | `telemetry.rs` |

pub mod app;
pub mod breaker;
pub mod config;
pub mod consumer;
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
pub mod shutdown;
pub mod telemetry;

/// Generated `order.v1` protobuf types, server and client.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("order.v1");
}

use std::future::Future;

pub use app::App;
pub use config::Config;
pub use error::StartError;
pub use shutdown::SubStepResult;

/// Starts the service, serves until `shutdown` resolves, then runs the nine steps' app side
/// in order within `config.shutdown_budget`. Returns what each step did.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Vec<SubStepResult>, StartError> {
    let budget = config.shutdown_budget;
    let app = App::start(config).await?;
    tracing::info!(
        grpc = %app.grpc_addr(),
        metrics = ?app.metrics_addr(),
        "order-service ready"
    );
    shutdown.await;
    tracing::info!(
        budget_ms = budget.as_millis() as u64,
        "shutdown requested; running the steps in order"
    );
    Ok(shutdown::run_local(&app, budget).await)
}
