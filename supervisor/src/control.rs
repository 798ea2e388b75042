//! Control mode, supervisor side: connect to the app's control socket, say hello as driver, and walk the
//! nine-step table under the deadlines of SPEC §2.
//!
//! Two connections: the *driver* sends step verbs only; the *observer* polls `health` and `status` for the
//! probes, so a long drain never delays a liveness answer. Both are (re)connected with retry while the app
//! runs. Budgets: each verb gets min(sum of its rows' budgets, time left); a verb that does not answer in
//! time is recorded `timeout` and the sequence goes on; at the overall deadline the app's process group gets
//! SIGTERM then SIGKILL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quiesce_protocol::client::{Client, ClientError};
use quiesce_protocol::wire::{AgentCommand, HelloReply, Outcome, Role, StepReply, StepVerb};
use tokio::sync::{Mutex, watch};
use tokio::time::{Instant, sleep, timeout_at};

use crate::exit::{ChildEnd, StopContext};
use crate::state::{Shared, StepOutcome, StepRecord, ms};
use crate::steps::{STEPS, verbs};
use crate::stop::{self, StopCtx};

/// Slack for a reply after a step's deadline: the agent cuts handlers at the deadline, then writes.
const REPLY_SLACK: Duration = Duration::from_millis(250);
/// Pause between connection attempts while the app starts.
const RETRY: Duration = Duration::from_millis(50);

/// The driver connection, shared between the connector and the stop sequence.
#[derive(Clone, Debug, Default)]
pub struct Driver(Arc<Mutex<Option<Client>>>);

/// What the app said in `hello`; `None` until it has.
pub type HelloWatch = watch::Receiver<Option<HelloReply>>;

/// Connects `role` to the app, retrying every 50 ms until `until` or the child's end.
pub async fn connect(
    path: &PathBuf,
    role: Role,
    until: Instant,
    end: &watch::Receiver<Option<ChildEnd>>,
) -> Option<(Client, HelloReply)> {
    let mut last_err = String::new();
    while Instant::now() < until && end.borrow().is_none() {
        match Client::connect(path).await {
            Ok(mut c) => match timeout_at(until, c.hello(role)).await {
                Ok(Ok(hello)) => return Some((c, hello)),
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "hello not answered".into(),
            },
            Err(ClientError::Connect { .. }) => {}
            Err(e) => last_err = e.to_string(),
        }
        sleep(RETRY).await;
    }
    if !last_err.is_empty() {
        tracing::warn!(socket = %path.display(), ?role, error = %last_err, "control connection not established");
    }
    None
}

/// Connects the driver at start-up (retrying while the app starts); the stop sequence reconnects by itself
/// if that connection breaks later.
pub async fn connect_driver(
    path: PathBuf,
    connect_timeout: Duration,
    driver: Driver,
    hello_tx: watch::Sender<Option<HelloReply>>,
    shared: Shared,
    end: watch::Receiver<Option<ChildEnd>>,
) {
    let until = Instant::now() + connect_timeout;
    match connect(&path, Role::Driver, until, &end).await {
        Some((client, hello)) => {
            tracing::info!(app = %hello.app, pid = hello.pid, services = ?hello.services, registered = ?hello.registered, "app said hello");
            *driver.0.lock().await = Some(client);
            shared.lock().control = "connected".into();
            hello_tx.send_replace(Some(hello));
        }
        None => {
            if end.borrow().is_none() {
                tracing::warn!(
                    socket = %path.display(),
                    timeout_ms = ms(connect_timeout),
                    "the app did not answer hello on its control socket; it will be stopped with the stop signal"
                );
                shared.lock().control = "never connected".into();
            }
        }
    }
}

/// The control-mode stop: step 1, then each verb in table order, then wait for the app to exit.
pub async fn sequence(ctx: StopCtx, driver: Driver) -> StopContext {
    stop::step_one(&ctx).await;
    let mut client = driver.0.lock().await.take();
    if client.is_none() && !ctx.child_ended() {
        // The app never connected: the best we can do is ask it the signal way.
        tracing::warn!(
            "no control connection: stopping the app with its stop signal instead of the nine steps"
        );
        skip_rows(
            &ctx,
            1..STEPS.len(),
            "no control connection; the stop signal was sent instead",
        );
        return stop::ask_with_signal(&ctx, ctx.cfg.stop_signal).await;
    }

    let mut per_substep = true;
    for (verb_name, rows) in verbs() {
        if ctx.child_ended() {
            skip_rows(&ctx, rows.iter().copied(), &exited_detail(&ctx));
            continue;
        }
        let Some(verb) = StepVerb::parse(verb_name) else {
            continue;
        };
        let began = Instant::now();
        let left = ctx.deadline().saturating_duration_since(began);
        if left.is_zero() {
            skip_rows(
                &ctx,
                rows.iter().copied(),
                "no time left before the overall deadline",
            );
            continue;
        }
        let mut budget = verb_budget(&ctx.cfg.budgets, &rows, began, ctx.deadline());
        if budget + REPLY_SLACK > left {
            // Cut short by the overall deadline: leave the agent time to write its reply (with the counts
            // of the step that ran out of time) before our own wait ends.
            budget = left
                .saturating_sub(REPLY_SLACK)
                .max(Duration::from_millis(1));
        }
        for &i in &rows {
            tracing::info!(
                step = STEPS[i].name,
                number = STEPS[i].number,
                verb = verb_name,
                budget_ms = ms(budget),
                "step start"
            );
        }
        let wait_until = (began + budget + REPLY_SLACK)
            .min(ctx.deadline())
            .max(began + budget);
        let own: Vec<Duration> = rows
            .iter()
            .map(|&i| ctx.cfg.budgets[i].max(Duration::from_millis(1)))
            .collect();
        let mut result = match client.as_mut() {
            None => Err(StepFailure::Connection("control connection lost".into())),
            Some(c) => {
                send_step(
                    &ctx,
                    c,
                    verb,
                    budget,
                    per_substep.then(|| own.clone()),
                    began,
                    wait_until,
                )
                .await
            }
        };
        // An app on an agent without per-sub-step budgets refuses `budgets_ms`: say it once, then drive it
        // the plain way (sub-steps then share the verb's deadline).
        if per_substep
            && let Err(why @ StepFailure::Refused { message, .. }) = &result
            && message.contains("budgets_ms")
            && let Some(c) = client.as_mut()
        {
            tracing::warn!(reason = %why, "the app does not take per-sub-step budgets; sending plain deadlines");
            per_substep = false;
            result = send_step(&ctx, c, verb, budget, None, began, wait_until).await;
        }
        // A connection that broke while idle (long before the stop) fails the first write: the app never saw
        // the verb, so reconnect and send it again, once, with what is left of its budget.
        if let Err(why @ StepFailure::Connection(_)) = &result
            && !ctx.child_ended()
            && let Some(fresh) = reconnect(&ctx).await
        {
            tracing::warn!(reason = %why, verb = verb_name, "control connection broke; sending the step again");
            client = Some(fresh);
            let now = Instant::now();
            let again = budget
                .saturating_sub(now - began)
                .max(Duration::from_millis(1));
            if let Some(c) = client.as_mut() {
                let budgets = per_substep.then(|| own.clone());
                result = send_step(
                    &ctx,
                    c,
                    verb,
                    again,
                    budgets,
                    now,
                    wait_until.max(now + again),
                )
                .await;
            }
        }
        let rtt = began.elapsed();
        match result {
            Ok(reply) => record_reply(&ctx, &rows, began, &reply),
            Err(failure) => {
                // A connection that breaks mid-step usually means the app died: give the reaper a moment
                // to say so, so the row names the exit instead of a socket error.
                if !matches!(failure, StepFailure::NoReply(_)) {
                    let until = (Instant::now() + Duration::from_millis(200)).min(ctx.deadline());
                    let _ = ctx.wait_end_until(until).await;
                }
                let (outcome, why) = match (*ctx.end.borrow(), &failure) {
                    (Some(end), _) => (StepOutcome::Error, format!("app {end} during this step")),
                    (None, StepFailure::NoReply(_)) => (StepOutcome::Timeout, failure.to_string()),
                    (None, _) => (StepOutcome::Error, failure.to_string()),
                };
                for &i in &rows {
                    ctx.record(STEPS[i].number, STEPS[i].name, outcome, began, why.clone());
                }
                // A request without its reply leaves the connection out of step: start afresh.
                client = None;
                if !ctx.child_ended() {
                    client = reconnect(&ctx).await;
                }
            }
        }
        tracing::debug!(verb = verb_name, rtt_ms = ms(rtt), "control round trip");
    }

    // After `close` the app exits by itself.
    let began = Instant::now();
    if ctx.wait_end_until(ctx.deadline()).await {
        return StopContext {
            asked_with: None,
            forced: false,
        };
    }
    ctx.record(
        0,
        "app-exit",
        StepOutcome::Timeout,
        began,
        "the app did not exit after its last step".into(),
    );
    stop::force(&ctx, true).await;
    StopContext {
        asked_with: Some(crate::signals::Sig::TERM),
        forced: true,
    }
}

/// Why a step verb got no usable reply.
#[derive(Debug)]
enum StepFailure {
    /// Nothing within the budget (the app is busy or frozen).
    NoReply(Duration),
    /// The app refused the request (`budgets_ms` names the argument an older agent does not know).
    Refused { message: String, code: String },
    /// The app exited while the step ran.
    Exited(String),
    /// The connection broke or was never there.
    Connection(String),
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepFailure::NoReply(b) => {
                write!(f, "no reply within {}", humantime::format_duration(*b))
            }
            StepFailure::Refused { message, code } => write!(f, "refused: {message} ({code})"),
            StepFailure::Exited(why) | StepFailure::Connection(why) => f.write_str(why),
        }
    }
}

/// Sends one step verb and waits for its reply until `wait_until` (or the app's end).
async fn send_step(
    ctx: &StopCtx,
    c: &mut Client,
    verb: StepVerb,
    budget: Duration,
    budgets: Option<Vec<Duration>>,
    began: Instant,
    wait_until: Instant,
) -> Result<StepReply, StepFailure> {
    let req = AgentCommand::Step {
        verb,
        deadline: budget,
        budgets,
    }
    .to_request();
    // The client's own timeout is set past ours, so a silent app is always our `timeout`.
    let client_wait = wait_until - began + Duration::from_secs(1);
    let mut end = ctx.end.clone();
    let reply = c.request::<StepReply>(&req, client_wait);
    tokio::pin!(reply);
    let got = tokio::select! {
        biased;
        r = timeout_at(wait_until, &mut reply) => r,
        _ = async { drop(end.wait_for(|e| e.is_some()).await) } => {
            // An app that exits right after answering (as one does after `close`) may be reaped before
            // its reply is read: the reply is already in the socket buffer, so finish reading it.
            match tokio::time::timeout(Duration::from_millis(100), &mut reply).await {
                Ok(Ok(r)) => Ok(Ok(r)),
                _ => return Err(StepFailure::Exited(exited_detail(ctx))),
            }
        }
    };
    match got {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(ClientError::Timeout { .. })) | Err(_) => Err(StepFailure::NoReply(budget)),
        Ok(Err(ClientError::Refused { reply, .. })) => Err(StepFailure::Refused {
            message: reply.message,
            code: reply.error.to_string(),
        }),
        Ok(Err(e)) => Err(StepFailure::Connection(e.to_string())),
    }
}

/// SPEC §2: a verb gets the sum of its rows' budgets, capped by what is left of the overall window.
pub fn verb_budget(
    budgets: &[Duration; 9],
    rows: &[usize],
    now: Instant,
    deadline: Instant,
) -> Duration {
    let own: Duration = rows.iter().map(|&i| budgets[i]).sum();
    own.min(deadline.saturating_duration_since(now))
}

async fn reconnect(ctx: &StopCtx) -> Option<Client> {
    let path = ctx.cfg.control_socket.clone()?;
    let until = (Instant::now() + Duration::from_secs(1)).min(ctx.deadline());
    let got = connect(&path, Role::Driver, until, &ctx.end)
        .await
        .map(|(c, _)| c);
    ctx.shared.lock().control = if got.is_some() {
        "connected".into()
    } else {
        "lost".into()
    };
    got
}

fn exited_detail(ctx: &StopCtx) -> String {
    match *ctx.end.borrow() {
        Some(e) => format!("app {e} before this step"),
        None => "app exited".into(),
    }
}

fn skip_rows(ctx: &StopCtx, rows: impl IntoIterator<Item = usize>, detail: &str) {
    let now = Instant::now();
    for i in rows {
        ctx.record(
            STEPS[i].number,
            STEPS[i].name,
            StepOutcome::Skipped,
            now,
            detail.to_string(),
        );
    }
}

/// Maps the app's reply onto the table rows the verb covers (sub-step name = row name).
fn record_reply(ctx: &StopCtx, rows: &[usize], began: Instant, reply: &StepReply) {
    let mut offset = began;
    for &i in rows {
        let row = &STEPS[i];
        let sub = reply.substeps.iter().find(|s| s.name.as_str() == row.name);
        let (outcome, duration, counts, detail) = match sub {
            Some(s) => (
                outcome_of(s.outcome),
                Duration::from_millis(s.duration_ms),
                s.counts.clone(),
                s.message
                    .clone()
                    .or_else(|| s.note.clone())
                    .unwrap_or_default(),
            ),
            None => (
                outcome_of(reply.outcome),
                Duration::ZERO,
                Default::default(),
                "no sub-step report".to_string(),
            ),
        };
        let r = StepRecord {
            number: row.number,
            name: row.name.to_string(),
            outcome,
            started_ms: ms(offset.saturating_duration_since(ctx.start)),
            duration_ms: ms(duration),
            counts,
            detail,
        };
        tracing::info!(step = %r.name, outcome = r.outcome.as_str(), duration_ms = r.duration_ms, counts = ?r.counts, detail = %r.detail, "step end");
        ctx.shared.record(r);
        offset += duration;
    }
}

fn outcome_of(o: Outcome) -> StepOutcome {
    match o {
        Outcome::Ok => StepOutcome::Ok,
        Outcome::Timeout => StepOutcome::Timeout,
        Outcome::Error => StepOutcome::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> [Duration; 9] {
        let mut b = [Duration::ZERO; 9];
        for (i, s) in STEPS.iter().enumerate() {
            b[i] = s.default_budget;
        }
        b
    }

    #[tokio::test(start_paused = true)]
    async fn budgets_shrink_to_the_time_left() {
        let b = defaults();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(28);
        let plan = verbs();
        // drain = stop-accepting 1s + drain-in-flight 7s
        assert_eq!(
            verb_budget(&b, &plan[0].1, Instant::now(), deadline),
            Duration::from_secs(8)
        );
        // 25s later only 3s are left: the 5s consumer budget is cut to 3s.
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(
            verb_budget(&b, &plan[2].1, Instant::now(), deadline),
            Duration::from_secs(3)
        );
        // close = 1s + 1s + 2s, but 500ms are left.
        tokio::time::advance(Duration::from_millis(2500)).await;
        assert_eq!(
            verb_budget(&b, &plan[4].1, Instant::now(), deadline),
            Duration::from_millis(500)
        );
        // Past the deadline nothing is left.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            verb_budget(&b, &plan[4].1, Instant::now(), deadline),
            Duration::ZERO
        );
    }

    #[test]
    fn every_app_row_is_a_protocol_substep() {
        use quiesce_protocol::wire::SubStep;
        for s in STEPS.iter().filter(|s| s.verb.is_some()) {
            let sub = SubStep::parse(s.name)
                .unwrap_or_else(|| panic!("{} is not a protocol sub-step", s.name));
            assert_eq!(sub.verb().as_str(), s.verb.expect("app step"));
            assert_eq!(sub.step_number(), s.number);
        }
    }
}
