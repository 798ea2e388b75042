//! Control mode, supervisor side: connect to the app's control socket, say hello as driver, and walk the
//! nine-step table under the window's deadlines.
//!
//! Two connections: the *driver* sends step verbs only; the *observer* polls `health` and `status` for the
//! probes, so a long drain never delays a liveness answer. Both are (re)connected with retry while the app
//! runs. Budgets: each verb gets the sum of its rows' budgets, all scaled down alike when the time left is
//! less than what the remaining steps ask for ([`plan`]); a verb that does not answer in time is recorded
//! `timeout` and the sequence goes on. A driver connection that fails in any way is closed before a new one
//! claims the slot, and the verb is sent once more. When the steps' time is over the app's process group
//! gets SIGTERM, and SIGKILL at the window's end.

use std::path::PathBuf;
use std::time::Duration;

use quiesce_protocol::client::{Client, ClientError};
use quiesce_protocol::wire::{
    AgentCommand, HelloReply, Outcome, Role, StepReply, StepVerb, TRACEPARENT,
};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout_at};

use crate::exit::StopResult;
use crate::lifecycle::Lifecycle;
use crate::state::{Control, Shared, StepRecord, ms};
use crate::steps::{Extra, STEPS, verbs};
use crate::stop::{self, StopCtx};
use quiesce_protocol::log::json_text;

/// Slack for a reply after a step's deadline: the agent cuts handlers at the deadline, then writes.
const REPLY_SLACK: Duration = Duration::from_millis(250);
/// Pause between connection attempts while the app starts.
const RETRY: Duration = Duration::from_millis(50);

/// The connector task ([`connect_driver`]): its result, the driver connection and the app's hello, goes to
/// the stop sequence alone, which takes it when step 1 is over.
pub type Connector = tokio::task::JoinHandle<Option<(Client, HelloReply)>>;

/// What the app said in `hello`; `None` until it has.
pub type HelloWatch = watch::Receiver<Option<HelloReply>>;

/// Connects `role` to the app, retrying every 50 ms until `until` or the child's end.
pub async fn connect(
    path: &PathBuf,
    role: Role,
    until: Instant,
    life: &watch::Receiver<Lifecycle>,
) -> Option<(Client, HelloReply)> {
    let mut last_err = String::new();
    while Instant::now() < until && life.borrow().end().is_none() {
        match Client::connect(path).await {
            Ok(c) if let Err(why) = listener_is_the_app(&c) => {
                if why != last_err {
                    tracing::error!(socket = %path.display(), role = role.as_str(), reason = %why, "refusing the process listening at the control socket; retrying until the app listens there");
                }
                last_err = why;
            }
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
        tracing::warn!(socket = %path.display(), role = role.as_str(), error = %last_err, "control connection not established");
    }
    None
}

/// The credential check of [`crate::peer`] on a fresh connection.
fn listener_is_the_app(c: &Client) -> Result<(), String> {
    let cred = c
        .peer_cred()
        .map_err(|e| format!("cannot read the listener's credentials: {e}"))?;
    crate::peer::check(&cred)
}

/// Connects the driver at start-up (retrying while the app starts) and returns the connection; the stop
/// sequence reconnects by itself if that connection breaks later.
pub async fn connect_driver(
    path: PathBuf,
    connect_timeout: Duration,
    hello_tx: watch::Sender<Option<HelloReply>>,
    shared: Shared,
    life: watch::Receiver<Lifecycle>,
) -> Option<(Client, HelloReply)> {
    let until = Instant::now() + connect_timeout;
    match connect(&path, Role::Driver, until, &life).await {
        Some((client, mut hello)) => {
            bound_services(&mut hello.services);
            tracing::info!(app = %hello.app, pid = hello.pid, services = %json_text(&hello.services), registered = %json_text(&hello.registered), extensions = %json_text(&hello.extensions), "app said hello");
            shared.lock().control = Control::Connected;
            hello_tx.send_replace(Some(hello.clone()));
            Some((client, hello))
        }
        None => {
            if life.borrow().end().is_none() {
                tracing::warn!(
                    socket = %path.display(),
                    timeout_ms = ms(connect_timeout),
                    "the app did not answer hello on its control socket; it will be stopped with the stop signal"
                );
                shared.lock().control = Control::NeverConnected;
            }
            None
        }
    }
}

/// The most health services an app may announce, and the longest name: each becomes a health service and a
/// metric series, so an app cannot grow the supervisor's memory or the metrics without bound.
pub const MAX_SERVICES: usize = 64;
pub const MAX_SERVICE_NAME: usize = 200;

/// Keeps the first [`MAX_SERVICES`] well-formed names (printable ASCII without spaces, at most
/// [`MAX_SERVICE_NAME`] bytes: what gRPC service names look like); says what it dropped.
fn bound_services(services: &mut Vec<String>) {
    let before = services.len();
    services.retain(|n| {
        !n.is_empty() && n.len() <= MAX_SERVICE_NAME && n.bytes().all(|b| b.is_ascii_graphic())
    });
    let malformed = before - services.len();
    let extra = services.len().saturating_sub(MAX_SERVICES);
    services.truncate(MAX_SERVICES);
    if malformed + extra > 0 {
        tracing::warn!(
            dropped_malformed = malformed,
            dropped_over_limit = extra,
            limit = MAX_SERVICES,
            "the app announced health services quiesce does not serve: names must be printable ASCII \
             without spaces, at most 200 bytes, and at most 64 of them"
        );
    }
}

/// The control-mode stop: step 1, then each verb in table order, then wait for the app to exit.
pub async fn sequence(ctx: StopCtx, connector: Connector) -> StopResult {
    stop::step_one(&ctx).await;
    // The connection the connector made, if it made one by now; one still trying is given up.
    let connected = if connector.is_finished() {
        connector.await.ok().flatten()
    } else {
        connector.abort();
        None
    };
    let traced = connected
        .as_ref()
        .is_some_and(|(_, hello)| takes_traces(&ctx, hello));
    let client = connected.map(|(c, _)| c);
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
        return stop::ask_with_signal(&ctx, ctx.ask_with).await;
    }
    let mut walk = Walk {
        ctx: &ctx,
        client,
        per_substep: true,
        traced,
        trace_refused: false,
    };
    for (verb, rows) in verbs() {
        walk.verb(verb, &rows).await;
    }
    wait_exit(&ctx).await
}

/// After `close` the app exits by itself; one that does not gets the deadline's SIGTERM when the steps' time
/// is over and SIGKILL at the window's end.
async fn wait_exit(ctx: &StopCtx) -> StopResult {
    let began = Instant::now();
    if ctx.wait_end_until(ctx.steps_deadline()).await {
        return StopResult {
            asked_with: None,
            forced: false,
        };
    }
    ctx.record(
        0,
        Extra::AppExit.name(),
        Outcome::Timeout,
        began,
        "the app did not exit after its last step".into(),
    );
    stop::force(ctx, true).await;
    StopResult {
        asked_with: Some(crate::signals::Sig::TERM),
        forced: true,
    }
}

/// One verb's deadlines, fixed when it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `deadline_ms`: the verb's (scaled) budget, cut to leave the reply slack inside the window.
    pub deadline: Duration,
    /// `budgets_ms`: each sub-step's (scaled) budget.
    pub substeps: Vec<Duration>,
    /// How long the supervisor waits for the reply.
    pub wait_until: Instant,
}

/// The budget rule (docs/OPERATIONS.md, "Budgets"): a hung step never takes the later steps' time away.
/// When the time left before `end` is less than the budgets of every step still to run (this verb's rows
/// and all later ones), each is scaled by the same factor, time left ÷ remaining budgets. Recomputed at
/// every verb, so time a fast step leaves unused goes to the later ones.
pub fn plan(budgets: &[Duration; 9], rows: &[usize], began: Instant, end: Instant) -> Plan {
    let left = end.saturating_duration_since(began);
    let remaining: Duration = budgets[rows[0]..].iter().sum();
    let scale = |d: Duration| {
        if remaining > left {
            d.mul_f64(left.as_secs_f64() / remaining.as_secs_f64())
        } else {
            d
        }
    };
    let substeps: Vec<Duration> = rows.iter().map(|&i| scale(budgets[i])).collect();
    let mut deadline: Duration = substeps.iter().sum();
    if deadline + REPLY_SLACK > left {
        // Cut short by the window: leave the agent time to write its reply (with the counts of the step
        // that ran out of time) before our own wait ends.
        deadline = left.saturating_sub(REPLY_SLACK);
    }
    let deadline = deadline.max(MIN_DEADLINE);
    Plan {
        deadline,
        substeps: substeps
            .into_iter()
            .map(|d| d.clamp(MIN_DEADLINE, deadline))
            .collect(),
        wait_until: (began + deadline + REPLY_SLACK)
            .min(end)
            .max(began + deadline),
    }
}

/// The shortest deadline sent: the protocol's unit is the millisecond.
const MIN_DEADLINE: Duration = Duration::from_millis(1);

/// The walk over the verbs; owns the driver connection while the stop runs.
struct Walk<'a> {
    ctx: &'a StopCtx,
    client: Option<Client>,
    /// Whether the app takes `budgets_ms` (an older agent refuses it once; then plain deadlines).
    per_substep: bool,
    /// Whether step verbs carry `traceparent=`: this stop is traced and the app's hello announced the
    /// extension ([`takes_traces`]), and the app has not refused it.
    traced: bool,
    /// The app refused `traceparent=` once: never sent again, whatever a later hello says.
    trace_refused: bool,
}

/// Whether step verbs to the app that said `hello` carry the trace context: only when this stop is traced
/// and the app announced the extension (PROTOCOL.md §5.5), so an agent that does not know it never sees it.
fn takes_traces(ctx: &StopCtx, hello: &HelloReply) -> bool {
    ctx.trace.is_some() && hello.takes(TRACEPARENT)
}

impl Walk<'_> {
    /// Sends one verb, retrying once over a fresh connection when the old one failed, and records its rows.
    async fn verb(&mut self, verb: StepVerb, rows: &[usize]) {
        let ctx = self.ctx;
        let verb_name = verb.as_str();
        if ctx.child_ended() {
            skip_rows(ctx, rows.iter().copied(), &exited_detail(ctx));
            return;
        }
        let began = Instant::now();
        let end = ctx.steps_deadline();
        if end <= began {
            skip_rows(
                ctx,
                rows.iter().copied(),
                "no time left before the overall deadline",
            );
            return;
        }
        let plan = plan(&ctx.cfg.budgets, rows, began, end);
        for (j, &i) in rows.iter().enumerate() {
            tracing::info!(
                step = STEPS[i].name,
                number = STEPS[i].number,
                verb = verb_name,
                budget_ms = ms(plan.deadline),
                "step start"
            );
            let budget = plan.substeps.get(j).copied().unwrap_or(plan.deadline);
            ctx.started(STEPS[i].number, STEPS[i].name, began, budget);
        }
        let mut result = self.send_or_simplify(verb, rows, &plan, began).await;
        if let Err(why @ StepFailure::Connection(_)) = &result
            && !ctx.child_ended()
        {
            // The connection is out of step (dropped, or a reply that is not protocol): close it first, so the
            // app frees its driver slot, then claim the slot again and send the verb once more. A repeat
            // returns the recorded result when the app had finished the step (PROTOCOL.md §6.3).
            tracing::warn!(reason = %why, verb = verb_name, "control connection failed; reconnecting to send the step again");
            self.client = None;
            self.reconnect().await;
            if self.client.is_some() {
                let now = Instant::now();
                let again = Plan {
                    deadline: plan.deadline.saturating_sub(now - began).max(MIN_DEADLINE),
                    wait_until: plan.wait_until.max(now + MIN_DEADLINE),
                    ..plan.clone()
                };
                result = self.send(verb, rows, &again, now).await;
            }
        }
        tracing::debug!(
            verb = verb_name,
            rtt_ms = ms(began.elapsed()),
            "control round trip"
        );
        match result {
            Ok(reply) => record_reply(ctx, rows, began, &reply),
            Err(failure) => {
                record_failure(ctx, verb_name, rows, began, &failure).await;
                // A request without its reply leaves the connection out of step: start afresh.
                self.client = None;
                if !ctx.child_ended() {
                    self.reconnect().await;
                }
            }
        }
    }

    /// Sends the verb; an app that refuses an optional argument by name (a `traceparent` it announced but
    /// does not take, `budgets_ms` from an older agent) gets the verb once more without it, and that
    /// argument is never sent again. The trace context is dropped first: its refusal may list `budgets_ms`
    /// among the arguments the app takes.
    async fn send_or_simplify(
        &mut self,
        verb: StepVerb,
        rows: &[usize],
        plan: &Plan,
        began: Instant,
    ) -> Result<StepReply, StepFailure> {
        loop {
            let result = self.send(verb, rows, plan, began).await;
            let Err(why @ StepFailure::Refused { message, .. }) = &result else {
                return result;
            };
            if self.traced && message.contains(TRACEPARENT) {
                tracing::warn!(reason = %why, "the app announced the traceparent extension but refused it; sending steps without trace context");
                (self.traced, self.trace_refused) = (false, true);
            } else if self.per_substep && message.contains("budgets_ms") {
                tracing::warn!(reason = %why, "the app does not take per-sub-step budgets; sending plain deadlines");
                self.per_substep = false;
            } else {
                return result;
            }
        }
    }

    async fn send(
        &mut self,
        verb: StepVerb,
        rows: &[usize],
        plan: &Plan,
        began: Instant,
    ) -> Result<StepReply, StepFailure> {
        let Some(c) = self.client.as_mut() else {
            return Err(StepFailure::Connection("control connection lost".into()));
        };
        let req = AgentCommand::Step {
            verb,
            deadline: plan.deadline,
            budgets: self.per_substep.then(|| plan.substeps.clone()),
            traceparents: match &self.ctx.trace {
                Some(t) if self.traced => Some(t.traceparents(rows)),
                _ => None,
            },
        };
        send_step(self.ctx, c, &req, plan.deadline, began, plan.wait_until).await
    }

    /// A fresh driver connection in place of one that failed; what the app says in its new hello decides
    /// whether steps carry trace context from now on.
    async fn reconnect(&mut self) {
        let got = reconnect(self.ctx).await;
        if let Some((_, hello)) = &got {
            self.traced = !self.trace_refused && takes_traces(self.ctx, hello);
        }
        self.client = got.map(|(c, _)| c);
    }
}

/// Records the rows of a verb that got no usable reply. A verb that covers several rows (`drain`, `close`)
/// is one request: when the app died during it, the supervisor cannot know which of its sub-steps had
/// finished, so those rows say `unknown` rather than blame a step that may have finished.
async fn record_failure(
    ctx: &StopCtx,
    verb_name: &str,
    rows: &[usize],
    began: Instant,
    failure: &StepFailure,
) {
    // A connection that breaks mid-step usually means the app died: give the reaper a moment to say so,
    // so the row names the exit instead of a socket error.
    if !matches!(failure, StepFailure::NoReply(_)) {
        let until = (Instant::now() + Duration::from_millis(200)).min(ctx.deadline());
        let _ = ctx.wait_end_until(until).await;
    }
    let (outcome, why) = match (ctx.end(), failure) {
        (Some(end), _) if rows.len() > 1 => {
            let (first, last) = (STEPS[rows[0]].number, STEPS[rows[rows.len() - 1]].number);
            (
                Outcome::Unknown,
                format!(
                    "app {end} during `{verb_name}` (steps {first}-{last}, one request); which of its sub-steps had finished is not known"
                ),
            )
        }
        (Some(end), _) => (Outcome::Error, format!("app {end} during this step")),
        (None, StepFailure::NoReply(_)) => (Outcome::Timeout, failure.to_string()),
        (None, _) => (Outcome::Error, failure.to_string()),
    };
    for &i in rows {
        ctx.record(STEPS[i].number, STEPS[i].name, outcome, began, why.clone());
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
    command: &AgentCommand,
    budget: Duration,
    began: Instant,
    wait_until: Instant,
) -> Result<StepReply, StepFailure> {
    let req = command.to_request();
    // The client's own timeout is set past ours, so a silent app is always our `timeout`.
    let client_wait = wait_until - began + Duration::from_secs(1);
    let mut life = ctx.life.subscribe();
    let reply = c.request::<StepReply>(&req, client_wait);
    tokio::pin!(reply);
    let got = tokio::select! {
        biased;
        r = timeout_at(wait_until, &mut reply) => r,
        _ = async { drop(life.wait_for(|l| l.end().is_some()).await) } => {
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

async fn reconnect(ctx: &StopCtx) -> Option<(Client, HelloReply)> {
    let path = ctx.cfg.control_socket.clone()?;
    // Never past the steps' time: a frozen app that accepts but never answers hello must not delay the
    // deadline's signals.
    let until = (Instant::now() + Duration::from_secs(1)).min(ctx.steps_deadline());
    let got = connect(&path, Role::Driver, until, &ctx.life.subscribe()).await;
    ctx.shared.lock().control = if got.is_some() {
        Control::Connected
    } else {
        Control::Lost
    };
    got
}

fn exited_detail(ctx: &StopCtx) -> String {
    match ctx.end() {
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
            Outcome::Skipped,
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
        // The app's text is data: escaped here, once, so logs (human ones too), `ctl status` and the
        // termination message never carry a raw newline or escape sequence from it.
        let (outcome, duration, counts, detail) = match sub {
            // No sub-step took longer than the whole verb: an app's figure beyond that is not believed.
            Some(s) => (
                s.outcome,
                Duration::from_millis(s.duration_ms).min(began.elapsed()),
                s.counts
                    .iter()
                    .map(|(k, v)| (crate::report::escape_controls(k), *v))
                    .collect(),
                crate::report::escape_controls(
                    s.message
                        .as_deref()
                        .or(s.note.as_deref())
                        .unwrap_or_default(),
                ),
            ),
            None => (
                reply.outcome,
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
        tracing::info!(step = %r.name, outcome = r.outcome.as_str(), duration_ms = r.duration_ms, counts = %serde_json::to_string(&r.counts).unwrap_or_default(), detail = %r.detail, "step end");
        ctx.shared.record(r);
        offset = offset.checked_add(duration).unwrap_or(offset);
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
    async fn budgets_fit_unchanged_while_there_is_time() {
        let b = defaults();
        let plan_of = |verb: usize, end: Instant| plan(&b, &verbs()[verb].1, Instant::now(), end);
        // drain = stop-accepting 1s + drain-in-flight 7s; 23s of budgets fit a 28s window.
        let p = plan_of(0, Instant::now() + Duration::from_secs(28));
        assert_eq!(p.deadline, Duration::from_secs(8));
        assert_eq!(p.substeps, [Duration::from_secs(1), Duration::from_secs(7)]);
        assert_eq!(p.wait_until, Instant::now() + Duration::from_millis(8250));
    }

    #[tokio::test(start_paused = true)]
    async fn overcommitted_budgets_are_scaled_alike() {
        let b = defaults();
        let now = Instant::now();
        // Steps 5-9 ask for 5+3+1+1+2 = 12s, but 3s are left: each gets a quarter of its budget.
        let p = plan(&b, &verbs()[2].1, now, now + Duration::from_secs(3));
        assert_eq!(p.deadline, Duration::from_millis(1250));
        // close (1s+1s+2s) with 2s left and nothing after it: half of each, minus the reply slack.
        let p = plan(&b, &verbs()[4].1, now, now + Duration::from_secs(2));
        assert_eq!(p.deadline, Duration::from_millis(1750));
        assert_eq!(
            p.substeps,
            [
                Duration::from_millis(500),
                Duration::from_millis(500),
                Duration::from_millis(1000)
            ]
        );
        assert_eq!(p.wait_until, now + Duration::from_secs(2));
        // Past the deadline the minimum is sent.
        let p = plan(&b, &verbs()[4].1, now, now);
        assert_eq!(p.deadline, Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_step_never_takes_the_later_steps_time() {
        // A 4s window for 23s of budgets (steps 2-9): even when every verb uses all of its slice, `close`
        // still gets its share of the window, 4/23 of 4s, less the reply slack it must leave inside it.
        let b = defaults();
        let end = Instant::now() + Duration::from_secs(4);
        for (verb, rows) in &verbs() {
            let p = plan(&b, rows, Instant::now(), end);
            if *verb == StepVerb::Close {
                let share = Duration::from_secs(4).mul_f64(4.0 / 23.0);
                assert!(
                    p.deadline + REPLY_SLACK + Duration::from_millis(5) >= share,
                    "{p:?}"
                );
                assert!(p.deadline >= Duration::from_millis(400), "{p:?}");
            }
            tokio::time::advance(p.deadline).await;
        }
    }

    #[test]
    fn every_app_row_is_a_protocol_substep() {
        use quiesce_protocol::wire::SubStep;
        for s in STEPS.iter().filter(|s| s.verb().is_some()) {
            let sub = SubStep::parse(s.name)
                .unwrap_or_else(|| panic!("{} is not a protocol sub-step", s.name));
            assert_eq!(Some(sub.verb()), s.verb());
            assert_eq!(sub.step_number(), s.number);
        }
    }
}
