//! The supervisor's admin socket: `quiesce prestop` and `quiesce ctl` talk to the running supervisor here.
//!
//! Same framing as the control protocol (one request line, one JSON reply line; parser and renderer from
//! `quiesce_protocol::wire`), with the supervisor's own verbs:
//!
//! - `status`: phase, child pid, control connection, each shutdown step's outcome and timing.
//! - `shutdown`: start the shutdown sequence, as SIGTERM would (joins one already running).
//! - `prestop`: start step 1 (or join it) and reply once the preStop delay has passed.
//! - `watch`: the `status` reply, then again each time it changes, then the supervisor's exit code and
//!   reason (`quiesce ctl status --watch`). It is the one verb that answers more than once: the server
//!   looks at the record whenever a step starts or is recorded or the lifecycle moves (and every
//!   [`WATCH_POLL`] for the rest, health and the control connection), instead of every client polling
//!   over its own connection, and only the server sees the exit decided ([`publish_exit`]) in the last
//!   moments before the process ends. A watch is exempt from the idle timeout while it streams, but it
//!   holds at most one line in flight (a client that stops reading is dropped after [`IDLE_TIMEOUT`]) and
//!   at most [`MAX_WATCHERS`] of the connection slots, so watchers never take the slot `prestop` needs.
//!
//! The socket file follows `quiesce_protocol::socket`, the rule the app's control socket follows too: a stale
//! socket is replaced, a live one or any other file refused, and exit removes only the file this supervisor
//! created. It is created 0600 and peers must be root or the supervisor's own uid (SO_PEERCRED), even when
//! the file's mode is widened later: another uid gets one `peer_refused` reply and is disconnected.

pub mod client;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use quiesce_protocol::socket::{self, Owner, Peer, SocketFile};
use quiesce_protocol::wire::{ErrorCode, LineReader, Request, WireError, render_reply};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::lifecycle::Lifecycle;
use crate::runloop::{Event, Watches};
use crate::state::{Shared, Trigger, ms};

#[derive(Debug, thiserror::Error)]
#[error("admin socket {path}: {reason}")]
pub struct BindError {
    pub path: PathBuf,
    pub reason: String,
}

/// The admin socket's listener, with the rule for who may connect (fixed when it was bound).
#[derive(Debug)]
pub struct Listener {
    listener: std::os::unix::net::UnixListener,
    owner: Owner,
}

/// Binds the socket 0600, creating its directory if needed. A file already at the path is removed only when it
/// is a socket nobody answers on (a stale one); a live socket means another supervisor, and anything that is
/// not a socket is refused, so a misconfigured path never deletes a file. The [`SocketFile`] is what exit
/// removes, and nothing else.
pub fn bind(path: &Path) -> Result<(Listener, SocketFile), BindError> {
    let err = |reason: String| BindError {
        path: path.into(),
        reason,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}; mount a writable directory there (an emptyDir) or set admin_socket", dir.display())))?;
    }
    let (listener, file) = socket::bind(path, 0o600).map_err(|e| err(reason(e)))?;
    let owner = file.owner();
    Ok((Listener { listener, owner }, file))
}

/// The admin socket's wording of a bind failure: it names the setting to change.
fn reason(error: socket::BindError) -> String {
    use socket::BindError as E;
    match error {
        E::InUse { .. } => {
            "another supervisor is already listening there; give this one its own admin_socket".into()
        }
        E::NotASocket { .. } => {
            "a file that is not a socket is there; refusing to remove it: set admin_socket to a path of its own"
                .into()
        }
        E::Inspect { source, .. } => format!("cannot inspect the existing file: {source}"),
        E::RemoveStale { source, .. } => format!("cannot remove the stale socket file: {source}"),
        E::Bind { source, .. } => format!("cannot bind: {source}"),
        E::Mode { mode, source, .. } => format!("cannot set mode {mode:04o}: {source}"),
    }
}

/// At most this many admin connections are served at once; more are closed at accept. `prestop` holds one
/// for the preStop delay, `ctl` one for a moment: 16 is plenty, and a flood cannot grow past it.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection that sends no request for this long is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// At most this many `watch` connections at once (out of [`MAX_CONNECTIONS`]).
pub const MAX_WATCHERS: usize = 4;
/// How often a watch looks at the record for changes nobody announces (health, the control connection).
pub const WATCH_POLL: Duration = Duration::from_millis(100);
/// A watch sends a line at least this often, the same state again if nothing changed, so its client can
/// tell a quiet stop from a supervisor that stopped answering.
pub const WATCH_KEEPALIVE: Duration = Duration::from_secs(5);
/// How long [`publish_exit`] waits for the watchers to have the outcome before the supervisor goes on.
pub const WATCH_FLUSH: Duration = Duration::from_millis(200);

/// The supervisor's exit code and reason, once the end of the run decided them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Final {
    code: i32,
    reason: String,
}

/// Process-wide, like the exit itself: only watch connections subscribe, so its receiver count is the
/// number of watchers.
static OUTCOME: LazyLock<watch::Sender<Option<Final>>> = LazyLock::new(|| watch::channel(None).0);

/// Tells every watcher how the supervisor ends, and waits (at most [`WATCH_FLUSH`], not at all without
/// watchers) until each has written it: the process exits right after, taking the connections along.
pub async fn publish_exit(code: i32, reason: &str) {
    OUTCOME.send_replace(Some(Final {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(WATCH_FLUSH, OUTCOME.closed()).await;
}

/// Serves the admin socket on a thread and runtime of its own, so that no client, however busy, can delay
/// the run loop, the reaper or the stop's timers.
pub fn spawn(
    listener: Listener,
    shared: Shared,
    events: mpsc::UnboundedSender<Event>,
    watches: Watches,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("quiesce-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    return tracing::error!(error = %e, "admin socket: cannot start its runtime");
                }
            };
            rt.block_on(async move {
                let Listener { listener, owner } = listener;
                match UnixListener::from_std(listener) {
                    Ok(l) => serve(l, owner, shared, events, watches).await,
                    Err(e) => tracing::error!(error = %e, "admin socket: cannot listen"),
                }
            });
        })
        .map(drop)
}

/// Serves connections until the process ends.
async fn serve(
    listener: UnixListener,
    owner: Owner,
    shared: Shared,
    events: mpsc::UnboundedSender<Event>,
    watches: Watches,
) {
    // Bound early (so `quiesce prestop` can connect from the first moment) but served once the child runs:
    // clients that come first wait in the listen queue and cannot take the descriptors its start needs.
    let mut life = watches.lifecycle.clone();
    if life.wait_for(|l| l.started()).await.is_err() {
        return; // the child never started
    }
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                limit = MAX_CONNECTIONS,
                "admin socket: too many connections; closing one"
            );
            continue;
        };
        let allowed = matches!(owner.check(&stream), Peer::Allowed);
        let (shared, events, watches) = (shared.clone(), events.clone(), watches.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, allowed, shared, events, watches).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
            drop(slot);
        });
    }
}

async fn connection(
    stream: UnixStream,
    allowed: bool,
    shared: Shared,
    events: mpsc::UnboundedSender<Event>,
    mut watches: Watches,
) -> io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut reader = LineReader::new(tokio::io::BufReader::new(rd));
    if !allowed {
        // A stranger's first request (whatever it is, if it comes within a few seconds) gets one refusal,
        // then the connection is closed; nothing it sends is parsed.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), reader.next_line()).await;
        let e = WireError::new(
            ErrorCode::PeerRefused,
            "only root or the supervisor's own user may use the admin socket",
        );
        wr.write_all(e.render_reply().as_bytes()).await?;
        return Ok(());
    }
    while let Ok(read) = tokio::time::timeout(IDLE_TIMEOUT, reader.next_line()).await {
        let Some(next) = read? else { break };
        let line = match next {
            Ok(line) if quiesce_protocol::wire::is_blank(&line) => continue,
            Ok(line) => line,
            Err(e) => {
                wr.write_all(e.render_reply().as_bytes()).await?;
                continue;
            }
        };
        let reply = match Request::parse(&line) {
            Err(e) => e.render_reply(),
            Ok(req) if req.verb() == "watch" => match req.check_keys(&[]) {
                Err(e) => e.render_reply(),
                // The connection is the watch's from here on, until the supervisor exits.
                Ok(()) => return stream_watch(&mut reader, &mut wr, &shared, &watches).await,
            },
            Ok(req) => answer(&req, &shared, &events, &mut watches).await,
        };
        wr.write_all(reply.as_bytes()).await?;
    }
    Ok(())
}

async fn answer(
    req: &Request,
    shared: &Shared,
    events: &mpsc::UnboundedSender<Event>,
    watches: &mut Watches,
) -> String {
    // The verb is judged before its arguments: `frobnicate x=1` is an unknown verb, not a bad argument.
    if !matches!(req.verb(), "status" | "shutdown" | "prestop") {
        return unknown_verb(req.verb());
    }
    if let Err(e) = req.check_keys(&[]) {
        return e.render_reply();
    }
    match req.verb() {
        "status" => render_reply(&status(shared, &watches.lifecycle.borrow().clone())),
        "shutdown" => {
            let already = watches.lifecycle.borrow().stop().is_some();
            let _ = events.send(Event::Stop(Trigger::Operator));
            render_reply(&json!({"ok": true, "already_stopping": already}))
        }
        "prestop" => {
            let began = Instant::now();
            let already = watches.lifecycle.borrow().stop().is_some();
            let _ = events.send(Event::Stop(Trigger::Prestop));
            // Returns when step 1 is over, or at once if the app is already gone.
            let _ = watches.lifecycle.wait_for(|l| l.step_one_over()).await;
            render_reply(
                &json!({"ok": true, "already_stopping": already, "waited_ms": ms(began.elapsed())}),
            )
        }
        other => unknown_verb(other),
    }
}

/// The `status` reply: the lifecycle, then the record ([`crate::state::Status`]).
fn status(shared: &Shared, life: &Lifecycle) -> serde_json::Value {
    let mut v = serde_json::to_value(&*shared.lock()).unwrap_or_else(|_| json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("ok".into(), json!(true));
        o.insert("pid".into(), json!(std::process::id()));
        o.insert("phase".into(), json!(life.phase()));
        o.insert("child_end".into(), json!(life.end().map(|e| e.to_string())));
        o.insert("trigger".into(), json!(life.stop().map(|s| &s.trigger)));
        if let Some(s) = life.stop() {
            o.insert("stop_elapsed_ms".into(), json!(ms(s.since.elapsed())));
        }
    }
    v
}

fn unknown_verb(verb: &str) -> String {
    WireError::new(
        ErrorCode::UnknownVerb,
        format!(
            "unknown verb '{verb}': the admin socket understands status, watch, shutdown and prestop"
        ),
    )
    .render_reply()
}

/// The `watch` verb: a `status` line (`"event":"status"`) now and whenever it changes (the stop's elapsed
/// time aside) or [`WATCH_KEEPALIVE`] passed, then `{"event":"exit","code":…,"reason":…}` once
/// [`publish_exit`] was called, and the end of the connection. A line from the client ends it too.
async fn stream_watch<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut LineReader<R>,
    wr: &mut OwnedWriteHalf,
    shared: &Shared,
    watches: &Watches,
) -> io::Result<()> {
    // One runtime thread serves every connection: nothing else subscribes between the count and this.
    if OUTCOME.receiver_count() >= MAX_WATCHERS {
        let e = WireError::new(
            ErrorCode::Internal,
            format!("{MAX_WATCHERS} watches are already running; try again when one ends"),
        );
        return wr.write_all(e.render_reply().as_bytes()).await;
    }
    let mut outcome = OUTCOME.subscribe();
    let mut life = watches.lifecycle.clone();
    let mut steps = shared.step_changes();
    let (mut last, mut sent) = (serde_json::Value::Null, Instant::now());
    // A half-close (`printf 'watch\n' | socat …`) only means the client has nothing more to say.
    let mut listening = true;
    loop {
        let now = life.borrow_and_update().clone();
        steps.borrow_and_update();
        let mut v = status(shared, &now);
        v["event"] = json!("status");
        let mut key = v.clone();
        if let Some(o) = key.as_object_mut() {
            o.remove("stop_elapsed_ms");
        }
        if key != last || sent.elapsed() >= WATCH_KEEPALIVE {
            send_line(wr, &render_reply(&v)).await?;
            (last, sent) = (key, Instant::now());
        }
        let decided = outcome.borrow_and_update().clone();
        if let Some(f) = decided {
            let v = json!({"ok": true, "event": "exit", "code": f.code, "reason": f.reason});
            return send_line(wr, &render_reply(&v)).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_POLL) => {}
            Ok(()) = life.changed() => {}
            Ok(()) = steps.changed() => {}
            Ok(()) = outcome.changed() => {}
            r = reader.next_line(), if listening => match r {
                Ok(None) => listening = false,
                _ => return Ok(()),
            },
        }
    }
}

/// One line to a watcher, who must read it within [`IDLE_TIMEOUT`]: a stalled client cannot make the
/// supervisor hold more than this line.
async fn send_line(wr: &mut OwnedWriteHalf, line: &str) -> io::Result<()> {
    match tokio::time::timeout(IDLE_TIMEOUT, wr.write_all(line.as_bytes())).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the watcher stopped reading",
        )),
    }
}
