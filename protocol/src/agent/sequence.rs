//! Sequencing: the step state machine, the entry points that claim a verb and run it
//! ([`Agent::step`], [`Agent::run_local`], and the socket's step requests), and the runner that
//! executes one verb's sub-steps under its deadline (and, when the driver sent `budgets_ms`,
//! each sub-step under its own budget as well).
//!
//! State changes only here, under the agent's lock, and only in one direction per step:
//! pending → running → done. A refused request never reaches [`Sequence::claim`]'s mutation.
//! The runner is spawned, so a connection that vanishes mid-step cannot cancel it: the result is
//! recorded either way and returned to whoever asks for that verb again.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Agent;
use super::handler::{StepCtx, StepFn};
use crate::log::json_text;
use crate::wire::{
    Counts, Outcome, Phase, StepReply, StepState, StepStatus, StepVerb, SubStep, SubStepReply,
    TraceParent, WireError,
};

/// How long a cancelled handler task gets to be dropped before the sequence moves on anyway (a
/// handler blocking its thread cannot be dropped at all).
const ABORT_GRACE: Duration = Duration::from_millis(100);

/// How [`Agent::run_local`] splits its budget: each step gets its weight's share of what is left,
/// so time a fast step does not use passes to the later ones.
const LOCAL_WEIGHTS: [u32; 5] = [4, 1, 2, 1, 2];

type Done = watch::Receiver<Option<StepReply>>;

#[derive(Debug)]
enum Slot {
    Pending,
    Running { started: Instant, done: Done },
    Done(StepReply),
}

/// What the caller of [`Sequence::claim`] must do next.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The verb already ran: here is its recorded reply, marked repeated.
    Recorded(StepReply),
    /// The verb is running on behalf of someone else: wait for its reply.
    Wait(Done),
    /// The verb is now marked running: run it and publish the reply here.
    Run(watch::Sender<Option<StepReply>>),
}

/// The five steps' states.
#[derive(Debug)]
pub(crate) struct Sequence {
    slots: [Slot; 5],
}

impl Sequence {
    pub(crate) fn new() -> Sequence {
        Sequence {
            slots: std::array::from_fn(|_| Slot::Pending),
        }
    }

    /// Accepts `verb` if every earlier verb is done; changes nothing when it refuses.
    pub(crate) fn claim(&mut self, verb: StepVerb) -> Result<Claim, WireError> {
        match &self.slots[verb.index()] {
            Slot::Done(reply) => {
                let mut reply = reply.clone();
                reply.repeated = true;
                return Ok(Claim::Recorded(reply));
            }
            Slot::Running { done, .. } => return Ok(Claim::Wait(done.clone())),
            Slot::Pending => {}
        }
        for earlier in &StepVerb::ALL[..verb.index()] {
            match &self.slots[earlier.index()] {
                Slot::Done(_) => {}
                Slot::Running { .. } => {
                    return Err(WireError::out_of_order(
                        *earlier,
                        format!(
                            "`{verb}` must wait: `{earlier}` is still running; send `{verb}` after `{earlier}` has replied"
                        ),
                    ));
                }
                Slot::Pending => {
                    return Err(WireError::out_of_order(
                        *earlier,
                        format!(
                            "`{verb}` is out of order: `{earlier}` has not run yet; send `{earlier} deadline_ms=…` first (order: drain, stop-cron, stop-consumer, stop-poller, close)"
                        ),
                    ));
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        self.slots[verb.index()] = Slot::Running {
            started: Instant::now(),
            done: rx,
        };
        Ok(Claim::Run(tx))
    }

    /// Records the reply of a verb that finished.
    pub(crate) fn finish(&mut self, reply: StepReply) {
        let index = reply.step.index();
        self.slots[index] = Slot::Done(reply);
    }

    pub(crate) fn phase(&self) -> Phase {
        if matches!(self.slots[StepVerb::Close.index()], Slot::Done(_)) {
            Phase::Closed
        } else if self.slots.iter().all(|s| matches!(s, Slot::Pending)) {
            Phase::Serving
        } else {
            Phase::Stopping
        }
    }

    /// The first verb that has not finished (it may be running).
    pub(crate) fn next_step(&self) -> Option<StepVerb> {
        StepVerb::ALL
            .into_iter()
            .find(|v| !matches!(self.slots[v.index()], Slot::Done(_)))
    }

    pub(crate) fn steps(&self) -> Vec<StepStatus> {
        StepVerb::ALL
            .into_iter()
            .map(|verb| match &self.slots[verb.index()] {
                Slot::Pending => StepStatus {
                    verb,
                    state: StepState::Pending,
                    outcome: None,
                    duration_ms: None,
                },
                Slot::Running { started, .. } => StepStatus {
                    verb,
                    state: StepState::Running,
                    outcome: None,
                    duration_ms: Some(millis(started.elapsed())),
                },
                Slot::Done(reply) => StepStatus {
                    verb,
                    state: StepState::Done,
                    outcome: Some(reply.outcome),
                    duration_ms: Some(reply.duration_ms),
                },
            })
            .collect()
    }
}

impl Agent {
    /// Runs every remaining step in order in-process, for an app that got SIGTERM without a
    /// supervisor: same handlers, same order, same recording. Steps that already ran return their
    /// recorded replies; a step a driver is running is waited for. The budget is shared out by
    /// weight (drain 4, stop-cron 1, stop-consumer 2, stop-poller 1, close 2), unused time passing
    /// to later steps. Returns one reply per verb.
    pub async fn run_local(&self, total_budget: Duration) -> Vec<StepReply> {
        let overall = instant_after(Instant::now(), total_budget);
        let mut replies = Vec::with_capacity(StepVerb::ALL.len());
        for verb in StepVerb::ALL {
            let now = Instant::now();
            let left = overall.saturating_duration_since(now);
            let weights_left: u32 = LOCAL_WEIGHTS[verb.index()..].iter().sum();
            let share =
                left.mul_f64(f64::from(LOCAL_WEIGHTS[verb.index()]) / f64::from(weights_left));
            match self
                .step_at(verb, now, instant_after(now, share), None, None, true)
                .await
            {
                Ok(reply) => replies.push(reply),
                Err(error) => {
                    tracing::error!(verb = %verb, %error, "local shutdown stopped");
                    break;
                }
            }
        }
        replies
    }

    /// Runs one step in-process with a budget from now, enforcing the same order as the socket.
    pub async fn step(&self, verb: StepVerb, budget: Duration) -> Result<StepReply, WireError> {
        let now = Instant::now();
        self.step_at(verb, now, instant_after(now, budget), None, None, true)
            .await
    }

    pub(crate) async fn step_at(
        &self,
        verb: StepVerb,
        received: Instant,
        deadline: Instant,
        budgets: Option<Vec<Duration>>,
        traceparents: Option<Vec<TraceParent>>,
        local: bool,
    ) -> Result<StepReply, WireError> {
        let claim = self.inner.lock().sequence.claim(verb)?;
        match claim {
            Claim::Recorded(reply) => Ok(reply),
            Claim::Wait(done) => {
                let mut reply = wait_done(done, verb).await?;
                reply.repeated = true;
                Ok(reply)
            }
            Claim::Run(publish) => {
                let done = publish.subscribe();
                let agent = self.clone();
                let substep_budgets_ms = budgets
                    .as_ref()
                    .map(|b| json_text(&b.iter().map(|d| millis(*d)).collect::<Vec<_>>()));
                tracing::info!(
                    verb = %verb,
                    budget_ms = millis(deadline.saturating_duration_since(received)),
                    substep_budgets_ms,
                    local,
                    "step started"
                );
                tokio::spawn(async move {
                    let reply = run_verb(
                        &agent.inner.app.handlers,
                        verb,
                        received,
                        deadline,
                        budgets.as_deref(),
                        traceparents.as_deref(),
                        local,
                    )
                    .await;
                    tracing::info!(
                        verb = %verb,
                        outcome = %reply.outcome,
                        duration_ms = reply.duration_ms,
                        counts = %json_text(&reply.counts),
                        local,
                        "step finished"
                    );
                    agent.inner.lock().sequence.finish(reply.clone());
                    publish.send_replace(Some(reply));
                    if verb == StepVerb::Close {
                        if local {
                            // Nobody waits for a reply to an in-process `close`.
                            agent.inner.close_replied.send_replace(true);
                        }
                        agent.inner.closed.send_replace(true);
                    }
                });
                wait_done(done, verb).await
            }
        }
    }
}

/// Waits for a running verb's reply.
pub(crate) async fn wait_done(mut done: Done, verb: StepVerb) -> Result<StepReply, WireError> {
    match done.wait_for(Option::is_some).await {
        Ok(reply) => match reply.clone() {
            Some(reply) => Ok(reply),
            None => Err(lost(verb)),
        },
        Err(_) => Err(lost(verb)),
    }
}

fn lost(verb: StepVerb) -> WireError {
    WireError::new(
        crate::wire::ErrorCode::Internal,
        format!(
            "`{verb}` ended without recording a result (its task was dropped, e.g. the runtime is shutting down); the app should exit"
        ),
    )
}

/// Runs every sub-step of `verb` in order under the verb's `deadline` and builds its reply.
/// `received` is when the request arrived, so the verb's duration covers the whole budget.
///
/// With `budgets` (one per sub-step, in order; validated by the parser), sub-step `i` is cut at
/// `min(its start + budgets[i], deadline)`, so a hang in one sub-step leaves the next its own
/// time. Without them every sub-step runs until `deadline`.
pub(crate) async fn run_verb(
    handlers: &BTreeMap<SubStep, StepFn>,
    verb: StepVerb,
    received: Instant,
    deadline: Instant,
    budgets: Option<&[Duration]>,
    traceparents: Option<&[TraceParent]>,
    local: bool,
) -> StepReply {
    let mut substeps = Vec::with_capacity(verb.substeps().len());
    for (i, &substep) in verb.substeps().iter().enumerate() {
        let budget = budgets.and_then(|b| b.get(i)).copied();
        let parent = traceparents.and_then(|t| t.get(i)).copied();
        let left = deadline.saturating_duration_since(Instant::now());
        tracing::info!(
            step = substep.step_number(),
            verb = %verb,
            substep = %substep,
            budget_ms = millis(budget.map_or(left, |b| b.min(left))),
            local,
            "sub-step started"
        );
        let run = SubStepRun {
            substep,
            deadline,
            budget,
            parent,
            local,
        };
        let reply = run_substep(handlers.get(&substep), run).await;
        log_substep_end(verb, &reply, local);
        substeps.push(reply);
    }
    let outcome = substeps
        .iter()
        .map(|s| s.outcome)
        .max()
        .unwrap_or(Outcome::Ok);
    let mut counts = Counts::new();
    for s in &substeps {
        for (k, v) in &s.counts {
            let total = counts.entry(k.clone()).or_insert(0);
            *total = total.saturating_add(*v);
        }
    }
    let failures: Vec<String> = substeps
        .iter()
        .filter(|s| s.outcome != Outcome::Ok)
        .map(|s| format!("{}: {}", s.name, s.message.as_deref().unwrap_or("failed")))
        .collect();
    StepReply {
        ok: true,
        step: verb,
        outcome,
        duration_ms: millis(received.elapsed()),
        message: (!failures.is_empty()).then(|| failures.join("; ")),
        counts,
        substeps,
        repeated: false,
    }
}

/// The one line at a sub-step's end: its number, names, outcome, duration and counts, and the
/// handler's note or the failure's reason (as `note`: a field named `message` would replace the
/// line's text). A sub-step that did not finish cleanly is a warning.
fn log_substep_end(verb: StepVerb, reply: &SubStepReply, local: bool) {
    let note = reply.message.as_deref().or(reply.note.as_deref());
    let counts = json_text(&reply.counts);
    let substep = reply.name;
    crate::event_if!(
        reply.outcome == Outcome::Ok,
        info,
        warn,
        step = substep.step_number(),
        verb = %verb,
        substep = %substep,
        outcome = %reply.outcome,
        duration_ms = reply.duration_ms,
        counts = %counts,
        note,
        local,
        "sub-step finished"
    );
}

/// One sub-step's turn, as [`run_substep`] gets it.
#[derive(Debug, Clone, Copy)]
struct SubStepRun {
    substep: SubStep,
    /// The verb's deadline.
    deadline: Instant,
    /// Its own budget from its start (`budgets_ms`), if the driver sent one.
    budget: Option<Duration>,
    /// The trace context the driver sent for it (`traceparent`), if any.
    parent: Option<TraceParent>,
    local: bool,
}

/// Runs one sub-step until the verb's `deadline`, or until its own `budget` from now runs out if
/// that comes first.
async fn run_substep(handler: Option<&StepFn>, run: SubStepRun) -> SubStepReply {
    let SubStepRun {
        substep,
        deadline,
        budget,
        parent,
        local,
    } = run;
    let started = Instant::now();
    let mut reply = SubStepReply {
        name: substep,
        outcome: Outcome::Ok,
        duration_ms: 0,
        message: None,
        counts: Counts::new(),
        note: None,
    };
    let Some(handler) = handler else {
        reply.note = Some("nothing registered".to_owned());
        return reply;
    };
    if deadline <= started {
        reply.outcome = Outcome::Timeout;
        reply.message = Some(
            "not started: the step's deadline had passed before this sub-step's turn".to_owned(),
        );
        return reply;
    }
    // Its own budget, when given and shorter than what the verb has left.
    let own = budget
        .map(|b| instant_after(started, b))
        .filter(|own| *own < deadline);
    let cut_at = own.unwrap_or(deadline);
    let mut ctx = StepCtx::new(substep, cut_at, local);
    ctx.traceparent = parent;
    let future = handler(ctx);
    let mut task = tokio::spawn(future);
    match tokio::time::timeout_at(cut_at, &mut task).await {
        Ok(Ok(Ok(report))) => {
            let (counts, note, timed_out) = report.into_parts();
            reply.counts = counts;
            if timed_out {
                reply.outcome = Outcome::Timeout;
                reply.message = Some(note.unwrap_or_else(|| "reached its deadline".to_owned()));
            } else {
                reply.note = note;
            }
        }
        Ok(Ok(Err(error))) => {
            reply.outcome = Outcome::Error;
            reply.message = Some(error.message().to_owned());
        }
        Ok(Err(join_error)) => {
            reply.outcome = Outcome::Error;
            reply.message = Some(panic_message(join_error));
        }
        Err(_elapsed) => {
            task.abort();
            // Give the runtime a moment to drop the future, so the next sub-step does not
            // overlap with this one; a handler blocking its thread cannot be waited for.
            let _ = tokio::time::timeout(ABORT_GRACE, task).await;
            reply.outcome = Outcome::Timeout;
            reply.message = Some(match (own, budget) {
                (Some(_), Some(budget)) => format!(
                    "still running at the end of its own budget ({} ms): cancelled (see budgets_ms)",
                    millis(budget)
                ),
                _ => "still running at the step's deadline: cancelled (see deadline_ms)".to_owned(),
            });
        }
    }
    reply.duration_ms = millis(started.elapsed());
    reply
}

fn panic_message(error: tokio::task::JoinError) -> String {
    if error.is_cancelled() {
        return "the handler task was cancelled".to_owned();
    }
    let payload = error.into_panic();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_owned());
    format!("the handler panicked: {text}")
}

pub(crate) fn instant_after(now: Instant, budget: Duration) -> Instant {
    // A budget too large to represent means "no deadline" in practice: ten years.
    now.checked_add(budget)
        .or_else(|| now.checked_add(Duration::from_secs(10 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Whole milliseconds, rounded down.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ErrorCode;

    fn reply(verb: StepVerb) -> StepReply {
        StepReply {
            ok: true,
            step: verb,
            outcome: Outcome::Ok,
            duration_ms: 1,
            message: None,
            counts: Counts::new(),
            substeps: vec![],
            repeated: false,
        }
    }

    #[tokio::test]
    async fn order_is_enforced_and_refusal_changes_nothing() {
        let mut seq = Sequence::new();
        assert_eq!(seq.phase(), Phase::Serving);
        let err = seq.claim(StepVerb::StopCron).unwrap_err();
        assert_eq!(err.code, ErrorCode::OutOfOrder);
        assert_eq!(err.expected, Some(StepVerb::Drain));
        assert_eq!(seq.phase(), Phase::Serving);
        assert!(matches!(seq.claim(StepVerb::Drain), Ok(Claim::Run(_))));
        assert_eq!(seq.phase(), Phase::Stopping);
        assert!(matches!(seq.claim(StepVerb::Drain), Ok(Claim::Wait(_))));
        let err = seq.claim(StepVerb::StopCron).unwrap_err();
        assert!(err.message.contains("still running"), "{}", err.message);
        seq.finish(reply(StepVerb::Drain));
        match seq.claim(StepVerb::Drain) {
            Ok(Claim::Recorded(r)) => assert!(r.repeated),
            other => panic!("expected the recorded reply, got {other:?}"),
        }
        for verb in &StepVerb::ALL[1..] {
            assert!(matches!(seq.claim(*verb), Ok(Claim::Run(_))));
            seq.finish(reply(*verb));
        }
        assert_eq!(seq.phase(), Phase::Closed);
        assert_eq!(seq.next_step(), None);
    }
}
