//! The assembled service: connects the dependencies, starts every component, and exposes the
//! hooks the shutdown steps, health checks and status need. Start order is the reverse of the
//! stop order: dependencies first (DB, Redis, MQ), then the background workers, then the
//! listeners, so nothing is served before it can be handled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::Config;
use crate::consumer::PaymentConsumer;
use crate::control::SubStep;
use crate::cron::ExpiryJob;
use crate::db::Db;
use crate::error::StartError;
use crate::grpc::GrpcServer;
use crate::grpc::service::OrderApi;
use crate::metrics::Metrics;
use crate::metrics_server::MetricsServer;
use crate::mq::Mq;
use crate::outbox::OutboxPoller;
use crate::redis_store::RedisStore;
use crate::report::{HandlerError, Report};

/// The gRPC service names served (the supervisor's health server reports them).
pub const SERVICES: [&str; 1] = ["order.v1.OrderService"];

/// One dependency check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// "db", "redis" or "mq".
    pub name: &'static str,
    /// Whether readiness depends on it.
    pub required: bool,
    /// Whether it answered.
    pub up: bool,
    /// How long it took.
    pub latency_ms: f64,
    /// Why it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The running service.
#[derive(Debug)]
pub struct App {
    config: Config,
    metrics: Arc<Metrics>,
    db: Db,
    redis: RedisStore,
    mq: Mq,
    grpc: GrpcServer,
    consumer: PaymentConsumer,
    poller: OutboxPoller,
    cron: ExpiryJob,
    metrics_server: Option<MetricsServer>,
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
    env_var: &'static str,
) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what,
            addr,
            source,
            env_var,
        })
}

impl App {
    /// Connects to PostgreSQL (migrating it), Redis and RabbitMQ, then starts the cron job, the
    /// consumer, the outbox poller, `/metrics` and the gRPC server.
    pub async fn start(config: Config) -> Result<Arc<Self>, StartError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        tracing::info!(
            database = %config.database_url,
            redis = %config.redis_url,
            amqp = %config.amqp_url,
            "connecting to dependencies"
        );
        let db = Db::connect(&config).await?;
        metrics.register_pool(db.pool().clone(), config.db_max_connections);
        let redis = RedisStore::connect(&config).await?;
        let mq = Mq::connect(&config).await?;

        let cron = ExpiryJob::start(&config, db.clone(), metrics.clone());
        let consumer = PaymentConsumer::start(&config, db.clone(), mq.clone(), metrics.clone());
        let wake = Arc::new(tokio::sync::Notify::new());
        let poller = OutboxPoller::start(
            &config,
            db.clone(),
            mq.clone(),
            metrics.clone(),
            wake.clone(),
        );

        let metrics_server = match config.metrics_addr {
            Some(addr) => {
                let listener = bind(addr, "metrics", "APP_METRICS_ADDR").await?;
                Some(
                    MetricsServer::start(listener, metrics.clone()).map_err(|source| {
                        StartError::Bind {
                            what: "metrics",
                            addr,
                            source,
                            env_var: "APP_METRICS_ADDR",
                        }
                    })?,
                )
            }
            None => None,
        };
        let listener = bind(config.grpc_addr, "gRPC", "APP_GRPC_ADDR").await?;
        let api = OrderApi::new(db.clone(), redis.clone(), wake, config.idempotency_lease);
        let grpc = GrpcServer::start(listener, api, metrics.clone()).map_err(|source| {
            StartError::Bind {
                what: "gRPC",
                addr: config.grpc_addr,
                source,
                env_var: "APP_GRPC_ADDR",
            }
        })?;
        Ok(Arc::new(Self {
            config,
            metrics,
            db,
            redis,
            mq,
            grpc,
            consumer,
            poller,
            cron,
            metrics_server,
        }))
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The gRPC address actually bound (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr()
    }

    /// The `/metrics` address actually bound, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(MetricsServer::local_addr)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The RabbitMQ handle.
    pub fn mq(&self) -> &Mq {
        &self.mq
    }

    /// The payment consumer.
    pub fn consumer(&self) -> &PaymentConsumer {
        &self.consumer
    }

    /// The outbox poller.
    pub fn poller(&self) -> &OutboxPoller {
        &self.poller
    }

    /// The expiry job.
    pub fn cron(&self) -> &ExpiryJob {
        &self.cron
    }

    /// Runs one shutdown sub-step under `deadline`: its stop function's report, or its error.
    pub async fn run_substep(
        &self,
        substep: SubStep,
        deadline: Instant,
    ) -> Result<Report, HandlerError> {
        match substep {
            SubStep::StopAccepting => Ok(self.grpc.stop_accepting(deadline).await),
            SubStep::DrainInFlight => Ok(self.grpc.drain(deadline).await),
            SubStep::StopCron => Ok(self.cron.stop(deadline).await),
            SubStep::StopConsumer => Ok(self.consumer.stop(deadline).await),
            SubStep::StopPoller => Ok(self.poller.stop(deadline).await),
            SubStep::CloseMq => self.mq.close(deadline).await,
            SubStep::CloseRedis => Ok(self.redis.close(deadline).await),
            // The spans still queued are flushed by the caller once this step's span has ended
            // (`control::traced_substep`).
            SubStep::CloseDb => Ok(self.db.close(deadline).await),
        }
    }

    /// DB `SELECT 1`.
    pub async fn check_db(&self) -> Result<(), String> {
        self.db.ping().await
    }

    /// Redis PING.
    pub async fn check_redis(&self) -> Result<(), String> {
        self.redis.ping().await
    }

    /// AMQP connection up and a channel opens.
    pub async fn check_mq(&self) -> Result<(), String> {
        self.mq.check().await
    }

    /// Every dependency check, concurrently, each bounded by `timeout`.
    pub async fn health(&self, timeout: Duration) -> Vec<CheckResult> {
        async fn timed(
            name: &'static str,
            timeout: Duration,
            check: impl Future<Output = Result<(), String>>,
        ) -> CheckResult {
            let start = StdInstant::now();
            let result = tokio::time::timeout(timeout, check)
                .await
                .unwrap_or_else(|_| Err(format!("timeout after {} ms", timeout.as_millis())));
            CheckResult {
                name,
                required: true,
                up: result.is_ok(),
                latency_ms: start.elapsed().as_secs_f64() * 1000.0,
                error: result.err(),
            }
        }
        let (db, redis, mq) = tokio::join!(
            timed("db", timeout, self.check_db()),
            timed("redis", timeout, self.check_redis()),
            timed("mq", timeout, self.check_mq()),
        );
        vec![db, redis, mq]
    }

    /// Per-component state and in-flight counts (the protocol's `status.components`).
    pub fn status(&self) -> serde_json::Value {
        json!({
            "grpc": {
                "state": self.grpc.state(),
                "in_flight": self.grpc.in_flight(),
                "addr": self.grpc_addr().to_string(),
            },
            "cron": self.cron.status(),
            "consumer": self.consumer.status(),
            "poller": self.poller.status(),
            "mq": { "state": if self.mq_closed_hint() { "closed" } else { "open" } },
            "redis": { "state": if self.redis.is_closed() { "closed" } else { "open" } },
            "db": {
                "state": if self.db.is_closed() { "closed" } else { "open" },
                "application_name": self.db.application_name(),
                "pool_size": self.db.pool().size(),
                "pool_idle": self.db.pool().num_idle(),
            },
        })
    }

    fn mq_closed_hint(&self) -> bool {
        // `status` must not wait on the connection lock held by a reconnect; a poisoned or
        // busy lock reads as "open".
        self.mq.try_is_closed().unwrap_or(false)
    }
}
