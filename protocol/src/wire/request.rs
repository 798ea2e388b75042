//! The request line: one parser and one renderer for `verb key=value ...`.
//!
//! The parser knows the grammar only, not which verbs exist: the agent and the supervisor's admin
//! socket each validate the generic [`Request`] against their own verbs (see
//! [`super::AgentCommand`]). It never panics and answers every input with a request or a
//! [`WireError`] (held to that by a property test and a fuzz target).

use std::fmt;
use std::str::FromStr;

use super::MAX_LINE;
use super::error::{ErrorCode, WireError, quote, shown};

/// Longest verb or key accepted, in bytes.
const MAX_NAME: usize = 64;

/// A parsed request: a verb and its `key=value` arguments, keys unique, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    verb: String,
    args: Vec<(String, String)>,
}

impl Request {
    /// A request with no arguments. The renderer writes what it is given: build requests from
    /// valid tokens (see the grammar in `docs/PROTOCOL.md`) or the peer will refuse the line.
    pub fn new(verb: impl Into<String>) -> Request {
        Request {
            verb: verb.into(),
            args: Vec::new(),
        }
    }

    /// Adds (or replaces) the argument `key=value`.
    #[must_use]
    pub fn with_arg(mut self, key: impl Into<String>, value: impl ToString) -> Request {
        let key = key.into();
        let value = value.to_string();
        match self.args.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.args.push((key, value)),
        }
        self
    }

    /// The verb.
    pub fn verb(&self) -> &str {
        &self.verb
    }

    /// The arguments in the order they were sent.
    pub fn args(&self) -> &[(String, String)] {
        &self.args
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parses one request line. A trailing `\n` and then one `\r` are stripped. Blank lines are
    /// refused here (`bad_request`); a server skips them before parsing (see
    /// [`super::LineReader::next_request`]).
    pub fn parse(line: &[u8]) -> Result<Request, WireError> {
        let text = line_text(line)?;
        let mut tokens = text.split([' ', '\t']).filter(|t| !t.is_empty());
        let mut request = Request::new(parse_verb(tokens.next())?);
        for token in tokens {
            let (key, value) = parse_argument(token)?;
            if request.get(key).is_some() {
                return Err(WireError::new(
                    ErrorCode::BadRequest,
                    format!("argument `{key}` is given twice: give each key once"),
                ));
            }
            request.args.push((key.to_owned(), value.to_owned()));
        }
        Ok(request)
    }

    /// Renders the request as a line without its `\n`: `verb key=value ...`.
    pub fn render(&self) -> String {
        let mut out = self.verb.clone();
        for (k, v) in &self.args {
            out.push(' ');
            out.push_str(k);
            out.push('=');
            out.push_str(v);
        }
        out
    }

    /// Refuses (`bad_argument`) any key not in `allowed`, naming the keys the verb takes.
    pub fn check_keys(&self, allowed: &[&str]) -> Result<(), WireError> {
        match self
            .args
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((k, _)) => {
                let takes = if allowed.is_empty() {
                    "takes no arguments".to_owned()
                } else {
                    format!("takes only {}", allowed.join(", "))
                };
                Err(WireError::new(
                    ErrorCode::BadArgument,
                    format!("unknown argument `{k}` for `{}`: it {takes}", self.verb),
                ))
            }
        }
    }

    /// The value of a required argument, or `missing_argument` naming it and an example.
    pub fn required(&self, key: &str, example: &str) -> Result<&str, WireError> {
        self.get(key).ok_or_else(|| {
            WireError::new(
                ErrorCode::MissingArgument,
                format!(
                    "`{}` needs `{key}=`: e.g. `{} {key}={example}`",
                    self.verb, self.verb
                ),
            )
        })
    }

    /// Parses the value of `key` with [`FromStr`], refusing (`bad_argument`) a value that does not
    /// parse; `what` describes the expected value ("a whole number of milliseconds").
    pub fn parse_arg<T: FromStr>(&self, key: &str, what: &str) -> Result<Option<T>, WireError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value.parse().map(Some).map_err(|_| {
                WireError::new(
                    ErrorCode::BadArgument,
                    format!("`{key}={}` is not valid: expected {what}", shown(value)),
                )
            }),
        }
    }
}

/// The framing checks of [`Request::parse`]: strips the `\n` and one `\r`, and refuses a line
/// over [`MAX_LINE`], invalid UTF-8, or a control character other than tab.
fn line_text(line: &[u8]) -> Result<&str, WireError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(WireError::new(
            ErrorCode::LineTooLong,
            format!(
                "request line is {} bytes, the limit is {MAX_LINE}: the line was discarded; send shorter requests",
                line.len()
            ),
        ));
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|e| {
        WireError::new(
            ErrorCode::InvalidUtf8,
            format!(
                "request line is not valid UTF-8 (bad byte at offset {}): send plain UTF-8 text",
                e.valid_up_to()
            ),
        )
    })?;
    if let Some((offset, c)) = text
        .char_indices()
        .find(|(_, c)| c.is_control() && *c != '\t')
    {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!(
                "control character U+{:04X} at offset {offset}: a request is one line of printable text",
                u32::from(c)
            ),
        ));
    }
    Ok(text)
}

/// The verb: the line's first token, lowercase letters, digits and `-`.
fn parse_verb(token: Option<&str>) -> Result<&str, WireError> {
    let Some(verb) = token else {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "empty request: send a verb, e.g. `status`",
        ));
    };
    if !is_verb(verb) {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!(
                "malformed verb {}: verbs are lowercase letters, digits and `-`, e.g. `status`",
                quote(verb)
            ),
        ));
    }
    Ok(verb)
}

/// One `key=value` argument: a well-formed key and a non-empty value.
fn parse_argument(token: &str) -> Result<(&str, &str), WireError> {
    let Some((key, value)) = token.split_once('=') else {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!(
                "argument {} has no `=`: arguments are key=value, e.g. `deadline_ms=5000`",
                quote(token)
            ),
        ));
    };
    if !is_key(key) {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!(
                "malformed key {}: keys are lowercase letters and `_`, e.g. `deadline_ms`",
                quote(key)
            ),
        ));
    }
    if value.is_empty() {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("argument `{key}` has an empty value: write `{key}=VALUE`"),
        ));
    }
    Ok((key, value))
}

fn is_verb(s: &str) -> bool {
    s.len() <= MAX_NAME
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl FromStr for Request {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Request::parse(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &[u8]) -> ErrorCode {
        Request::parse(line).unwrap_err().code
    }

    #[test]
    fn parses_verb_and_args() {
        let r = Request::parse(b"drain deadline_ms=5000\r\n").unwrap();
        assert_eq!(r.verb(), "drain");
        assert_eq!(r.get("deadline_ms"), Some("5000"));
        assert_eq!(r.render(), "drain deadline_ms=5000");
        let r = Request::parse(b"  hello \t role=driver   version=1 ").unwrap();
        assert_eq!(r.args().len(), 2);
        assert_eq!(r.render(), "hello role=driver version=1");
        let r = Request::parse(b"x k=a=b").unwrap();
        assert_eq!(r.get("k"), Some("a=b"));
    }

    #[test]
    fn refuses_malformed_lines() {
        assert_eq!(code(b""), ErrorCode::BadRequest);
        assert_eq!(code(b"   "), ErrorCode::BadRequest);
        assert_eq!(code(b"status foo"), ErrorCode::BadRequest);
        assert_eq!(code(b"status =1"), ErrorCode::BadRequest);
        assert_eq!(code(b"status k="), ErrorCode::BadRequest);
        assert_eq!(code(b"status K=1"), ErrorCode::BadRequest);
        assert_eq!(code(b"status k=1 k=2"), ErrorCode::BadRequest);
        assert_eq!(code(b"STATUS"), ErrorCode::BadRequest);
        assert_eq!(code(b"-x"), ErrorCode::BadRequest);
        assert_eq!(code(b"status\x00"), ErrorCode::BadRequest);
        assert_eq!(code(b"status\rx"), ErrorCode::BadRequest);
        assert_eq!(code(b"stat\xffus"), ErrorCode::InvalidUtf8);
        assert_eq!(code(&[b'a'; MAX_LINE + 1]), ErrorCode::LineTooLong);
        let mut longest = b"status pad=".to_vec();
        longest.resize(MAX_LINE, b'a');
        assert!(Request::parse(&longest).is_ok());
        longest.push(b'a');
        assert_eq!(code(&longest), ErrorCode::LineTooLong);
        longest.pop();
        longest.extend_from_slice(b"\r\n");
        assert_eq!(code(&longest), ErrorCode::LineTooLong, "a \\r counts");
    }

    #[test]
    fn argument_helpers_name_the_fix() {
        let r = Request::parse(b"drain deadline_ms=soon extra=1").unwrap();
        let e = r.check_keys(&["deadline_ms"]).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgument);
        assert!(e.message.contains("extra"), "{}", e.message);
        let e = r.parse_arg::<u64>("deadline_ms", "a number").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgument);
        let e = Request::new("drain")
            .required("deadline_ms", "5000")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::MissingArgument);
        assert!(e.message.contains("drain deadline_ms=5000"));
    }
}
