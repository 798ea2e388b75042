//! The `traceparent` extension: W3C trace context on step verbs, so the app's sub-step spans are
//! children of the supervisor's step spans (PROTOCOL.md §5.5).
//!
//! Optional on both sides. An agent that takes the argument says so in its `hello` reply
//! (`"extensions":["traceparent"]`); a supervisor sends it only to such an agent, so an agent
//! written before the extension never sees an argument it does not know. The value is one W3C
//! `traceparent` per sub-step of the verb, comma-separated, in sub-step order (like
//! `budgets_ms`): `drain` carries two, `close` three.

use std::fmt;

use super::error::{ErrorCode, WireError, quote};
use super::steps::StepVerb;

/// The name of the extension in `hello`'s `extensions`, and of the step verbs' argument.
pub const TRACEPARENT: &str = "traceparent";

/// A W3C `traceparent` of version `00`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`,
/// lowercase, neither id all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// A sampled context (flags `01`) naming `span_id` in `trace_id` as the parent.
    pub fn sampled(trace_id: [u8; 16], span_id: [u8; 8]) -> TraceParent {
        TraceParent {
            trace_id,
            span_id,
            flags: 1,
        }
    }

    /// The trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The parent span's id.
    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// Whether the sampled flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Parses one `traceparent`; `None` when it is not version `00` in the exact W3C form.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let parts: Vec<&str> = text.split('-').collect();
        let [version, trace, span, flags] = parts[..] else {
            return None;
        };
        if version != "00" {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let span_id: [u8; 8] = hex(span)?.try_into().ok()?;
        let [flags]: [u8; 1] = hex(flags)?.try_into().ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// Parses the step verbs' `traceparent=` value for `verb`: one per sub-step, in order.
    pub fn parse_list(verb: StepVerb, value: &str) -> Result<Vec<TraceParent>, WireError> {
        let n = verb.substeps().len();
        let refuse = |problem: String| {
            WireError::new(
                ErrorCode::BadArgument,
                format!(
                    "traceparent for {verb} needs {n} W3C traceparent{s} (one per sub-step, comma-separated, in order): {problem}; each is `00-<32 lowercase hex>-<16 lowercase hex>-<2 hex>`, e.g. `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`",
                    s = if n == 1 { "" } else { "s" },
                ),
            )
        };
        let items: Vec<&str> = value.split(',').collect();
        if items.len() != n {
            return Err(refuse(format!("got {}", items.len())));
        }
        items
            .iter()
            .map(|item| {
                TraceParent::parse(item)
                    .ok_or_else(|| refuse(format!("{} is not one", quote(item))))
            })
            .collect()
    }

    /// The list as the argument's value.
    pub fn join(list: &[TraceParent]) -> String {
        list.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Lowercase hex digits to bytes; `None` for an odd length, uppercase or anything else.
fn hex(text: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for b in self.trace_id {
            write!(f, "{b:02x}")?;
        }
        f.write_str("-")?;
        for b in self.span_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_w3c_form() {
        let tp = TraceParent::parse(GOOD).expect("valid");
        assert_eq!(tp.to_string(), GOOD);
        assert!(tp.is_sampled());
        assert_eq!(tp.span_id()[0], 0x00);
        assert_eq!(tp.span_id()[1], 0xf0);
        let unsampled = TraceParent::parse(&GOOD.replace("-01", "-00")).expect("valid");
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn refuses_what_is_not_version_00_exactly() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902g7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_list_has_one_per_substep() {
        let two = format!("{GOOD},{GOOD}");
        assert_eq!(
            TraceParent::parse_list(StepVerb::Drain, &two).map(|l| l.len()),
            Ok(2)
        );
        let e = TraceParent::parse_list(StepVerb::Close, &two).expect_err("close has three");
        assert_eq!(e.code, ErrorCode::BadArgument);
        assert!(
            e.message.contains("needs 3") && e.message.contains("got 2"),
            "{e:?}"
        );
        let e = TraceParent::parse_list(StepVerb::StopCron, "nope").expect_err("garbage");
        assert!(e.message.contains("`nope` is not one"), "{e:?}");
        let list = TraceParent::parse_list(StepVerb::Drain, &two).expect("valid");
        assert_eq!(TraceParent::join(&list), two);
    }
}
