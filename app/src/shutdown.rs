//! The app's side of the nine shutdown steps as data: which sub-step belongs to which control
//! verb and seed step, in order. The control agent and the local sequencer (SIGTERM without a
//! supervisor) both walk this table; [`crate::app::App::run_substep`] does the work.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::app::App;
use crate::report::{Outcome, StopReport};

/// One unit of shutdown work owned by the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubStep {
    /// Step 2: close the gRPC listener.
    StopAccepting,
    /// Step 3: wait for in-flight RPCs, cancel the rest at the deadline.
    DrainInFlight,
    /// Step 4: stop the expiry job.
    StopCron,
    /// Step 5: stop the payment consumer.
    StopConsumer,
    /// Step 6: stop the outbox poller.
    StopPoller,
    /// Step 7: close the RabbitMQ connection.
    CloseMq,
    /// Step 8: close Redis.
    CloseRedis,
    /// Step 9: close the PostgreSQL pool.
    CloseDb,
}

/// A control verb and the sub-steps it runs, in order; `share` is the fraction of the local
/// budget the verb may use (unused time carries over to the next verb).
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// The control protocol verb.
    pub verb: &'static str,
    /// Its sub-steps.
    pub substeps: &'static [SubStep],
    /// Share of the local shutdown budget.
    pub share: f64,
}

/// The verbs in the order the protocol enforces.
pub const STEPS: [Step; 5] = [
    Step {
        verb: "drain",
        substeps: &[SubStep::StopAccepting, SubStep::DrainInFlight],
        share: 0.4,
    },
    Step {
        verb: "stop-cron",
        substeps: &[SubStep::StopCron],
        share: 0.1,
    },
    Step {
        verb: "stop-consumer",
        substeps: &[SubStep::StopConsumer],
        share: 0.2,
    },
    Step {
        verb: "stop-poller",
        substeps: &[SubStep::StopPoller],
        share: 0.15,
    },
    Step {
        verb: "close",
        substeps: &[SubStep::CloseMq, SubStep::CloseRedis, SubStep::CloseDb],
        share: 0.15,
    },
];

impl SubStep {
    /// Every sub-step in order.
    pub const ALL: [SubStep; 8] = [
        SubStep::StopAccepting,
        SubStep::DrainInFlight,
        SubStep::StopCron,
        SubStep::StopConsumer,
        SubStep::StopPoller,
        SubStep::CloseMq,
        SubStep::CloseRedis,
        SubStep::CloseDb,
    ];

    /// The protocol's sub-step name.
    pub fn name(self) -> &'static str {
        match self {
            Self::StopAccepting => "stop-accepting",
            Self::DrainInFlight => "drain-in-flight",
            Self::StopCron => "stop-cron",
            Self::StopConsumer => "stop-consumer",
            Self::StopPoller => "stop-poller",
            Self::CloseMq => "close-mq",
            Self::CloseRedis => "close-redis",
            Self::CloseDb => "close-db",
        }
    }

    /// The step number in the seed's nine-step order.
    pub fn seed_step(self) -> u8 {
        match self {
            Self::StopAccepting => 2,
            Self::DrainInFlight => 3,
            Self::StopCron => 4,
            Self::StopConsumer => 5,
            Self::StopPoller => 6,
            Self::CloseMq => 7,
            Self::CloseRedis => 8,
            Self::CloseDb => 9,
        }
    }
}

/// What one sub-step did.
#[derive(Debug, Clone, Serialize)]
pub struct SubStepResult {
    /// Which.
    pub substep: SubStep,
    /// Its verb.
    pub verb: &'static str,
    /// Outcome and counts.
    #[serde(flatten)]
    pub report: StopReport,
    /// How long it took.
    pub duration_ms: u64,
}

/// Runs every sub-step in order within `budget` (SIGTERM without a supervisor). Each verb may
/// use its share of the budget plus whatever earlier verbs left unused; a sub-step that times
/// out is recorded and the sequence goes on.
pub async fn run_local(app: &App, budget: Duration) -> Vec<SubStepResult> {
    let start = Instant::now();
    let overall = start + budget;
    let mut results = Vec::new();
    let mut allotted = Duration::ZERO;
    for step in STEPS {
        allotted += budget.mul_f64(step.share);
        let deadline = (start + allotted).min(overall);
        for &substep in step.substeps {
            let began = Instant::now();
            tracing::info!(
                step = substep.seed_step(),
                substep = substep.name(),
                verb = step.verb,
                "shutdown step started"
            );
            let report =
                match tokio::time::timeout_at(deadline, app.run_substep(substep, deadline)).await {
                    Ok(report) => report,
                    Err(_) => StopReport::ok().timeout("cut at the step deadline"),
                };
            let duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
            match report.outcome {
                Outcome::Ok => {
                    tracing::info!(step = substep.seed_step(), substep = substep.name(), duration_ms, counts = ?report.counts, "shutdown step finished")
                }
                _ => {
                    tracing::warn!(step = substep.seed_step(), substep = substep.name(), duration_ms, outcome = ?report.outcome, message = report.message.as_deref().unwrap_or(""), counts = ?report.counts, "shutdown step did not finish cleanly")
                }
            }
            results.push(SubStepResult {
                substep,
                verb: step.verb,
                report,
                duration_ms,
            });
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_every_substep_once_in_seed_order() {
        let flat: Vec<SubStep> = STEPS
            .iter()
            .flat_map(|s| s.substeps.iter().copied())
            .collect();
        assert_eq!(flat, SubStep::ALL);
        let numbers: Vec<u8> = flat.iter().map(|s| s.seed_step()).collect();
        assert_eq!(numbers, (2..=9).collect::<Vec<_>>());
        let total: f64 = STEPS.iter().map(|s| s.share).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}
