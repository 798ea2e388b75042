//! A small async client for the control socket: what the supervisor uses to drive an app.
//!
//! One request, one reply, in order, each under a timeout. A call that times out leaves a reply
//! in flight that would be read as the answer to the next request, so the client refuses further
//! calls after a timeout: reconnect instead.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::wire::{
    AgentCommand, ErrorCode, ErrorReply, HealthReply, HelloReply, LineReader, PROTOCOL_VERSION,
    Request, Role, StatusReply, StepReply, StepVerb, is_blank,
};

/// Default timeout of calls other than steps.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Extra time a step call waits beyond the step's own deadline for the reply to arrive.
pub const STEP_REPLY_SLACK: Duration = Duration::from_secs(1);

/// Replies longer than this are refused (status with a large `components` object stays well
/// below it).
pub const MAX_REPLY: usize = 1 << 20;

/// A failed call. Every variant names the socket and the verb.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error(
        "control socket {path}: cannot connect: {source} (is the app running and listening there?)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Writing the request failed.
    #[error("control socket {path}: sending `{verb}` failed: {source}")]
    Send {
        /// The socket path.
        path: PathBuf,
        /// The verb of the request.
        verb: String,
        /// The cause.
        source: io::Error,
    },
    /// Reading the reply failed.
    #[error("control socket {path}: reading the reply to `{verb}` failed: {source}")]
    Receive {
        /// The socket path.
        path: PathBuf,
        /// The verb of the request.
        verb: String,
        /// The cause.
        source: io::Error,
    },
    /// The app closed the connection before replying.
    #[error("control socket {path}: the app closed the connection before replying to `{verb}`")]
    Closed {
        /// The socket path.
        path: PathBuf,
        /// The verb of the request.
        verb: String,
    },
    /// No reply within the timeout.
    #[error(
        "control socket {path}: no reply to `{verb}` within {timeout:?}; the connection is out of step now: reconnect"
    )]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The verb of the request.
        verb: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The reply is not a protocol v1 reply (not JSON, no `ok`, wrong shape, too long).
    #[error(
        "control socket {path}: the reply to `{verb}` is not a valid protocol v1 reply ({reason}): {line}"
    )]
    InvalidReply {
        /// The socket path.
        path: PathBuf,
        /// The verb of the request.
        verb: String,
        /// What is wrong with it.
        reason: String,
        /// The reply line (truncated).
        line: String,
    },
    /// The app refused the request (`"ok":false`).
    #[error("control socket {path}: `{verb}` refused with {}: {}", reply.error, reply.message)]
    Refused {
        /// The socket path.
        path: PathBuf,
        /// The verb of the request.
        verb: String,
        /// The refusal.
        reply: ErrorReply,
    },
    /// An earlier call timed out, so replies may be out of step.
    #[error(
        "control socket {path}: an earlier call timed out, so replies may be out of step: reconnect"
    )]
    Desynchronized {
        /// The socket path.
        path: PathBuf,
    },
    /// The caller passed a line that cannot be sent as one request.
    #[error("cannot send {line:?}: {reason}")]
    InvalidRequest {
        /// The line.
        line: String,
        /// Why not.
        reason: &'static str,
    },
}

impl ClientError {
    /// The protocol error code, when the app refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { reply, .. } => Some(reply.error),
            _ => None,
        }
    }
}

/// One connection to a control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: LineReader<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    desynchronized: bool,
}

impl Client {
    /// Connects to the socket at `path`. Callers that start before the app retry on
    /// [`ClientError::Connect`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.clone(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        Ok(Client {
            path,
            reader: LineReader::with_limit(BufReader::new(read), MAX_REPLY),
            writer,
            timeout: DEFAULT_TIMEOUT,
            desynchronized: false,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Credentials of the process that listens at the socket (`SO_PEERCRED`: recorded by the kernel when
    /// it called `listen`), so a supervisor can check it is talking to its own app.
    pub fn peer_cred(&self) -> io::Result<tokio::net::unix::UCred> {
        self.writer.as_ref().peer_cred()
    }

    /// Sets the timeout the typed helpers use (except [`Client::step`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends one request line and returns the reply object, `ok:false` replies included.
    pub async fn call_raw(
        &mut self,
        line: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        if line.contains('\n') {
            return Err(ClientError::InvalidRequest {
                line: line.to_owned(),
                reason: "a request is one line: remove the newline",
            });
        }
        if is_blank(line.as_bytes()) {
            return Err(ClientError::InvalidRequest {
                line: line.to_owned(),
                reason: "blank lines get no reply: send a verb",
            });
        }
        if self.desynchronized {
            return Err(ClientError::Desynchronized {
                path: self.path.clone(),
            });
        }
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        match tokio::time::timeout(timeout, self.exchange(&bytes, &verb)).await {
            Ok(result) => result,
            Err(_) => {
                self.desynchronized = true;
                Err(ClientError::Timeout {
                    path: self.path.clone(),
                    verb,
                    timeout,
                })
            }
        }
    }

    /// Reads one reply line that was not asked for, e.g. the `peer_refused` line an app sends
    /// on connect to a peer it does not accept.
    pub async fn read_reply(
        &mut self,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let verb = "(connect)".to_owned();
        match tokio::time::timeout(timeout, self.receive(&verb)).await {
            Ok(result) => result,
            Err(_) => {
                self.desynchronized = true;
                Err(ClientError::Timeout {
                    path: self.path.clone(),
                    verb,
                    timeout,
                })
            }
        }
    }

    async fn exchange(
        &mut self,
        bytes: &[u8],
        verb: &str,
    ) -> Result<serde_json::Value, ClientError> {
        let send = |source| ClientError::Send {
            path: self.path.clone(),
            verb: verb.to_owned(),
            source,
        };
        self.writer.write_all(bytes).await.map_err(send)?;
        self.receive(verb).await
    }

    async fn receive(&mut self, verb: &str) -> Result<serde_json::Value, ClientError> {
        let invalid = |reason: String, line: &[u8]| ClientError::InvalidReply {
            path: self.path.clone(),
            verb: verb.to_owned(),
            reason,
            line: String::from_utf8_lossy(&line[..line.len().min(512)]).into_owned(),
        };
        let line = match self.reader.next_line().await {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(_))) => {
                return Err(invalid(format!("longer than {MAX_REPLY} bytes"), b""));
            }
            Ok(None) => {
                return Err(ClientError::Closed {
                    path: self.path.clone(),
                    verb: verb.to_owned(),
                });
            }
            Err(source) => {
                return Err(ClientError::Receive {
                    path: self.path.clone(),
                    verb: verb.to_owned(),
                    source,
                });
            }
        };
        let value: serde_json::Value =
            serde_json::from_slice(&line).map_err(|e| invalid(format!("not JSON: {e}"), &line))?;
        if !value.get("ok").is_some_and(serde_json::Value::is_boolean) {
            return Err(invalid("no boolean \"ok\" field".to_owned(), &line));
        }
        Ok(value)
    }

    /// Sends one request line; an `ok:false` reply becomes [`ClientError::Refused`].
    pub async fn call(
        &mut self,
        line: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let value = self.call_raw(line, timeout).await?;
        let verb = line.split_whitespace().next().unwrap_or_default();
        self.check_ok(value, verb)
    }

    fn check_ok(
        &self,
        value: serde_json::Value,
        verb: &str,
    ) -> Result<serde_json::Value, ClientError> {
        if value.get("ok") == Some(&serde_json::Value::Bool(true)) {
            return Ok(value);
        }
        match serde_json::from_value::<ErrorReply>(value.clone()) {
            Ok(reply) => Err(ClientError::Refused {
                path: self.path.clone(),
                verb: verb.to_owned(),
                reply,
            }),
            Err(e) => Err(ClientError::InvalidReply {
                path: self.path.clone(),
                verb: verb.to_owned(),
                reason: format!("an ok:false reply without a known error code ({e})"),
                line: value.to_string(),
            }),
        }
    }

    /// Sends `request` and decodes an `ok:true` reply as `T`.
    pub async fn request<T: DeserializeOwned>(
        &mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let value = self.call(&request.render(), timeout).await?;
        serde_json::from_value(value.clone()).map_err(|e| ClientError::InvalidReply {
            path: self.path.clone(),
            verb: request.verb().to_owned(),
            reason: format!("unexpected shape: {e}"),
            line: value.to_string(),
        })
    }

    /// `hello role=… version=1`.
    pub async fn hello(&mut self, role: Role) -> Result<HelloReply, ClientError> {
        let request = AgentCommand::Hello {
            role,
            version: PROTOCOL_VERSION,
        }
        .to_request();
        self.request(&request, self.timeout).await
    }

    /// `hello role=driver version=1`: claims the driver slot.
    pub async fn hello_driver(&mut self) -> Result<HelloReply, ClientError> {
        self.hello(Role::Driver).await
    }

    /// `status`.
    pub async fn status(&mut self) -> Result<StatusReply, ClientError> {
        self.request(&AgentCommand::Status.to_request(), self.timeout)
            .await
    }

    /// `health` (takes about as long as the slowest check, at most its timeout).
    pub async fn health(&mut self) -> Result<HealthReply, ClientError> {
        self.request(&AgentCommand::Health.to_request(), self.timeout)
            .await
    }

    /// Runs a step with `deadline` as its budget; waits up to `deadline` + [`STEP_REPLY_SLACK`].
    /// An `ok:true` reply is returned whatever the step's outcome.
    pub async fn step(
        &mut self,
        verb: StepVerb,
        deadline: Duration,
    ) -> Result<StepReply, ClientError> {
        let request = AgentCommand::Step {
            verb,
            deadline,
            budgets: None,
            traceparents: None,
        }
        .to_request();
        self.request(&request, deadline.saturating_add(STEP_REPLY_SLACK))
            .await
    }

    /// Like [`Client::step`], with a budget per sub-step (`budgets_ms`): one entry per
    /// [`StepVerb::substeps`] of `verb`, in order, in whole milliseconds of at least 1. Sub-step
    /// `i` is cut at `min(its start + budgets[i], receipt + deadline)`, so a hang in one sub-step
    /// leaves the next its own time. A wrong count or a zero budget is refused by the app
    /// (`bad_argument`, [`ClientError::Refused`]). Waits up to `deadline` +
    /// [`STEP_REPLY_SLACK`], since the budgets never extend the step past its deadline.
    pub async fn step_with_budgets(
        &mut self,
        verb: StepVerb,
        deadline: Duration,
        budgets: &[Duration],
    ) -> Result<StepReply, ClientError> {
        let request = AgentCommand::Step {
            verb,
            deadline,
            budgets: Some(budgets.to_vec()),
            traceparents: None,
        }
        .to_request();
        self.request(&request, deadline.saturating_add(STEP_REPLY_SLACK))
            .await
    }
}
