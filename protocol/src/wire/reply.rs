//! Typed reply objects: one struct per reply shape, serialised as one JSON line.
//!
//! Both sides use these types: the agent renders them, the supervisor's client decodes them. Field
//! order is the order on the wire. Optional fields are omitted when absent, never `null`, except
//! `next_step` which is `null` once everything ran.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::ErrorCode;
use super::steps::{StepVerb, SubStep};

/// Named counts a step reports (`"requests_drained": 12`). Sorted by key on the wire.
pub type Counts = BTreeMap<String, u64>;

/// The role a connection has after `hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May send step verbs. At most one driver connection at a time.
    Driver,
    /// Read-only: `hello`, `status`, `health`. Every connection starts as an observer.
    #[default]
    Observer,
}

impl Role {
    /// The role as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Driver => "driver",
            Role::Observer => "observer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the app is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No step verb has started.
    Serving,
    /// At least one step started, `close` has not finished.
    Stopping,
    /// `close` finished; the app is about to exit.
    Closed,
}

/// A step's progress in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Its handlers are running now.
    Running,
    /// Finished (whatever the outcome); repeats return the recorded reply.
    Done,
}

/// How a step or sub-step ended: the one outcome vocabulary of the agent, the wire, the supervisor's rows,
/// its metrics and the termination message. An app answers `ok`, `timeout` or `error` (the other two do not
/// parse in a reply); ordered from best to worst, so a verb's outcome is the `max` of its sub-steps'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Finished within the deadline.
    Ok,
    /// Still running at the deadline: cancelled.
    Timeout,
    /// The handler returned an error (or panicked).
    Error,
    /// Recorded by the supervisor, never answered by an app: the step did not run (the app had exited
    /// before it, or step 1's delay was cut short by the app's exit).
    #[serde(skip_deserializing)]
    Skipped,
    /// Recorded by the supervisor, never answered by an app: the app died during a request that covered
    /// several steps, and which of them had finished is not known.
    #[serde(skip_deserializing)]
    Unknown,
}

impl Outcome {
    /// The outcome as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
            Outcome::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `{"ok":false,"error":"…","message":"…"}`: a refused request. Nothing changed on the serving side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Always `false`.
    pub ok: bool,
    /// The stable code.
    pub error: ErrorCode,
    /// What was wrong and how to fix it.
    pub message: String,
    /// For `out_of_order`: the verb expected next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<StepVerb>,
}

/// Reply to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Always `true`.
    pub ok: bool,
    /// The protocol version this side speaks (1).
    pub protocol: u32,
    /// The app's name.
    pub app: String,
    /// The app's process id (as the app sees it).
    pub pid: u32,
    /// The role this connection has now.
    pub role: Role,
    /// The step verbs the app accepts, in order (always all five in v1).
    pub steps: Vec<StepVerb>,
    /// The sub-steps that have a handler; the others complete at once with a note.
    pub registered: Vec<SubStep>,
    /// gRPC service names the app serves, for the supervisor's health server.
    pub services: Vec<String>,
    /// Optional protocol extensions the app takes (PROTOCOL.md §5.5): `traceparent`. Absent
    /// (empty) from agents that take none; a supervisor sends an extension's arguments only to
    /// an app that lists it.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "lenient_extensions"
    )]
    pub extensions: Vec<String>,
}

/// `extensions` as an app sent it: an advisory list, so a malformed one (`null`, a string, numbers
/// among the names) never fails the whole `hello`; only its string entries count.
fn lenient_extensions<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|v| match v {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    })
}

impl HelloReply {
    /// Whether the app listed `extension` (e.g. [`crate::wire::TRACEPARENT`]).
    pub fn takes(&self, extension: &str) -> bool {
        self.extensions.iter().any(|e| e == extension)
    }
}

/// One step's line in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStatus {
    /// The step verb.
    pub verb: StepVerb,
    /// Pending, running or done.
    pub state: StepState,
    /// Present once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Time spent so far (running) or in total (done); absent while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Reply to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// Always `true`.
    pub ok: bool,
    /// The app's name.
    pub app: String,
    /// Serving, stopping or closed.
    pub phase: Phase,
    /// The first step verb that has not finished (it may be running); `null` after `close`.
    pub next_step: Option<StepVerb>,
    /// Every step verb in order.
    pub steps: Vec<StepStatus>,
    /// App-provided JSON: per-component state and in-flight counts.
    pub components: serde_json::Value,
}

/// One dependency check in `health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReply {
    /// The dependency (`db`, `redis`, `mq`, …).
    pub name: String,
    /// Whether `healthy` depends on it.
    pub required: bool,
    /// Whether the check passed within its timeout.
    pub up: bool,
    /// How long the check took, in milliseconds (the timeout when it timed out).
    pub latency_ms: f64,
    /// Why it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reply to `health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReply {
    /// Always `true` (a down dependency is data, not a refusal).
    pub ok: bool,
    /// Every required check is up.
    pub healthy: bool,
    /// Each check, in registration order.
    pub checks: Vec<CheckReply>,
}

/// One sub-step inside a step reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubStepReply {
    /// The sub-step.
    pub name: SubStep,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it ran.
    pub duration_ms: u64,
    /// Why it did not end `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What it did.
    #[serde(default)]
    pub counts: Counts,
    /// A remark, e.g. `"nothing registered"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Reply to a step verb that ran (whatever its outcome).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReply {
    /// Always `true`: the step ran; see `outcome` for how it went.
    pub ok: bool,
    /// The verb.
    pub step: StepVerb,
    /// The worst of the sub-steps' outcomes.
    pub outcome: Outcome,
    /// Time from receipt to the end of the last sub-step.
    pub duration_ms: u64,
    /// Present when the outcome is not `ok`: which sub-steps failed and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The sub-steps' counts, summed by key.
    #[serde(default)]
    pub counts: Counts,
    /// Each sub-step in order.
    pub substeps: Vec<SubStepReply>,
    /// `true` when this is the recorded reply of a step that had already run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub repeated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_extensions_list_never_fails_hello() {
        let hello = |ext: &str| {
            let line = format!(
                r#"{{"ok":true,"protocol":1,"app":"a","pid":1,"role":"driver","steps":[],"registered":[],"services":[]{ext}}}"#
            );
            serde_json::from_str::<HelloReply>(&line).map(|h| h.extensions)
        };
        assert_eq!(hello("").unwrap(), Vec::<String>::new());
        assert_eq!(
            hello(r#","extensions":null"#).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            hello(r#","extensions":"traceparent""#).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            hello(r#","extensions":[1,"traceparent",{}]"#).unwrap(),
            ["traceparent"]
        );
    }

    #[test]
    fn outcome_order_is_worst_last() {
        assert!(Outcome::Ok < Outcome::Timeout);
        assert!(Outcome::Timeout < Outcome::Error);
    }

    #[test]
    fn the_supervisors_own_outcomes_serialize_but_an_app_cannot_answer_them() {
        for (o, s) in [(Outcome::Skipped, "skipped"), (Outcome::Unknown, "unknown")] {
            assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{s}\""));
            assert_eq!(o.as_str(), s);
            assert!(serde_json::from_str::<Outcome>(&format!("\"{s}\"")).is_err());
        }
        assert_eq!(
            serde_json::from_str::<Outcome>("\"timeout\"").unwrap(),
            Outcome::Timeout
        );
    }

    #[test]
    fn step_reply_round_trips_and_omits_absent_fields() {
        let reply = StepReply {
            ok: true,
            step: StepVerb::Drain,
            outcome: Outcome::Ok,
            duration_ms: 3,
            message: None,
            counts: Counts::from([("requests_drained".to_owned(), 2)]),
            substeps: vec![SubStepReply {
                name: SubStep::StopAccepting,
                outcome: Outcome::Ok,
                duration_ms: 1,
                message: None,
                counts: Counts::new(),
                note: Some("nothing registered".to_owned()),
            }],
            repeated: false,
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert!(!json.contains("repeated"));
        assert!(!json.contains("message"));
        assert!(json.starts_with(r#"{"ok":true,"step":"drain","outcome":"ok""#));
        let back: StepReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn status_next_step_is_null_not_absent() {
        let reply = StatusReply {
            ok: true,
            app: "a".into(),
            phase: Phase::Closed,
            next_step: None,
            steps: vec![],
            components: serde_json::json!({}),
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert!(json.contains(r#""next_step":null"#));
    }
}
