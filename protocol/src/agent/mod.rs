//! The app side of the protocol: register handlers once, then serve them on the control socket
//! or run them locally.
//!
//! ```no_run
//! use std::time::Duration;
//! use quiesce_protocol::agent::{Agent, HandlerError, Report, StepCtx};
//! use quiesce_protocol::wire::SubStep;
//!
//! # async fn demo(sigterm: impl std::future::Future<Output = ()>)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! let agent = Agent::builder("order-service")
//!     .service("order.v1.OrderService")
//!     .on(SubStep::DrainInFlight, |ctx: StepCtx| async move {
//!         // wait for in-flight requests until ctx.cancelled(), then cancel the rest
//!         Ok(Report::new().count("requests_drained", 12))
//!     })
//!     .check("db", true, || async { Ok::<(), HandlerError>(()) })
//!     .build();
//! match agent.serve_from_env().await? {
//!     // under quiesce: the supervisor drives the steps; exit once `close` ran
//!     Some(handle) => handle.closed().await,
//!     // standalone: on SIGTERM run the same steps in-process
//!     None => {
//!         sigterm.await;
//!         agent.run_local(Duration::from_secs(25)).await;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Layout: `handler` (what apps register), `sequence` (step state machine and runner), `server`
//! (socket, peer check, one task per connection).

mod handler;
mod sequence;
mod server;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use handler::{HandlerError, Report, StepCtx};

use handler::{Check, CheckFn, RequestHook, StatusFn, StepFn};
use sequence::{Claim, Sequence};

use crate::CONTROL_SOCKET_ENV;
use crate::wire::{
    CheckReply, HealthReply, HelloReply, PROTOCOL_VERSION, Phase, Role, StatusReply, StepReply,
    StepVerb, SubStep, WireError,
};

/// Default time a health check may take before it counts as down.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long [`Agent::closed`] waits, after `close` finished, for its reply to be written before
/// it resolves anyway (the driver may be gone; a reconnecting one repeats `close` within this).
pub const CLOSE_REPLY_WAIT: Duration = Duration::from_millis(500);

/// Default socket file mode: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// How [`Agent::run_local`] splits its budget: each step gets its weight's share of what is left,
/// so time a fast step does not use passes to the later ones.
const LOCAL_WEIGHTS: [u32; 5] = [4, 1, 2, 1, 2];

/// Starting or serving the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Another process answers on the path.
    #[error(
        "control socket {path}: another process is already listening there; stop it, or give this app another path in {CONTROL_SOCKET_ENV}"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A non-socket file is in the way; the agent will not delete it.
    #[error(
        "control socket {path}: a file that is not a socket is in the way; remove it or choose another path"
    )]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The stale socket file could not be checked or removed.
    #[error("control socket {path}: cannot check or remove the stale socket file: {source}")]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `bind(2)` failed.
    #[error(
        "control socket {path}: cannot bind: {source} (the directory must exist and be writable; the path must be under 108 bytes)"
    )]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `chmod(2)` on the new socket failed.
    #[error("control socket {path}: cannot set mode {mode:o}: {source}")]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// The cause.
        source: io::Error,
    },
}

/// Collects an app's handlers, checks and identity; [`AgentBuilder::build`] makes the [`Agent`].
pub struct AgentBuilder {
    app: String,
    services: Vec<String>,
    handlers: BTreeMap<SubStep, StepFn>,
    checks: Vec<Check>,
    check_timeout: Duration,
    status: Option<StatusFn>,
    on_request: Option<RequestHook>,
    socket_mode: u32,
}

impl AgentBuilder {
    /// Adds a gRPC service name the app serves (reported in `hello`).
    #[must_use]
    pub fn service(mut self, name: impl Into<String>) -> AgentBuilder {
        self.services.push(name.into());
        self
    }

    /// Registers the handler for a sub-step (a later registration for the same sub-step replaces
    /// an earlier one). A sub-step with no handler completes at once with a note.
    #[must_use]
    pub fn on<F, Fut>(mut self, substep: SubStep, handler: F) -> AgentBuilder
    where
        F: Fn(StepCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Report, HandlerError>> + Send + 'static,
    {
        let handler: StepFn = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers.insert(substep, handler);
        self
    }

    /// Registers a dependency check for `health`. `required` checks decide `healthy`.
    #[must_use]
    pub fn check<F, Fut>(self, name: impl Into<String>, required: bool, check: F) -> AgentBuilder
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.check_inner(name.into(), required, None, check)
    }

    /// Like [`AgentBuilder::check`] with its own timeout instead of the default.
    #[must_use]
    pub fn check_with_timeout<F, Fut>(
        self,
        name: impl Into<String>,
        required: bool,
        timeout: Duration,
        check: F,
    ) -> AgentBuilder
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.check_inner(name.into(), required, Some(timeout), check)
    }

    fn check_inner<F, Fut>(
        mut self,
        name: String,
        required: bool,
        timeout: Option<Duration>,
        check: F,
    ) -> AgentBuilder
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let run: CheckFn = Arc::new(move || Box::pin(check()));
        self.checks.push(Check {
            name,
            required,
            timeout,
            run,
        });
        self
    }

    /// The timeout of checks registered without their own (default [`DEFAULT_CHECK_TIMEOUT`]).
    #[must_use]
    pub fn check_timeout(mut self, timeout: Duration) -> AgentBuilder {
        self.check_timeout = timeout;
        self
    }

    /// Supplies the `components` object of `status` (per-component state, in-flight counts).
    /// Called on every `status`: keep it cheap and non-blocking.
    #[must_use]
    pub fn status<F>(mut self, status: F) -> AgentBuilder
    where
        F: Fn() -> serde_json::Value + Send + Sync + 'static,
    {
        self.status = Some(Arc::new(status));
        self
    }

    /// Called with every well-formed request before it is validated and answered (for logs,
    /// metrics, or test fixtures that record what arrived). Keep it cheap.
    #[must_use]
    pub fn on_request<F>(mut self, hook: F) -> AgentBuilder
    where
        F: Fn(&crate::wire::Request) + Send + Sync + 'static,
    {
        self.on_request = Some(Arc::new(hook));
        self
    }

    /// The socket file's mode (default `0o600`). With group bits set (e.g. `0o660`), peers whose
    /// effective gid is the socket file's group are accepted too.
    #[must_use]
    pub fn socket_mode(mut self, mode: u32) -> AgentBuilder {
        self.socket_mode = mode & 0o777;
        self
    }

    /// Builds the agent.
    pub fn build(self) -> Agent {
        let (closed, _) = watch::channel(false);
        let (close_replied, _) = watch::channel(false);
        Agent {
            inner: Arc::new(Inner {
                app: self.app,
                services: self.services,
                handlers: self.handlers,
                checks: self.checks,
                check_timeout: self.check_timeout,
                status: self.status,
                on_request: self.on_request,
                socket_mode: self.socket_mode,
                state: Mutex::new(State {
                    sequence: Sequence::new(),
                    driver: None,
                }),
                closed,
                close_replied,
                next_connection: AtomicU64::new(1),
            }),
        }
    }
}

impl fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("app", &self.app)
            .field("services", &self.services)
            .field("registered", &self.handlers.keys().collect::<Vec<_>>())
            .field("checks", &self.checks)
            .field("socket_mode", &format_args!("{:o}", self.socket_mode))
            .finish_non_exhaustive()
    }
}

pub(crate) struct State {
    pub(crate) sequence: Sequence,
    /// The connection id of the driver, if one is connected.
    pub(crate) driver: Option<u64>,
}

pub(crate) struct Inner {
    app: String,
    services: Vec<String>,
    handlers: BTreeMap<SubStep, StepFn>,
    checks: Vec<Check>,
    check_timeout: Duration,
    status: Option<StatusFn>,
    pub(crate) on_request: Option<RequestHook>,
    pub(crate) socket_mode: u32,
    state: Mutex<State>,
    closed: watch::Sender<bool>,
    /// Set once a connection has written its reply after `close` finished.
    pub(crate) close_replied: watch::Sender<bool>,
    pub(crate) next_connection: AtomicU64,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across an await or a user callback, so a poisoned lock can only
        // come from a bug in this module; the state itself is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The app-side agent: cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("app", &self.inner.app)
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts describing the app named `app`.
    pub fn builder(app: impl Into<String>) -> AgentBuilder {
        AgentBuilder {
            app: app.into(),
            services: Vec::new(),
            handlers: BTreeMap::new(),
            checks: Vec::new(),
            check_timeout: DEFAULT_CHECK_TIMEOUT,
            status: None,
            on_request: None,
            socket_mode: DEFAULT_SOCKET_MODE,
        }
    }

    /// Binds the control socket at `path` (removing a stale socket file first) and serves it on
    /// a background task. Dropping the returned handle does not stop serving; call
    /// [`AgentHandle::shutdown`] for that.
    pub async fn serve(&self, path: impl AsRef<Path>) -> Result<AgentHandle, AgentError> {
        let path = path.as_ref().to_path_buf();
        let (listener, owner) = server::bind(&path, self.inner.socket_mode)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(server::accept_loop(
            self.clone(),
            listener,
            owner,
            path.clone(),
            stopped,
        ));
        tracing::info!(path = %path.display(), app = %self.inner.app, "control socket listening");
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

    /// Runs every remaining step in order in-process, for an app that got SIGTERM without a
    /// supervisor: same handlers, same order, same recording. Steps that already ran return their
    /// recorded replies; a step a driver is running is waited for. The budget is shared out by
    /// weight (drain 4, stop-cron 1, stop-consumer 2, stop-poller 1, close 2), unused time passing
    /// to later steps. Returns one reply per verb.
    pub async fn run_local(&self, total_budget: Duration) -> Vec<StepReply> {
        let overall = instant_after(Instant::now(), total_budget);
        let mut replies = Vec::with_capacity(StepVerb::ALL.len());
        for verb in StepVerb::ALL {
            let now = Instant::now();
            let left = overall.saturating_duration_since(now);
            let weights_left: u32 = LOCAL_WEIGHTS[verb.index()..].iter().sum();
            let share =
                left.mul_f64(f64::from(LOCAL_WEIGHTS[verb.index()]) / f64::from(weights_left));
            match self
                .step_at(verb, now, instant_after(now, share), None, true)
                .await
            {
                Ok(reply) => replies.push(reply),
                Err(error) => {
                    tracing::error!(step = %verb, %error, "local shutdown stopped");
                    break;
                }
            }
        }
        replies
    }

    /// Runs one step in-process with a budget from now, enforcing the same order as the socket.
    pub async fn step(&self, verb: StepVerb, budget: Duration) -> Result<StepReply, WireError> {
        let now = Instant::now();
        self.step_at(verb, now, instant_after(now, budget), None, true)
            .await
    }

    pub(crate) async fn step_at(
        &self,
        verb: StepVerb,
        received: Instant,
        deadline: Instant,
        budgets: Option<Vec<Duration>>,
        local: bool,
    ) -> Result<StepReply, WireError> {
        let claim = self.inner.lock().sequence.claim(verb)?;
        match claim {
            Claim::Recorded(reply) => Ok(reply),
            Claim::Wait(done) => {
                let mut reply = sequence::wait_done(done, verb).await?;
                reply.repeated = true;
                Ok(reply)
            }
            Claim::Run(publish) => {
                let done = publish.subscribe();
                let agent = self.clone();
                tracing::info!(
                    step = %verb,
                    budget_ms = sequence::millis(deadline.saturating_duration_since(received)),
                    substep_budgets_ms = ?budgets
                        .as_ref()
                        .map(|b| b.iter().map(|d| sequence::millis(*d)).collect::<Vec<_>>()),
                    local,
                    "step started"
                );
                tokio::spawn(async move {
                    let reply = sequence::run_verb(
                        &agent.inner.handlers,
                        verb,
                        received,
                        deadline,
                        budgets.as_deref(),
                        local,
                    )
                    .await;
                    tracing::info!(
                        step = %verb,
                        outcome = %reply.outcome,
                        duration_ms = reply.duration_ms,
                        "step finished"
                    );
                    agent.inner.lock().sequence.finish(reply.clone());
                    publish.send_replace(Some(reply));
                    if verb == StepVerb::Close {
                        if local {
                            // Nobody waits for a reply to an in-process `close`.
                            agent.inner.close_replied.send_replace(true);
                        }
                        agent.inner.closed.send_replace(true);
                    }
                });
                sequence::wait_done(done, verb).await
            }
        }
    }

    /// The `hello` reply for a connection with `role`.
    pub fn hello(&self, role: Role) -> HelloReply {
        HelloReply {
            ok: true,
            protocol: PROTOCOL_VERSION,
            app: self.inner.app.clone(),
            pid: std::process::id(),
            role,
            steps: StepVerb::ALL.to_vec(),
            registered: self.inner.handlers.keys().copied().collect(),
            services: self.inner.services.clone(),
        }
    }

    /// The `status` reply now.
    pub fn status(&self) -> StatusReply {
        let (phase, next_step, steps) = {
            let state = self.inner.lock();
            (
                state.sequence.phase(),
                state.sequence.next_step(),
                state.sequence.steps(),
            )
        };
        let components = match &self.inner.status {
            Some(status) => status(),
            None => serde_json::json!({}),
        };
        StatusReply {
            ok: true,
            app: self.inner.app.clone(),
            phase,
            next_step,
            steps,
            components,
        }
    }

    /// Runs every check concurrently, each under its timeout, and reports them in registration
    /// order.
    pub async fn health(&self) -> HealthReply {
        let running: Vec<_> = self
            .inner
            .checks
            .iter()
            .map(|check| {
                let run = Arc::clone(&check.run);
                let timeout = check.timeout.unwrap_or(self.inner.check_timeout);
                let task = tokio::spawn(async move {
                    let started = Instant::now();
                    let result = tokio::time::timeout(timeout, run()).await;
                    (result, started.elapsed())
                });
                (check, timeout, task)
            })
            .collect();
        let mut checks = Vec::with_capacity(running.len());
        for (check, timeout, task) in running {
            let (up, latency, error) = match task.await {
                Ok((Ok(Ok(())), took)) => (true, took, None),
                Ok((Ok(Err(e)), took)) => (false, took, Some(e.message().to_owned())),
                Ok((Err(_), _)) => (
                    false,
                    timeout,
                    Some(format!("timed out after {}", human(timeout))),
                ),
                Err(e) => (
                    false,
                    Duration::ZERO,
                    Some(format!("the check failed: {e}")),
                ),
            };
            checks.push(CheckReply {
                name: check.name.clone(),
                required: check.required,
                up,
                latency_ms: (latency.as_secs_f64() * 10_000.0).round() / 10.0,
                error,
            });
        }
        HealthReply {
            ok: true,
            healthy: checks.iter().all(|c| c.up || !c.required),
            checks,
        }
    }

    /// Where the app is: serving, stopping or closed.
    pub fn phase(&self) -> Phase {
        self.inner.lock().sequence.phase()
    }

    /// Whether `close` has finished.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// Resolves once `close` has finished (driven over the socket or run locally) and its reply
    /// has been written to a connection that asked for it (first or repeated): the moment the app
    /// should exit, with code 0. If no connection takes the reply within
    /// [`CLOSE_REPLY_WAIT`] of `close` finishing (the driver is gone and did not come back to
    /// repeat it), it resolves anyway. Replies to other requests (an observer's `status`) do
    /// not count.
    pub async fn closed(&self) {
        let mut closed = self.inner.closed.subscribe();
        // The sender lives in `Inner`, which `self` keeps alive, so this cannot fail.
        let _ = closed.wait_for(|c| *c).await;
        let mut replied = self.inner.close_replied.subscribe();
        let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, replied.wait_for(|r| *r)).await;
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

fn instant_after(now: Instant, budget: Duration) -> Instant {
    // A budget too large to represent means "no deadline" in practice: ten years.
    now.checked_add(budget)
        .or_else(|| now.checked_add(Duration::from_secs(10 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// `250ms`, `1s`, `1.5s`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}
