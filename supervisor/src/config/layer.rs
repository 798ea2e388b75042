//! The layers (flags, env, file): one struct per section deriving both clap and serde, so a key is declared
//! once; the TOML file's reading, and the merge of a layer over a lower one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Deserializer};

use super::{ConfigError, Dur, ForwardTo, Level, LogFormat, StopExitCode};
use crate::signals::{Rewrite, Sig};
use quiesce_protocol::wire::{STEPS, SubStep};

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

/// `[steps]`: the budgets of steps 2–9, one per row of the step table ([`quiesce_protocol::wire::STEPS`]).
/// The file keys (`stop_accepting`), flags (`--steps-stop-accepting`) and variables
/// (`QUIESCE_STEPS_STOP_ACCEPTING`) are derived from the rows' config keys, so a step added to the table is
/// configurable everywhere at once.
#[derive(Debug, Default, Clone)]
pub struct StepsLayer([Option<Dur>; APP_STEPS]);

/// Steps 2–9: the rows with a sub-step.
const APP_STEPS: usize = STEPS.len() - 1;

/// The app's rows in table order, with their `[steps]` file key.
fn app_rows() -> impl Iterator<Item = (SubStep, &'static str)> {
    STEPS[1..]
        .iter()
        .zip(KEYS)
        .filter_map(|(s, k)| Some((s.substep?, k)))
}

/// The flag (and clap id) of a `[steps]` key: `stop_accepting` → `steps-stop-accepting`.
fn flag(key: &str) -> String {
    format!("steps-{}", key.replace('_', "-"))
}

impl StepsLayer {
    pub(super) fn get(&self, sub: SubStep) -> Option<Dur> {
        app_rows()
            .position(|(s, _)| s == sub)
            .and_then(|i| self.0[i])
    }

    fn merge(self, lower: StepsLayer) -> StepsLayer {
        StepsLayer(std::array::from_fn(|i| self.0[i].or(lower.0[i])))
    }
}

impl clap::Args for StepsLayer {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        app_rows().fold(cmd, |cmd, (_, key)| {
            cmd.arg(
                clap::Arg::new(flag(key))
                    .long(flag(key))
                    .env(format!("QUIESCE_STEPS_{}", key.to_uppercase()))
                    .value_name("DURATION")
                    .value_parser(|v: &str| v.parse::<Dur>()),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for StepsLayer {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut layer = StepsLayer::default();
        layer.update_from_arg_matches(m)?;
        Ok(layer)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        for (i, (_, key)) in app_rows().enumerate() {
            if let Some(d) = m.get_one::<Dur>(&flag(key)) {
                self.0[i] = Some(*d);
            }
        }
        Ok(())
    }
}

/// The `[steps]` file keys, from the table (`steps.stop_accepting` → `stop_accepting`).
const KEYS: [&str; APP_STEPS] = {
    let mut keys = [""; APP_STEPS];
    let mut i = 0;
    while i < APP_STEPS {
        let (_, key) = STEPS[i + 1].config_key.as_bytes().split_at("steps.".len());
        keys[i] = match std::str::from_utf8(key) {
            Ok(s) => s,
            Err(_) => panic!("config keys are ASCII"),
        };
        i += 1;
    }
    keys
};

/// A `[steps]` key, as its row index; an unknown key fails while the key is read, so the error points at it.
struct Key(usize);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let key = String::deserialize(d)?;
        KEYS.iter()
            .position(|k| *k == key)
            .map(Key)
            .ok_or_else(|| serde::de::Error::unknown_field(&key, &KEYS))
    }
}

impl<'de> Deserialize<'de> for StepsLayer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Table;
        impl<'de> serde::de::Visitor<'de> for Table {
            type Value = StepsLayer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table of step budgets")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StepsLayer, A::Error> {
                let mut layer = StepsLayer::default();
                while let Some(Key(i)) = map.next_key()? {
                    layer.0[i] = Some(map.next_value()?);
                }
                Ok(layer)
            }
        }
        d.deserialize_map(Table)
    }
}

/// `[health]`
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct HealthLayer {
    /// Serve grpc.health.v1 for kubelet's probes (alone: on 0.0.0.0:50051). [default: off unless an address is set]
    #[arg(long = "health-enabled", id = "health-enabled", env = "QUIESCE_HEALTH_ENABLED", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub enabled: Option<bool>,
    /// Probe address; setting it turns health on.
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
    /// Serve Prometheus metrics on /metrics (alone: on 0.0.0.0:9090). [default: off unless an address is set]
    #[arg(long = "metrics-enabled", id = "metrics-enabled", env = "QUIESCE_METRICS_ENABLED", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub enabled: Option<bool>,
    /// Metrics address; setting it turns metrics on.
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
pub(super) fn non_empty(p: Option<PathBuf>) -> Option<PathBuf> {
    p.filter(|p| !matches!(p.to_str(), Some("" | "off" | "none")))
}

pub(super) fn non_blank(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches as _;

    #[test]
    fn every_app_step_is_a_file_key_a_flag_and_a_variable() {
        for (i, (sub, key)) in app_rows().enumerate() {
            let secs = i as u64 + 1;
            let file: StepsLayer =
                toml::from_str(&format!("{key} = \"{secs}s\"\n")).expect("file key");
            assert_eq!(
                file.get(sub),
                Some(Dur(std::time::Duration::from_secs(secs))),
                "{key}"
            );
            let cmd = StepsLayer::augment_args(clap::Command::new("t"));
            let m = cmd
                .try_get_matches_from(["t", &format!("--{}", flag(key)), &format!("{secs}s")])
                .expect("flag");
            let flags = StepsLayer::from_arg_matches(&m).expect("matches");
            assert_eq!(flags.get(sub), file.get(sub), "{key}");
            let arg = StepsLayer::augment_args(clap::Command::new("t"))
                .get_arguments()
                .find(|a| a.get_id() == flag(key).as_str())
                .map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()));
            assert_eq!(
                arg,
                Some(Some(format!("QUIESCE_STEPS_{}", key.to_uppercase())))
            );
        }
        assert_eq!(app_rows().count(), 8);
    }
}
