//! Configuration: one set of keys, four layers (flags > `QUIESCE_*` env > TOML file > defaults).
//!
//! Each layer struct derives both `clap::Args` and `serde::Deserialize`, so a key is declared once with its
//! flag, its env twin and its TOML name; [`Config::resolve`] merges the layers and checks the result.
//! TOML errors name the file, the line and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Deserializer};
use tracing::level_filters::LevelFilter;

use crate::signals::{Rewrite, Sig};
use crate::steps::STEPS;
use quiesce_protocol::wire::SubStep;

/// A human duration (`5s`, `250ms`, `1m30s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("invalid duration '{s}' ({e}): write a number with a unit, such as 5s, 250ms or 1m30s"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Sig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Sig::parse(s)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Sig::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a stop that the supervisor started, and the app finished in time, reports as the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopExitCode {
    /// Exit 0 even if the app died of the stop signal (kubectl shows "Completed", not "Error").
    Zero,
    /// Keep 128+N, exactly as tini does.
    Signal,
}

/// Where forwarded signals go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardTo {
    Child,
    Group,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Human,
}

/// A log level (`error`, `warn`, `info`, `debug`, `trace`, `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level(pub LevelFilter);

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim().parse::<LevelFilter>().map(Level).map_err(|_| {
            format!("invalid log level '{s}': use error, warn, info, debug, trace or off")
        })
    }
}

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Top-level keys. Flags are `--key-name`, env `QUIESCE_KEY_NAME`.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// The program to run, if not given after `--`.
    #[arg(skip)]
    pub command: Option<Vec<String>>,
    /// Time kubelet gives the pod to stop (terminationGracePeriodSeconds). [default: 30s]
    #[arg(long, env = "QUIESCE_GRACE_PERIOD", value_name = "DURATION")]
    pub grace_period: Option<Dur>,
    /// How long before kubelet's SIGKILL the supervisor must have exited. [default: 2s]
    #[arg(long, env = "QUIESCE_SAFETY_MARGIN", value_name = "DURATION")]
    pub safety_margin: Option<Dur>,
    /// Step 1: after readiness goes NOT_SERVING, wait this long for endpoint removal. [default: 0s]
    #[arg(long, env = "QUIESCE_PRESTOP_DELAY", value_name = "DURATION")]
    pub prestop_delay: Option<Dur>,
    /// Signal that asks the app to stop (signal mode). [default: SIGTERM]
    #[arg(long, env = "QUIESCE_STOP_SIGNAL", value_name = "SIGNAL")]
    pub stop_signal: Option<Sig>,
    /// Exit code of a stop we started that the app finished in time. [default: zero]
    #[arg(long, env = "QUIESCE_STOP_EXIT_CODE", value_enum)]
    pub stop_exit_code: Option<StopExitCode>,
    /// Forward signals to the child only, or to its whole process group. [default: child]
    #[arg(long, env = "QUIESCE_FORWARD_TO", value_enum)]
    pub forward_to: Option<ForwardTo>,
    /// After the app exits, leftover processes get SIGTERM, this long, then SIGKILL. [default: 2s]
    #[arg(long, env = "QUIESCE_CLEANUP_TIMEOUT", value_name = "DURATION")]
    pub cleanup_timeout: Option<Dur>,
    /// Termination message file; written only if its directory exists. `off` disables. [default: /dev/termination-log]
    #[arg(long, env = "QUIESCE_TERMINATION_LOG", value_name = "PATH")]
    pub termination_log: Option<PathBuf>,
    /// Run the child as this user (name or uid); supplementary groups are cleared.
    #[arg(long, env = "QUIESCE_USER")]
    pub user: Option<String>,
    /// Run the child with this group (name or gid); defaults to the user's primary group.
    #[arg(long, env = "QUIESCE_GROUP")]
    pub group: Option<String>,
    /// Working directory of the child.
    #[arg(long, env = "QUIESCE_WORKDIR", value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Log format: json when stderr is not a terminal, human when it is. [default: auto]
    #[arg(long, env = "QUIESCE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level: error, warn, info, debug, trace or off. [default: info]
    #[arg(long, env = "QUIESCE_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<Level>,
    /// Admin socket for `quiesce prestop` and `quiesce ctl`. `off` disables. [default: /run/quiesce/admin.sock]
    #[arg(long, env = "QUIESCE_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Extra environment for the child (file: an `[env]` table).
    #[arg(skip)]
    pub env: Option<BTreeMap<String, String>>,

    #[command(flatten)]
    #[serde(default)]
    pub signals: SignalsLayer,
    #[command(flatten)]
    #[serde(default)]
    pub control: ControlLayer,
    #[command(flatten)]
    #[serde(default)]
    pub steps: StepsLayer,
    #[command(flatten)]
    #[serde(default)]
    pub health: HealthLayer,
    #[command(flatten)]
    #[serde(default)]
    pub metrics: MetricsLayer,
}

/// `[signals]`
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct SignalsLayer {
    /// Rewrite forwarded signals, e.g. SIGHUP=SIGUSR1,SIGWINCH=SIGUSR2 (file: a table).
    #[arg(long = "signals-rewrite", id = "signals-rewrite", env = "QUIESCE_SIGNALS_REWRITE", value_name = "FROM=TO,...", value_parser = parse_rewrite)]
    #[serde(default, deserialize_with = "de_rewrite")]
    pub rewrite: Option<Rewrite>,
}

/// `[control]`: control mode is on when `socket` is set.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ControlLayer {
    /// Control socket the app listens on (passed as QUIESCE_CONTROL_SOCKET); enables control mode.
    #[arg(
        long = "control-socket",
        id = "control-socket",
        env = "QUIESCE_CONTROL_SOCKET_PATH",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// How long the app may take to answer `hello` after start. [default: 60s]
    #[arg(
        long = "control-connect-timeout",
        id = "control-connect-timeout",
        env = "QUIESCE_CONTROL_CONNECT_TIMEOUT",
        value_name = "DURATION"
    )]
    pub connect_timeout: Option<Dur>,
}

/// `[steps]`: per-step budgets of the nine-step table.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct StepsLayer {
    #[arg(
        long = "steps-stop-accepting",
        id = "steps-stop-accepting",
        env = "QUIESCE_STEPS_STOP_ACCEPTING",
        value_name = "DURATION"
    )]
    pub stop_accepting: Option<Dur>,
    #[arg(
        long = "steps-drain-in-flight",
        id = "steps-drain-in-flight",
        env = "QUIESCE_STEPS_DRAIN_IN_FLIGHT",
        value_name = "DURATION"
    )]
    pub drain_in_flight: Option<Dur>,
    #[arg(
        long = "steps-stop-cron",
        id = "steps-stop-cron",
        env = "QUIESCE_STEPS_STOP_CRON",
        value_name = "DURATION"
    )]
    pub stop_cron: Option<Dur>,
    #[arg(
        long = "steps-stop-consumer",
        id = "steps-stop-consumer",
        env = "QUIESCE_STEPS_STOP_CONSUMER",
        value_name = "DURATION"
    )]
    pub stop_consumer: Option<Dur>,
    #[arg(
        long = "steps-stop-poller",
        id = "steps-stop-poller",
        env = "QUIESCE_STEPS_STOP_POLLER",
        value_name = "DURATION"
    )]
    pub stop_poller: Option<Dur>,
    #[arg(
        long = "steps-close-mq",
        id = "steps-close-mq",
        env = "QUIESCE_STEPS_CLOSE_MQ",
        value_name = "DURATION"
    )]
    pub close_mq: Option<Dur>,
    #[arg(
        long = "steps-close-redis",
        id = "steps-close-redis",
        env = "QUIESCE_STEPS_CLOSE_REDIS",
        value_name = "DURATION"
    )]
    pub close_redis: Option<Dur>,
    #[arg(
        long = "steps-close-db",
        id = "steps-close-db",
        env = "QUIESCE_STEPS_CLOSE_DB",
        value_name = "DURATION"
    )]
    pub close_db: Option<Dur>,
}

impl StepsLayer {
    fn get(&self, sub: SubStep) -> Option<Dur> {
        match sub {
            SubStep::StopAccepting => self.stop_accepting,
            SubStep::DrainInFlight => self.drain_in_flight,
            SubStep::StopCron => self.stop_cron,
            SubStep::StopConsumer => self.stop_consumer,
            SubStep::StopPoller => self.stop_poller,
            SubStep::CloseMq => self.close_mq,
            SubStep::CloseRedis => self.close_redis,
            SubStep::CloseDb => self.close_db,
        }
    }
    fn merge(self, lower: StepsLayer) -> StepsLayer {
        StepsLayer {
            stop_accepting: self.stop_accepting.or(lower.stop_accepting),
            drain_in_flight: self.drain_in_flight.or(lower.drain_in_flight),
            stop_cron: self.stop_cron.or(lower.stop_cron),
            stop_consumer: self.stop_consumer.or(lower.stop_consumer),
            stop_poller: self.stop_poller.or(lower.stop_poller),
            close_mq: self.close_mq.or(lower.close_mq),
            close_redis: self.close_redis.or(lower.close_redis),
            close_db: self.close_db.or(lower.close_db),
        }
    }
}

/// `[health]`
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct HealthLayer {
    /// Serve grpc.health.v1 for kubelet's probes. [default: true]
    #[arg(long = "health-enabled", id = "health-enabled", env = "QUIESCE_HEALTH_ENABLED", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub enabled: Option<bool>,
    /// Probe address. [default: 0.0.0.0:50051]
    #[arg(
        long = "health-address",
        id = "health-address",
        env = "QUIESCE_HEALTH_ADDRESS",
        value_name = "ADDR"
    )]
    pub address: Option<SocketAddr>,
    /// How often to ask the app for its dependency health. [default: 2s]
    #[arg(
        long = "health-poll-interval",
        id = "health-poll-interval",
        env = "QUIESCE_HEALTH_POLL_INTERVAL",
        value_name = "DURATION"
    )]
    pub poll_interval: Option<Dur>,
    /// Dependencies that must be up for readiness (empty: every check the app marks required).
    #[arg(
        long = "health-required",
        id = "health-required",
        env = "QUIESCE_HEALTH_REQUIRED",
        value_delimiter = ',',
        value_name = "NAME,..."
    )]
    pub required: Option<Vec<String>>,
    /// Liveness fails when the app's control socket does not answer `status` within this. [default: 1s]
    #[arg(
        long = "health-liveness-timeout",
        id = "health-liveness-timeout",
        env = "QUIESCE_HEALTH_LIVENESS_TIMEOUT",
        value_name = "DURATION"
    )]
    pub liveness_timeout: Option<Dur>,
    /// End the preStop delay once kubelet has seen readiness NOT_SERVING this many times (0: off). [default: 0]
    #[arg(
        long = "health-observed-probes",
        id = "health-observed-probes",
        env = "QUIESCE_HEALTH_OBSERVED_PROBES",
        value_name = "N"
    )]
    pub observed_probes: Option<u32>,
    /// Extra wait after the observed probes, for endpoint propagation. [default: 1s]
    #[arg(
        long = "health-propagation-margin",
        id = "health-propagation-margin",
        env = "QUIESCE_HEALTH_PROPAGATION_MARGIN",
        value_name = "DURATION"
    )]
    pub propagation_margin: Option<Dur>,
}

/// `[metrics]`
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct MetricsLayer {
    /// Serve Prometheus metrics on /metrics. [default: true]
    #[arg(long = "metrics-enabled", id = "metrics-enabled", env = "QUIESCE_METRICS_ENABLED", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub enabled: Option<bool>,
    /// Metrics address. [default: 0.0.0.0:9090]
    #[arg(
        long = "metrics-address",
        id = "metrics-address",
        env = "QUIESCE_METRICS_ADDRESS",
        value_name = "ADDR"
    )]
    pub address: Option<SocketAddr>,
}

fn parse_rewrite(s: &str) -> Result<Rewrite, String> {
    Rewrite::parse_list(s)
}

fn de_rewrite<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rewrite>, D::Error> {
    let table = BTreeMap::<String, String>::deserialize(d)?;
    let mut map = BTreeMap::new();
    for (from, to) in table {
        map.insert(
            Sig::parse(&from).map_err(serde::de::Error::custom)?,
            Sig::parse(&to).map_err(serde::de::Error::custom)?,
        );
    }
    Ok(Some(Rewrite(map)))
}

/// The resolved configuration every other module reads.
#[derive(Clone, Debug)]
pub struct Config {
    pub command: Vec<String>,
    pub grace_period: Duration,
    pub safety_margin: Duration,
    pub prestop_delay: Duration,
    pub stop_signal: Sig,
    pub stop_exit_code: StopExitCode,
    pub forward_to: ForwardTo,
    pub cleanup_timeout: Duration,
    pub termination_log: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub workdir: Option<PathBuf>,
    pub log_format: LogFormat,
    pub log_level: LevelFilter,
    pub admin_socket: Option<PathBuf>,
    /// The admin socket path was configured (not the default): failing to bind it is then fatal.
    pub admin_socket_explicit: bool,
    pub env: BTreeMap<String, String>,
    pub rewrite: Rewrite,
    pub control_socket: Option<PathBuf>,
    pub control_connect_timeout: Duration,
    /// Budget of each of the nine steps, indexed like [`STEPS`]. Step 1's is the preStop delay.
    pub budgets: [Duration; 9],
    pub health: HealthConfig,
    pub metrics_address: Option<SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// `None` when the health server is turned off.
    pub address: Option<SocketAddr>,
    pub poll_interval: Duration,
    pub required: Vec<String>,
    pub liveness_timeout: Duration,
    pub observed_probes: u32,
    pub propagation_margin: Duration,
}

/// A configuration problem, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "config file {path} is larger than 1 MiB: a quiesce config is a few hundred bytes; check the --config path"
    )]
    TooLarge { path: PathBuf },
    #[error("{path} line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            key,
            message: message.to_string(),
        }
    }
}

/// The largest config file read: far above any real one, and a `/dev/zero` cannot fill PID 1's memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Parses a TOML file into a layer; errors carry the line and the key. Reads at most [`MAX_FILE_BYTES`].
pub fn load_file(path: &Path) -> Result<Layer, ConfigError> {
    use std::io::Read as _;
    let read_err = |source| ConfigError::Read {
        path: path.into(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge { path: path.into() });
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    parse_toml(path, &text)
}

pub fn parse_toml(path: &Path, text: &str) -> Result<Layer, ConfigError> {
    toml::from_str::<Layer>(text).map_err(|e| {
        let start = e.span().map(|s| s.start).unwrap_or(0);
        let line = text[..start.min(text.len())].matches('\n').count() + 1;
        let line_text = text.lines().nth(line - 1).unwrap_or("");
        let message = e.message().trim().to_string();
        // Serde names unknown keys itself; for bad values, name the key from the offending line.
        let message = match line_text.split_once('=') {
            Some((key, _)) if !message.contains("unknown field") => {
                format!("{}: {message}", key.trim())
            }
            _ => message,
        };
        ConfigError::Parse {
            path: path.into(),
            line,
            message,
        }
    })
}

impl Layer {
    /// `self` wins over `lower`, key by key.
    pub fn merge(self, lower: Layer) -> Layer {
        Layer {
            command: self.command.or(lower.command),
            grace_period: self.grace_period.or(lower.grace_period),
            safety_margin: self.safety_margin.or(lower.safety_margin),
            prestop_delay: self.prestop_delay.or(lower.prestop_delay),
            stop_signal: self.stop_signal.or(lower.stop_signal),
            stop_exit_code: self.stop_exit_code.or(lower.stop_exit_code),
            forward_to: self.forward_to.or(lower.forward_to),
            cleanup_timeout: self.cleanup_timeout.or(lower.cleanup_timeout),
            termination_log: self.termination_log.or(lower.termination_log),
            user: self.user.or(lower.user),
            group: self.group.or(lower.group),
            workdir: self.workdir.or(lower.workdir),
            log_format: self.log_format.or(lower.log_format),
            log_level: self.log_level.or(lower.log_level),
            admin_socket: self.admin_socket.or(lower.admin_socket),
            env: match (self.env, lower.env) {
                (Some(mut hi), Some(lo)) => {
                    for (k, v) in lo {
                        hi.entry(k).or_insert(v);
                    }
                    Some(hi)
                }
                (hi, lo) => hi.or(lo),
            },
            signals: SignalsLayer {
                rewrite: self.signals.rewrite.or(lower.signals.rewrite),
            },
            control: ControlLayer {
                socket: self.control.socket.or(lower.control.socket),
                connect_timeout: self
                    .control
                    .connect_timeout
                    .or(lower.control.connect_timeout),
            },
            steps: self.steps.merge(lower.steps),
            health: HealthLayer {
                enabled: self.health.enabled.or(lower.health.enabled),
                address: self.health.address.or(lower.health.address),
                poll_interval: self.health.poll_interval.or(lower.health.poll_interval),
                required: self.health.required.or(lower.health.required),
                liveness_timeout: self
                    .health
                    .liveness_timeout
                    .or(lower.health.liveness_timeout),
                observed_probes: self.health.observed_probes.or(lower.health.observed_probes),
                propagation_margin: self
                    .health
                    .propagation_margin
                    .or(lower.health.propagation_margin),
            },
            metrics: MetricsLayer {
                enabled: self.metrics.enabled.or(lower.metrics.enabled),
                address: self.metrics.address.or(lower.metrics.address),
            },
        }
    }
}

/// Paths that can be turned off: empty (in the file), `off` or `none`.
fn non_empty(p: Option<PathBuf>) -> Option<PathBuf> {
    p.filter(|p| !matches!(p.to_str(), Some("" | "off" | "none")))
}

fn non_blank(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

fn dur(v: Option<Dur>, default: Duration) -> Duration {
    v.map(|d| d.0).unwrap_or(default)
}

impl HealthConfig {
    fn with_defaults(l: HealthLayer) -> HealthConfig {
        HealthConfig {
            address: l.enabled.unwrap_or(true).then(|| {
                l.address
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 50051)))
            }),
            poll_interval: dur(l.poll_interval, Duration::from_secs(2)),
            required: l
                .required
                .unwrap_or_default()
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            liveness_timeout: dur(l.liveness_timeout, Duration::from_secs(1)),
            observed_probes: l.observed_probes.unwrap_or(0),
            propagation_margin: dur(l.propagation_margin, Duration::from_secs(1)),
        }
    }
}

/// An allowed range of a duration key, and why it is that range (said when a value is refused).
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub min: Duration,
    pub max: Duration,
    pub why: &'static str,
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const HOUR: Duration = secs(3600);

/// 1s is the shortest non-zero terminationGracePeriodSeconds; a day is past any real stop, and keeps every
/// deadline (start + grace period) far from an `Instant` overflow.
pub const GRACE_PERIOD: Limit = Limit {
    min: secs(1),
    max: secs(24 * 3600),
    why: "set it to the pod's terminationGracePeriodSeconds",
};
/// The time kept for the escalation and the report before kubelet's SIGKILL: seconds are enough.
pub const SAFETY_MARGIN: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "it must also be shorter than grace_period",
};
/// Endpoint removal takes seconds; the delay must also fit the stop window.
pub const PRESTOP_DELAY: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "it must also be shorter than grace_period - safety_margin",
};
/// 0s: SIGKILL leftovers at once; waiting hours for orphans after the app has gone helps no one.
pub const CLEANUP_TIMEOUT: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "leftover processes get this long after SIGTERM",
};
/// Below one CFS quota period (100ms) a throttled app misses its hello; an hour of start-up is a hung app.
pub const CONNECT_TIMEOUT: Limit = Limit {
    min: Duration::from_millis(100),
    max: HOUR,
    why: "the app's start-up time until it answers hello",
};
/// A step's budget: 0s is "no time for it"; the steps share the stop window anyway (scaled when over it).
pub const STEP_BUDGET: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "the steps share the stop window, grace_period - safety_margin",
};
/// 50ms is at most 20 status calls a second (a nanosecond burned 70 % of a CPU); past an hour readiness no
/// longer follows the dependencies.
pub const POLL_INTERVAL: Limit = Limit {
    min: Duration::from_millis(50),
    max: HOUR,
    why: "faster polling only burns CPU",
};
/// 0s failed liveness forever (a restart loop); under one CFS quota period (100ms) a throttled but healthy
/// app fails it too.
pub const LIVENESS_TIMEOUT: Limit = Limit {
    min: Duration::from_millis(100),
    max: HOUR,
    why: "a healthy app must be able to answer status within it",
};
/// It can only shorten the preStop delay, which is at most an hour.
pub const PROPAGATION_MARGIN: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "the wait for endpoint propagation after the observed probes",
};
/// kubelet probes at most once a second and the preStop delay ends the wait anyway; also keeps the probe
/// count arithmetic far from overflow.
pub const MAX_OBSERVED_PROBES: u32 = 100;

/// A bound as the error messages say it: whole hours as `24h`, not `1day`.
fn show(d: Duration) -> String {
    if d >= HOUR && d.as_nanos().is_multiple_of(HOUR.as_nanos()) {
        format!("{}h", d.as_secs() / 3600)
    } else {
        humantime::format_duration(d).to_string()
    }
}

impl Config {
    /// Applies defaults, then checks each value's range, then that the values fit together.
    pub fn resolve(l: Layer) -> Result<Config, ConfigError> {
        let cfg = Config::with_defaults(l);
        cfg.check_ranges()?;
        cfg.check_windows()?;
        cfg.check_names()?;
        Ok(cfg)
    }

    /// Every duration key with its value in force and its allowed range.
    pub fn durations(&self) -> Vec<(&'static str, Duration, Limit)> {
        let h = &self.health;
        let mut keys = vec![
            ("grace_period", self.grace_period, GRACE_PERIOD),
            ("safety_margin", self.safety_margin, SAFETY_MARGIN),
            ("prestop_delay", self.prestop_delay, PRESTOP_DELAY),
            ("cleanup_timeout", self.cleanup_timeout, CLEANUP_TIMEOUT),
            (
                "control.connect_timeout",
                self.control_connect_timeout,
                CONNECT_TIMEOUT,
            ),
            ("health.poll_interval", h.poll_interval, POLL_INTERVAL),
            (
                "health.liveness_timeout",
                h.liveness_timeout,
                LIVENESS_TIMEOUT,
            ),
            (
                "health.propagation_margin",
                h.propagation_margin,
                PROPAGATION_MARGIN,
            ),
        ];
        // Step 1's budget is prestop_delay, above.
        for (step, budget) in STEPS.iter().zip(self.budgets).skip(1) {
            keys.push((step.config_key, budget, STEP_BUDGET));
        }
        keys
    }

    /// Each value within its key's range (a huge one would overflow a deadline and abort PID 1).
    fn check_ranges(&self) -> Result<(), ConfigError> {
        for (key, value, limit) in self.durations() {
            if value < limit.min || value > limit.max {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{} is out of range (allowed {} to {}): {}",
                        humantime::format_duration(value),
                        show(limit.min),
                        show(limit.max),
                        limit.why
                    ),
                ));
            }
        }
        let n = self.health.observed_probes;
        if n > MAX_OBSERVED_PROBES {
            return Err(ConfigError::invalid(
                "health.observed_probes",
                format!(
                    "{n} is out of range (allowed 0 to {MAX_OBSERVED_PROBES}): kubelet probes at most once a second, and the preStop delay ends the wait anyway"
                ),
            ));
        }
        Ok(())
    }

    /// The safety margin and the preStop delay leave time to stop.
    fn check_windows(&self) -> Result<(), ConfigError> {
        let h = |d: Duration| humantime::format_duration(d).to_string();
        if self.safety_margin >= self.grace_period {
            return Err(ConfigError::invalid(
                "safety_margin",
                format!(
                    "{} leaves no time to stop within grace_period {}: make it smaller than grace_period",
                    h(self.safety_margin),
                    h(self.grace_period)
                ),
            ));
        }
        let window = self.stop_window();
        if self.prestop_delay >= window {
            return Err(ConfigError::invalid(
                "prestop_delay",
                format!(
                    "{} uses the whole stop window ({} = grace_period - safety_margin): make it shorter so the app has time to stop",
                    h(self.prestop_delay),
                    h(window)
                ),
            ));
        }
        Ok(())
    }

    /// The program name, the addresses and the environment names are usable.
    fn check_names(&self) -> Result<(), ConfigError> {
        if self.command.first().is_some_and(|c| c.is_empty()) {
            return Err(ConfigError::invalid("command", "the program name is empty"));
        }
        if let (Some(h), Some(m)) = (self.health.address, self.metrics_address)
            && h == m
        {
            return Err(ConfigError::invalid(
                "metrics.address",
                format!("{m} is also health.address: give them different ports"),
            ));
        }
        if let Some(bad) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(ConfigError::invalid(
                "env",
                format!("'{bad}' is not a valid variable name"),
            ));
        }
        Ok(())
    }

    /// The layers with defaults filled in; nothing checked yet.
    fn with_defaults(l: Layer) -> Config {
        let prestop_delay = dur(l.prestop_delay, STEPS[0].default_budget);
        let mut budgets = [Duration::ZERO; 9];
        for (i, step) in STEPS.iter().enumerate() {
            budgets[i] = match step.substep {
                None => prestop_delay,
                Some(sub) => dur(l.steps.get(sub), step.default_budget),
            };
        }
        let metrics_address = l.metrics.enabled.unwrap_or(true).then(|| {
            l.metrics
                .address
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9090)))
        });
        Config {
            command: l.command.unwrap_or_default(),
            grace_period: dur(l.grace_period, Duration::from_secs(30)),
            safety_margin: dur(l.safety_margin, Duration::from_secs(2)),
            prestop_delay,
            stop_signal: l.stop_signal.unwrap_or(Sig::TERM),
            stop_exit_code: l.stop_exit_code.unwrap_or(StopExitCode::Zero),
            forward_to: l.forward_to.unwrap_or(ForwardTo::Child),
            cleanup_timeout: dur(l.cleanup_timeout, Duration::from_secs(2)),
            termination_log: match l.termination_log {
                None => Some(PathBuf::from("/dev/termination-log")),
                some => non_empty(some),
            },
            user: non_blank(l.user),
            group: non_blank(l.group),
            workdir: non_empty(l.workdir),
            log_format: l.log_format.unwrap_or(LogFormat::Auto),
            log_level: l.log_level.map(|l| l.0).unwrap_or(LevelFilter::INFO),
            admin_socket_explicit: l.admin_socket.is_some(),
            admin_socket: match l.admin_socket {
                None => Some(PathBuf::from("/run/quiesce/admin.sock")),
                some => non_empty(some),
            },
            env: l.env.unwrap_or_default(),
            rewrite: l.signals.rewrite.unwrap_or_default(),
            control_socket: non_empty(l.control.socket),
            control_connect_timeout: dur(l.control.connect_timeout, Duration::from_secs(60)),
            budgets,
            health: HealthConfig::with_defaults(l.health),
            metrics_address,
        }
    }

    /// The overall stop window: shutdown start + this = the moment the supervisor must be done.
    pub fn stop_window(&self) -> Duration {
        self.grace_period - self.safety_margin
    }

    /// The one place the mode is decided: a control socket makes it control mode.
    pub fn mode(&self) -> Mode {
        if self.control_socket.is_some() {
            Mode::Control
        } else {
            Mode::Signal
        }
    }
}

/// Signal mode (a drop-in init: the stop signal, then the deadline) or control mode (the nine steps over the
/// app's control socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Signal,
    Control,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Signal => "signal",
            Mode::Control => "control",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::resolve(parse_toml(Path::new("q.toml"), text)?)
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::resolve(Layer::default()).expect("defaults are valid");
        assert_eq!(c.grace_period, Duration::from_secs(30));
        assert_eq!(c.stop_window(), Duration::from_secs(28));
        assert_eq!(c.stop_signal, Sig::TERM);
        assert_eq!(
            c.health.address,
            Some("0.0.0.0:50051".parse().expect("addr"))
        );
        assert_eq!(
            c.termination_log.as_deref(),
            Some(Path::new("/dev/termination-log"))
        );
        assert!(c.control_socket.is_none());
    }

    #[test]
    fn file_values_and_tables() {
        let c = parse(
            "grace_period = \"45s\"\nstop_signal = \"QUIT\"\n[env]\nA = \"1\"\n[signals]\nrewrite = { SIGHUP = \"SIGUSR1\" }\n[steps]\nclose_db = \"500ms\"\n[health]\nenabled = false\n",
        )
        .expect("valid");
        assert_eq!(c.grace_period, Duration::from_secs(45));
        assert_eq!(c.stop_signal, Sig(libc::SIGQUIT));
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(c.rewrite.apply(Sig(libc::SIGHUP)), Sig(libc::SIGUSR1));
        assert_eq!(c.budgets[8], Duration::from_millis(500));
        assert!(c.health.address.is_none());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse("grace_period = \"5s\"\n\ngrase = 1\n").expect_err("unknown key");
        let s = e.to_string();
        assert!(s.starts_with("q.toml line 3:"), "{s}");
        assert!(s.contains("grase"), "{s}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let s = parse("stop_signal = \"TERM\"\nsafety_margin = \"2 parsecs\"\n")
            .expect_err("bad")
            .to_string();
        assert!(s.starts_with("q.toml line 2: safety_margin:"), "{s}");
        assert!(s.contains("such as 5s"), "{s}");
        let s = parse("[health]\naddress = \"nowhere\"\n")
            .expect_err("bad")
            .to_string();
        assert!(s.contains("line 2") && s.contains("address"), "{s}");
        let s = parse("stop_signal = \"SIGBOGUS\"\n")
            .expect_err("bad")
            .to_string();
        assert!(s.contains("unknown signal 'SIGBOGUS'"), "{s}");
    }

    #[test]
    fn windows_must_fit() {
        let s = parse("grace_period = \"5s\"\nsafety_margin = \"5s\"\n")
            .expect_err("bad")
            .to_string();
        assert!(s.starts_with("safety_margin:"), "{s}");
        let s = parse("grace_period = \"10s\"\nprestop_delay = \"9s\"\n")
            .expect_err("bad")
            .to_string();
        assert!(s.starts_with("prestop_delay:"), "{s}");
    }

    /// `a.b` = `"v"` as TOML.
    fn toml_line(key: &str, value: &str) -> String {
        match key.split_once('.') {
            Some((table, name)) => format!("[{table}]\n{name} = \"{value}\"\n"),
            None => format!("{key} = \"{value}\"\n"),
        }
    }

    #[test]
    fn every_duration_key_is_refused_outside_its_range() {
        let keys = Config::resolve(Layer::default())
            .expect("defaults")
            .durations();
        assert_eq!(
            keys.len(),
            8 + 8,
            "the top-level and health keys, and steps 2-9"
        );
        let ns = Duration::from_nanos(1);
        for (key, _, limit) in keys {
            let below = limit.min.checked_sub(ns);
            for value in below.into_iter().chain([limit.max + ns]) {
                let text = humantime::format_duration(value).to_string();
                let e = parse(&toml_line(key, &text)).expect_err(key).to_string();
                let want = format!(
                    "{key}: {text} is out of range (allowed {} to {}): ",
                    show(limit.min),
                    show(limit.max)
                );
                assert!(e.starts_with(&want), "{e}");
            }
        }
        let s = parse("[health]\nobserved_probes = 101\n")
            .expect_err("too many")
            .to_string();
        assert!(
            s.starts_with("health.observed_probes: 101 is out of range (allowed 0 to 100)"),
            "{s}"
        );
    }

    #[test]
    fn range_edges_are_accepted() {
        // Every duration key at the same edge of its range, one TOML table per section.
        let all = |pick: fn(&Limit) -> Duration| -> String {
            let c = Config::resolve(Layer::default()).expect("defaults");
            let mut tables: BTreeMap<&str, String> = BTreeMap::new();
            for (key, _, limit) in c.durations() {
                let (table, name) = key.split_once('.').unwrap_or(("", key));
                let value = humantime::format_duration(pick(&limit));
                *tables.entry(table).or_default() += &format!("{name} = \"{value}\"\n");
            }
            tables
                .iter()
                .map(|(t, body)| match *t {
                    "" => body.clone(),
                    t => format!("[{t}]\n{body}"),
                })
                .collect()
        };
        let lowest = parse(&all(|l| l.min)).expect("every key at its minimum");
        assert_eq!(lowest.grace_period, Duration::from_secs(1));
        assert_eq!(lowest.health.poll_interval, Duration::from_millis(50));
        let highest = parse(&all(|l| l.max)).expect("every key at its maximum");
        assert_eq!(highest.grace_period, Duration::from_secs(24 * 3600));
        assert_eq!(highest.budgets[8], HOUR);
        let c = parse("[health]\nobserved_probes = 100\n").expect("at the maximum");
        assert_eq!(c.health.observed_probes, 100);
    }

    #[test]
    fn higher_layer_wins_key_by_key() {
        let file = parse_toml(
            Path::new("f"),
            "grace_period = \"40s\"\nsafety_margin = \"3s\"\n",
        )
        .expect("ok");
        let flags = Layer {
            grace_period: Some(Dur(Duration::from_secs(20))),
            ..Layer::default()
        };
        let c = Config::resolve(flags.merge(file)).expect("valid");
        assert_eq!(c.grace_period, Duration::from_secs(20));
        assert_eq!(c.safety_margin, Duration::from_secs(3));
    }
}
