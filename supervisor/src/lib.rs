//! quiesce: a PID-1 supervisor for containers.
//!
//! It starts one application process, reaps every zombie, owns the signals, and stops the app inside the
//! pod's grace period, then reports how that went through the exit code and the termination message.
//!
//! # Theory of operation
//!
//! | what | owner | how |
//! |---|---|---|
//! | the main child's pid | [`runloop::supervise`] | spawned once with `std::process::Command`, never waited on by it |
//! | the lifecycle | [`lifecycle::Transitions`] | `Starting → Running → Stopping → Exited` in one watch; the run loop makes the transitions, everyone else subscribes |
//! | every exit status | [`reaper`] | `waitpid(-1, WNOHANG)` on SIGCHLD, in the run loop only; the main child's end becomes the lifecycle's `Exited` |
//! | every catchable signal | [`runloop::supervise`] | one `signal-hook-tokio` stream registered *before* the child starts |
//! | SIGTERM / SIGINT | [`stop`] | start the shutdown once (from the signal's arrival); repeats reach the app only as [`stop::Relay`] allows |
//! | every signal sent | [`sys::send`] | to a process, the app's group, or everyone (as PID 1) |
//! | the shutdown deadlines | [`stop::StopCtx`] | start (earliest trigger) + `grace_period - safety_margin`; nothing waits past the window + half the margin |
//! | the termination message | [`report`] | its file opened at start-up, written once after the child and its leftovers are gone |
//! | `unsafe` | [`sys`] | the pre-exec hook, signal masks and dispositions, `kill`, the arrival stamp |
//!
//! # The lifecycle ([`lifecycle`]: one state, one watch)
//!
//! ```text
//!   Starting ──spawn──▶ Running ──SIGTERM/SIGINT, preStop, ctl shutdown──▶ Stopping { since, trigger, step_one_done }
//!                          │                                                    │
//!                          └──────────── main child reaped ───────────▶ Exited { end, stop } ◀──┘
//! ```
//!
//! # A SIGTERM, from the kernel to the exit code
//!
//! 1. `main` blocked every signal first ([`sys::block_all`]), so a SIGTERM that comes before the handlers
//!    waits in the kernel instead of being dropped (as PID 1 an unhandled default-action signal is).
//! 2. The run loop ([`runloop::supervise`]) installed the handlers and opened the mask; the handler stamps the
//!    arrival ([`sys::stamp_stop_signals`]) and wakes the loop's signal stream.
//! 3. The loop counts it ([`state::Shared::signal`], [`stop::Relay`]) and begins the stop: the lifecycle
//!    goes `Stopping { since: arrival, trigger }` ([`lifecycle::Transitions::begin_stop`], once; a later
//!    trigger joins it), and one stop task is spawned.
//! 4. [`health::track`] sees `Stopping` and recomputes: the probe thread answers NOT_SERVING. Step 1
//!    ([`stop::step_one`]) runs the preStop delay and marks it over in the lifecycle (`quiesce prestop`
//!    returns).
//! 5. Signal mode: [`stop::ask_with_signal`] sends the one stop signal ([`stop::ask_signal`]) and waits for
//!    the end until the deadline. Control mode: [`control::sequence`] walks the verbs, each planned by
//!    [`control::plan`], sent over the driver connection; each reply becomes the rows of the status.
//! 6. The app exits; SIGCHLD wakes the loop, [`reaper::reap`] collects the status, and the lifecycle goes
//!    `Exited { end }`: every wait of the stop task ends.
//! 7. The end of the run: the leftover sweep, [`exit::exit_code`], [`report::render`] into the file opened
//!    at start-up; [`run`] logs `exiting` and `main` exits with the code.

//! # Layout
//!
//! - [`config`], [`cli`]: keys, layers, validation; [`logging`]: tracing setup.
//! - [`child`]: spawning (argv exec, process group, terminal, ids); [`users`]: names from /etc/passwd and
//!   /etc/group; [`sys`]: the unsafe bits.
//! - [`signals`]: names, the forwarded set, rewrites; [`reaper`]: reaping and the leftover sweep.
//! - [`steps`]: the nine-step table; [`stop`]: step 1, the stop signal, the deadline's force;
//!   [`control`]: control mode, walking the table over the app's control socket.
//! - [`peer`]: who may answer at the control socket (the app or its descendants, by `SO_PEERCRED`).
//! - [`admin`]: the admin socket (`prestop`, `ctl`); [`admin::client`]: its client in the same binary.
//! - [`health`]: grpc.health.v1 for kubelet on its own thread; [`metrics`]: Prometheus `/metrics`.
//! - [`runloop`]: the run loop; [`exit`]: exit codes; [`report`]: the termination message;
//!   [`lifecycle`]: the one state machine; [`state`]: the observable record (steps, counters, health).

pub mod admin;
pub mod child;
pub mod cli;
pub mod config;
pub mod control;
pub mod exit;
pub mod health;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod peer;
pub mod reaper;
pub mod report;
pub mod runloop;
pub mod signals;
pub mod state;
pub mod steps;
pub mod stop;
pub mod sys;
pub mod trace;
pub mod users;

use std::sync::Arc;

use config::Config;
use exit::code;

/// Runs a supervised program to its end and returns the process exit code. Logs the final line
/// `exiting code=… reason=…`. `mask` is the signal mask the process started with ([`sys::block_all`]).
pub fn run(cfg: Config, mask: nix::sys::signal::SigSet) -> i32 {
    match run_inner(cfg, mask) {
        Ok(out) => {
            tracing::info!(code = out.code, reason = %out.reason, "exiting");
            out.code
        }
        Err(code) => code,
    }
}

/// Everything the run needs, in the order it must exist: the child's spec, the termination-log file, the
/// probe ports and the admin socket (all before the child starts), then the run loop. An error is the exit
/// code, its line already written ([`fail`]).
fn run_inner(cfg: Config, mask: nix::sys::signal::SigSet) -> Result<runloop::Exit, i32> {
    let spec = spawn_spec(&cfg, mask)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            fail(
                code::INTERNAL,
                &format!("cannot start the async runtime: {e}"),
            )
        })?;
    let sink = open_termination_log(&cfg);
    if let trace::Traces::Unusable(why) = &cfg.traces {
        tracing::warn!(reason = %why, "the shutdown will not be exported as a trace");
    }
    let cfg = Arc::new(cfg);
    // Metrics are kept only when `/metrics` is served: nobody else reads them.
    let metrics = match cfg.metrics_address {
        Some(_) => metrics::Metrics::new(),
        None => metrics::Metrics::off(),
    };
    let shared = state::Shared::with_metrics(cfg.mode(), metrics);
    let (chans, watches) = runloop::channels();
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    start_probe_thread(&cfg, &shared, &chans, &watches)?;
    let mut own_socket = None;
    let result = rt.block_on(async {
        // Bound before the child starts, so `quiesce prestop` works from the first moment.
        own_socket = start_admin(&cfg, &shared, events_tx, &watches)?;
        runloop::supervise(cfg.clone(), spec, shared, chans, events_rx, sink)
            .await
            .map_err(|e| fail(e.exit_code(), &e.to_string()))
    });
    if let Some(own) = own_socket {
        own.remove();
    }
    // Never wait for a blocking task at the exit (a collector's name still being resolved when the export's
    // time ran out): dropping the runtime would, without a limit.
    rt.shutdown_background();
    result
}

/// The child's argv, environment, ids and the signal state it gets back.
fn spawn_spec(cfg: &Config, mask: nix::sys::signal::SigSet) -> Result<child::SpawnSpec, i32> {
    // Before any handler or thread of ours: what the app must find ignored, as it would under tini.
    let ignored = sys::ignored_now();
    let foreground = sys::ignore_tty_signals();
    let ids = child::resolve_ids(cfg.user.as_deref(), cfg.group.as_deref())
        .map_err(|e| fail(e.exit_code(), &e.to_string()))?;
    let mut env = cfg.env.clone();
    if let Some(path) = &cfg.control_socket {
        env.insert(
            quiesce_protocol::CONTROL_SOCKET_ENV.to_string(),
            path.display().to_string(),
        );
    }
    Ok(child::SpawnSpec {
        argv: cfg.command.clone(),
        env,
        workdir: cfg.workdir.clone(),
        ids,
        foreground,
        mask,
        ignored,
    })
}

/// Judged and opened before the app runs; kept open for the end (see [`report::Sink`]).
fn open_termination_log(cfg: &Config) -> Option<report::Sink> {
    let path = cfg.termination_log.as_deref()?;
    report::Sink::open(path).unwrap_or_else(|why| {
        tracing::warn!(path = %path.display(), reason = %why, "no termination message will be written");
        None
    })
}

/// Probe and metrics ports are bound before the child starts (the app would otherwise find them taken),
/// and served on a thread of their own.
fn start_probe_thread(
    cfg: &Config,
    shared: &state::Shared,
    chans: &runloop::Channels,
    watches: &runloop::Watches,
) -> Result<(), i32> {
    let bind = |what: &str, addr: Option<std::net::SocketAddr>| {
        addr.map(|a| health::bind(what, a)).transpose()
    };
    let (health_l, metrics_l) = match (
        bind("health", cfg.health.address),
        bind("metrics", cfg.metrics_address),
    ) {
        (Ok(h), Ok(m)) => (h, m),
        (Err(e), _) | (_, Err(e)) => return Err(fail(code::BIND, &e)),
    };
    if metrics_l.is_some() {
        shared.metrics.budgets(cfg);
        shared.metrics.with_process_metrics();
    }
    if health_l.is_none() && metrics_l.is_none() {
        return Ok(());
    }
    health::spawn_server(
        health_l,
        metrics_l,
        watches.statuses.clone(),
        chans.probes.clone(),
        shared.metrics.clone(),
    )
    .map_err(|e| {
        fail(
            code::INTERNAL,
            &format!("cannot start the probe thread: {e}"),
        )
    })
}

/// The admin socket, on its own thread, started while every signal is still blocked (signals stay the run
/// loop's). The default path may not be writable for a non-root drop-in init: then the run goes on without
/// it; a configured path is required.
fn start_admin(
    cfg: &Config,
    shared: &state::Shared,
    events: tokio::sync::mpsc::UnboundedSender<runloop::Event>,
    watches: &runloop::Watches,
) -> Result<Option<quiesce_protocol::socket::SocketFile>, i32> {
    let Some(path) = &cfg.admin_socket else {
        return Ok(None);
    };
    match admin::bind(path) {
        Ok((listener, own)) => {
            admin::spawn(listener, shared.clone(), events, watches.clone()).map_err(|e| {
                fail(
                    code::INTERNAL,
                    &format!("cannot start the admin thread: {e}"),
                )
            })?;
            Ok(Some(own))
        }
        Err(e) if cfg.admin_socket_explicit => Err(fail(code::BIND, &format!("{e}"))),
        Err(e) => {
            tracing::warn!(error = %e, "no admin socket: `quiesce prestop` and `quiesce ctl` will not reach this supervisor");
            Ok(None)
        }
    }
}

/// The supervisor's own failure: one line on stderr (also logged), and its documented code.
pub fn fail(code: i32, reason: &str) -> i32 {
    tracing::error!(code, reason, "exiting");
    logging::say(&format!("quiesce: {reason}"));
    code
}
