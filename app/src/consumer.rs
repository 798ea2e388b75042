//! The payment consumer (step 5): applies `payment.succeeded` / `payment.failed` messages.
//!
//! - Prefetch is bounded (`basic.qos`), handlers run concurrently up to
//!   `consumer_concurrency`, and a message is acked only after its transaction committed.
//! - The transaction records the AMQP `message_id` in `processed_messages`, so a redelivery
//!   (after a crash between commit and ack) or a duplicate publish changes nothing.
//! - Poison (no message_id, unknown routing key, unparseable body, unknown order) is rejected
//!   without requeue and dead-lettered through the DLX; transient failures (database down)
//!   are requeued.
//! - Stopping cancels the subscription (the broker sends nothing more), requeues the
//!   prefetched messages no handler has started, waits for running handlers to commit and
//!   ack, then closes the channel (anything still unacked returns to the queue).
//! - Each message is handled in a consumer span, the child of the producer's `traceparent`
//!   header when it carries one (traces on).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::Config;
use crate::db::Db;
use crate::db::payments::{self, PaymentEffect, PaymentKind};
use crate::metrics::Metrics;
use crate::mq::Mq;
use crate::report::{Report, deadline_reached};
use crate::traces;
use crate::worker::{WorkerEnd, WorkerTask};

/// A payment message body. Other fields are ignored.
#[derive(Debug, Deserialize)]
pub struct PaymentMessage {
    /// The order paid (or not).
    pub order_id: Uuid,
}

const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const STOPPED: u8 = 2;

#[derive(Debug, Default)]
struct Counters {
    state: AtomicU8,
    in_flight: AtomicU64,
    acked: AtomicU64,
    requeued: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates: AtomicU64,
}

/// What to do with a message after handling it.
#[derive(Debug)]
enum Disposition {
    Ack(PaymentEffect),
    DeadLetter(String),
    Requeue(String),
}

/// The running consumer.
#[derive(Debug)]
pub struct PaymentConsumer {
    counters: Arc<Counters>,
    worker: WorkerTask,
}

struct Worker {
    db: Db,
    mq: Mq,
    metrics: Arc<Metrics>,
    counters: Arc<Counters>,
    prefetch: u16,
    concurrency: usize,
}

impl PaymentConsumer {
    /// Subscribes to the payments queue.
    pub fn start(config: &Config, db: Db, mq: Mq, metrics: Arc<Metrics>) -> Self {
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            db,
            mq,
            metrics,
            counters: counters.clone(),
            prefetch: config.prefetch,
            concurrency: config.consumer_concurrency,
        };
        Self {
            counters,
            worker: WorkerTask::spawn(|stop| worker.run(stop)),
        }
    }

    /// Messages acked since start (applied, duplicate or ignored).
    pub fn acked_total(&self) -> u64 {
        self.counters.acked.load(Ordering::SeqCst)
    }

    /// Status for the control protocol.
    pub fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        json!({
            "state": match c.state.load(Ordering::SeqCst) {
                RUNNING => "running",
                STOPPING => "stopping",
                _ => "stopped",
            },
            "in_flight": c.in_flight.load(Ordering::SeqCst),
            "acked_total": c.acked.load(Ordering::SeqCst),
            "requeued_total": c.requeued.load(Ordering::SeqCst),
            "dead_lettered_total": c.dead_lettered.load(Ordering::SeqCst),
            "duplicates_total": c.duplicates.load(Ordering::SeqCst),
        })
    }

    /// Step 5. Counts: `in_flight` (handlers running when asked), `acked` (messages acked
    /// while stopping), `requeued` (prefetched but unstarted, returned to the queue),
    /// `abandoned` (handlers cut at the deadline; their messages return to the queue when the
    /// channel closes, and a committed one is recognised as a duplicate on redelivery).
    pub async fn stop(&self, deadline: Instant) -> Report {
        let c = &self.counters;
        let in_flight = c.in_flight.load(Ordering::SeqCst);
        let acked_before = c.acked.load(Ordering::SeqCst);
        let requeued_before = c.requeued.load(Ordering::SeqCst);
        if c.state.load(Ordering::SeqCst) == RUNNING {
            c.state.store(STOPPING, Ordering::SeqCst);
        }
        let finished = self.worker.stop(deadline).await == WorkerEnd::Finished;
        c.state.store(STOPPED, Ordering::SeqCst);
        let abandoned = if finished {
            0
        } else {
            c.in_flight.load(Ordering::SeqCst)
        };
        let report = Report::new()
            .count("in_flight", in_flight)
            .count("acked", c.acked.load(Ordering::SeqCst) - acked_before)
            .count(
                "requeued",
                c.requeued.load(Ordering::SeqCst) - requeued_before,
            )
            .count("abandoned", abandoned);
        if finished {
            report
        } else {
            deadline_reached(
                report,
                format!(
                    "{abandoned} handler(s) still running at the deadline were abandoned; their messages return to the queue"
                ),
            )
        }
    }
}

impl Worker {
    async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        loop {
            if stop.is_cancelled() {
                break;
            }
            match this.clone().consume(&stop).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "payment consumer lost its subscription; resubscribing");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Consumes until stopped (Ok) or the subscription breaks (Err).
    async fn consume(self: Arc<Self>, stop: &CancellationToken) -> Result<(), String> {
        let channel = match self.mq.channel().await {
            Ok(c) => c,
            Err(crate::mq::MqError::Closed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let tag = format!("order-service-{}", Uuid::new_v4().simple());
        let mut consumer = channel
            .basic_consume(
                self.mq.topology.payments_queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let handlers = TaskTracker::new();
        let broken = loop {
            let permit = tokio::select! {
                biased;
                () = stop.cancelled() => break None,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break None,
                },
            };
            let next = tokio::select! {
                biased;
                () = stop.cancelled() => break None,
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let this = self.clone();
                    this.counters.in_flight.fetch_add(1, Ordering::SeqCst);
                    handlers.spawn(async move {
                        this.handle(delivery).await;
                        this.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
                        drop(permit);
                    });
                }
                Some(Err(e)) => break Some(e.to_string()),
                None => break Some("the broker cancelled the subscription".to_owned()),
            }
        };
        if broken.is_none() {
            // Stop: no more deliveries, then hand back what was prefetched but not started.
            let cancelled = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
            if let Err(e) = &cancelled {
                tracing::warn!(error = %e, "basic.cancel failed; closing the channel requeues prefetched messages");
            }
            // After cancel-ok the stream yields what was already delivered, then ends.
            while cancelled.is_ok()
                && let Some(Ok(delivery)) = consumer.next().await
            {
                if self.requeue(&delivery).await {
                    self.metrics
                        .consumer_messages
                        .with_label_values(&["requeued"])
                        .inc();
                }
            }
        }
        handlers.close();
        handlers.wait().await;
        let _ = channel.close(200, "payment consumer stopped".into()).await;
        broken.map_or(Ok(()), Err)
    }

    async fn handle(&self, delivery: Delivery) {
        let span = tracing::info_span!(
            "payment.process",
            otel.name = %format_args!("process {}", delivery.routing_key.as_str()),
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation = "process",
            messaging.destination.name = %delivery.exchange.as_str(),
            messaging.rabbitmq.destination.routing_key = %delivery.routing_key.as_str(),
            messaging.message.id = tracing::field::Empty,
        );
        if let Some(id) = delivery.properties.message_id() {
            span.record("messaging.message.id", id.as_str());
        }
        // The producer's trace continues here (the payment is the next step of the order's).
        traces::set_parent(
            &span,
            traces::extract_amqp(delivery.properties.headers().as_ref()),
        );
        self.dispose(delivery).instrument(span).await;
    }

    async fn dispose(&self, delivery: Delivery) {
        let disposition = self.process(&delivery).await;
        let outcome = match disposition {
            Disposition::Ack(effect) => {
                let label = match effect {
                    PaymentEffect::Applied(_) => "applied",
                    PaymentEffect::Duplicate => {
                        self.counters.duplicates.fetch_add(1, Ordering::SeqCst);
                        "duplicate"
                    }
                    PaymentEffect::Ignored(_) => "ignored",
                    PaymentEffect::UnknownOrder => "dead_lettered",
                };
                match delivery.acker.ack(BasicAckOptions::default()).await {
                    Ok(_) => {
                        self.counters.acked.fetch_add(1, Ordering::SeqCst);
                        label
                    }
                    Err(e) => {
                        // Committed but not acked: the redelivery will be a duplicate.
                        tracing::warn!(error = %e, "ack failed after commit; the redelivery will be ignored as a duplicate");
                        "ack_failed"
                    }
                }
            }
            Disposition::DeadLetter(reason) => {
                tracing::warn!(reason = %reason, routing_key = %delivery.routing_key, "dead-lettering a poison payment message");
                let reject = BasicRejectOptions { requeue: false };
                if delivery.acker.reject(reject).await.is_ok() {
                    self.counters.dead_lettered.fetch_add(1, Ordering::SeqCst);
                }
                "dead_lettered"
            }
            Disposition::Requeue(reason) => {
                tracing::warn!(reason = %reason, "payment message failed transiently; requeueing");
                // A short pause so a database outage does not become a redelivery storm.
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.requeue(&delivery).await;
                "requeued"
            }
        };
        self.metrics
            .consumer_messages
            .with_label_values(&[outcome])
            .inc();
    }

    /// Returns `delivery` to the queue (nack with requeue); whether the broker took it.
    async fn requeue(&self, delivery: &Delivery) -> bool {
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let requeued = delivery.acker.nack(requeue).await.is_ok();
        if requeued {
            self.counters.requeued.fetch_add(1, Ordering::SeqCst);
        }
        requeued
    }

    async fn process(&self, delivery: &Delivery) -> Disposition {
        let Some(message_id) = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .filter(|id| !id.is_empty())
        else {
            return Disposition::DeadLetter(
                "no message_id property (needed for deduplication)".into(),
            );
        };
        let Some(kind) = PaymentKind::from_routing_key(delivery.routing_key.as_str()) else {
            return Disposition::DeadLetter(format!(
                "unknown routing key `{}`; expected payment.succeeded or payment.failed",
                delivery.routing_key.as_str()
            ));
        };
        let body: PaymentMessage = match serde_json::from_slice(&delivery.data) {
            Ok(body) => body,
            Err(e) => {
                return Disposition::DeadLetter(format!(
                    "body is not {{\"order_id\": \"<uuid>\"}} JSON: {e}"
                ));
            }
        };
        match payments::apply(self.db.pool(), &message_id, kind, body.order_id).await {
            Ok(PaymentEffect::UnknownOrder) => {
                Disposition::DeadLetter(format!("order {} does not exist", body.order_id))
            }
            Ok(effect) => Disposition::Ack(effect),
            Err(e) => Disposition::Requeue(e.to_string()),
        }
    }
}
