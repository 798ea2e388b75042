//! The run loop: owns the signal stream and the reaper, starts the stop, and decides the exit.
//!
//! One task owns `waitpid(-1)` and every signal. The stop sequence runs as its own task and hears about the
//! child's end through the lifecycle watch ([`crate::lifecycle`]), so the loop keeps reaping and forwarding while it runs.

use std::sync::Arc;

use futures_util::StreamExt;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::{Cause, Origin, Sent};
use signal_hook_tokio::SignalsInfo;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use quiesce_protocol::wire::HelloReply;

use crate::child::{self, SpawnError, SpawnSpec};
use crate::config::Config;
use crate::control::{self, Connector, HelloWatch};
use crate::exit::{self, ChildEnd, StopResult, code};
use crate::health::{self, AppHealth, Statuses};
use crate::lifecycle::{self, Lifecycle, Transitions};
use crate::reaper;
use crate::report;
use crate::signals::{self, Sig};
use crate::state::{Outcome, Shared, Trigger, ms};
use crate::stop::{self, StopCtx};
use crate::trace;

/// Requests from outside the loop (admin socket, tests).
#[derive(Debug)]
pub enum Event {
    /// Begin the shutdown (idempotent: a second request joins the first).
    Stop(Trigger),
}

/// Watches other parts of the supervisor can hold.
#[derive(Clone, Debug)]
pub struct Watches {
    /// Starting → Running → Stopping → Exited ([`crate::lifecycle`]).
    pub lifecycle: watch::Receiver<Lifecycle>,
    /// The app's `hello` (control mode), once it said it.
    pub hello: HelloWatch,
    /// What the health server answers, per service.
    pub statuses: watch::Receiver<Statuses>,
}

/// How the supervisor ends: its exit code and the reason the last log line gives.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Spawn(#[from] SpawnError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Spawn(e) => e.exit_code(),
            RunError::Signals(_) => code::INTERNAL,
        }
    }
}

/// The senders behind [`Watches`], created before the loop so servers can subscribe first.
#[derive(Debug)]
pub struct Channels {
    life: Transitions,
    hello: watch::Sender<Option<HelloReply>>,
    statuses: watch::Sender<Statuses>,
    /// Incremented by the health server; public so the probe thread can hold a clone.
    pub probes: watch::Sender<u32>,
}

impl Channels {
    /// Fresh receivers on every channel.
    pub fn watches(&self) -> Watches {
        Watches {
            lifecycle: self.life.subscribe(),
            hello: self.hello.subscribe(),
            statuses: self.statuses.subscribe(),
        }
    }
}

pub fn channels() -> (Channels, Watches) {
    let chans = Channels {
        life: Transitions::default(),
        hello: watch::channel(None).0,
        // Known from the first moment (NOT_SERVING): before the child starts, probes get an answer, not NOT_FOUND.
        statuses: watch::channel(health::compute(&health::Inputs::default())).0,
        probes: watch::channel(0).0,
    };
    let watches = chans.watches();
    (chans, watches)
}

/// Starts the child and supervises it until the end. Signal handlers are installed before the child starts
/// so no signal sent in between is lost.
pub async fn supervise(
    cfg: Arc<Config>,
    spec: SpawnSpec,
    shared: Shared,
    chans: Channels,
    mut events: mpsc::UnboundedReceiver<Event>,
    sink: Option<report::Sink>,
) -> Result<Exit, RunError> {
    let mut sigs = install_signals()?;
    if std::process::id() != 1 {
        // Orphans of our descendants come to us instead of to the real init, so we can reap them.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper; orphans will go to the host's init");
        }
    }
    let pid = child::spawn(&spec)?;
    started(&cfg, &shared, &spec, pid);
    chans.life.running();
    let driver = start_watchers(&cfg, &shared, &chans);
    let mut l = RunLoop::new(cfg, shared, chans, pid, driver, sink);
    loop {
        tokio::select! {
            Some(origin) = sigs.next() => l.on_signal(&origin),
            Some(Event::Stop(trigger)) = events.recv() => l.begin_stop(trigger, None, None),
            done = async { l.stop_task.as_mut().expect("guarded").await }, if l.stop_task.is_some() && l.finish.is_none() => {
                l.stop_task = None;
                l.on_stop_done(done.unwrap_or(StopResult { asked_with: None, forced: true }));
            }
            out = async { l.finish.as_mut().expect("guarded").await }, if l.finish.is_some() => {
                return Ok(out.unwrap_or_else(|e| Exit { code: code::INTERNAL, reason: format!("internal error: {e}") }));
            }
        }
    }
}

/// The one signal stream (every forwarded signal and SIGCHLD), the arrival stamp, then the mask opened:
/// what arrived since `main` blocked everything is delivered now.
fn install_signals() -> Result<SignalsInfo<WithOrigin>, RunError> {
    let mut handled = signals::forwarded();
    handled.push(Sig::CHLD);
    let sigs =
        SignalsInfo::<WithOrigin>::new(handled.iter().map(|s| s.0)).map_err(RunError::Signals)?;
    crate::sys::stamp_stop_signals().map_err(RunError::Signals)?;
    crate::sys::unblock_all();
    Ok(sigs)
}

/// Records the started child: who may answer at its control socket, the status, the log line.
fn started(cfg: &Config, shared: &Shared, spec: &SpawnSpec, pid: i32) {
    crate::peer::set_app(crate::peer::Expected {
        pid,
        uid: spec
            .ids
            .map_or_else(|| nix::unistd::geteuid().as_raw(), |(u, _)| u.as_raw()),
    });
    if let Some(path) = &cfg.control_socket {
        crate::peer::warn_if_shared_dir(path);
    }
    shared.lock().child_pid = Some(pid);
    tracing::info!(pid, command = %quiesce_protocol::log::json_text(&spec.argv), "child started");
}

/// The tasks that follow the app while it runs: the health tracker, and in control mode the observer poll
/// and the driver's connector (whose connection the stop sequence takes over).
fn start_watchers(cfg: &Arc<Config>, shared: &Shared, chans: &Channels) -> Option<Connector> {
    let app_health = cfg.control_socket.as_ref().map(|_| {
        // Not ready until the app's first `health` answer says so.
        let (deps_tx, deps_ok) = watch::channel(false);
        let (live_tx, live_ok) = watch::channel(true);
        tokio::spawn(health::poll(
            cfg.clone(),
            shared.clone(),
            chans.life.subscribe(),
            chans.hello.subscribe(),
            deps_tx,
            live_tx,
        ));
        AppHealth { deps_ok, live_ok }
    });
    tokio::spawn(health::track(
        cfg.clone(),
        chans.watches(),
        app_health,
        chans.statuses.clone(),
        shared.clone(),
    ));
    cfg.control_socket.clone().map(|path| {
        tokio::spawn(control::connect_driver(
            path,
            cfg.control_connect_timeout,
            chans.hello.clone(),
            shared.clone(),
            chans.life.subscribe(),
        ))
    })
}

/// The run loop's state: what happened so far, and the tasks it waits for.
struct RunLoop {
    cfg: Arc<Config>,
    shared: Shared,
    chans: Channels,
    pid: i32,
    driver: Option<Connector>,
    relay: Arc<std::sync::Mutex<stop::Relay>>,
    sink: Arc<std::sync::Mutex<Option<report::Sink>>>,
    none_left: (watch::Sender<bool>, watch::Receiver<bool>),
    /// The stop sequence while it runs.
    stop_task: Option<JoinHandle<StopResult>>,
    /// Its result once it is over (it ends after the child's end, or after the forced kill).
    stopped: Option<StopResult>,
    /// The end of the run (sweep, exit code, report), once the child is gone.
    finish: Option<JoinHandle<Exit>>,
    /// The stop's trace ids, when the shutdown is exported as a trace.
    trace: Option<Arc<trace::Shutdown>>,
}

impl RunLoop {
    fn new(
        cfg: Arc<Config>,
        shared: Shared,
        chans: Channels,
        pid: i32,
        driver: Option<Connector>,
        sink: Option<report::Sink>,
    ) -> RunLoop {
        RunLoop {
            cfg,
            shared,
            chans,
            pid,
            driver,
            relay: Arc::default(),
            sink: Arc::new(std::sync::Mutex::new(sink)),
            none_left: watch::channel(false),
            stop_task: None,
            stopped: None,
            finish: None,
            trace: None,
        }
    }

    fn on_signal(&mut self, origin: &Origin) {
        let sig = Sig(origin.signal);
        if sig == Sig::CHLD {
            return self.on_reap();
        }
        if sig == Sig::PIPE && !sent_by_another_process(origin) {
            return; // raised by our own socket write, not meant for the app
        }
        self.shared.signal(sig.name());
        if sig == Sig::TERM || sig == Sig::INT {
            let age = crate::sys::take_stop_signal_age();
            return self.begin_stop(Trigger::Signal(sig.name()), Some(sig), age);
        }
        if self.exited() {
            return;
        }
        let out = self.cfg.rewrite.apply(sig);
        tracing::debug!(received = %sig, forwarded = %out, "forwarding signal");
        stop::deliver(self.pid, out, self.cfg.forward_to);
    }

    fn on_reap(&mut self) {
        let r = reaper::reap(self.pid);
        self.shared.reaped(r.count);
        if let Some(end) = r.main
            && self.chans.life.exited(end)
        {
            quiesce_protocol::event_if!(self.cfg.narrates_steps(), info, debug, pid = self.pid, status = %end, "child ended");
            self.shared.metrics.child_exit(match end {
                ChildEnd::Exited(_) => "exited",
                ChildEnd::Signaled(_) => "signaled",
            });
            let task = self.stop_task.take();
            self.finish = Some(tokio::spawn(finish_up(
                self.ending(),
                end,
                task,
                self.stopped,
            )));
        }
        if r.none_left {
            self.none_left.0.send_replace(true);
        }
    }

    /// Begins the stop, once: a later trigger joins it, and a later stop signal may still reach the app
    /// ([`stop::Relay`]). `age`: how long ago the signal arrived.
    fn begin_stop(
        &mut self,
        trigger: Trigger,
        received: Option<Sig>,
        age: Option<std::time::Duration>,
    ) {
        let cfg = &self.cfg;
        if let Some(sig) = received {
            self.relay
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .received(stop::ask_signal(cfg, Some(sig)));
        }
        // From the signal's arrival (stamped in its handler), so a busy loop never moves the deadlines later.
        let now = age
            .and_then(|a| Instant::now().checked_sub(a.min(std::time::Duration::from_secs(5))))
            .unwrap_or_else(Instant::now);
        // Read before health flips: only NOT_SERVING answers from now on count for `health.observed_probes`.
        let probes_before = *self.chans.probes.borrow();
        if !self.chans.life.begin_stop(now, trigger.clone()) {
            quiesce_protocol::event_if!(self.cfg.narrates_steps(), info, debug, %trigger, "shutdown already under way; not restarting it");
            if !self.exited() {
                stop::settle(&self.relay, self.pid, cfg.forward_to);
            }
            return;
        }
        self.trace = cfg
            .traces
            .settings()
            .map(|_| Arc::new(trace::Shutdown::begin(now)));
        let trace_id = self.trace.as_ref().map(|t| t.trace_id_hex());
        quiesce_protocol::event_if!(self.cfg.narrates_steps(), info, debug, %trigger, window_ms = ms(cfg.stop_window()), trace_id, "shutdown started");
        let ctx = StopCtx {
            cfg: cfg.clone(),
            shared: self.shared.clone(),
            pid: self.pid,
            life: self.chans.life.clone(),
            start: now,
            probes: self.chans.probes.subscribe(),
            probes_before,
            ask_with: stop::ask_signal(cfg, received),
            relay: self.relay.clone(),
            trace: self.trace.clone(),
        };
        self.stop_task = Some(match self.driver.take() {
            Some(c) => tokio::spawn(control::sequence(ctx, c)),
            None => tokio::spawn(stop::signal_mode(ctx)),
        });
    }

    fn on_stop_done(&mut self, ctx: StopResult) {
        self.stopped = Some(ctx);
        if ctx.forced && !self.exited() {
            // SIGKILL was sent and waited for, yet the child was not reaped (stuck in the kernel, e.g. a hung
            // mount). Exit anyway, inside the grace period, with the story written.
            tracing::error!(
                pid = self.pid,
                "the app was not reaped after SIGKILL; exiting without waiting for it"
            );
            let end = ChildEnd::Signaled(Sig::KILL);
            self.finish = Some(tokio::spawn(finish_up(
                self.ending(),
                end,
                None,
                self.stopped,
            )));
        }
    }

    fn exited(&self) -> bool {
        self.chans.life.now().end().is_some()
    }

    fn ending(&self) -> Ending {
        Ending {
            cfg: self.cfg.clone(),
            shared: self.shared.clone(),
            stop: self.chans.life.now().stop().cloned(),
            none_left: self.none_left.1.clone(),
            sink: self.sink.clone(),
            trace: self.trace.clone(),
        }
    }
}

/// A signal another process sent with kill(2) and friends. The kernel reports the SIGPIPE of a write to a
/// closed socket as SI_USER from ourselves, so our own pid does not count.
fn sent_by_another_process(o: &Origin) -> bool {
    let me = std::process::id() as libc::pid_t;
    matches!(o.cause, Cause::Sent(Sent::User | Sent::TKill | Sent::Queue))
        && o.process.is_none_or(|p| p.pid != me)
}

/// After the main child ended: let the stop task finish, sweep leftovers, decide the code, write the report.
/// What the end of a run needs besides the child's end and the stop's result.
struct Ending {
    cfg: Arc<Config>,
    shared: Shared,
    /// The stop, if one began.
    stop: Option<lifecycle::Stop>,
    none_left: watch::Receiver<bool>,
    sink: Arc<std::sync::Mutex<Option<report::Sink>>>,
    trace: Option<Arc<trace::Shutdown>>,
}

async fn finish_up(
    e: Ending,
    end: ChildEnd,
    stop_task: Option<JoinHandle<StopResult>>,
    stopped: Option<StopResult>,
) -> Exit {
    let Ending {
        cfg,
        shared,
        stop: begun,
        none_left,
        sink,
        trace,
    } = e;
    let stop = match stop_task {
        Some(t) => t.await.ok(),
        None => stopped,
    };
    let start = begun.as_ref().map(|s| s.since);
    let trigger = begun.map(|s| s.trigger);
    let reap_until = cleanup(&cfg, &shared, start, none_left.clone()).await;
    let code = exit::exit_code(end, stop, cfg.stop_exit_code);
    let reason = match (&stop, trigger.clone()) {
        (Some(s), Some(t)) if s.forced => {
            format!(
                "stop by {t}: app still running at the deadline; its process group got the deadline's signals (app {end})"
            )
        }
        (_, Some(t)) if code == 0 && end.raw_code() != 0 => {
            format!("stop by {t}: app {end} in time (stop_exit_code=zero)")
        }
        (_, Some(t)) => format!("stop by {t}: app {end}"),
        (_, None) => format!("app {end} without a stop being requested"),
    };
    let total = start.map(|s| ms(s.elapsed()));
    {
        let st = shared.lock();
        let text = report::render(&report::Summary {
            code,
            reason: &reason,
            trigger: trigger.as_ref(),
            status: &st,
            window_ms: ms(cfg.stop_window()),
            total_ms: total,
        });
        if let Some(sink) = sink.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            match sink.write(&text) {
                Ok(()) => {
                    tracing::debug!(path = %sink.path().display(), "termination message written")
                }
                Err(e) => {
                    tracing::warn!(path = %sink.path().display(), error = %e, "cannot write the termination message")
                }
            }
        }
    }
    let hard_end = start.map(|s| s + stop::exit_by(&cfg));
    if let (Some(t), Some(until)) = (&trace, hard_end) {
        export_trace(&cfg, &shared, t, trigger.as_ref(), (code, &reason), until).await;
    }
    // `quiesce ctl status --watch` clients get the outcome (at once when nobody watches); never past the
    // stop's hard end.
    let publish = crate::admin::publish_exit(code, &reason);
    match hard_end {
        Some(hard) => drop(tokio::time::timeout_at(hard, publish).await),
        None => publish.await,
    }
    if let Some(until) = reap_until {
        // The report is out; give SIGKILLed leftovers a moment to be reaped, never past the hard end.
        let mut none_left = none_left;
        let _ = tokio::time::timeout_at(until, none_left.wait_for(|v| *v)).await;
    }
    Exit { code, reason }
}

/// The shutdown as a trace, from the rows just reported; bounded, and never past `until` (the hard end).
async fn export_trace(
    cfg: &Config,
    shared: &Shared,
    t: &trace::Shutdown,
    trigger: Option<&Trigger>,
    ended: (i32, &str),
    until: Instant,
) {
    let Some(settings) = cfg.traces.settings() else {
        return;
    };
    let attributes = shutdown_attributes(cfg, trigger);
    let spans = t.spans(&shared.lock().steps, &cfg.budgets, attributes, ended);
    trace::export(settings, spans, &t.trace_id_hex(), until).await;
}

/// The shutdown span's own attributes: what started it and the window it had.
fn shutdown_attributes(cfg: &Config, trigger: Option<&Trigger>) -> Vec<trace::otlp::KeyValue> {
    use trace::otlp::KeyValue;
    let mut out = vec![
        KeyValue::text("quiesce.mode", cfg.mode().to_string()),
        KeyValue::count("quiesce.window_ms", ms(cfg.stop_window())),
    ];
    if let Some(t) = trigger {
        out.push(KeyValue::text("quiesce.trigger", t.to_string()));
    }
    out
}

/// Leftover descendants (daemons the app started, orphans): SIGTERM, wait up to `cleanup_timeout` for them
/// to go, then SIGKILL. The wait ends as soon as the reaper reports no children left, and never after the
/// stop's hard end ([`stop::exit_by`]). Returns until when to wait for SIGKILLed leftovers to be reaped: the
/// caller writes the report first, so a process SIGKILL cannot reap never costs the report.
async fn cleanup(
    cfg: &Config,
    shared: &Shared,
    start: Option<Instant>,
    mut none_left: watch::Receiver<bool>,
) -> Option<Instant> {
    if *none_left.borrow() {
        return None;
    }
    let began = Instant::now();
    let hard = start.map(|s| s + stop::exit_by(cfg));
    let until = hard.map_or(began + cfg.cleanup_timeout, |h| {
        (began + cfg.cleanup_timeout).min(h).max(began)
    });
    let n = reaper::signal_all_descendants(Sig::TERM);
    let quick = (began + std::time::Duration::from_millis(50)).min(until);
    if n == 0
        && tokio::time::timeout_at(quick, none_left.wait_for(|v| *v))
            .await
            .is_ok()
    {
        return None;
    }
    let ok = tokio::time::timeout_at(until, none_left.wait_for(|v| *v))
        .await
        .is_ok();
    let (outcome, detail, reap_until) = if ok {
        (
            Outcome::Ok,
            "leftover processes exited after SIGTERM".to_string(),
            None,
        )
    } else {
        reaper::signal_all_descendants(Sig::KILL);
        let waited = std::time::Duration::from_millis(ms(began.elapsed()));
        let reap = Instant::now() + std::time::Duration::from_millis(500);
        (
            Outcome::Timeout,
            format!(
                "leftover processes still running after {}: SIGKILL",
                humantime::format_duration(waited)
            ),
            Some(hard.map_or(reap, |h| reap.min(h))),
        )
    };
    quiesce_protocol::event_if!(
        cfg.narrates_steps() || outcome != Outcome::Ok,
        info,
        debug,
        outcome = outcome.as_str(),
        "leftover cleanup done"
    );
    shared.record(crate::state::StepRecord {
        number: 0,
        name: crate::steps::Extra::Cleanup.name().into(),
        outcome,
        started_ms: start
            .map(|b| ms(began.saturating_duration_since(b)))
            .unwrap_or(0),
        duration_ms: ms(began.elapsed()),
        counts: Default::default(),
        detail,
    });
    reap_until
}
