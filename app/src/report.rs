//! What a component's stop function returns: an outcome and named counts ("requests_drained",
//! "acked", ...). The shutdown sequence and the control protocol both report these as they are.

use std::collections::BTreeMap;

use serde::Serialize;

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Finished within its deadline.
    Ok,
    /// The deadline cut it short; the counts say what was left.
    Timeout,
    /// It failed; the message says why.
    Error,
}

/// The result of stopping one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StopReport {
    /// Ok, timeout or error.
    pub outcome: Outcome,
    /// Named counts of what the stop did.
    pub counts: BTreeMap<&'static str, u64>,
    /// Why it failed or timed out, for humans.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl StopReport {
    /// An `ok` report with no counts.
    pub fn ok() -> Self {
        Self {
            outcome: Outcome::Ok,
            counts: BTreeMap::new(),
            message: None,
        }
    }

    /// Adds a count.
    pub fn count(mut self, name: &'static str, value: u64) -> Self {
        self.counts.insert(name, value);
        self
    }

    /// Marks the report as timed out with a reason.
    pub fn timeout(mut self, message: impl Into<String>) -> Self {
        self.outcome = Outcome::Timeout;
        self.message = Some(message.into());
        self
    }

    /// Marks the report as failed with a reason.
    pub fn error(mut self, message: impl Into<String>) -> Self {
        self.outcome = Outcome::Error;
        self.message = Some(message.into());
        self
    }

    /// Reads a count (0 when absent).
    pub fn get(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }
}

/// The moment a stop function should give up waiting so that it still has time to clean up
/// and report before the hard `deadline` (after which its caller may drop it): a tenth of the
/// remaining budget, at most 100 ms, is kept in reserve.
pub fn soft_deadline(deadline: tokio::time::Instant) -> tokio::time::Instant {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    deadline - (left / 10).min(std::time::Duration::from_millis(100))
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
        let r = StopReport::ok().count("a", 2).timeout("late");
        assert_eq!(
            (r.outcome, r.get("a"), r.get("b")),
            (Outcome::Timeout, 2, 0)
        );
        assert!(Outcome::Error > Outcome::Timeout && Outcome::Timeout > Outcome::Ok);
    }
}
