//! What an app registers: step handlers, health checks, and the values they get and give.
//!
//! Handlers are plain async closures. They are boxed once at build time so the agent stores one
//! type per kind; each invocation runs as its own task so a panic or a hang stays contained.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::wire::{Counts, StepVerb, SubStep, TraceParent};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub(crate) type StepFn =
    Arc<dyn Fn(StepCtx) -> BoxFuture<Result<Report, HandlerError>> + Send + Sync>;
pub(crate) type CheckFn = Arc<dyn Fn() -> BoxFuture<Result<(), HandlerError>> + Send + Sync>;
pub(crate) type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
pub(crate) type RequestHook = Arc<dyn Fn(&crate::wire::Request) + Send + Sync>;

/// What a step handler did: named counts and an optional remark. Counts of one verb's sub-steps
/// are summed by key into the verb's `counts`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    counts: Counts,
    note: Option<String>,
    timed_out: bool,
}

impl Report {
    /// An empty report.
    pub fn new() -> Report {
        Report::default()
    }

    /// Sets the count `name` (e.g. `"requests_drained"`) to `value`.
    #[must_use]
    pub fn count(mut self, name: impl Into<String>, value: u64) -> Report {
        self.counts.insert(name.into(), value);
        self
    }

    /// Attaches a remark shown as the sub-step's `note`.
    #[must_use]
    pub fn note(mut self, note: impl Into<String>) -> Report {
        self.note = Some(note.into());
        self
    }

    /// Marks the sub-step as having reached its deadline: it stopped taking work and wrapped up,
    /// but did not finish cleanly. Recorded as outcome `timeout` (with these counts, and the note
    /// as its `message`) so the supervisor names the step that hung.
    #[must_use]
    pub fn timed_out(mut self) -> Report {
        self.timed_out = true;
        self
    }

    /// Whether [`Report::timed_out`] was called.
    pub fn is_timed_out(&self) -> bool {
        self.timed_out
    }

    /// The counts so far.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }

    pub(crate) fn into_parts(self) -> (Counts, Option<String>, bool) {
        (self.counts, self.note, self.timed_out)
    }
}

/// A failed handler or check. Any `std::error::Error` converts with `?` (its source chain is kept
/// in the message); use [`HandlerError::msg`] for plain text.
///
/// Like `anyhow::Error`, it deliberately does not implement `std::error::Error` itself, which is
/// what allows the blanket conversion.
pub struct HandlerError {
    message: String,
}

impl HandlerError {
    /// An error with this message.
    pub fn msg(message: impl fmt::Display) -> HandlerError {
        HandlerError {
            message: message.to_string(),
        }
    }

    /// The message, as it appears in the reply.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> HandlerError {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        HandlerError { message }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HandlerError").field(&self.message).finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a step handler is told: which sub-step, and how long it has.
///
/// The hard deadline is [`StepCtx::deadline`]: a handler still running then is cancelled (its
/// future dropped) and recorded `timeout`, and it reports nothing. A handler that wants to report
/// what it cancelled should stop waiting at [`StepCtx::cancelled`], which fires a little earlier,
/// cancel what is left, and return its counts.
#[derive(Debug, Clone)]
pub struct StepCtx {
    pub(crate) substep: SubStep,
    pub(crate) started: Instant,
    pub(crate) soft_deadline: Instant,
    pub(crate) deadline: Instant,
    pub(crate) local: bool,
    pub(crate) traceparent: Option<TraceParent>,
}

impl StepCtx {
    /// Margin between [`StepCtx::cancelled`] and the hard deadline: a tenth of the time left when
    /// the sub-step starts, at most this much.
    pub const WRAP_UP_MAX: Duration = Duration::from_millis(100);

    pub(crate) fn new(substep: SubStep, deadline: Instant, local: bool) -> StepCtx {
        let started = Instant::now();
        let margin = (deadline.saturating_duration_since(started) / 10).min(StepCtx::WRAP_UP_MAX);
        StepCtx {
            substep,
            started,
            soft_deadline: deadline.checked_sub(margin).unwrap_or(deadline),
            deadline,
            local,
            traceparent: None,
        }
    }

    /// The sub-step being run.
    pub fn substep(&self) -> SubStep {
        self.substep
    }

    /// The verb the sub-step belongs to.
    pub fn verb(&self) -> StepVerb {
        self.substep.verb()
    }

    /// When this sub-step started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The hard deadline of this sub-step: the verb's deadline, or earlier when the driver gave
    /// the verb per-sub-step budgets (`budgets_ms`) and this sub-step's runs out first.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// When the handler should give up waiting and wrap up (see the type's docs).
    pub fn soft_deadline(&self) -> Instant {
        self.soft_deadline
    }

    /// Time left until the hard deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Resolves at [`StepCtx::soft_deadline`]. The future owns its data, so it can be moved into
    /// tasks the handler spawns.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        tokio::time::sleep_until(self.soft_deadline)
    }

    /// Whether [`StepCtx::soft_deadline`] has passed.
    pub fn is_cancelled(&self) -> bool {
        Instant::now() >= self.soft_deadline
    }

    /// The trace context the supervisor sent for this sub-step (the `traceparent` extension,
    /// PROTOCOL.md §5.5): the supervisor's span for this shutdown step. An app that traces
    /// makes it the parent of the sub-step's span. `None` when the driver sent none (it does not
    /// trace, or the sub-step runs locally).
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.traceparent
    }

    /// `true` when run by [`crate::agent::Agent::run_local`] (no supervisor), `false` when a
    /// driver sent the verb.
    pub fn is_local(&self) -> bool {
        self.local
    }
}

/// A registered health check.
#[derive(Clone)]
pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) required: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) run: CheckFn,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .field("required", &self.required)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("closing pool")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn handler_error_keeps_the_source_chain() {
        let e = HandlerError::from(Outer(std::io::Error::other("broken pipe")));
        assert_eq!(e.message(), "closing pool: broken pipe");
        assert_eq!(HandlerError::msg("x").to_string(), "x");
    }

    #[tokio::test(start_paused = true)]
    async fn soft_deadline_leaves_a_margin() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let ctx = StepCtx::new(SubStep::DrainInFlight, deadline, false);
        assert_eq!(ctx.deadline() - ctx.soft_deadline(), StepCtx::WRAP_UP_MAX);
        let short = StepCtx::new(
            SubStep::CloseDb,
            Instant::now() + Duration::from_millis(50),
            true,
        );
        assert_eq!(
            short.deadline() - short.soft_deadline(),
            Duration::from_millis(5)
        );
        assert!(!ctx.is_cancelled());
        ctx.cancelled().await;
        assert!(ctx.is_cancelled());
        assert!(ctx.remaining() <= StepCtx::WRAP_UP_MAX);
    }
}
