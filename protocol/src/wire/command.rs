//! The agent's verbs: validation of a generic [`Request`] into a typed command.
//!
//! Kept apart from the parser so the supervisor's admin socket can validate the same generic
//! requests against its own verbs.

use std::time::Duration;

use super::PROTOCOL_VERSION;
use super::error::{ErrorCode, WireError, quote, shown};
use super::reply::Role;
use super::request::Request;
use super::steps::StepVerb;
use super::trace::{TRACEPARENT, TraceParent};

/// A request the app-side agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    /// `hello [role=driver|observer] [version=1]`.
    Hello {
        /// The role asked for (default observer).
        role: Role,
        /// The protocol version the peer speaks (default 1).
        version: u32,
    },
    /// `status`.
    Status,
    /// `health`.
    Health,
    /// `drain|stop-cron|stop-consumer|stop-poller|close deadline_ms=N [budgets_ms=A,B,...]`.
    Step {
        /// Which step.
        verb: StepVerb,
        /// The time budget from receipt.
        deadline: Duration,
        /// Per-sub-step budgets, one per entry of [`StepVerb::substeps`] in that order (whole
        /// milliseconds, each at least 1). Sub-step `i` runs until `min(its start + budgets[i],
        /// receipt + deadline)`, so a hang in one sub-step cannot eat the time of the next.
        /// `None`: the sub-steps share `deadline`.
        budgets: Option<Vec<Duration>>,
        /// The `traceparent` extension (PROTOCOL.md §5.5): one W3C trace context per sub-step,
        /// the parent of that sub-step's span. `None`: no trace context was sent.
        traceparents: Option<Vec<TraceParent>>,
    },
}

/// Every verb the agent serves, for messages.
pub const AGENT_VERBS: [&str; 8] = [
    "hello",
    "status",
    "health",
    "drain",
    "stop-cron",
    "stop-consumer",
    "stop-poller",
    "close",
];

impl AgentCommand {
    /// Validates a parsed request against the agent's verbs and their arguments.
    pub fn from_request(request: &Request) -> Result<AgentCommand, WireError> {
        match request.verb() {
            "hello" => {
                request.check_keys(&["role", "version"])?;
                let role = match request.get("role") {
                    None | Some("observer") => Role::Observer,
                    Some("driver") => Role::Driver,
                    Some(other) => {
                        return Err(WireError::new(
                            ErrorCode::BadArgument,
                            format!(
                                "`role={}` is not valid: expected `role=driver` or `role=observer`",
                                shown(other)
                            ),
                        ));
                    }
                };
                if let Some(value) = request.get("version") {
                    check_version(value)?;
                }
                Ok(AgentCommand::Hello {
                    role,
                    version: PROTOCOL_VERSION,
                })
            }
            "status" => {
                request.check_keys(&[])?;
                Ok(AgentCommand::Status)
            }
            "health" => {
                request.check_keys(&[])?;
                Ok(AgentCommand::Health)
            }
            verb => match StepVerb::parse(verb) {
                Some(step) => {
                    request.check_keys(&["deadline_ms", "budgets_ms", TRACEPARENT])?;
                    let ms = parse_deadline(request.required("deadline_ms", "5000")?)?;
                    let budgets = request
                        .get("budgets_ms")
                        .map(|value| parse_budgets(step, value))
                        .transpose()?;
                    let traceparents = request
                        .get(TRACEPARENT)
                        .map(|value| TraceParent::parse_list(step, value))
                        .transpose()?;
                    Ok(AgentCommand::Step {
                        verb: step,
                        deadline: Duration::from_millis(ms),
                        budgets,
                        traceparents,
                    })
                }
                None => Err(WireError::new(
                    ErrorCode::UnknownVerb,
                    format!(
                        "unknown verb {}: this agent serves {}",
                        quote(verb),
                        AGENT_VERBS.join(", ")
                    ),
                )),
            },
        }
    }

    /// The request that expresses this command (what a client sends).
    pub fn to_request(&self) -> Request {
        match self {
            AgentCommand::Hello { role, version } => Request::new("hello")
                .with_arg("role", role)
                .with_arg("version", version),
            AgentCommand::Status => Request::new("status"),
            AgentCommand::Health => Request::new("health"),
            AgentCommand::Step {
                verb,
                deadline,
                budgets,
                traceparents,
            } => {
                let mut request =
                    Request::new(verb.as_str()).with_arg("deadline_ms", deadline.as_millis());
                if let Some(budgets) = budgets {
                    let list: Vec<String> =
                        budgets.iter().map(|b| b.as_millis().to_string()).collect();
                    request = request.with_arg("budgets_ms", list.join(","));
                }
                if let Some(list) = traceparents {
                    request = request.with_arg(TRACEPARENT, TraceParent::join(list));
                }
                request
            }
        }
    }
}

/// Parses `budgets_ms=A,B,...` for `verb`: exactly one positive whole number of milliseconds per
/// sub-step, comma-separated, digits only. Every refusal names the count and the sub-steps.
fn parse_budgets(verb: StepVerb, value: &str) -> Result<Vec<Duration>, WireError> {
    let substeps = verb.substeps();
    let refuse = |problem: String| {
        let names: Vec<&str> = substeps.iter().map(|s| s.as_str()).collect();
        let example: Vec<&str> = ["1000", "4000", "2000"]
            .into_iter()
            .take(substeps.len())
            .collect();
        WireError::new(
            ErrorCode::BadArgument,
            format!(
                "budgets_ms needs {} value{} for {verb} ({}): {problem}; give one positive whole number of milliseconds per sub-step, in that order, e.g. `budgets_ms={}`",
                substeps.len(),
                if substeps.len() == 1 { "" } else { "s" },
                names.join(", "),
                example.join(","),
            ),
        )
    };
    let items: Vec<&str> = value.split(',').collect();
    if items.len() != substeps.len() {
        return Err(refuse(format!("got {}", items.len())));
    }
    items
        .iter()
        .map(|item| match whole_number(item) {
            Err(NotWhole::NotDigits) if item.is_empty() => {
                Err(refuse("one entry is empty (check the commas)".to_owned()))
            }
            Ok(0) => Err(refuse("a budget of 0 ms is not allowed".to_owned())),
            Ok(ms) => Ok(Duration::from_millis(ms)),
            Err(NotWhole::NotDigits) => {
                Err(refuse(format!("{} is not a whole number", quote(item))))
            }
            Err(NotWhole::TooLarge) => Err(refuse(format!(
                "{} is too large (at most {})",
                quote(item),
                u64::MAX
            ))),
        })
        .collect()
}

/// Why a value is not a whole number in the sense of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotWhole {
    /// Empty, or something other than ASCII digits (a sign, a unit, a decimal point, spaces).
    NotDigits,
    /// Digits, but more than `u64::MAX`.
    TooLarge,
}

/// The protocol's "whole number": one or more ASCII digits, no sign; leading zeros are allowed and
/// ignored (`0100` is 100); at most `u64::MAX` (18446744073709551615).
fn whole_number(text: &str) -> Result<u64, NotWhole> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NotWhole::NotDigits);
    }
    text.parse().map_err(|_| NotWhole::TooLarge)
}

/// `deadline_ms=N`: a whole number of milliseconds, at least 1.
fn parse_deadline(value: &str) -> Result<u64, WireError> {
    let problem = match whole_number(value) {
        Ok(0) => {
            "0 ms is not allowed (the step would have no time); expected a whole number of milliseconds from 1"
                .to_owned()
        }
        Ok(ms) => return Ok(ms),
        Err(NotWhole::NotDigits) => "expected a whole number of milliseconds".to_owned(),
        Err(NotWhole::TooLarge) => {
            format!("expected a whole number of milliseconds up to {}", u64::MAX)
        }
    };
    Err(WireError::new(
        ErrorCode::BadArgument,
        format!(
            "`deadline_ms={}` is not valid: {problem}, e.g. `deadline_ms=5000`",
            shown(value)
        ),
    ))
}

/// `version=N`: digits name a version (only 1 is spoken; any other number, however large, is
/// `unsupported_version`); anything else is not a version number (`bad_argument`).
fn check_version(value: &str) -> Result<(), WireError> {
    match whole_number(value) {
        Ok(v) if u64::from(PROTOCOL_VERSION) == v => Ok(()),
        Err(NotWhole::NotDigits) => Err(WireError::new(
            ErrorCode::BadArgument,
            format!(
                "`version={}` is not valid: expected a protocol version number, e.g. `version={PROTOCOL_VERSION}`",
                shown(value)
            ),
        )),
        Ok(_) | Err(NotWhole::TooLarge) => {
            let digits = value.trim_start_matches('0');
            let digits = if digits.is_empty() { "0" } else { digits };
            Err(WireError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported: this side speaks version {PROTOCOL_VERSION}; send `hello version={PROTOCOL_VERSION}`",
                    shown(digits)
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &str) -> Result<AgentCommand, ErrorCode> {
        AgentCommand::from_request(&Request::parse(line.as_bytes()).unwrap()).map_err(|e| e.code)
    }

    #[test]
    fn validates_each_verb() {
        assert_eq!(
            cmd("hello"),
            Ok(AgentCommand::Hello {
                role: Role::Observer,
                version: 1
            })
        );
        assert_eq!(
            cmd("hello role=driver version=1"),
            Ok(AgentCommand::Hello {
                role: Role::Driver,
                version: 1
            })
        );
        assert_eq!(cmd("hello role=boss"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("hello version=2"), Err(ErrorCode::UnsupportedVersion));
        assert_eq!(cmd("hello version=one"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("hello colour=red"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("status"), Ok(AgentCommand::Status));
        assert_eq!(cmd("status verbose=1"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("health"), Ok(AgentCommand::Health));
        assert_eq!(
            cmd("stop-cron deadline_ms=250"),
            Ok(AgentCommand::Step {
                verb: StepVerb::StopCron,
                deadline: Duration::from_millis(250),
                budgets: None,
                traceparents: None,
            })
        );
        assert_eq!(cmd("close"), Err(ErrorCode::MissingArgument));
        assert_eq!(cmd("close deadline_ms=-1"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("close deadline_ms=1 x=2"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("shutdown"), Err(ErrorCode::UnknownVerb));
    }

    #[test]
    fn whole_numbers_are_digits_only_leading_zeros_allowed() {
        let ms = Duration::from_millis;
        let deadline = |line: &str| match cmd(line) {
            Ok(AgentCommand::Step { deadline, .. }) => Ok(deadline),
            Ok(other) => panic!("{line}: {other:?}"),
            Err(code) => Err(code),
        };
        assert_eq!(deadline("drain deadline_ms=0100"), Ok(ms(100)));
        assert_eq!(deadline("drain deadline_ms=1"), Ok(ms(1)));
        assert_eq!(
            deadline("drain deadline_ms=18446744073709551615"),
            Ok(ms(u64::MAX))
        );
        for bad in [
            "0",
            "000",
            "+5000",
            "-1",
            "5s",
            "1.5",
            "1_000",
            "18446744073709551616",
            "٣",
        ] {
            let line = format!("drain deadline_ms={bad}");
            let e =
                AgentCommand::from_request(&Request::parse(line.as_bytes()).unwrap()).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadArgument, "{line}");
            assert!(
                e.message
                    .starts_with(&format!("`deadline_ms={bad}` is not valid: ")),
                "{line}: {}",
                e.message
            );
        }
        let refusal = |line: &str| {
            AgentCommand::from_request(&Request::parse(line.as_bytes()).unwrap())
                .unwrap_err()
                .message
        };
        assert!(refusal("drain deadline_ms=0").contains("0 ms is not allowed"));
        assert!(
            refusal("drain deadline_ms=99999999999999999999")
                .contains("up to 18446744073709551615")
        );
        assert_eq!(
            cmd("drain deadline_ms=5000 budgets_ms=01000,007"),
            Ok(AgentCommand::Step {
                verb: StepVerb::Drain,
                deadline: ms(5000),
                budgets: Some(vec![ms(1000), ms(7)]),
                traceparents: None,
            })
        );
        assert_eq!(
            cmd("drain deadline_ms=5000 budgets_ms=00,1"),
            Err(ErrorCode::BadArgument)
        );
    }

    #[test]
    fn versions_are_numbers_and_only_1_is_spoken() {
        let hello = Ok(AgentCommand::Hello {
            role: Role::Observer,
            version: 1,
        });
        assert_eq!(cmd("hello version=1"), hello);
        assert_eq!(cmd("hello version=001"), hello);
        for unsupported in ["0", "2", "10", "4294967297", "99999999999999999999999"] {
            assert_eq!(
                cmd(&format!("hello version={unsupported}")),
                Err(ErrorCode::UnsupportedVersion),
                "{unsupported}"
            );
        }
        for bad in ["abc", "+1", "-1", "1.0", "v1", "١"] {
            assert_eq!(
                cmd(&format!("hello version={bad}")),
                Err(ErrorCode::BadArgument),
                "{bad}"
            );
        }
        let e = AgentCommand::from_request(&Request::parse(b"hello version=0002").unwrap())
            .unwrap_err();
        assert!(
            e.message.starts_with("protocol version 2 is not supported"),
            "{}",
            e.message
        );
        let e =
            AgentCommand::from_request(&Request::parse(b"hello version=00").unwrap()).unwrap_err();
        assert!(
            e.message.starts_with("protocol version 0 is not supported"),
            "{}",
            e.message
        );
    }

    #[test]
    fn checks_apply_in_the_documented_order() {
        // Within validation: unknown key, then a missing required argument, then values.
        assert_eq!(cmd("drain x=1"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("drain budgets_ms=1,2"), Err(ErrorCode::MissingArgument));
        assert_eq!(
            cmd("drain budgets_ms=1 deadline_ms=0"),
            Err(ErrorCode::BadArgument)
        );
        // An unknown verb wins over its arguments.
        assert_eq!(cmd("reboot now=1"), Err(ErrorCode::UnknownVerb));
        // hello: unknown key, then role, then version.
        let e = AgentCommand::from_request(&Request::parse(b"hello role=admin version=2").unwrap())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgument);
        assert!(e.message.contains("role=admin"), "{}", e.message);
        assert_eq!(
            cmd("hello version=2 colour=red"),
            Err(ErrorCode::BadArgument)
        );
    }

    #[test]
    fn to_request_round_trips() {
        for line in [
            "hello role=driver version=1",
            "status",
            "health",
            "close deadline_ms=7",
            "drain deadline_ms=8000 budgets_ms=1000,7000",
            "close deadline_ms=5000 budgets_ms=1,2,3",
            "stop-poller deadline_ms=5000 budgets_ms=18446744073709551615",
            "drain deadline_ms=8000 budgets_ms=1000,7000 traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01,00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b8-01",
            "stop-cron deadline_ms=3000 traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ] {
            let c = cmd(line).unwrap();
            assert_eq!(c.to_request().render(), line);
            assert_eq!(AgentCommand::from_request(&c.to_request()), Ok(c));
        }
    }

    #[test]
    fn budgets_parse_one_per_substep_in_order() {
        let ms = Duration::from_millis;
        assert_eq!(
            cmd("drain deadline_ms=8000 budgets_ms=1000,7000"),
            Ok(AgentCommand::Step {
                verb: StepVerb::Drain,
                deadline: ms(8000),
                budgets: Some(vec![ms(1000), ms(7000)]),
                traceparents: None,
            })
        );
        assert_eq!(
            cmd("close budgets_ms=300,200,100 deadline_ms=5000"),
            Ok(AgentCommand::Step {
                verb: StepVerb::Close,
                deadline: ms(5000),
                budgets: Some(vec![ms(300), ms(200), ms(100)]),
                traceparents: None,
            })
        );
        assert_eq!(
            cmd(
                "close deadline_ms=5000 traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ),
            Err(ErrorCode::BadArgument),
            "close needs one traceparent per sub-step"
        );
        // A budget larger than the deadline is allowed: the deadline caps it.
        assert_eq!(
            cmd("stop-cron deadline_ms=100 budgets_ms=900"),
            Ok(AgentCommand::Step {
                verb: StepVerb::StopCron,
                deadline: ms(100),
                budgets: Some(vec![ms(900)]),
                traceparents: None,
            })
        );
    }

    #[test]
    fn bad_budgets_are_refused_naming_count_and_substeps() {
        let refusal = |line: &str| {
            AgentCommand::from_request(&Request::parse(line.as_bytes()).unwrap()).unwrap_err()
        };
        for (line, needs) in [
            (
                "drain deadline_ms=5000 budgets_ms=1000",
                "budgets_ms needs 2 values for drain (stop-accepting, drain-in-flight)",
            ),
            (
                "drain deadline_ms=5000 budgets_ms=1,2,3",
                "budgets_ms needs 2 values for drain (stop-accepting, drain-in-flight)",
            ),
            (
                "close deadline_ms=5000 budgets_ms=1,0,3",
                "budgets_ms needs 3 values for close (close-mq, close-redis, close-db)",
            ),
            (
                "stop-cron deadline_ms=5000 budgets_ms=1s",
                "budgets_ms needs 1 value for stop-cron (stop-cron)",
            ),
            ("drain deadline_ms=5000 budgets_ms=1,", "one entry is empty"),
            ("drain deadline_ms=5000 budgets_ms=,1", "one entry is empty"),
            (
                "drain deadline_ms=5000 budgets_ms=+1,2",
                "`+1` is not a whole number",
            ),
            (
                "drain deadline_ms=5000 budgets_ms=-1,2",
                "`-1` is not a whole number",
            ),
            (
                "drain deadline_ms=5000 budgets_ms=1.5,2",
                "`1.5` is not a whole number",
            ),
            (
                "drain deadline_ms=5000 budgets_ms=0,2",
                "a budget of 0 ms is not allowed",
            ),
            (
                "drain deadline_ms=5000 budgets_ms=1,18446744073709551616",
                "`18446744073709551616` is too large",
            ),
        ] {
            let e = refusal(line);
            assert_eq!(e.code, ErrorCode::BadArgument, "{line}");
            assert!(e.message.contains(needs), "{line}: {}", e.message);
        }
        // On a verb that has no sub-steps it is an unknown argument.
        for line in [
            "status budgets_ms=1",
            "health budgets_ms=1",
            "hello budgets_ms=1",
        ] {
            let e = refusal(line);
            assert_eq!(e.code, ErrorCode::BadArgument, "{line}");
            assert!(e.message.contains("`budgets_ms`"), "{}", e.message);
        }
        // deadline_ms stays required.
        assert_eq!(cmd("drain budgets_ms=1,2"), Err(ErrorCode::MissingArgument));
    }
}
