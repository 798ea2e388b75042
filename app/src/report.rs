//! Helpers over the protocol's step report, [`quiesce_protocol::agent::Report`], which every
//! component's stop function builds and returns as is (named counts such as
//! `"requests_drained"`, an optional note, timed out or not). The agent hands it to the
//! supervisor unchanged, so there is no app-side report type to convert from.
//!
//! What the protocol type has no words for lives here as functions over it: the app's rule for
//! a stop that reached its deadline ([`deadline_reached`]), reading a count or the
//! outcome back (tests, logs), and the soft deadline a stop function aims for when it is given
//! only a bare deadline.

pub use quiesce_protocol::agent::{HandlerError, Report, StepCtx};
pub use quiesce_protocol::wire::Outcome;

/// Marks `report` as cut short by its (soft) deadline: the stop wrapped up and still reports its
/// counts, plus `deadline_reached: 1`, with `why` as the note; the agent records it as outcome
/// `timeout`.
pub fn deadline_reached(report: Report, why: impl Into<String>) -> Report {
    report.count("deadline_reached", 1).timed_out().note(why)
}

/// Reading a stop's result back (logs, tests): a stop function's [`Report`], or a sub-step's
/// `Result<Report, HandlerError>` (a stop that fails returns the error instead of a report).
pub trait ReportExt {
    /// A count (0 when absent, or when the stop failed).
    fn get(&self, name: &str) -> u64;

    /// The outcome the agent records: `ok`, `timeout` when the deadline cut the stop short,
    /// `error` when it failed.
    fn outcome(&self) -> Outcome;
}

impl ReportExt for Report {
    fn get(&self, name: &str) -> u64 {
        self.counts().get(name).copied().unwrap_or(0)
    }

    fn outcome(&self) -> Outcome {
        if self.is_timed_out() {
            Outcome::Timeout
        } else {
            Outcome::Ok
        }
    }
}

impl ReportExt for Result<Report, HandlerError> {
    fn get(&self, name: &str) -> u64 {
        self.as_ref().map_or(0, |report| report.get(name))
    }

    fn outcome(&self) -> Outcome {
        self.as_ref().map_or(Outcome::Error, ReportExt::outcome)
    }
}

/// The moment a stop function should give up waiting so that it still has time to clean up
/// and report before the hard `deadline` (after which its caller may drop it): a tenth of the
/// remaining budget, at most [`StepCtx::WRAP_UP_MAX`], is kept in reserve (the same margin as
/// [`StepCtx::soft_deadline`], for callers that have only the deadline).
pub fn soft_deadline(deadline: tokio::time::Instant) -> tokio::time::Instant {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    deadline - (left / 10).min(StepCtx::WRAP_UP_MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn soft_deadline_keeps_a_reserve() {
        let now = Instant::now();
        assert_eq!(
            soft_deadline(now + Duration::from_secs(10)),
            now + Duration::from_millis(9900)
        );
        assert_eq!(
            soft_deadline(now + Duration::from_millis(500)),
            now + Duration::from_millis(450)
        );
        assert_eq!(soft_deadline(now), now);
    }

    #[test]
    fn report_builders() {
        let r = deadline_reached(Report::new().count("a", 2), "late");
        assert_eq!(
            (r.outcome(), r.get("a"), r.get("b")),
            (Outcome::Timeout, 2, 0)
        );
        assert!(Outcome::Error > Outcome::Timeout && Outcome::Timeout > Outcome::Ok);
    }

    #[test]
    fn a_report_cut_at_its_deadline_keeps_its_counts_and_is_a_timeout() {
        let ok = Report::new().count("acked", 3);
        assert_eq!(ok.counts().get("acked"), Some(&3));
        assert_eq!(ok.outcome(), Outcome::Ok);
        let late = deadline_reached(Report::new().count("requests_cancelled", 2), "2 cancelled");
        assert_eq!(late.counts().get("requests_cancelled"), Some(&2));
        assert_eq!(late.counts().get("deadline_reached"), Some(&1));
        assert!(
            late.is_timed_out(),
            "a step cut at its deadline is a timeout"
        );
        let err: Result<Report, HandlerError> = Err(HandlerError::msg("broken pipe"));
        assert_eq!((err.outcome(), err.get("acked")), (Outcome::Error, 0));
    }
}
