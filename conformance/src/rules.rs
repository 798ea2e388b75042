//! The catalogue of rules the kit checks, in report order. Every rule names the section of
//! `docs/PROTOCOL.md` that states it, so a failure points at the text to read. The catalogue is
//! data, separate from the checks, so a scenario that cannot run (the app did not start) still
//! reports each of its rules, as failed with the reason, instead of silently checking fewer.

use crate::scenario::input;

/// How strongly PROTOCOL.md states a rule: a failed SHOULD rule is reported `warn` and does not
/// make the run fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Must,
    Should,
}

/// The scenario (one fresh app process, or none) that checks a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// A process started over a stale socket file: observing, bad input, the driver slot.
    Startup,
    /// A process driven through the five steps with ample deadlines, then `close`.
    Steps,
    /// A process driven through the five steps with short deadlines and budgets.
    Deadlines,
    /// A process whose driver leaves while `drain` runs.
    Disconnect,
    /// Processes started with the socket path already taken.
    PathTaken,
    /// A process started without `QUIESCE_CONTROL_SOCKET`, then SIGTERM.
    Standalone,
    /// Aggregated over every reply of the run.
    Whole,
}

/// One checked rule.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub id: &'static str,
    pub section: &'static str,
    pub level: Level,
    pub scenario: Scenario,
    pub title: &'static str,
}

const fn must(
    id: &'static str,
    section: &'static str,
    scenario: Scenario,
    title: &'static str,
) -> Rule {
    Rule {
        id,
        section,
        level: Level::Must,
        scenario,
        title,
    }
}

const fn should(
    id: &'static str,
    section: &'static str,
    scenario: Scenario,
    title: &'static str,
) -> Rule {
    Rule {
        id,
        section,
        level: Level::Should,
        scenario,
        title,
    }
}

use Scenario::{Deadlines, Disconnect, PathTaken, Standalone, Startup, Steps, Whole};

/// Rules before the bad-input table (section 7).
const HEAD: &[Rule] = &[
    must(
        "stale-socket",
        "2",
        Startup,
        "starts over a stale socket file at its path and listens there",
    ),
    must(
        "socket-mode",
        "2",
        Startup,
        "the socket file is a socket with mode 0600 (or the 0660 option)",
    ),
    must(
        "hello-observer",
        "5.1",
        Startup,
        "`hello`: protocol 1, app, pid, role observer, the five steps in order, registered sub-steps, services",
    ),
    must(
        "hello-pid",
        "5.1",
        Startup,
        "`hello`'s pid is a process of the group the kit started",
    ),
    must(
        "hello-extensions",
        "5.5",
        Startup,
        "`hello`'s `extensions`, when present, is a JSON array of strings (absent: the app takes no extension)",
    ),
    must(
        "status-initial",
        "5.2",
        Startup,
        "`status` before any step: phase serving, next_step drain, five pending steps, components",
    ),
    must(
        "health-shape",
        "5.3",
        Startup,
        "`health`: healthy is every required check up; each check has name, required, up, latency_ms (error when down)",
    ),
    must(
        "peer-refused",
        "9",
        Startup,
        "a peer of another uid gets one `peer_refused` line and is disconnected",
    ),
    must(
        "blank-lines",
        "3",
        Startup,
        "blank lines (empty, SP, HTAB, CR) get no reply at all",
    ),
    must(
        "last-line-without-lf",
        "3",
        Startup,
        "a last line without `\\n` is answered once the peer shuts its sending side",
    ),
    must(
        "pipelining",
        "3",
        Startup,
        "pipelined requests are answered in order",
    ),
];

/// Rules after the bad-input table.
const TAIL: &[Rule] = &[
    must(
        "connection-survives",
        "6.4",
        Startup,
        "bad input is refused per line and the connection stays usable",
    ),
    must(
        "refusals-change-nothing",
        "3",
        Startup,
        "after every refusal, `status` (phase, next_step, steps) is unchanged",
    ),
    must(
        "driver-claim",
        "5.1",
        Startup,
        "`hello role=driver` claims the free slot; repeating it on the same connection keeps it",
    ),
    must(
        "driver-taken",
        "5.1",
        Startup,
        "a second `hello role=driver` is `driver_taken` and that connection stays an observer",
    ),
    must(
        "driver-release",
        "5.1",
        Startup,
        "the driver's `hello role=observer` frees the slot for another connection",
    ),
    must(
        "driver-freed-on-close",
        "5.1",
        Startup,
        "closing the driver's connection frees the slot: a new connection claims it within 1 s",
    ),
    must(
        "out-of-order",
        "6.1",
        Startup,
        "a step verb before its turn is `out_of_order` naming `expected`, and nothing changes",
    ),
    must(
        "bad-budgets",
        "6.2.1",
        Startup,
        "bad `budgets_ms` from the driver is `bad_argument`, and nothing changes",
    ),
    must(
        "traceparent-count",
        "5.5",
        Startup,
        "an app listing `traceparent`: a wrong count of traceparents is `bad_argument`, and nothing changes",
    ),
    must(
        "traceparent-malformed",
        "5.5",
        Startup,
        "an app listing `traceparent`: a malformed traceparent is `bad_argument`, and nothing changes",
    ),
    must(
        "step-replies",
        "5.4",
        Steps,
        "step replies: step, outcome = worst sub-step's, duration_ms, counts = sum, sub-steps in order, message unless ok",
    ),
    must(
        "unregistered-note",
        "5.4",
        Steps,
        "a sub-step without a handler completes `ok` with a `note`",
    ),
    must(
        "traceparent-accepted",
        "5.5",
        Steps,
        "an app listing `traceparent` accepts every step verb with one valid traceparent per sub-step, and runs it",
    ),
    must(
        "step-deadline",
        "6.2",
        Steps,
        "each step is answered within its deadline_ms plus the reply slack",
    ),
    must(
        "order-after-drain",
        "6.1",
        Steps,
        "after `drain`, `close` is `out_of_order` with expected `stop-cron`",
    ),
    must(
        "status-progress",
        "5.2",
        Steps,
        "`status` after each step: phase, next_step, the step done with its recorded outcome",
    ),
    must(
        "pipelined-after-step",
        "3",
        Steps,
        "a `status` pipelined behind a step verb is answered after the step, showing it done",
    ),
    must(
        "repeat",
        "6.3",
        Steps,
        "a finished verb sent again returns the recorded reply plus \"repeated\":true",
    ),
    must(
        "reconnect-repeat",
        "6.4",
        Steps,
        "a reconnecting driver claims the slot and a repeat returns the record",
    ),
    must(
        "close-reply",
        "5.4",
        Steps,
        "the reply to `close` is written before the process exits",
    ),
    should(
        "exit-after-close",
        "5.4",
        Steps,
        "the app exits on its own after `close`",
    ),
    should(
        "exit-code",
        "5.4",
        Steps,
        "the exit code after `close` is 0",
    ),
    should(
        "socket-removed",
        "5.4",
        Steps,
        "the socket file is removed on exit",
    ),
    must(
        "short-deadline",
        "6.2",
        Deadlines,
        "a step with a short deadline_ms is answered within it plus the slack, outcomes as recorded",
    ),
    must(
        "short-budgets",
        "6.2.1",
        Deadlines,
        "with budgets_ms, a step is answered within the sum of its budgets plus the slack",
    ),
    should(
        "exit-after-timeouts",
        "5.4",
        Deadlines,
        "after `close`, the app exits with 0 also when steps timed out",
    ),
    must(
        "slot-freed-mid-step",
        "5.1",
        Disconnect,
        "the driver's connection closing mid-step frees the slot at once, not at the step's end",
    ),
    must(
        "repeat-while-running",
        "6.3",
        Disconnect,
        "a verb sent again while it runs is waited for and answered with \"repeated\":true",
    ),
    must(
        "non-socket-kept",
        "2",
        PathTaken,
        "a regular file at the socket path is not removed",
    ),
    must(
        "live-socket-kept",
        "2",
        PathTaken,
        "a socket another process listens on is not removed or replaced",
    ),
    must(
        "path-taken-exits",
        "2",
        PathTaken,
        "with the socket path taken, the app fails to start (non-zero exit)",
    ),
    should(
        "runs-without-socket",
        "2",
        Standalone,
        "without QUIESCE_CONTROL_SOCKET the app starts and keeps running",
    ),
    should(
        "sigterm-standalone",
        "2",
        Standalone,
        "without QUIESCE_CONTROL_SOCKET, SIGTERM runs the steps in-process and the app exits 0",
    ),
    should(
        "empty-variable",
        "2",
        Standalone,
        "with QUIESCE_CONTROL_SOCKET empty, the same: the app runs, and SIGTERM makes it exit 0",
    ),
    must(
        "reply-framing",
        "3",
        Whole,
        "every reply is one JSON object on one line ending in `\\n`, with a boolean `ok`",
    ),
    must(
        "refusal-shape",
        "3",
        Whole,
        "every refusal has a known error code and a non-empty message",
    ),
];

/// Every rule, in report order.
pub fn catalogue() -> Vec<Rule> {
    let cases = input::CASES
        .iter()
        .map(|c| must(c.id, c.section, Startup, c.title));
    HEAD.iter()
        .copied()
        .chain(cases)
        .chain(TAIL.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique() {
        let rules = catalogue();
        let mut ids: Vec<_> = rules.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), rules.len());
    }
}
