//! The service's side of the quiesce control protocol: the eight sub-steps (the protocol
//! crate's table: `wire::SubStep`, grouped into five verbs) mapped onto the components' stop
//! functions, the `db`/`redis`/`mq` health checks, and per-component status.
//!
//! Under quiesce (`QUIESCE_CONTROL_SOCKET` set) the supervisor drives the steps over the socket;
//! without it, SIGTERM runs the same handlers in the same order through `Agent::run_local`.
//! Either way the agent logs each sub-step's start and end (`"sub-step started"` /
//! `"sub-step finished"`: number, verb, budget, outcome, duration, counts, note); the app adds
//! no lines of its own to that story.

use std::sync::Arc;
use std::time::Duration;

use quiesce_protocol::agent::{Agent, HandlerError, StepCtx};
pub use quiesce_protocol::wire::{STEPS, StepReply, SubStep};

use crate::app::{App, SERVICES};

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
            async move { app.run_substep(ctx.substep(), ctx.deadline()).await }
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

/// Runs every remaining step in-process within `budget` (SIGTERM without a supervisor, and
/// tests): the same handlers and order the supervisor would drive.
pub async fn stop_all(app: &Arc<App>, budget: Duration) -> Vec<StepReply> {
    agent(app).run_local(budget).await
}
