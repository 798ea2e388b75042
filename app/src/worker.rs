//! Stopping a background worker task: the expiry job (step 4), the payment consumer (step 5) and
//! the outbox poller (step 6) all run as one spawned task that watches a cancellation token, and
//! all stop the same way: cancel the token, wait for the task to wind down by itself until the
//! soft deadline, and abort it past that. The three differ only in what they count and say about
//! it, so the sequence is written once, here, and each component keeps its own report.

use std::future::Future;
use std::sync::Mutex;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::report::soft_deadline;

/// How a worker's stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum WorkerEnd {
    /// The task returned by itself before the soft deadline (or had already been stopped).
    Finished,
    /// The task was still running at the soft deadline and was aborted (its future dropped).
    Aborted,
}

/// A spawned worker task and the token that asks it to stop.
#[derive(Debug)]
pub struct WorkerTask {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl WorkerTask {
    /// Spawns `run(token)`; the task should return soon after the token is cancelled.
    pub fn spawn<F>(run: impl FnOnce(CancellationToken) -> F) -> WorkerTask
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(stop.clone()));
        WorkerTask {
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Cancels the token, waits for the task until the soft deadline of `deadline`, and aborts it
    /// (waiting for the abort to take effect) if it is still running then. A second call finds
    /// no task and returns [`WorkerEnd::Finished`] at once.
    pub async fn stop(&self, deadline: Instant) -> WorkerEnd {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut task) = task else {
            return WorkerEnd::Finished;
        };
        if tokio::time::timeout_at(soft_deadline(deadline), &mut task)
            .await
            .is_ok()
        {
            return WorkerEnd::Finished;
        }
        task.abort();
        let _ = task.await;
        WorkerEnd::Aborted
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_returns_when_cancelled_finishes() {
        let worker = WorkerTask::spawn(|stop| async move { stop.cancelled().await });
        let end = worker.stop(Instant::now() + Duration::from_secs(1)).await;
        assert_eq!(end, WorkerEnd::Finished);
        let again = worker.stop(Instant::now() + Duration::from_secs(1)).await;
        assert_eq!(
            again,
            WorkerEnd::Finished,
            "a second stop finds nothing running"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_ignores_the_token_is_aborted_at_the_soft_deadline() {
        let worker = WorkerTask::spawn(|_stop| std::future::pending::<()>());
        let deadline = Instant::now() + Duration::from_secs(1);
        let soft = soft_deadline(deadline);
        assert_eq!(worker.stop(deadline).await, WorkerEnd::Aborted);
        assert_eq!(Instant::now(), soft, "aborted at the soft deadline");
    }
}
