//! The scenarios: each starts fresh app processes (fresh step state, a fresh socket path in its
//! own directory) and records the rules it checks in the report. A scenario that cannot go on
//! (the app did not start, a reply never came) returns the reason, and the runner marks the
//! scenario's unchecked rules with it. Scenarios run one after the other on the main thread
//! (see [`crate::sys`] for why).

mod disconnect;
pub mod input;
mod path_taken;
mod peer;
mod standalone;
mod startup;
mod steps;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::conn::{Conn, Session, Shared};
use crate::process::{App, Socket};
use crate::report::Report;
use crate::rules::Scenario;

pub use peer::probe_main;

/// The kit's options.
#[derive(Debug, Clone)]
pub struct Options {
    pub command: Vec<String>,
    /// The hard timeout on every single wait (a reply, a start, an exit).
    pub timeout: Duration,
    /// Time allowed past a step's deadline for its reply (PROTOCOL.md 6.5: 250 ms).
    pub slack: Duration,
}

/// What every scenario uses.
#[derive(Debug)]
pub struct Ctx {
    pub opts: Options,
    pub report: Report,
    pub shared: Shared,
    root: PathBuf,
    /// How long the app took to listen in the first scenario (a hint for the waits of the
    /// scenarios that cannot see it start).
    pub ready_after: Duration,
}

impl Ctx {
    pub fn new(opts: Options, report: Report, root: PathBuf) -> Ctx {
        let shared = Arc::new(Session {
            timeout: opts.timeout,
            violations: Default::default(),
        });
        Ctx {
            opts,
            report,
            shared,
            root,
            ready_after: Duration::from_secs(1),
        }
    }

    /// A fresh directory for one app process (mode 0711: see the peer check, section 9).
    pub fn dir(&self, name: &str) -> Result<PathBuf, String> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.root.join(name);
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Starts the app with its socket at `dir/control.sock`.
    pub fn spawn(&self, dir: &Path) -> Result<App, String> {
        App::spawn(
            &self.opts.command,
            Socket::At(dir.join("control.sock")),
            dir,
        )
    }

    /// Starts the app in a fresh directory and waits until it accepts a connection.
    pub fn start(&self, name: &str) -> Result<(App, Conn), String> {
        let dir = self.dir(name)?;
        let mut app = self.spawn(&dir)?;
        let (conn, _) = app.wait_listening(self.opts.timeout, &self.shared)?;
        Ok((app, conn))
    }

    /// A new connection to `app`.
    pub fn connect(&self, app: &App) -> Result<Conn, String> {
        let path = app.socket.as_ref().ok_or("the app has no socket")?;
        Conn::connect(path, &self.shared)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))
    }
}

/// Runs every scenario, then the whole-run rules.
pub fn run_all(ctx: &mut Ctx) {
    type Run = fn(&mut Ctx) -> Result<(), String>;
    let scenarios: [(Scenario, Run); 6] = [
        (Scenario::Startup, startup::run),
        (Scenario::Steps, steps::run),
        (Scenario::Deadlines, steps::run_short),
        (Scenario::Disconnect, disconnect::run),
        (Scenario::PathTaken, path_taken::run),
        (Scenario::Standalone, standalone::run),
    ];
    for (scenario, run) in scenarios {
        if let Err(why) = run(ctx) {
            ctx.report.abort(scenario, &why);
        }
    }
    let (framing, refusals) = match ctx.shared.violations.lock() {
        Ok(v) => (v.framing.clone(), v.refusals.clone()),
        Err(_) => (vec!["the kit's log is poisoned".to_owned()], Vec::new()),
    };
    let first = |list: Vec<String>| match list.first() {
        None => Ok(()),
        Some(one) => Err(format!("{} bad, e.g. {one}", list.len())),
    };
    ctx.report.check("reply-framing", first(framing));
    ctx.report.check("refusal-shape", first(refusals));
}
