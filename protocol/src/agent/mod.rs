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
//! Layout, one concept per file:
//!
//! - this file: the [`Agent`] itself (the state its clones share) and its read-only answers
//!   (`hello`, `status`, `phase`, `closed`);
//! - `builder`: what an app registers before it serves;
//! - `handler`: the types handlers and checks see ([`StepCtx`], [`Report`], [`HandlerError`]);
//! - `sequence`: the step order (pending → running → done), its runner, and the in-process
//!   entry points [`Agent::step`] and [`Agent::run_local`];
//! - `health`: running the dependency checks for `health`;
//! - `server`: serving the control socket (bound by [`crate::socket`]), one task per
//!   connection, the driver slot;
//! - `error`: why the socket could not be served.

mod builder;
mod error;
mod handler;
mod health;
mod sequence;
mod server;

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

pub use builder::AgentBuilder;
pub use error::AgentError;
pub use handler::{HandlerError, Report, StepCtx};
pub use server::AgentHandle;

use builder::Registration;
use sequence::Sequence;

use crate::wire::{HelloReply, PROTOCOL_VERSION, Phase, Role, StatusReply, StepVerb};

/// Default time a health check may take before it counts as down.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long [`Agent::closed`] waits, after `close` finished, for its reply to be written before
/// it resolves anyway (the driver may be gone; a reconnecting one repeats `close` within this).
pub const CLOSE_REPLY_WAIT: Duration = Duration::from_millis(500);

/// Default socket file mode: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

pub(crate) struct State {
    pub(crate) sequence: Sequence,
    /// The connection id of the driver, if one is connected.
    pub(crate) driver: Option<u64>,
}

pub(crate) struct Inner {
    app: Registration,
    state: Mutex<State>,
    closed: watch::Sender<bool>,
    /// Set once a connection has written its reply after `close` finished.
    close_replied: watch::Sender<bool>,
    next_connection: AtomicU64,
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
            .field("app", &self.inner.app.name)
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts describing the app named `app`.
    pub fn builder(app: impl Into<String>) -> AgentBuilder {
        AgentBuilder::new(app.into())
    }

    /// The `hello` reply for a connection with `role`.
    pub fn hello(&self, role: Role) -> HelloReply {
        HelloReply {
            ok: true,
            protocol: PROTOCOL_VERSION,
            app: self.inner.app.name.clone(),
            pid: std::process::id(),
            role,
            steps: StepVerb::ALL.to_vec(),
            registered: self.inner.app.handlers.keys().copied().collect(),
            services: self.inner.app.services.clone(),
            extensions: vec![crate::wire::TRACEPARENT.to_owned()],
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
        let components = match &self.inner.app.status {
            Some(status) => status(),
            None => serde_json::json!({}),
        };
        StatusReply {
            ok: true,
            app: self.inner.app.name.clone(),
            phase,
            next_step,
            steps,
            components,
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
