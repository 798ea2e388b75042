//! `fixture-app`: an app that embeds the real control-protocol agent and misbehaves on request, so
//! the supervisor's tests can produce every situation a real service can.
//!
//! ```text
//! fixture-app [OPTIONS]
//!   --socket PATH               serve the control socket at PATH
//!   --socket-from-env           serve it at $QUIESCE_CONTROL_SOCKET (the default; unset = no socket)
//!   --no-socket                 never serve it (signal mode)
//!   --app NAME                  app name in hello/status (default fixture-app)
//!   --services A[,B...]         gRPC service names reported by hello (repeatable)
//!   --behave SUBSTEP=BEHAVIOUR  how a sub-step's handler behaves (repeatable; default finish):
//!        finish[:MS]   finish after MS milliseconds (default 0)
//!        hang          never finish (async: the agent cuts it at the deadline)
//!        freeze[:MS]   block the whole process for MS ms (default forever): no answers at all
//!        stop          SIGSTOP itself
//!        fail[:TEXT]   return an error (outcome "error")
//!        crash[:CODE]  exit(CODE) mid-step (default 3)
//!        none          register no handler ("nothing registered")
//!   --checks LIST               health checks, e.g. db,redis,mq? (`?` = optional; default db,redis,mq)
//!   --deps-file PATH            re-read on every health call; lines NAME=up|down[:TEXT]|slow:MS|hang
//!   --freeze-file PATH          while PATH exists the process blocks and answers nothing
//!   --event-log PATH            append "<CLOCK_MONOTONIC ns> <event>" lines (see below)
//!   --local-budget-ms N         budget of the in-process shutdown on SIGTERM/SIGINT (default 10000)
//!   --ignore-sigterm            do nothing on SIGTERM
//!   --startup-delay-ms N        wait N ms before serving the socket
//!   --exit-after-ms N           exit by itself after N ms (code from --exit-code)
//!   --exit-code N               exit code after close, SIGTERM or --exit-after-ms (default 0)
//! ```
//!
//! Events (one line each, prefixed by CLOCK_MONOTONIC nanoseconds, comparable across
//! processes): `start pid=N` (signals are handled from then on), `listening PATH`, `verb REQUEST`, `substep NAME begin BEHAVIOUR`,
//! `substep NAME end ok|error`, `crash NAME code=N`, `freeze begin`/`freeze end`,
//! `signal SIGTERM`, `local-shutdown begin`/`local-shutdown end`, `closed`, `exit code=N`.
//!
//! It exits with the exit code after `close` has run, and on SIGTERM or SIGINT runs the remaining
//! steps in-process first (`Agent::run_local`), with or without a control socket. It is SIGKILLed
//! when the process that started it dies (a parent-death signal).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::exit;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiesce_protocol::agent::{Agent, HandlerError, Report, StepCtx};
use quiesce_protocol::wire::SubStep;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Behaviour {
    Finish(u64),
    Hang,
    Freeze(Option<u64>),
    Stop,
    Fail(String),
    Crash(i32),
    None,
}

impl Behaviour {
    fn parse(text: &str) -> Result<Behaviour, String> {
        let (name, arg) = match text.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (text, None),
        };
        let number = |what: &str| -> Result<u64, String> {
            arg.unwrap_or("0")
                .parse()
                .map_err(|_| format!("`{text}`: {what} must be a whole number"))
        };
        Ok(match name {
            "finish" => Behaviour::Finish(number("the delay in ms")?),
            "hang" => Behaviour::Hang,
            "freeze" => Behaviour::Freeze(arg.map(|_| number("the freeze in ms")).transpose()?),
            "stop" => Behaviour::Stop,
            "fail" => Behaviour::Fail(arg.unwrap_or("fixture failure").to_owned()),
            "crash" => Behaviour::Crash(match arg {
                Some(code) => code
                    .parse()
                    .map_err(|_| format!("`{text}`: the exit code must be a number"))?,
                None => 3,
            }),
            "none" => Behaviour::None,
            _ => {
                return Err(format!(
                    "unknown behaviour `{text}`: use finish[:MS], hang, freeze[:MS], stop, fail[:TEXT], crash[:CODE] or none"
                ));
            }
        })
    }

    fn label(&self) -> String {
        match self {
            Behaviour::Finish(ms) => format!("finish:{ms}"),
            Behaviour::Hang => "hang".to_owned(),
            Behaviour::Freeze(Some(ms)) => format!("freeze:{ms}"),
            Behaviour::Freeze(None) => "freeze".to_owned(),
            Behaviour::Stop => "stop".to_owned(),
            Behaviour::Fail(_) => "fail".to_owned(),
            Behaviour::Crash(code) => format!("crash:{code}"),
            Behaviour::None => "none".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SocketChoice {
    FromEnv,
    Path(PathBuf),
    Off,
}

#[derive(Debug)]
struct Config {
    socket: SocketChoice,
    app: String,
    services: Vec<String>,
    behaviours: BTreeMap<SubStep, Behaviour>,
    checks: Vec<(String, bool)>,
    deps_file: Option<PathBuf>,
    freeze_file: Option<PathBuf>,
    event_log: Option<PathBuf>,
    local_budget: Duration,
    ignore_sigterm: bool,
    startup_delay: Duration,
    exit_after: Option<Duration>,
    exit_code: i32,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut config = Config {
        socket: SocketChoice::FromEnv,
        app: "fixture-app".to_owned(),
        services: Vec::new(),
        behaviours: BTreeMap::new(),
        checks: vec![
            ("db".to_owned(), true),
            ("redis".to_owned(), true),
            ("mq".to_owned(), true),
        ],
        deps_file: None,
        freeze_file: None,
        event_log: None,
        local_budget: Duration::from_secs(10),
        ignore_sigterm: false,
        startup_delay: Duration::ZERO,
        exit_after: None,
        exit_code: 0,
    };
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("`{flag}` needs a value"));
        let millis = |text: String| -> Result<Duration, String> {
            text.parse()
                .map(Duration::from_millis)
                .map_err(|_| format!("`{text}` is not a whole number of milliseconds"))
        };
        match flag.as_str() {
            "--socket" => config.socket = SocketChoice::Path(value()?.into()),
            "--socket-from-env" => config.socket = SocketChoice::FromEnv,
            "--no-socket" => config.socket = SocketChoice::Off,
            "--app" => config.app = value()?,
            "--services" => config.services.extend(
                value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            ),
            "--behave" => {
                let spec = value()?;
                let (name, behaviour) = spec
                    .split_once('=')
                    .ok_or_else(|| format!("`--behave {spec}`: write SUBSTEP=BEHAVIOUR"))?;
                let substep = SubStep::parse(name).ok_or_else(|| {
                    format!(
                        "`{name}` is not a sub-step: use one of {}",
                        SubStep::ALL.map(|s| s.as_str()).join(", ")
                    )
                })?;
                config
                    .behaviours
                    .insert(substep, Behaviour::parse(behaviour)?);
            }
            "--checks" => {
                config.checks = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| match s.strip_suffix('?') {
                        Some(name) => (name.to_owned(), false),
                        None => (s.to_owned(), true),
                    })
                    .collect();
            }
            "--deps-file" => config.deps_file = Some(value()?.into()),
            "--freeze-file" => config.freeze_file = Some(value()?.into()),
            "--event-log" => config.event_log = Some(value()?.into()),
            "--local-budget-ms" => config.local_budget = millis(value()?)?,
            "--ignore-sigterm" => config.ignore_sigterm = true,
            "--startup-delay-ms" => config.startup_delay = millis(value()?)?,
            "--exit-after-ms" => config.exit_after = Some(millis(value()?)?),
            "--exit-code" => {
                let text = value()?;
                config.exit_code = text
                    .parse()
                    .map_err(|_| format!("`--exit-code {text}`: not a number"))?;
            }
            other => {
                return Err(format!(
                    "unknown option `{other}` (see the source's header)"
                ));
            }
        }
    }
    Ok(config)
}

/// Appends timestamped lines to the event log, if there is one.
#[derive(Debug, Clone)]
struct EventLog(Option<Arc<PathBuf>>);

impl EventLog {
    fn event(&self, text: &str) {
        let Some(path) = &self.0 else { return };
        let line = format!("{} {text}\n", monotonic_ns());
        // One write per line on an O_APPEND file: lines from concurrent writers do not interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.as_path())
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "fixture-app: cannot write the event log {}: {e}",
                path.display()
            );
        }
    }
}

fn monotonic_ns() -> u128 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => {
            u128::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u128::try_from(t.tv_nsec()).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// Per-sub-step state for `status`.
type Components = Arc<Mutex<BTreeMap<&'static str, &'static str>>>;

fn set_state(components: &Components, substep: SubStep, state: &'static str) {
    if let Ok(mut map) = components.lock() {
        map.insert(substep.as_str(), state);
    }
}

/// Blocks the calling thread (the only runtime thread): nothing in the process runs meanwhile.
fn block_thread(duration: Option<u64>) {
    match duration {
        Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}

async fn run_handler(
    substep: SubStep,
    behaviour: Behaviour,
    log: EventLog,
    components: Components,
) -> Result<Report, HandlerError> {
    log.event(&format!("substep {substep} begin {}", behaviour.label()));
    set_state(&components, substep, "running");
    let result = match behaviour {
        Behaviour::Finish(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Report::new().count("fixture_calls", 1))
        }
        Behaviour::Hang => std::future::pending().await,
        Behaviour::Freeze(ms) => {
            log.event("freeze begin");
            block_thread(ms);
            log.event("freeze end");
            Ok(Report::new().count("fixture_calls", 1))
        }
        Behaviour::Stop => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
            Ok(Report::new().count("fixture_calls", 1))
        }
        Behaviour::Fail(text) => Err(HandlerError::msg(text)),
        Behaviour::Crash(code) => {
            log.event(&format!("crash {substep} code={code}"));
            exit(code);
        }
        Behaviour::None => Ok(Report::new()),
    };
    set_state(
        &components,
        substep,
        if result.is_ok() { "done" } else { "failed" },
    );
    log.event(&format!(
        "substep {substep} end {}",
        if result.is_ok() { "ok" } else { "error" }
    ));
    result
}

/// One dependency's state from the deps file (re-read on every call; missing file = all up).
async fn check_dependency(name: String, deps_file: Option<PathBuf>) -> Result<(), HandlerError> {
    let Some(path) = deps_file else { return Ok(()) };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(HandlerError::msg(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let state = text.lines().find_map(|line| {
        let (key, value) = line.trim().split_once('=')?;
        (key.trim() == name).then(|| value.trim().to_owned())
    });
    let Some(state) = state else { return Ok(()) };
    let (kind, arg) = match state.split_once(':') {
        Some((kind, arg)) => (kind, Some(arg)),
        None => (state.as_str(), None),
    };
    match kind {
        "up" => Ok(()),
        "down" => Err(HandlerError::msg(
            arg.map_or_else(|| format!("{name} is down"), str::to_owned),
        )),
        "slow" => {
            let ms = arg.and_then(|a| a.parse().ok()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        }
        "hang" => std::future::pending().await,
        other => Err(HandlerError::msg(format!(
            "deps file {}: unknown state `{other}` for {name} (use up, down[:TEXT], slow:MS, hang)",
            path.display()
        ))),
    }
}

fn build_agent(config: &Config, log: &EventLog, components: &Components) -> Agent {
    let mut builder = Agent::builder(config.app.clone());
    for service in &config.services {
        builder = builder.service(service.clone());
    }
    for substep in SubStep::ALL {
        let behaviour = config
            .behaviours
            .get(&substep)
            .cloned()
            .unwrap_or(Behaviour::Finish(0));
        if behaviour == Behaviour::None {
            continue;
        }
        set_state(components, substep, "pending");
        let (log, components) = (log.clone(), Arc::clone(components));
        builder = builder.on(substep, move |_ctx: StepCtx| {
            run_handler(
                substep,
                behaviour.clone(),
                log.clone(),
                Arc::clone(&components),
            )
        });
    }
    for (name, required) in &config.checks {
        let (name, deps_file) = (name.clone(), config.deps_file.clone());
        builder = builder.check(name.clone(), *required, move || {
            check_dependency(name.clone(), deps_file.clone())
        });
    }
    let request_log = log.clone();
    let snapshot = Arc::clone(components);
    builder
        .on_request(move |request| request_log.event(&format!("verb {request}")))
        .status(move || {
            let substeps = snapshot.lock().map(|m| m.clone()).unwrap_or_default();
            serde_json::json!({ "substeps": substeps, "in_flight": 0 })
        })
        .build()
}

/// While `path` exists, block the runtime thread: the process answers nothing (a frozen app).
async fn watch_freeze_file(path: PathBuf, log: EventLog) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if path.exists() {
            log.event("freeze begin");
            while path.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            log.event("freeze end");
        }
    }
}

async fn run(config: Config, log: EventLog) -> i32 {
    let (Ok(mut sigterm), Ok(mut sigint)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("fixture-app: cannot install signal handlers");
        return 2;
    };
    // Logged once SIGTERM/SIGINT are handled, so a test may signal as soon as it sees this.
    log.event(&format!("start pid={}", std::process::id()));
    let components: Components = Arc::new(Mutex::new(BTreeMap::new()));
    let agent = build_agent(&config, &log, &components);
    if let Some(path) = config.freeze_file.clone() {
        tokio::spawn(watch_freeze_file(path, log.clone()));
    }
    tokio::time::sleep(config.startup_delay).await;
    let served = match &config.socket {
        SocketChoice::Path(path) => agent.serve(path).await.map(Some),
        SocketChoice::FromEnv => agent.serve_from_env().await,
        SocketChoice::Off => Ok(None),
    };
    let _handle = match served {
        Ok(Some(handle)) => {
            log.event(&format!("listening {}", handle.path().display()));
            Some(handle)
        }
        Ok(None) => None,
        Err(e) => {
            eprintln!("fixture-app: {e}");
            return 2;
        }
    };
    let exit_after = async {
        match config.exit_after {
            Some(after) => tokio::time::sleep(after).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(exit_after);
    loop {
        let signal_name = tokio::select! {
            () = agent.closed() => {
                log.event("closed");
                return config.exit_code;
            }
            () = &mut exit_after => return config.exit_code,
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        log.event(&format!("signal {signal_name}"));
        if config.ignore_sigterm && signal_name == "SIGTERM" {
            continue;
        }
        log.event("local-shutdown begin");
        agent.run_local(config.local_budget).await;
        log.event("local-shutdown end");
        return config.exit_code;
    }
}

fn main() {
    // Before the runtime starts any thread: die with the process that started us (the
    // supervisor under test), so a killed supervisor never leaves this app running.
    quiesce_testbin::die_with_parent("fixture-app");
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("fixture-app: {message}");
            exit(2);
        }
    };
    let log = EventLog(config.event_log.clone().map(Arc::new));
    // One thread on purpose: `freeze` and the freeze file block it, and with it the whole app.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fixture-app: cannot start the runtime: {e}");
            exit(2);
        }
    };
    let code = runtime.block_on(run(config, log.clone()));
    log.event(&format!("exit code={code}"));
    exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn args(line: &str) -> Result<Config, String> {
        parse_args(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn parses_behaviours_and_options() {
        let c = args(
            "--socket /tmp/s --behave drain-in-flight=hang --behave close-db=crash:7 \
             --behave stop-cron=finish:250 --behave close-mq=none --checks db,mq? --services a,b",
        )
        .unwrap();
        assert_eq!(
            c.socket,
            SocketChoice::Path(Path::new("/tmp/s").to_path_buf())
        );
        assert_eq!(c.behaviours[&SubStep::DrainInFlight], Behaviour::Hang);
        assert_eq!(c.behaviours[&SubStep::CloseDb], Behaviour::Crash(7));
        assert_eq!(c.behaviours[&SubStep::StopCron], Behaviour::Finish(250));
        assert_eq!(c.behaviours[&SubStep::CloseMq], Behaviour::None);
        assert_eq!(
            c.checks,
            vec![("db".to_owned(), true), ("mq".to_owned(), false)]
        );
        assert_eq!(c.services, ["a", "b"]);
        assert_eq!(Behaviour::parse("freeze").unwrap(), Behaviour::Freeze(None));
        assert_eq!(Behaviour::parse("crash").unwrap(), Behaviour::Crash(3));
        assert!(args("--behave drain=hang").is_err());
        assert!(args("--behave close-db=explode").is_err());
        assert!(args("--socket").is_err());
        assert!(args("--what").is_err());
    }
}
