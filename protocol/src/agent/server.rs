//! The control socket: bind safely, check each peer, and serve one task per connection.
//!
//! - bind: a stale socket file (nothing listening) is removed; a live one or a non-socket file
//!   is an error; the new file gets the configured mode (0600 by default).
//! - peers: SO_PEERCRED uid must be 0 or the socket file's owner (or, with a group-accessible
//!   mode, the gid must be the file's group); others get one `peer_refused` line and are closed.
//! - connections: requests answered in order; a step runs on its own task, so a peer vanishing
//!   mid-step only frees the driver slot, it does not cancel the step.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Agent, AgentError, Inner, instant_after};
use crate::wire::{
    AgentCommand, ErrorCode, LineReader, Request, Role, StepVerb, WireError, render_reply,
};

/// Who owns the socket file, which decides who may connect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SocketOwner {
    uid: u32,
    gid: u32,
    group_access: bool,
    dev: u64,
    ino: u64,
}

impl SocketOwner {
    fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || uid == self.uid || (self.group_access && gid == self.gid)
    }

    /// Who is allowed, for the refusal message.
    fn describe(&self) -> String {
        let mut who = if self.uid == 0 {
            "uid 0 (the app's)".to_owned()
        } else {
            format!("uid 0 and uid {} (the app's)", self.uid)
        };
        if self.group_access {
            who.push_str(&format!(" and processes with gid {}", self.gid));
        }
        who
    }
}

/// Removes a stale socket file at `path`, then binds and sets the mode.
pub(crate) fn bind(path: &Path, mode: u32) -> Result<(UnixListener, SocketOwner), AgentError> {
    remove_stale(path)?;
    let listener = UnixListener::bind(path).map_err(|source| AgentError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let permissions = |source| AgentError::Permissions {
        path: path.to_path_buf(),
        mode,
        source,
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(permissions)?;
    // The file's owner is this process's (fs)uid and its group the one that mode bits grant
    // access to, so the peer check compares against the file itself: no libc call needed.
    let meta = fs::metadata(path).map_err(permissions)?;
    Ok((
        listener,
        SocketOwner {
            uid: meta.uid(),
            gid: meta.gid(),
            group_access: mode & 0o070 != 0,
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

fn remove_stale(path: &Path) -> Result<(), AgentError> {
    let stale = |source| AgentError::Stale {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(AgentError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(AgentError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            match fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed stale control socket file");
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(stale(e)),
            }
        }
        Err(e) => Err(stale(e)),
    }
}

/// Accepts connections until `stop` turns true, then drops them all and removes the socket file
/// (if it is still the one this agent created).
pub(crate) async fn accept_loop(
    agent: Agent,
    listener: UnixListener,
    owner: SocketOwner,
    path: PathBuf,
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
                    connections.spawn(serve_connection(agent.clone(), stream, owner));
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
    if let Ok(meta) = fs::symlink_metadata(&path)
        && meta.dev() == owner.dev
        && meta.ino() == owner.ino
    {
        let _ = fs::remove_file(&path);
    }
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

async fn serve_connection(agent: Agent, mut stream: UnixStream, owner: SocketOwner) {
    let connection = agent.inner.next_connection.fetch_add(1, Ordering::Relaxed);
    let refusal = match stream.peer_cred() {
        Ok(cred) if owner.allows(cred.uid(), cred.gid()) => None,
        Ok(cred) => Some(format!(
            "peer uid {} (gid {}, pid {}) may not use this socket: only {} may; connect as one of them",
            cred.uid(),
            cred.gid(),
            cred.pid()
                .map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
            owner.describe(),
        )),
        Err(e) => Some(format!(
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

/// What a written line was, for the app's exit after `close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    /// The step reply to `close` (recorded, waited for or repeated).
    CloseReply,
    /// Anything else: a refusal, another verb's reply.
    Other,
}

async fn answer<R>(
    agent: &Agent,
    request: &Request,
    driver: &mut DriverSlot,
    reader: &mut LineReader<R>,
) -> (String, Answered)
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    let mut kind = Answered::Other;
    let line = answer_line(agent, request, driver, reader, &mut kind).await;
    (line, kind)
}

async fn answer_line<R>(
    agent: &Agent,
    request: &Request,
    driver: &mut DriverSlot,
    reader: &mut LineReader<R>,
    kind: &mut Answered,
) -> String
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    let received = Instant::now();
    if let Some(hook) = &agent.inner.on_request {
        hook(request);
    }
    let command = match AgentCommand::from_request(request) {
        Ok(command) => command,
        Err(refusal) => return refusal.render_reply(),
    };
    match command {
        AgentCommand::Hello { role, .. } => {
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
        AgentCommand::Status => render_reply(&agent.status()),
        AgentCommand::Health => render_reply(&agent.health().await),
        AgentCommand::Step {
            verb,
            deadline,
            budgets,
        } => {
            if !driver.held {
                return WireError::new(
                    ErrorCode::NotDriver,
                    format!(
                        "`{verb}` is a step verb and this connection is not the driver: send `hello role=driver` first"
                    ),
                )
                .render_reply();
            }
            let step = agent.step_at(
                verb,
                received,
                instant_after(received, deadline),
                budgets,
                false,
            );
            tokio::pin!(step);
            let mut watching = true;
            loop {
                tokio::select! {
                    result = &mut step => {
                        return match result {
                            Ok(reply) => {
                                if reply.step == StepVerb::Close {
                                    *kind = Answered::CloseReply;
                                }
                                render_reply(&reply)
                            }
                            Err(refusal) => refusal.render_reply(),
                        };
                    }
                    readable = reader.wait_readable(), if watching => {
                        watching = false;
                        if !matches!(readable, Ok(true)) {
                            // The peer closed its side: it cannot send more requests, so free
                            // the driver slot for a reconnecting supervisor. The step goes on.
                            tracing::info!(step = %verb, "driver disconnected mid-step; the step continues");
                            driver.release();
                        }
                    }
                }
            }
        }
    }
}
