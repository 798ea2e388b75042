//! Serving the control socket: one task per connection, each peer checked first.
//!
//! - the socket file: bound, checked and removed by [`crate::socket`] (a stale file is replaced,
//!   a live socket or any other file is an error; the mode is the builder's, 0600 by default).
//! - peers: SO_PEERCRED uid must be 0 or the socket file's owner (or, with a group-accessible
//!   mode, the gid must be the file's group); others get one `peer_refused` line and are closed.
//! - connections: requests answered in order; a step runs on its own task, so a peer vanishing
//!   mid-step only frees the driver slot, it does not cancel the step.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::sequence::instant_after;
use super::{Agent, AgentError, Inner};
use crate::CONTROL_SOCKET_ENV;
use crate::socket::{self, Owner, Peer, SocketFile};
use crate::wire::{
    AgentCommand, ErrorCode, LineReader, Request, Role, StepReply, StepVerb, WireError,
    render_reply,
};

impl Agent {
    /// Binds the control socket at `path` (removing a stale socket file first) and serves it on
    /// a background task. Dropping the returned handle does not stop serving; call
    /// [`AgentHandle::shutdown`] for that.
    pub async fn serve(&self, path: impl AsRef<Path>) -> Result<AgentHandle, AgentError> {
        let path = path.as_ref().to_path_buf();
        let (listener, file) = socket::bind(&path, self.inner.app.socket_mode)?;
        let listener = UnixListener::from_std(listener).map_err(|source| AgentError::Bind {
            path: path.clone(),
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(self.clone(), listener, file, stopped));
        tracing::info!(path = %path.display(), app = %self.inner.app.name, "control socket listening");
        Ok(AgentHandle {
            agent: self.clone(),
            path,
            stop,
            task,
        })
    }

    /// [`Agent::serve`] on the path in `QUIESCE_CONTROL_SOCKET`; `Ok(None)` when it is unset or
    /// empty (the app runs without a supervisor).
    pub async fn serve_from_env(&self) -> Result<Option<AgentHandle>, AgentError> {
        match std::env::var_os(CONTROL_SOCKET_ENV) {
            Some(path) if !path.is_empty() => self.serve(PathBuf::from(path)).await.map(Some),
            _ => Ok(None),
        }
    }
}

/// A serving control socket. Dropping it leaves the socket served; [`AgentHandle::shutdown`]
/// stops it.
#[derive(Debug)]
pub struct AgentHandle {
    agent: Agent,
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl AgentHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The agent being served.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// Resolves once `close` has finished; see [`Agent::closed`].
    pub async fn closed(&self) {
        self.agent.closed().await;
    }

    /// Stops accepting, drops every open connection, and removes the socket file. Steps already
    /// running carry on and are recorded.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "control socket task ended abnormally");
        }
    }
}

/// Accepts connections until `stop` turns true, then drops them all and removes the socket file
/// (if it is still the one this agent created).
async fn accept_loop(
    agent: Agent,
    listener: UnixListener,
    file: SocketFile,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut handle_alive = true;
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            changed = stop.changed(), if handle_alive => match changed {
                // The only value ever sent is `true`: AgentHandle::shutdown.
                Ok(()) => break,
                // The handle was dropped: keep serving for the life of the runtime.
                Err(_) => handle_alive = false,
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(agent.clone(), stream, file.owner()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener recovers.
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    connections.shutdown().await;
    drop(listener);
    file.remove();
}

/// Frees the driver slot when the connection that holds it ends, however it ends.
struct DriverSlot {
    inner: Arc<Inner>,
    connection: u64,
    held: bool,
}

impl DriverSlot {
    fn claim(&mut self) -> bool {
        let mut state = self.inner.lock();
        match state.driver {
            Some(other) if other != self.connection => false,
            _ => {
                state.driver = Some(self.connection);
                self.held = true;
                true
            }
        }
    }

    fn release(&mut self) {
        if self.held {
            let mut state = self.inner.lock();
            if state.driver == Some(self.connection) {
                state.driver = None;
            }
            self.held = false;
        }
    }
}

impl Drop for DriverSlot {
    fn drop(&mut self) {
        self.release();
    }
}

async fn serve_connection(agent: Agent, mut stream: UnixStream, owner: Owner) {
    let connection = agent.inner.next_connection.fetch_add(1, Ordering::Relaxed);
    let refusal = match owner.check(&stream) {
        Peer::Allowed => None,
        Peer::Refused { uid, gid, pid } => Some(format!(
            "peer uid {uid} (gid {gid}, pid {}) may not use this socket: only {} may; connect as one of them",
            pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
            allowed_peers(owner),
        )),
        Peer::Unknown(e) => Some(format!(
            "cannot read the peer's credentials (SO_PEERCRED: {e}); connect over a local Unix socket"
        )),
    };
    if let Some(message) = refusal {
        tracing::warn!(%message, "control connection refused");
        let line = WireError::new(ErrorCode::PeerRefused, message).render_reply();
        let _ = stream.write_all(line.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    }
    let (read, mut write) = stream.into_split();
    let mut reader = LineReader::new(BufReader::new(read));
    let mut driver = DriverSlot {
        inner: Arc::clone(&agent.inner),
        connection,
        held: false,
    };
    loop {
        let (line, kind) = match reader.next_request().await {
            Ok(None) | Err(_) => break,
            Ok(Some(Err(refusal))) => (refusal.render_reply(), Answered::Other),
            Ok(Some(Ok(request))) => answer(&agent, &request, &mut driver, &mut reader).await,
        };
        if write.write_all(line.as_bytes()).await.is_err() {
            break;
        }
        if kind == Answered::CloseReply {
            // The driver has the reply to `close` (first or repeated): the app may exit now.
            // Only this reply counts: an observer's `status` written after `close` finished
            // must not let the app exit before the driver's reply is out.
            agent.inner.close_replied.send_replace(true);
        }
    }
}

/// Who is allowed, for the refusal message.
fn allowed_peers(owner: Owner) -> String {
    let mut who = if owner.uid() == 0 {
        "uid 0 (the app's)".to_owned()
    } else {
        format!("uid 0 and uid {} (the app's)", owner.uid())
    };
    if let Some(gid) = owner.group() {
        who.push_str(&format!(" and processes with gid {gid}"));
    }
    who
}

/// What a written line was, for the app's exit after `close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    /// The step reply to `close` (recorded, waited for or repeated).
    CloseReply,
    /// Anything else: a refusal, another verb's reply.
    Other,
}

/// Answers one well-formed request: the line to write, and whether it is the reply to `close`.
async fn answer<R>(
    agent: &Agent,
    request: &Request,
    driver: &mut DriverSlot,
    reader: &mut LineReader<R>,
) -> (String, Answered)
where
    R: AsyncBufRead + Unpin,
{
    let received = Instant::now();
    if let Some(hook) = &agent.inner.app.on_request {
        hook(request);
    }
    let command = match AgentCommand::from_request(request) {
        Ok(command) => command,
        Err(refusal) => return (refusal.render_reply(), Answered::Other),
    };
    match command {
        AgentCommand::Hello { role, .. } => (answer_hello(agent, role, driver), Answered::Other),
        AgentCommand::Status => (render_reply(&agent.status()), Answered::Other),
        AgentCommand::Health => (render_reply(&agent.health().await), Answered::Other),
        AgentCommand::Step {
            verb,
            deadline,
            budgets,
            traceparents,
        } => {
            if !driver.held {
                return (not_driver(verb), Answered::Other);
            }
            let step = agent.step_at(
                verb,
                received,
                instant_after(received, deadline),
                budgets,
                traceparents,
                false,
            );
            match step_watching_peer(step, verb, driver, reader).await {
                Ok(reply) if reply.step == StepVerb::Close => {
                    (render_reply(&reply), Answered::CloseReply)
                }
                Ok(reply) => (render_reply(&reply), Answered::Other),
                Err(refusal) => (refusal.render_reply(), Answered::Other),
            }
        }
    }
}

/// `hello`: a driver takes the driver slot (refused while another connection holds it); an
/// observer gives up the slot if this connection held it.
fn answer_hello(agent: &Agent, role: Role, driver: &mut DriverSlot) -> String {
    match role {
        Role::Driver if !driver.claim() => {
            return WireError::new(
                ErrorCode::DriverTaken,
                "another connection is the driver; only one at a time: close it first, or say `hello role=observer` to read",
            )
            .render_reply();
        }
        Role::Driver => {}
        Role::Observer => driver.release(),
    }
    render_reply(&agent.hello(role))
}

fn not_driver(verb: StepVerb) -> String {
    WireError::new(
        ErrorCode::NotDriver,
        format!(
            "`{verb}` is a step verb and this connection is not the driver: send `hello role=driver` first"
        ),
    )
    .render_reply()
}

/// Waits for a step's reply while watching the connection: if the peer closes its side
/// mid-step, the driver slot is freed for a reconnecting supervisor. The step goes on either way.
async fn step_watching_peer<R>(
    step: impl Future<Output = Result<StepReply, WireError>>,
    verb: StepVerb,
    driver: &mut DriverSlot,
    reader: &mut LineReader<R>,
) -> Result<StepReply, WireError>
where
    R: AsyncBufRead + Unpin,
{
    tokio::pin!(step);
    let mut watching = true;
    loop {
        tokio::select! {
            result = &mut step => return result,
            readable = reader.wait_readable(), if watching => {
                watching = false;
                if !matches!(readable, Ok(true)) {
                    // The peer cannot send more requests: free the driver slot.
                    tracing::info!(verb = %verb, "driver disconnected mid-step; the step continues");
                    driver.release();
                }
            }
        }
    }
}
