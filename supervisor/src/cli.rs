//! The command line: `quiesce [OPTIONS] [-- CMD ARGS...]` and the subcommands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, ConfigError, Layer};

#[derive(Parser, Debug)]
#[command(
    name = "quiesce",
    version,
    about = "PID-1 supervisor for containers: reaps zombies, forwards signals, serves kubelet's gRPC probes and \
             stops the app in order inside the pod's grace period.",
    args_conflicts_with_subcommands = true,
    after_help = "Every option has a QUIESCE_* environment twin and a key in the --config file.\n\
                  Precedence: flags > environment > file > defaults."
)]
pub struct Cli {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(subcommand)]
    pub sub: Option<Sub>,
}

/// Options of a supervised run (also accepted by `check-config`).
#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "QUIESCE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub layer: Layer,
    /// Extra environment variable for the child (repeatable; file: the `[env]` table).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// The program to supervise and its arguments.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Sub {
    /// Validate the configuration (file, environment, flags) and print the resolved shutdown plan.
    CheckConfig(Box<CheckArgs>),
    /// preStop exec hook: start step 1 in the running supervisor and return when the preStop delay has passed.
    Prestop(ClientArgs),
    /// Operator commands for the running supervisor.
    Ctl {
        #[command(subcommand)]
        cmd: CtlCmd,
    },
}

/// `check-config`: the run's options, and how strict to be about budgets.
#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Fail (exit 121) when the step budgets do not fit the stop window, instead of warning (for CI).
    #[arg(long)]
    pub strict: bool,
}

#[derive(Subcommand, Debug)]
pub enum CtlCmd {
    /// Phase, child, control connection, and each shutdown step's outcome and timing.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Follow the stop until the supervisor exits, then print its exit code and reason: on a terminal
        /// the table is redrawn as steps finish, elsewhere one line per change. `--timeout` is then how
        /// long the supervisor may stay silent.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Start the shutdown sequence, as SIGTERM would.
    Shutdown(ClientArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The supervisor's admin socket.
    #[arg(
        long,
        env = "QUIESCE_ADMIN_SOCKET",
        default_value = "/run/quiesce/admin.sock",
        value_name = "PATH"
    )]
    pub admin_socket: PathBuf,
    /// Give up after this long.
    #[arg(long, default_value = "60s", value_parser = parse_dur, value_name = "DURATION")]
    pub timeout: Duration,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// `--timeout` of `prestop` and `ctl`: at least 100ms (one CFS quota period), at most a day (the preStop
/// delay it waits for is at most an hour; a huge value would overflow the client's deadline).
fn parse_dur(s: &str) -> Result<Duration, String> {
    let d = s.parse::<config::Dur>()?.0;
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(24 * 3600));
    if d < min || d > max {
        return Err(format!(
            "{} is out of range (allowed 100ms to 24h)",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

impl RunArgs {
    /// Merges flags/env over the file over the defaults.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(p) => config::load_file(p)?,
            None => Layer::default(),
        };
        let mut top = self.layer.clone();
        if !self.command.is_empty() {
            top.command = Some(self.command.clone());
        }
        if !self.env.is_empty() {
            top.env = Some(self.env.iter().cloned().collect());
        }
        let mut cfg = Config::resolve(top.merge(file))?;
        cfg.traces = crate::trace::Traces::from_env(&cfg.env);
        Ok(cfg)
    }
}

/// The resolved plan `check-config` prints.
pub fn describe(cfg: &Config) -> String {
    use std::fmt::Write as _;
    let h = |d: Duration| humantime::format_duration(d).to_string();
    let mut out = String::new();
    let mode = cfg.mode();
    let _ = writeln!(out, "configuration is valid");
    let _ = writeln!(out, "mode: {mode}");
    if cfg.command.is_empty() {
        let _ = writeln!(out, "command: (none: give it after `--` when running)");
    } else {
        let _ = writeln!(out, "command: {:?}", cfg.command);
    }
    let _ = writeln!(
        out,
        "grace_period: {}  safety_margin: {}  stop window: {}",
        h(cfg.grace_period),
        h(cfg.safety_margin),
        h(cfg.stop_window())
    );
    let _ = writeln!(
        out,
        "stop_signal: {}  stop_exit_code: {:?}",
        cfg.stop_signal, cfg.stop_exit_code
    );
    describe_ports(&mut out, cfg);
    let _ = writeln!(out, "traces: {}", cfg.traces);
    let _ = writeln!(out, "shutdown steps:");
    let mut total = Duration::ZERO;
    for (i, s) in crate::steps::STEPS.iter().enumerate() {
        total += cfg.budgets[i];
        let verb = s.verb().map_or("-", |v| v.as_str());
        let _ = writeln!(
            out,
            "  {} {:<20} {:<14} {:>8}  ({})",
            s.number,
            s.name,
            verb,
            h(cfg.budgets[i]),
            s.config_key
        );
    }
    let _ = writeln!(
        out,
        "  budgets total {} of a {} window",
        h(total),
        h(cfg.stop_window())
    );
    let _ = writeln!(
        out,
        "  when time runs short, each remaining step gets budget x time left / remaining budgets"
    );
    if let Some(w) = budget_warning(cfg) {
        let _ = writeln!(out, "  warning: {w}");
    }
    out
}

/// Which ports `cfg` binds, and why each server is on or off.
fn describe_ports(out: &mut String, cfg: &Config) {
    use std::fmt::Write as _;
    let port =
        |a: Option<std::net::SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
    let _ = writeln!(
        out,
        "health: {}  ({})",
        port(cfg.health.address),
        cfg.health.why
    );
    let _ = writeln!(
        out,
        "metrics: {}  ({})",
        port(cfg.metrics_address),
        cfg.metrics_why
    );
    let ports: Vec<String> = [cfg.health.address, cfg.metrics_address]
        .into_iter()
        .flatten()
        .map(|a| format!("tcp {a}"))
        .collect();
    let _ = writeln!(
        out,
        "ports bound: {}",
        if ports.is_empty() {
            "none".to_string()
        } else {
            ports.join(", ")
        }
    );
}

/// Says so when the budgets (step 1's preStop delay included) do not fit the stop window. Not an error: at
/// run time the remaining budgets are scaled down alike, so every step still gets its share, but each gets
/// less than configured when an earlier one hangs.
pub fn budget_warning(cfg: &Config) -> Option<String> {
    let total: Duration = cfg.budgets.iter().sum();
    let window = cfg.stop_window();
    let h = |d: Duration| humantime::format_duration(d).to_string();
    (total > window).then(|| {
        format!(
            "the step budgets ({}, the preStop delay included) exceed the {} stop window by {}; a hung \
             step would scale every later one down; raise grace_period or lower the [steps] budgets",
            h(total),
            h(window),
            h(total - window)
        )
    })
}
