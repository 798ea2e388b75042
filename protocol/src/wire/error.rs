//! Stable error codes and the error type every refusal is built from.
//!
//! A refusal is data, not a crash: the parser, the verb validation and the agent all return a
//! [`WireError`], and the connection turns it into one `{"ok":false,...}` line.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::reply::ErrorReply;
use super::steps::StepVerb;

/// The machine-readable `"error"` code of a refusal. The set and spelling are stable in v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed line: argument without `=`, bad key, empty value, duplicate key, control byte.
    BadRequest,
    /// The verb is well formed but not served here.
    UnknownVerb,
    /// Unknown key for this verb, or a value that does not parse.
    BadArgument,
    /// A required argument is absent.
    MissingArgument,
    /// The line exceeded the limit; it was discarded up to its newline.
    LineTooLong,
    /// The line is not UTF-8.
    InvalidUtf8,
    /// `hello version=N` with a version this side does not speak.
    UnsupportedVersion,
    /// A step verb sent before every earlier step finished.
    OutOfOrder,
    /// A step verb from a connection that is not the driver.
    NotDriver,
    /// `hello role=driver` while another connection is the driver.
    DriverTaken,
    /// The connecting process's uid is not allowed; the connection is closed.
    PeerRefused,
    /// A fault on the serving side (a bug, or a step task that vanished).
    Internal,
}

impl ErrorCode {
    /// Every code, in the order the protocol document lists them.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownVerb,
        ErrorCode::BadArgument,
        ErrorCode::MissingArgument,
        ErrorCode::LineTooLong,
        ErrorCode::InvalidUtf8,
        ErrorCode::UnsupportedVersion,
        ErrorCode::OutOfOrder,
        ErrorCode::NotDriver,
        ErrorCode::DriverTaken,
        ErrorCode::PeerRefused,
        ErrorCode::Internal,
    ];

    /// The code as it appears on the wire (`"line_too_long"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownVerb => "unknown_verb",
            ErrorCode::BadArgument => "bad_argument",
            ErrorCode::MissingArgument => "missing_argument",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::OutOfOrder => "out_of_order",
            ErrorCode::NotDriver => "not_driver",
            ErrorCode::DriverTaken => "driver_taken",
            ErrorCode::PeerRefused => "peer_refused",
            ErrorCode::Internal => "internal",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: a stable code, a message naming the problem and the fix, and for
/// `out_of_order` the verb that is expected next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// The stable code.
    pub code: ErrorCode,
    /// Human text: what was wrong and what to do instead.
    pub message: String,
    /// Only for [`ErrorCode::OutOfOrder`]: the step verb the agent expects next.
    pub expected: Option<StepVerb>,
}

impl WireError {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
            expected: None,
        }
    }

    /// An `out_of_order` refusal naming the expected verb.
    pub fn out_of_order(expected: StepVerb, message: impl Into<String>) -> WireError {
        WireError {
            code: ErrorCode::OutOfOrder,
            message: message.into(),
            expected: Some(expected),
        }
    }

    /// The reply object for this refusal.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply {
            ok: false,
            error: self.code,
            message: self.message.clone(),
            expected: self.expected,
        }
    }

    /// The reply line (JSON plus `\n`) for this refusal.
    pub fn render_reply(&self) -> String {
        super::render_reply(&self.to_reply())
    }
}

impl From<ErrorReply> for WireError {
    fn from(reply: ErrorReply) -> WireError {
        WireError {
            code: reply.error,
            message: reply.message,
            expected: reply.expected,
        }
    }
}

/// A peer-supplied token made safe for an error message: at most 64 characters, escaped.
pub(crate) fn shown(token: &str) -> String {
    const MAX_CHARS: usize = 64;
    let head: String = token.chars().take(MAX_CHARS).collect();
    let mut out = head.escape_debug().to_string();
    if head.len() < token.len() {
        out.push('…');
    }
    out
}

/// [`shown`] in backticks.
pub(crate) fn quote(token: &str) -> String {
    format!("`{}`", shown(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_render_snake_case() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
    }

    #[test]
    fn quote_truncates_and_escapes() {
        assert_eq!(quote("a\tb"), "`a\\tb`");
        let long = "x".repeat(100);
        let q = quote(&long);
        assert!(q.ends_with("…`"));
        assert_eq!(q.chars().filter(|c| *c == 'x').count(), 64);
    }
}
