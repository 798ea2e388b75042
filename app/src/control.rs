//! The service's side of the quiesce control protocol: the eight sub-steps (the protocol
//! crate's table: `wire::SubStep`, grouped into five verbs) mapped onto the components' stop
//! functions, the `db`/`redis`/`mq` health checks, and per-component status.
//!
//! Under quiesce (`QUIESCE_CONTROL_SOCKET` set) the supervisor drives the steps over the socket;
//! without it, SIGTERM runs the same handlers in the same order through `Agent::run_local`.
//! Either way the agent logs each sub-step's end (verb, outcome, duration); the app adds one
//! line when a sub-step starts (its number and budget, which the agent logs per verb only) and
//! one when it ends with what only the app knows: the stop function's counts and note.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use quiesce_protocol::agent::{Agent, HandlerError, Report, StepCtx};
pub use quiesce_protocol::wire::{StepReply, SubStep};

use crate::app::{App, SERVICES};
use crate::report::{Outcome, ReportExt, noted};

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
    let (result, note) = noted(app.run_substep(substep, ctx.deadline())).await;
    log_end(
        step,
        substep,
        started.elapsed().as_millis() as u64,
        &result,
        note,
    );
    result
}

/// The app's line at a sub-step's end: the counts (as JSON text: a log field cannot hold a map)
/// and, when it did not finish cleanly, the outcome and why.
fn log_end(
    step: u8,
    substep: SubStep,
    duration_ms: u64,
    result: &Result<Report, HandlerError>,
    note: Option<String>,
) {
    let (outcome, counts, note) = match result {
        Ok(report) => (
            report.outcome(),
            serde_json::to_string(report.counts()).unwrap_or_default(),
            note.unwrap_or_default(),
        ),
        Err(e) => (Outcome::Error, "{}".to_owned(), e.message().to_owned()),
    };
    if outcome == Outcome::Ok {
        tracing::info!(step, substep = %substep, duration_ms, counts, "shutdown step finished");
    } else {
        tracing::warn!(
            step,
            substep = %substep,
            duration_ms,
            counts,
            outcome = outcome.as_str(),
            // Not `message`: that name would replace the event's text in JSON logs.
            note = %note,
            "shutdown step did not finish cleanly"
        );
    }
}

/// Runs every remaining step in-process within `budget` (SIGTERM without a supervisor, and
/// tests): the same handlers and order the supervisor would drive.
pub async fn stop_all(app: &Arc<App>, budget: Duration) -> Vec<StepReply> {
    agent(app).run_local(budget).await
}
