//! Protocol v1 on the wire: line framing, the request grammar, typed replies, error codes.
//!
//! Usable on its own (no agent, no client): the supervisor's admin socket speaks the same framing
//! with its own verbs, parsing with [`Request::parse`] and [`LineReader`] and answering with
//! [`render_reply`] and [`WireError`].

mod command;
mod error;
mod line;
mod reply;
mod request;
mod steps;
mod trace;

pub use command::{AGENT_VERBS, AgentCommand};
pub use error::{ErrorCode, WireError};
pub use line::{LineReader, is_blank};
pub use reply::{
    CheckReply, Counts, ErrorReply, HealthReply, HelloReply, Outcome, Phase, Role, StatusReply,
    StepReply, StepState, StepStatus, SubStepReply,
};
pub use request::Request;
pub use steps::{STEPS, Step, StepVerb, SubStep, UnknownName};
pub use trace::{TRACEPARENT, TraceParent};

use serde::Serialize;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line accepted, in bytes, not counting its `\n`.
pub const MAX_LINE: usize = 4096;

/// Renders a reply as one JSON line ending in `\n`.
///
/// Serialising the reply types cannot fail (string keys, no non-finite floats reach them); if a
/// custom type ever does, the peer gets an `internal` error line instead of nothing.
pub fn render_reply<T: Serialize + ?Sized>(reply: &T) -> String {
    match serde_json::to_string(reply) {
        Ok(mut line) => {
            line.push('\n');
            line
        }
        Err(e) => {
            let fallback = ErrorReply {
                ok: false,
                error: ErrorCode::Internal,
                message: format!("the reply could not be encoded as JSON ({e}); this is a bug"),
                expected: None,
            };
            let mut line = serde_json::to_string(&fallback).unwrap_or_else(|_| {
                r#"{"ok":false,"error":"internal","message":"reply encoding failed"}"#.to_owned()
            });
            line.push('\n');
            line
        }
    }
}
