//! The service's side of the quiesce control protocol: the eight sub-steps (the protocol
//! crate's table: `wire::SubStep`, grouped into five verbs) mapped onto the components' stop
//! functions, the `db`/`redis`/`mq` health checks, and per-component status.
//!
//! Under quiesce (`QUIESCE_CONTROL_SOCKET` set) the supervisor drives the steps over the socket;
//! without it, SIGTERM runs the same handlers in the same order through `Agent::run_local`.
//! Either way each sub-step is logged at start and end with its duration and counts.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use quiesce_protocol::agent::{Agent, HandlerError, Report, StepCtx};
pub use quiesce_protocol::wire::{StepReply, SubStep};

use crate::app::{App, SERVICES};
use crate::report::{Outcome, StopReport};

/// How long each health check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds the agent for `app` (not yet serving: call `serve_from_env` or `run_local`).
pub fn agent(app: &Arc<App>) -> Agent {
    let mut builder = Agent::builder("order-service").check_timeout(CHECK_TIMEOUT);
    for service in SERVICES {
        builder = builder.service(service);
    }
    for substep in SubStep::ALL {
        let app = app.clone();
        builder = builder.on(substep, move |ctx: StepCtx| {
            let app = app.clone();
            async move { run_logged(&app, ctx).await }
        });
    }
    let (db, redis, mq) = (app.clone(), app.clone(), app.clone());
    let status = app.clone();
    builder
        .check("db", true, move || {
            let app = db.clone();
            async move { app.check_db().await.map_err(HandlerError::msg) }
        })
        .check("redis", true, move || {
            let app = redis.clone();
            async move { app.check_redis().await.map_err(HandlerError::msg) }
        })
        .check("mq", true, move || {
            let app = mq.clone();
            async move { app.check_mq().await.map_err(HandlerError::msg) }
        })
        .status(move || status.status())
        .build()
}

async fn run_logged(app: &App, ctx: StepCtx) -> Result<Report, HandlerError> {
    let substep = ctx.substep();
    let step = substep.step_number();
    let budget_ms = ctx.remaining().as_millis() as u64;
    tracing::info!(step, substep = %substep, budget_ms, local = ctx.is_local(), "shutdown step started");
    let started = StdInstant::now();
    let report = app.run_substep(substep, ctx.deadline()).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    let counts = serde_json::to_string(&report.counts).unwrap_or_default();
    match report.outcome {
        Outcome::Ok => {
            tracing::info!(step, substep = %substep, duration_ms, counts, "shutdown step finished");
        }
        outcome => tracing::warn!(
            step,
            substep = %substep,
            duration_ms,
            counts,
            ?outcome,
            // Not `message`: that name would replace the event's text in JSON logs.
            note = report.message.as_deref().unwrap_or(""),
            "shutdown step did not finish cleanly"
        ),
    }
    to_protocol(report)
}

/// Maps a component's stop report to the agent's: counts kept; a component that reached its
/// (soft) deadline and wrapped up still reports its counts, with `deadline_reached: 1`, the reason
/// as the note, and outcome `timeout`; an error becomes the handler's error.
pub fn to_protocol(report: StopReport) -> Result<Report, HandlerError> {
    let mut out = Report::new();
    for (name, value) in &report.counts {
        out = out.count(*name, *value);
    }
    match report.outcome {
        Outcome::Ok => Ok(out),
        Outcome::Timeout => Ok(out.count("deadline_reached", 1).timed_out().note(
            report
                .message
                .unwrap_or_else(|| "deadline reached".to_owned()),
        )),
        Outcome::Error => Err(HandlerError::msg(
            report.message.unwrap_or_else(|| "failed".to_owned()),
        )),
    }
}

/// Runs every remaining step in-process within `budget` (SIGTERM without a supervisor, and
/// tests): the same handlers and order the supervisor would drive.
pub async fn stop_all(app: &Arc<App>, budget: Duration) -> Vec<StepReply> {
    agent(app).run_local(budget).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_map_to_the_protocol() {
        let ok = to_protocol(StopReport::ok().count("acked", 3)).unwrap();
        assert_eq!(ok.counts().get("acked"), Some(&3));
        let late = to_protocol(
            StopReport::ok()
                .count("requests_cancelled", 2)
                .timeout("2 cancelled"),
        )
        .unwrap();
        assert_eq!(late.counts().get("requests_cancelled"), Some(&2));
        assert_eq!(late.counts().get("deadline_reached"), Some(&1));
        assert!(
            late.is_timed_out(),
            "a step cut at its deadline is a timeout"
        );
        let err = to_protocol(StopReport::ok().error("broken pipe")).unwrap_err();
        assert_eq!(err.message(), "broken pipe");
    }
}
