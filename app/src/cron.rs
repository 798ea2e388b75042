//! The expiry job (step 4), on a plain tokio interval: every `cron_interval` it expires orders
//! pending for longer than `expire_after` (status and `order.expired` event in one statement)
//! and recounts the orders pending longer than `stuck_after` into `saga_stuck_total`.
//! Stopping waits for a run in progress; no new run starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::db::{Db, orders};
use crate::metrics::Metrics;
use crate::report::{Report, deadline_reached};
use crate::worker::{WorkerEnd, WorkerTask};

/// Orders expired per statement (the job loops until a batch comes back short).
const EXPIRE_BATCH: i64 = 1000;
/// Most batches per run, so one run stays short even with a huge backlog.
const MAX_BATCHES_PER_RUN: usize = 20;

#[derive(Debug, Default)]
struct Shared {
    running: AtomicBool,
    stopped: AtomicBool,
    runs: AtomicU64,
    expired: AtomicU64,
}

/// The scheduled job.
#[derive(Debug)]
pub struct ExpiryJob {
    shared: Arc<Shared>,
    worker: WorkerTask,
}

struct Job {
    db: Db,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    expire_after: Duration,
    stuck_after: Duration,
}

impl ExpiryJob {
    /// Starts the schedule; the first run is immediate.
    pub fn start(config: &Config, db: Db, metrics: Arc<Metrics>) -> Self {
        let shared = Arc::new(Shared::default());
        let job = Job {
            db,
            metrics,
            shared: shared.clone(),
            expire_after: config.expire_after,
            stuck_after: config.stuck_after,
        };
        let every = config.cron_interval;
        Self {
            shared,
            worker: WorkerTask::spawn(|stop| job.schedule(every, stop)),
        }
    }

    /// Completed runs.
    pub fn runs(&self) -> u64 {
        self.shared.runs.load(Ordering::SeqCst)
    }

    /// Status for the control protocol.
    pub fn status(&self) -> serde_json::Value {
        let s = &self.shared;
        json!({
            "state": if s.stopped.load(Ordering::SeqCst) { "stopped" } else { "scheduled" },
            "job_running": s.running.load(Ordering::SeqCst),
            "runs_total": s.runs.load(Ordering::SeqCst),
            "expired_total": s.expired.load(Ordering::SeqCst),
        })
    }

    /// Step 4. Counts: `job_running` (1 if a run was in progress when asked; it was allowed
    /// to finish), `runs_total`, `expired_total`.
    pub async fn stop(&self, deadline: Instant) -> Report {
        let running = self.shared.running.load(Ordering::SeqCst);
        // An aborted run's statement is rolled back with its connection; the next instance
        // expires those orders instead.
        let finished = self.worker.stop(deadline).await == WorkerEnd::Finished;
        self.shared.stopped.store(true, Ordering::SeqCst);
        let report = Report::new()
            .count("job_running", u64::from(running))
            .count("runs_total", self.shared.runs.load(Ordering::SeqCst))
            .count("expired_total", self.shared.expired.load(Ordering::SeqCst));
        if finished {
            report
        } else {
            deadline_reached(
                report,
                "the expiry run in progress did not finish by the deadline and was cancelled",
            )
        }
    }
}

impl Job {
    async fn schedule(self, every: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            self.shared.running.store(true, Ordering::SeqCst);
            // Each run is its own trace.
            let span = tracing::info_span!(
                parent: None,
                "cron.expire_orders",
                otel.kind = "internal",
                expired = tracing::field::Empty,
            );
            let result = self.run_once().instrument(span.clone()).await;
            if let Ok(n) = &result {
                span.record("expired", n);
            }
            let _in_run = span.enter();
            self.shared.running.store(false, Ordering::SeqCst);
            self.shared.runs.fetch_add(1, Ordering::SeqCst);
            let label = match result {
                Ok(expired) => {
                    if expired > 0 {
                        tracing::info!(expired, "expired stale pending orders");
                    }
                    "ok"
                }
                Err(e) => {
                    tracing::warn!(error = %e, "expiry job failed; it runs again at the next tick");
                    "error"
                }
            };
            self.metrics.cron_runs.with_label_values(&[label]).inc();
        }
    }

    async fn run_once(&self) -> Result<u64, sqlx::Error> {
        let mut total = 0;
        for _ in 0..MAX_BATCHES_PER_RUN {
            let n = orders::expire_stale(
                self.db.pool(),
                self.expire_after.as_secs_f64(),
                EXPIRE_BATCH,
            )
            .await?;
            total += n;
            self.shared.expired.fetch_add(n, Ordering::SeqCst);
            self.metrics.orders_expired.inc_by(n);
            if n < EXPIRE_BATCH as u64 {
                break;
            }
        }
        let stuck = orders::count_stuck(self.db.pool(), self.stuck_after.as_secs_f64()).await?;
        self.metrics.saga_stuck.set(stuck);
        Ok(total)
    }
}
