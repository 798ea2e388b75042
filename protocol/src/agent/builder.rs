//! What an app registers before it serves: identity, step handlers, dependency checks, the
//! `status` callback and the socket mode. Everything here is fixed once [`AgentBuilder::build`]
//! makes the [`Agent`]; nothing registered can change while steps run.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::handler::{
    Check, CheckFn, HandlerError, Report, RequestHook, StatusFn, StepCtx, StepFn,
};
use super::sequence::Sequence;
use super::{Agent, DEFAULT_CHECK_TIMEOUT, DEFAULT_SOCKET_MODE, Inner, State};
use crate::wire::SubStep;

/// What an app registered: collected by the builder, then owned by the agent unchanged.
pub(super) struct Registration {
    pub(super) name: String,
    pub(super) services: Vec<String>,
    pub(super) handlers: BTreeMap<SubStep, StepFn>,
    pub(super) checks: Vec<Check>,
    pub(super) check_timeout: Duration,
    pub(super) status: Option<StatusFn>,
    pub(super) on_request: Option<RequestHook>,
    pub(super) socket_mode: u32,
}

/// Collects an app's handlers, checks and identity; [`AgentBuilder::build`] makes the [`Agent`].
pub struct AgentBuilder {
    app: Registration,
}

impl AgentBuilder {
    pub(super) fn new(name: String) -> AgentBuilder {
        AgentBuilder {
            app: Registration {
                name,
                services: Vec::new(),
                handlers: BTreeMap::new(),
                checks: Vec::new(),
                check_timeout: DEFAULT_CHECK_TIMEOUT,
                status: None,
                on_request: None,
                socket_mode: DEFAULT_SOCKET_MODE,
            },
        }
    }

    /// Adds a gRPC service name the app serves (reported in `hello`).
    #[must_use]
    pub fn service(mut self, name: impl Into<String>) -> AgentBuilder {
        self.app.services.push(name.into());
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
        self.app.handlers.insert(substep, handler);
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
        self.app.checks.push(Check {
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
        self.app.check_timeout = timeout;
        self
    }

    /// Supplies the `components` object of `status` (per-component state, in-flight counts).
    /// Called on every `status`: keep it cheap and non-blocking.
    #[must_use]
    pub fn status<F>(mut self, status: F) -> AgentBuilder
    where
        F: Fn() -> serde_json::Value + Send + Sync + 'static,
    {
        self.app.status = Some(Arc::new(status));
        self
    }

    /// Called with every well-formed request before it is validated and answered (for logs,
    /// metrics, or test fixtures that record what arrived). Keep it cheap.
    #[must_use]
    pub fn on_request<F>(mut self, hook: F) -> AgentBuilder
    where
        F: Fn(&crate::wire::Request) + Send + Sync + 'static,
    {
        self.app.on_request = Some(Arc::new(hook));
        self
    }

    /// The socket file's mode (default `0o600`). With group bits set (e.g. `0o660`), peers whose
    /// effective gid is the socket file's group are accepted too.
    #[must_use]
    pub fn socket_mode(mut self, mode: u32) -> AgentBuilder {
        self.app.socket_mode = mode & 0o777;
        self
    }

    /// Builds the agent.
    pub fn build(self) -> Agent {
        let (closed, _) = watch::channel(false);
        let (close_replied, _) = watch::channel(false);
        Agent {
            inner: Arc::new(Inner {
                app: self.app,
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
            .field("app", &self.app.name)
            .field("services", &self.app.services)
            .field("registered", &self.app.handlers.keys().collect::<Vec<_>>())
            .field("checks", &self.app.checks)
            .field("socket_mode", &format_args!("{:o}", self.app.socket_mode))
            .finish_non_exhaustive()
    }
}
