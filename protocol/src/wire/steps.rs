//! The app-owned shutdown steps as data: five control verbs, eight sub-steps, one order.
//!
//! Steps 2–9 of the nine-step shutdown belong to the app. They are grouped into five verbs so
//! the supervisor makes five round trips, not eight. Everything that needs the order (the agent's
//! sequencer, status replies, the supervisor's table) reads it from here.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A step verb of protocol v1, in the only order the agent accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepVerb {
    /// Steps 2 (stop accepting) and 3 (drain in-flight requests).
    Drain,
    /// Step 4: stop the cron scheduler, let a running job finish.
    StopCron,
    /// Step 5: stop message consumers, ack/nack what was delivered.
    StopConsumer,
    /// Step 6: stop the outbox poller after its current batch.
    StopPoller,
    /// Steps 7–9: close the MQ connection, Redis, then the DB pool.
    Close,
}

impl StepVerb {
    /// Every step verb, in protocol order.
    pub const ALL: [StepVerb; 5] = [
        StepVerb::Drain,
        StepVerb::StopCron,
        StepVerb::StopConsumer,
        StepVerb::StopPoller,
        StepVerb::Close,
    ];

    /// The verb as it appears on the wire (`"stop-cron"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            StepVerb::Drain => "drain",
            StepVerb::StopCron => "stop-cron",
            StepVerb::StopConsumer => "stop-consumer",
            StepVerb::StopPoller => "stop-poller",
            StepVerb::Close => "close",
        }
    }

    /// Position in the order, 0 for `drain` to 4 for `close`.
    pub const fn index(self) -> usize {
        match self {
            StepVerb::Drain => 0,
            StepVerb::StopCron => 1,
            StepVerb::StopConsumer => 2,
            StepVerb::StopPoller => 3,
            StepVerb::Close => 4,
        }
    }

    /// The verb at position `index` (see [`StepVerb::index`]).
    pub fn from_index(index: usize) -> Option<StepVerb> {
        StepVerb::ALL.get(index).copied()
    }

    /// The verb that comes after this one, `None` after `close`.
    pub fn next(self) -> Option<StepVerb> {
        StepVerb::from_index(self.index() + 1)
    }

    /// The sub-steps this verb runs, in order, sharing its deadline (or each under its own
    /// budget when the request carries `budgets_ms`, one value per entry here, in this order).
    pub const fn substeps(self) -> &'static [SubStep] {
        match self {
            StepVerb::Drain => &[SubStep::StopAccepting, SubStep::DrainInFlight],
            StepVerb::StopCron => &[SubStep::StopCron],
            StepVerb::StopConsumer => &[SubStep::StopConsumer],
            StepVerb::StopPoller => &[SubStep::StopPoller],
            StepVerb::Close => &[SubStep::CloseMq, SubStep::CloseRedis, SubStep::CloseDb],
        }
    }

    /// Parses the wire spelling; `None` for anything else (case-sensitive).
    pub fn parse(s: &str) -> Option<StepVerb> {
        StepVerb::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for StepVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StepVerb {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StepVerb::parse(s).ok_or_else(|| UnknownName(s.to_owned()))
    }
}

/// One of the eight app-owned steps (2–9 of the nine-step shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubStep {
    /// Step 2: close listeners (gRPC/HTTP).
    StopAccepting,
    /// Step 3: wait for in-flight requests, cancel the rest at the deadline.
    DrainInFlight,
    /// Step 4: stop the cron scheduler.
    StopCron,
    /// Step 5: stop MQ consumers.
    StopConsumer,
    /// Step 6: stop the outbox poller.
    StopPoller,
    /// Step 7: close the MQ connection.
    CloseMq,
    /// Step 8: close the Redis client.
    CloseRedis,
    /// Step 9: close the DB pool.
    CloseDb,
}

impl SubStep {
    /// Every sub-step, in execution order.
    pub const ALL: [SubStep; 8] = [
        SubStep::StopAccepting,
        SubStep::DrainInFlight,
        SubStep::StopCron,
        SubStep::StopConsumer,
        SubStep::StopPoller,
        SubStep::CloseMq,
        SubStep::CloseRedis,
        SubStep::CloseDb,
    ];

    /// The name as it appears on the wire (`"drain-in-flight"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            SubStep::StopAccepting => "stop-accepting",
            SubStep::DrainInFlight => "drain-in-flight",
            SubStep::StopCron => "stop-cron",
            SubStep::StopConsumer => "stop-consumer",
            SubStep::StopPoller => "stop-poller",
            SubStep::CloseMq => "close-mq",
            SubStep::CloseRedis => "close-redis",
            SubStep::CloseDb => "close-db",
        }
    }

    /// The verb that runs this sub-step.
    pub const fn verb(self) -> StepVerb {
        match self {
            SubStep::StopAccepting | SubStep::DrainInFlight => StepVerb::Drain,
            SubStep::StopCron => StepVerb::StopCron,
            SubStep::StopConsumer => StepVerb::StopConsumer,
            SubStep::StopPoller => StepVerb::StopPoller,
            SubStep::CloseMq | SubStep::CloseRedis | SubStep::CloseDb => StepVerb::Close,
        }
    }

    /// The step's number in the nine-step shutdown (2..=9; step 1 is the supervisor's).
    pub const fn step_number(self) -> u8 {
        match self {
            SubStep::StopAccepting => 2,
            SubStep::DrainInFlight => 3,
            SubStep::StopCron => 4,
            SubStep::StopConsumer => 5,
            SubStep::StopPoller => 6,
            SubStep::CloseMq => 7,
            SubStep::CloseRedis => 8,
            SubStep::CloseDb => 9,
        }
    }

    /// Parses the wire spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<SubStep> {
        SubStep::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for SubStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SubStep {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SubStep::parse(s).ok_or_else(|| UnknownName(s.to_owned()))
    }
}

/// One row of the nine-step shutdown: the table the supervisor and the app both read. Step 1 is the
/// supervisor's own (readiness off, then the preStop delay); steps 2–9 are the app's sub-steps. The name is
/// the one logs, metrics labels, the termination message and the app's replies use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// 1-based position, as the docs number the steps.
    pub number: u8,
    pub name: &'static str,
    /// The app's sub-step; `None` for step 1.
    pub substep: Option<SubStep>,
    /// The supervisor's configuration key holding the step's budget.
    pub config_key: &'static str,
    /// The budget when the configuration sets none (step 1's is the default `prestop_delay`).
    pub default_budget: Duration,
}

impl Step {
    /// The verb that carries the step out; `None` for step 1.
    pub const fn verb(&self) -> Option<StepVerb> {
        match self.substep {
            Some(s) => Some(s.verb()),
            None => None,
        }
    }
}

const fn app_step(substep: SubStep, config_key: &'static str, default_ms: u64) -> Step {
    Step {
        number: substep.step_number(),
        name: substep.as_str(),
        substep: Some(substep),
        config_key,
        default_budget: Duration::from_millis(default_ms),
    }
}

/// The nine steps, in order. Steps 2–9 default to 23 s, so with a 5 s preStop delay they fill the 28 s
/// window of a 30 s grace period with a 2 s safety margin.
pub const STEPS: [Step; 9] = [
    Step {
        number: 1,
        name: "health-not-serving",
        substep: None,
        config_key: "prestop_delay",
        default_budget: Duration::ZERO,
    },
    app_step(SubStep::StopAccepting, "steps.stop_accepting", 1000),
    app_step(SubStep::DrainInFlight, "steps.drain_in_flight", 7000),
    app_step(SubStep::StopCron, "steps.stop_cron", 3000),
    app_step(SubStep::StopConsumer, "steps.stop_consumer", 5000),
    app_step(SubStep::StopPoller, "steps.stop_poller", 3000),
    app_step(SubStep::CloseMq, "steps.close_mq", 1000),
    app_step(SubStep::CloseRedis, "steps.close_redis", 1000),
    app_step(SubStep::CloseDb, "steps.close_db", 2000),
];

/// A name that is not one of the protocol's step or sub-step names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a step name of protocol v1")]
pub struct UnknownName(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substeps_cover_all_in_order() {
        let flat: Vec<SubStep> = StepVerb::ALL
            .iter()
            .flat_map(|v| v.substeps().iter().copied())
            .collect();
        assert_eq!(flat, SubStep::ALL);
        for (i, s) in SubStep::ALL.iter().enumerate() {
            assert_eq!(usize::from(s.step_number()), i + 2);
            assert!(s.verb().substeps().contains(s));
        }
    }

    #[test]
    fn the_table_is_numbered_in_order_and_covers_every_substep() {
        for (i, s) in STEPS.iter().enumerate() {
            assert_eq!(usize::from(s.number), i + 1, "{}", s.name);
        }
        let subs: Vec<SubStep> = STEPS.iter().filter_map(|s| s.substep).collect();
        assert_eq!(subs, SubStep::ALL);
        assert!(STEPS[0].substep.is_none());
    }

    #[test]
    fn names_round_trip() {
        for (i, v) in StepVerb::ALL.into_iter().enumerate() {
            assert_eq!(v.index(), i);
            assert_eq!(StepVerb::parse(v.as_str()), Some(v));
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{v}\""));
        }
        for s in SubStep::ALL {
            assert_eq!(SubStep::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(StepVerb::Close.next(), None);
        assert_eq!(StepVerb::Drain.next(), Some(StepVerb::StopCron));
        assert!(StepVerb::parse("Drain").is_none());
    }
}
