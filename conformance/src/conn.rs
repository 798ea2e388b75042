//! One connection to the app's control socket, speaking the wire format of PROTOCOL.md section 3
//! directly: requests are bytes the kit writes as they are (so it can send what no well-behaved
//! client would), replies are read byte by byte up to their `\n` under a deadline, and checked
//! for the framing every reply must have (one JSON object, one line, a boolean `ok`). A framing
//! or refusal-shape problem is both returned to the check at hand and logged in [`Shared`], which
//! the whole-run rules `reply-framing` and `refusal-shape` report.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The error codes of PROTOCOL.md section 8.
pub const CODES: [&str; 12] = [
    "bad_request",
    "unknown_verb",
    "bad_argument",
    "missing_argument",
    "line_too_long",
    "invalid_utf8",
    "unsupported_version",
    "out_of_order",
    "not_driver",
    "driver_taken",
    "peer_refused",
    "internal",
];

/// Problems seen on any connection of the run.
#[derive(Debug, Default)]
pub struct Violations {
    pub framing: Vec<String>,
    pub refusals: Vec<String>,
}

/// What every connection of a run shares: the reply timeout and the problems seen.
#[derive(Debug)]
pub struct Session {
    /// How long any reply may take (the kit's `--timeout-ms`).
    pub timeout: Duration,
    pub violations: Mutex<Violations>,
}

/// Shared by every connection of a run.
pub type Shared = Arc<Session>;

/// How a read ended without a reply.
#[derive(Debug)]
pub enum ReadError {
    Timeout,
    Eof,
    Other(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Timeout => f.write_str("no reply in time"),
            ReadError::Eof => f.write_str("the app closed the connection"),
            ReadError::Other(e) => f.write_str(e),
        }
    }
}

#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    pending: Vec<u8>,
    shared: Shared,
}

impl Conn {
    pub fn connect(path: &Path, shared: &Shared) -> std::io::Result<Conn> {
        let stream = UnixStream::connect(path)?;
        stream.set_write_timeout(Some(shared.timeout))?;
        Ok(Conn {
            stream,
            pending: Vec::new(),
            shared: Arc::clone(shared),
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("cannot write to the socket: {e}"))
    }

    /// Shuts the sending side (the peer sees end of input).
    pub fn shutdown_write(&mut self) -> Result<(), String> {
        self.stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("cannot shut down writing: {e}"))
    }

    /// Reads one raw line (without its `\n`) within `within`.
    pub fn read_line(&mut self, within: Duration) -> Result<Vec<u8>, ReadError> {
        let end = Instant::now() + within;
        loop {
            if let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=at).collect();
                line.pop();
                return Ok(line);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::Timeout);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| ReadError::Other(e.to_string()))?;
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf) {
                Ok(0) if self.pending.is_empty() => return Err(ReadError::Eof),
                Ok(0) => {
                    return Err(ReadError::Other(format!(
                        "the app closed the connection after a reply without `\\n`: {}",
                        String::from_utf8_lossy(&self.pending)
                    )));
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ReadError::Timeout);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(ReadError::Eof),
                Err(e) => return Err(ReadError::Other(format!("cannot read the socket: {e}"))),
            }
        }
    }

    /// Reads one reply within the timeout and checks its framing.
    pub fn reply(&mut self) -> Result<Value, String> {
        let line = self
            .read_line(self.shared.timeout)
            .map_err(|e| e.to_string())?;
        self.parse(&line)
    }

    /// Reads one reply within `within`.
    pub fn reply_within(&mut self, within: Duration) -> Result<Value, ReadError> {
        let line = self.read_line(within)?;
        self.parse(&line).map_err(ReadError::Other)
    }

    fn parse(&mut self, line: &[u8]) -> Result<Value, String> {
        let problem = match serde_json::from_slice::<Value>(line) {
            Ok(v) if v.get("ok").is_some_and(Value::is_boolean) => return Ok(v),
            Ok(v) if v.is_object() => "a reply without a boolean `ok`",
            Ok(_) => "a reply that is not a JSON object",
            Err(_) => "a reply that is not JSON",
        };
        let text = format!(
            "{problem}: {}",
            String::from_utf8_lossy(line)
                .chars()
                .take(200)
                .collect::<String>()
        );
        if let Ok(mut v) = self.shared.violations.lock() {
            v.framing.push(text.clone());
        }
        Err(text)
    }

    /// Sends `line` (which must end in `\n`) and reads its reply.
    pub fn request(&mut self, line: &str) -> Result<Value, String> {
        self.send(line.as_bytes())?;
        self.reply()
            .map_err(|e| format!("`{}`: {e}", line.trim_end()))
    }

    /// Sends `line` and requires `ok:true`.
    pub fn ok(&mut self, line: &str) -> Result<Value, String> {
        let v = self.request(line)?;
        if v["ok"] == true {
            Ok(v)
        } else {
            Err(format!("`{}` was refused: {v}", line.trim_end()))
        }
    }

    /// Sends `request` (raw bytes, ending in `\n`) and requires the refusal `code`.
    pub fn refused(&mut self, request: &[u8], code: &str) -> Result<Value, String> {
        self.send(request)?;
        let shown = show(request);
        let v = self.reply().map_err(|e| format!("`{shown}`: {e}"))?;
        self.refusal_shape(&v);
        if v["ok"] == false && v["error"] == code {
            Ok(v)
        } else {
            Err(format!(
                "`{shown}` should be refused with `{code}`, got {}",
                short(&v)
            ))
        }
    }

    /// Logs a refusal without a known code or message (section 8).
    pub fn refusal_shape(&self, v: &Value) {
        if v["ok"] != false {
            return;
        }
        let code_known = v["error"].as_str().is_some_and(|c| CODES.contains(&c));
        let has_message = v["message"].as_str().is_some_and(|m| !m.is_empty());
        if !(code_known && has_message)
            && let Ok(mut s) = self.shared.violations.lock()
        {
            s.refusals.push(short(v));
        }
    }

    /// Requires that nothing arrives for `quiet`.
    pub fn silent_for(&mut self, quiet: Duration) -> Result<(), String> {
        match self.read_line(quiet) {
            Err(ReadError::Timeout) => Ok(()),
            Ok(line) => Err(format!(
                "unexpected reply: {}",
                String::from_utf8_lossy(&line)
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A request for a message: escapes control characters and bytes that are not UTF-8, and cuts
/// long lines.
pub fn show(request: &[u8]) -> String {
    let trimmed = request.strip_suffix(b"\n").unwrap_or(request);
    let mut out = String::new();
    for chunk in trimmed.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.push_str(&c.escape_default().to_string());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    if out.chars().count() > 60 {
        let head: String = out.chars().take(40).collect();
        return format!("{head}… ({} bytes)", trimmed.len());
    }
    out
}

/// A reply cut to a readable length.
pub fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 240 {
        format!("{}…", text.chars().take(240).collect::<String>())
    } else {
        text
    }
}
