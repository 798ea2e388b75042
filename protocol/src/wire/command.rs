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

/// A request the app-side agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// `drain|stop-cron|stop-consumer|stop-poller|close deadline_ms=N`.
    Step {
        /// Which step.
        verb: StepVerb,
        /// The time budget from receipt.
        deadline: Duration,
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
                let version = request
                    .parse_arg::<u32>("version", "a protocol version number, e.g. `version=1`")?
                    .unwrap_or(PROTOCOL_VERSION);
                if version != PROTOCOL_VERSION {
                    return Err(WireError::new(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "protocol version {version} is not supported: this side speaks version {PROTOCOL_VERSION}; send `hello version={PROTOCOL_VERSION}`"
                        ),
                    ));
                }
                Ok(AgentCommand::Hello { role, version })
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
                    request.check_keys(&["deadline_ms"])?;
                    request.required("deadline_ms", "5000")?;
                    let ms = request
                        .parse_arg::<u64>(
                            "deadline_ms",
                            "a whole number of milliseconds, e.g. `deadline_ms=5000`",
                        )?
                        .unwrap_or_default();
                    Ok(AgentCommand::Step {
                        verb: step,
                        deadline: Duration::from_millis(ms),
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
        match *self {
            AgentCommand::Hello { role, version } => Request::new("hello")
                .with_arg("role", role)
                .with_arg("version", version),
            AgentCommand::Status => Request::new("status"),
            AgentCommand::Health => Request::new("health"),
            AgentCommand::Step { verb, deadline } => {
                Request::new(verb.as_str()).with_arg("deadline_ms", deadline.as_millis())
            }
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
                deadline: Duration::from_millis(250)
            })
        );
        assert_eq!(cmd("close"), Err(ErrorCode::MissingArgument));
        assert_eq!(cmd("close deadline_ms=-1"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("close deadline_ms=1 x=2"), Err(ErrorCode::BadArgument));
        assert_eq!(cmd("shutdown"), Err(ErrorCode::UnknownVerb));
    }

    #[test]
    fn to_request_round_trips() {
        for line in [
            "hello role=driver version=1",
            "status",
            "health",
            "close deadline_ms=7",
        ] {
            let c = cmd(line).unwrap();
            assert_eq!(c.to_request().render(), line);
            assert_eq!(AgentCommand::from_request(&c.to_request()), Ok(c));
        }
    }
}
