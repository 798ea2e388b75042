//! The `health` answer: every registered dependency check runs at once, each on its own task
//! under its own timeout, so one slow or hung check costs its timeout and no more, and a
//! panicking check is reported down instead of taking the connection with it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Agent;
use crate::wire::{CheckReply, HealthReply};

impl Agent {
    /// Runs every check concurrently, each under its timeout, and reports them in registration
    /// order.
    pub async fn health(&self) -> HealthReply {
        let running: Vec<_> = self
            .inner
            .app
            .checks
            .iter()
            .map(|check| {
                let run = Arc::clone(&check.run);
                let timeout = check.timeout.unwrap_or(self.inner.app.check_timeout);
                let task = tokio::spawn(async move {
                    let started = Instant::now();
                    let result = tokio::time::timeout(timeout, run()).await;
                    (result, started.elapsed())
                });
                (check, timeout, task)
            })
            .collect();
        let mut checks = Vec::with_capacity(running.len());
        for (check, timeout, task) in running {
            let (up, latency, error) = match task.await {
                Ok((Ok(Ok(())), took)) => (true, took, None),
                Ok((Ok(Err(e)), took)) => (false, took, Some(e.message().to_owned())),
                Ok((Err(_), _)) => (
                    false,
                    timeout,
                    Some(format!("timed out after {}", human(timeout))),
                ),
                Err(e) => (
                    false,
                    Duration::ZERO,
                    Some(format!("the check failed: {e}")),
                ),
            };
            checks.push(CheckReply {
                name: check.name.clone(),
                required: check.required,
                up,
                latency_ms: (latency.as_secs_f64() * 10_000.0).round() / 10.0,
                error,
            });
        }
        HealthReply {
            ok: true,
            healthy: checks.iter().all(|c| c.up || !c.required),
            checks,
        }
    }
}

/// `250ms`, `1s`, `1.5s`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}
