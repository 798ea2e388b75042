//! The outbox poller (step 6): relays committed outbox rows to the events exchange.
//!
//! Each batch is one database transaction: claim up to `poll_batch` unsent rows with
//! `FOR UPDATE SKIP LOCKED`, publish them all on a confirm-mode channel, wait for every
//! confirm, then mark exactly those rows sent and commit. A crash anywhere before the commit
//! leaves the rows unsent, so they are published again later: delivery is at least once, and
//! consumers deduplicate with the AMQP `message_id` (the event id).
//!
//! A [`CircuitBreaker`] wraps publishing. Stopping lets the batch in progress finish (publish,
//! confirm, commit) and claims no new one.
//!
//! With traces on, each event's publish is a producer span in the trace of the request that
//! wrote it (its row stores the `traceparent`), and the message's `traceparent` header names
//! that span, so the consumer of the event continues the trace.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::breaker::{BreakerState, CircuitBreaker};
use crate::config::Config;
use crate::db::{Db, outbox};
use crate::metrics::Metrics;
use crate::mq::{Mq, MqError};
use crate::report::{Report, deadline_reached};
use crate::traces;
use crate::worker::{WorkerEnd, WorkerTask};

/// How long the poller waits for the broker's confirms of one batch.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, at most, the unsent-events gauge is recounted while busy.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const STOPPED: u8 = 2;

#[derive(Debug)]
struct Shared {
    state: AtomicU8,
    batch_in_progress: AtomicU64,
    published_total: AtomicU64,
    batches_total: AtomicU64,
    breaker: Mutex<BreakerState>,
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Channel(#[from] MqError),
    #[error("publish: {0}")]
    Publish(#[from] lapin::Error),
    #[error("the broker nacked event {0}")]
    Nacked(uuid::Uuid),
    #[error("no publisher confirm within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout,
}

/// The running poller.
#[derive(Debug)]
pub struct OutboxPoller {
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    worker: WorkerTask,
}

struct Relay {
    db: Db,
    mq: Mq,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    channel: Option<Channel>,
    batch: i64,
}

impl OutboxPoller {
    /// Starts relaying. `wake` lets writers signal "new rows committed".
    pub fn start(
        config: &Config,
        db: Db,
        mq: Mq,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(RUNNING),
            batch_in_progress: AtomicU64::new(0),
            published_total: AtomicU64::new(0),
            batches_total: AtomicU64::new(0),
            breaker: Mutex::new(BreakerState::Closed),
        });
        let breaker = CircuitBreaker::new(
            "outbox_publisher",
            config.breaker_failures,
            config.breaker_open_for,
            metrics.circuit_breaker_state.clone(),
        );
        let relay = Relay {
            db,
            mq,
            metrics,
            shared: shared.clone(),
            channel: None,
            batch: i64::from(config.poll_batch),
        };
        let (relay_wake, poll_interval) = (wake.clone(), config.poll_interval);
        Self {
            shared,
            wake,
            worker: WorkerTask::spawn(|stop| relay.run(breaker, stop, relay_wake, poll_interval)),
        }
    }

    /// The notifier writers use after committing an outbox row.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Events published and confirmed since start.
    pub fn published_total(&self) -> u64 {
        self.shared.published_total.load(Ordering::SeqCst)
    }

    /// Status for the control protocol.
    pub fn status(&self) -> serde_json::Value {
        json!({
            "state": match self.shared.state.load(Ordering::SeqCst) {
                RUNNING => "running",
                STOPPING => "stopping",
                _ => "stopped",
            },
            "batch_in_progress": self.shared.batch_in_progress.load(Ordering::SeqCst),
            "published_total": self.published_total(),
            "batches_total": self.shared.batches_total.load(Ordering::SeqCst),
            "breaker": *self.shared.breaker.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    /// Step 6. Counts: `batch_in_progress` (rows of the batch running when asked; 0 if idle),
    /// `published` (events confirmed while stopping), `published_total`.
    pub async fn stop(&self, deadline: Instant) -> Report {
        let in_progress = self.shared.batch_in_progress.load(Ordering::SeqCst);
        let published_before = self.published_total();
        if self.shared.state.load(Ordering::SeqCst) == RUNNING {
            self.shared.state.store(STOPPING, Ordering::SeqCst);
        }
        // An aborted batch rolls its transaction back: its rows stay unsent and are published
        // again by the next poller (at least once). A second stop finds the batch count already
        // reset and nothing published since, so it reports zeros.
        let finished = self.worker.stop(deadline).await == WorkerEnd::Finished;
        self.shared.state.store(STOPPED, Ordering::SeqCst);
        self.shared.batch_in_progress.store(0, Ordering::SeqCst);
        let report = Report::new()
            .count("batch_in_progress", in_progress)
            .count("published", self.published_total() - published_before)
            .count("published_total", self.published_total());
        if finished {
            report
        } else {
            deadline_reached(
                report,
                "the batch in progress did not finish by the deadline; its rows stay unsent and will be relayed again",
            )
        }
    }
}

impl Relay {
    async fn run(
        mut self,
        mut breaker: CircuitBreaker,
        stop: CancellationToken,
        wake: Arc<Notify>,
        poll_interval: Duration,
    ) {
        let mut last_count = Instant::now() - GAUGE_REFRESH;
        loop {
            if stop.is_cancelled() {
                break;
            }
            if let Err(wait) = breaker.allow(Instant::now()) {
                self.set_breaker(&breaker);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
            self.set_breaker(&breaker);
            match self.relay_batch().await {
                Ok(0) => {
                    self.refresh_unsent().await;
                    last_count = Instant::now();
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(poll_interval) => {}
                        () = wake.notified() => {}
                    }
                }
                Ok(_) => {
                    breaker.on_success();
                    self.set_breaker(&breaker);
                    if last_count.elapsed() >= GAUGE_REFRESH {
                        self.refresh_unsent().await;
                        last_count = Instant::now();
                    }
                }
                Err(e) => {
                    self.shared.batch_in_progress.store(0, Ordering::SeqCst);
                    let publishing = !matches!(e, BatchError::Db(_));
                    if publishing {
                        self.metrics.outbox_publish_failures.inc();
                        self.channel = None;
                        breaker.on_failure(Instant::now());
                        self.set_breaker(&breaker);
                    }
                    tracing::warn!(error = %e, "outbox batch failed; its events stay unsent and will be retried");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(poll_interval.min(Duration::from_secs(1))) => {}
                    }
                }
            }
        }
        if let Some(channel) = self.channel.take() {
            let _ = channel.close(200, "outbox poller stopped".into()).await;
        }
    }

    fn set_breaker(&self, breaker: &CircuitBreaker) {
        *self
            .shared
            .breaker
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = breaker.state();
    }

    async fn refresh_unsent(&self) {
        match outbox::count_unsent(self.db.pool()).await {
            Ok(n) => self.metrics.outbox_unsent.set(n),
            Err(e) => tracing::debug!(error = %e, "cannot count unsent outbox events"),
        }
    }

    async fn channel(&mut self) -> Result<Channel, BatchError> {
        if let Some(c) = &self.channel
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        let channel = self.mq.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        self.channel = Some(channel.clone());
        Ok(channel)
    }

    /// Relays one batch; returns how many events were published.
    async fn relay_batch(&mut self) -> Result<usize, BatchError> {
        let mut tx = self.db.pool().begin().await?;
        let batch = outbox::claim_batch(&mut tx, self.batch).await?;
        if batch.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        self.shared
            .batch_in_progress
            .store(batch.len() as u64, Ordering::SeqCst);
        let channel = self.channel().await?;
        let exchange = self.mq.topology.events_exchange.as_str();
        let mut confirms = Vec::with_capacity(batch.len());
        // One producer span per event, in the trace of the change that wrote it; it ends once
        // the batch is confirmed and marked sent.
        let mut spans = Vec::with_capacity(batch.len());
        for event in &batch {
            let span = publish_span(exchange, event);
            let properties = BasicProperties::default()
                .with_headers(traces::amqp_headers(&span))
                .with_message_id(event.event_id.to_string().into())
                .with_type(event.event_type.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_app_id("order-service".into())
                .with_timestamp(u64::try_from(event.created_at.timestamp()).unwrap_or(0));
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    event.event_type.as_str().into(),
                    BasicPublishOptions::default(),
                    event.payload.as_bytes(),
                    properties,
                )
                .instrument(span.clone())
                .await?;
            confirms.push(confirm);
            spans.push(span);
        }
        let confirmed = async {
            for (event, confirm) in batch.iter().zip(confirms) {
                if confirm.await?.is_nack() {
                    return Err(BatchError::Nacked(event.event_id));
                }
            }
            Ok(())
        };
        tokio::time::timeout(CONFIRM_TIMEOUT, confirmed)
            .await
            .map_err(|_| BatchError::ConfirmTimeout)??;
        let ids: Vec<i64> = batch.iter().map(|e| e.id).collect();
        outbox::mark_sent(&mut tx, &ids).await?;
        tx.commit().await?;
        let now = chrono::Utc::now();
        for event in &batch {
            let lag = (now - event.created_at).to_std().unwrap_or_default();
            self.metrics
                .outbox_relay_lag
                .with_label_values(&[event.event_type.as_str()])
                .observe(lag.as_secs_f64());
        }
        self.metrics.outbox_published.inc_by(batch.len() as u64);
        self.shared
            .published_total
            .fetch_add(batch.len() as u64, Ordering::SeqCst);
        self.shared.batches_total.fetch_add(1, Ordering::SeqCst);
        self.shared.batch_in_progress.store(0, Ordering::SeqCst);
        drop(spans);
        Ok(batch.len())
    }
}

/// The producer span of relaying `event`: the child of the context stored with its row (a root
/// when there is none).
fn publish_span(exchange: &str, event: &outbox::OutboxEvent) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "outbox.publish",
        otel.name = %format_args!("publish {}", event.event_type),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation = "publish",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = %event.event_type,
        messaging.message.id = %event.event_id,
    );
    traces::set_parent(
        &span,
        traces::extract_traceparent(event.traceparent.as_deref()),
    );
    span
}
