//! The service's side of the quiesce control protocol: the eight sub-steps (the protocol
//! crate's table: `wire::SubStep`, grouped into five verbs) mapped onto the components' stop
//! functions, the `db`/`redis`/`mq` health checks, and per-component status.
//!
//! Under quiesce (`QUIESCE_CONTROL_SOCKET` set) the supervisor drives the steps over the socket;
//! without it, SIGTERM runs the same handlers in the same order through `Agent::run_local`.
//! Either way the agent logs each sub-step's start and end (`"sub-step started"` /
//! `"sub-step finished"`: number, verb, budget, outcome, duration, counts, note); the app adds
//! no lines of its own to that story. Each sub-step also runs in a span of its own ([`traced`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quiesce_protocol::agent::{Agent, HandlerError, Report, StepCtx};
pub use quiesce_protocol::wire::{STEPS, StepReply, SubStep};
use tracing::Instrument as _;

use crate::app::{App, SERVICES};
use crate::traces;

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
            async move {
                let work = app.run_substep(ctx.substep(), ctx.deadline());
                let result = traced(&ctx, work).await;
                // The last step: what is still queued goes now, its own span included.
                if ctx.substep() == SubStep::CloseDb
                    && let Some(t) = traces::installed()
                    && !t.flush(ctx.deadline()).await
                {
                    tracing::debug!("spans still queued at the close-db deadline were dropped");
                }
                result
            }
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

/// Runs one sub-step's `work` inside its own span: a child of the supervisor's span for that
/// shutdown step when it sent one (the protocol's `traceparent` extension), a trace of its own
/// otherwise. A sub-step the agent cuts at its hard deadline (this future dropped) still ends its
/// span with outcome `timeout`.
pub async fn traced<F>(ctx: &StepCtx, work: F) -> Result<Report, HandlerError>
where
    F: Future<Output = Result<Report, HandlerError>>,
{
    let substep = ctx.substep();
    let span = tracing::info_span!(
        parent: None,
        "substep",
        otel.name = substep.as_str(),
        otel.kind = "internal",
        otel.status_code = tracing::field::Empty,
        quiesce.step.number = substep.step_number(),
        quiesce.substep = substep.as_str(),
        quiesce.verb = ctx.verb().as_str(),
        quiesce.substep.budget_ms = u64::try_from(ctx.remaining().as_millis()).unwrap_or(u64::MAX),
        quiesce.step.outcome = tracing::field::Empty,
    );
    let parent = ctx.traceparent().map(|tp| tp.to_string());
    traces::set_parent(&span, traces::extract_traceparent(parent.as_deref()));
    let mut cut = Unfinished(Some(span.clone()));
    let result = work.instrument(span.clone()).await;
    cut.0 = None;
    record_outcome(
        &span,
        match &result {
            Ok(report) if report.is_timed_out() => "timeout",
            Ok(_) => "ok",
            Err(_) => "error",
        },
    );
    result
}

fn record_outcome(span: &tracing::Span, outcome: &str) {
    span.record("quiesce.step.outcome", outcome);
    if outcome != "ok" {
        span.record("otel.status_code", "ERROR");
    }
}

/// A sub-step span whose work has not finished: dropped so (the agent cut the handler at its
/// deadline), it records `timeout` before the span closes.
struct Unfinished(Option<tracing::Span>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(span) = self.0.take() {
            record_outcome(&span, "timeout");
        }
    }
}

/// Runs every remaining step in-process within `budget` (SIGTERM without a supervisor, and
/// tests): the same handlers and order the supervisor would drive.
pub async fn stop_all(app: &Arc<App>, budget: Duration) -> Vec<StepReply> {
    agent(app).run_local(budget).await
}
