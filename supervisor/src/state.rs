//! The supervisor's observable record: what `quiesce ctl status`, metrics and the termination message read
//! besides the lifecycle ([`crate::lifecycle`]): the step rows, the control connection, counters, health by
//! service. One `Arc<Mutex<_>>`, written by the run loop and the stop sequence, read by everyone else.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;

use crate::config::Mode;
use crate::metrics::Metrics;

/// A row's outcome: the protocol's vocabulary, end to end.
pub use quiesce_protocol::wire::Outcome;

/// One line of the shutdown story.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    /// Position in the nine-step table, or 0 for the supervisor's own bookkeeping rows (signal, cleanup).
    pub number: u8,
    pub name: String,
    pub outcome: Outcome,
    /// Offset from the start of the shutdown.
    pub started_ms: u64,
    pub duration_ms: u64,
    /// Counts the app reported (requests drained, messages acked…).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A step that has started and is not recorded yet: what `quiesce ctl status --watch` shows while it runs.
/// The rows of one control verb (`drain`: 2-3, `close`: 7-9) start together, since they are one request.
#[derive(Clone, Debug, Serialize)]
pub struct RunningStep {
    pub number: u8,
    pub name: String,
    /// Offset from the start of the shutdown.
    pub started_ms: u64,
    /// The time it was given.
    pub budget_ms: u64,
}

/// Why the shutdown began.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "detail")]
pub enum Trigger {
    Signal(String),
    Prestop,
    Operator,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Signal(s) => write!(f, "{s}"),
            Trigger::Prestop => f.write_str("preStop hook"),
            Trigger::Operator => f.write_str("quiesce ctl shutdown"),
        }
    }
}

/// One health service as `quiesce ctl status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceHealth {
    /// `SERVING` or `NOT_SERVING`, as the probe port answers it.
    pub status: &'static str,
    /// When it last changed (RFC 3339, UTC).
    pub since: String,
    /// What the answer rests on, e.g. `dependencies down: db`.
    pub why: String,
}

/// The driver connection to the app's control socket, as `quiesce ctl status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Control {
    /// Signal mode: there is none.
    #[serde(rename = "off")]
    Off,
    #[serde(rename = "connecting")]
    Connecting,
    #[serde(rename = "connected")]
    Connected,
    /// The app did not answer hello within `control.connect_timeout`.
    #[serde(rename = "never connected")]
    NeverConnected,
    /// It broke during the stop and could not be claimed again.
    #[serde(rename = "lost")]
    Lost,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub mode: Mode,
    pub child_pid: Option<i32>,
    pub steps: Vec<StepRecord>,
    /// Steps started and not yet recorded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub running: Vec<RunningStep>,
    pub control: Control,
    pub zombies_reaped: u64,
    pub signals_received: BTreeMap<String, u64>,
    /// Each health service: status, since when, why.
    pub health: BTreeMap<String, ServiceHealth>,
    /// The app's dependencies that its last `health` answer reported down (control mode).
    #[serde(skip)]
    pub deps_down: Vec<String>,
    /// Why the last liveness poll failed, if it did (control mode).
    #[serde(skip)]
    pub live_why: String,
}

/// Cheap to clone handle on the shared status and the metrics that mirror it.
#[derive(Clone, Debug)]
pub struct Shared {
    status: Arc<Mutex<Status>>,
    pub metrics: Arc<Metrics>,
    /// Bumped whenever a step starts or is recorded, so `quiesce ctl status --watch` shows each change
    /// as it happens instead of at its next look.
    steps_changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Shared {
    /// With every metric registered (tests, and runs that serve `/metrics`).
    pub fn new(mode: Mode) -> Shared {
        Shared::with_metrics(mode, Metrics::new())
    }

    pub fn with_metrics(mode: Mode, metrics: Metrics) -> Shared {
        let status = Arc::new(Mutex::new(Status {
            mode,
            child_pid: None,
            steps: Vec::new(),
            running: Vec::new(),
            control: match mode {
                Mode::Control => Control::Connecting,
                Mode::Signal => Control::Off,
            },
            zombies_reaped: 0,
            signals_received: BTreeMap::new(),
            health: BTreeMap::new(),
            deps_down: Vec::new(),
            live_why: String::new(),
        }));
        Shared {
            status,
            metrics: Arc::new(metrics),
            steps_changed: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Locks the status; a panic elsewhere never makes it unreadable.
    pub fn lock(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A step began (it stays listed as running until [`Shared::record`] records it).
    pub fn started(&self, step: RunningStep) {
        self.lock().running.push(step);
        self.steps_changed.send_modify(|n| *n += 1);
    }

    /// Changes whenever a step starts or is recorded.
    pub fn step_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.steps_changed.subscribe()
    }

    /// Appends a step to the shutdown story (and its metrics); it is no longer running.
    pub fn record(&self, r: StepRecord) {
        self.metrics.step(&r);
        {
            let mut st = self.lock();
            st.running.retain(|s| s.name != r.name);
            st.steps.push(r);
        }
        self.steps_changed.send_modify(|n| *n += 1);
    }

    pub fn reaped(&self, n: u64) {
        if n > 0 {
            self.metrics.reaped(n);
            self.lock().zombies_reaped += n;
        }
    }

    pub fn signal(&self, name: String) {
        self.metrics.signal(&name);
        *self.lock().signals_received.entry(name).or_default() += 1;
    }
}

pub fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}
