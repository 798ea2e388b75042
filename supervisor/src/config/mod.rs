//! Configuration: one set of keys, four layers (flags > `QUIESCE_*` env > TOML file > defaults).
//!
//! Each layer struct derives both `clap::Args` and `serde::Deserialize`, so a key is declared once with its
//! flag, its env twin and its TOML name; [`Config::resolve`] merges the layers and checks the result.
//! TOML errors name the file, the line and the key.
//!
//! Files: `values` the value types and their parsers, `layer` the layers and the file, `limits` the
//! allowed range of every duration; here the resolved [`Config`] and the checks that join them.

mod layer;
mod limits;
mod values;

pub use layer::*;
pub use limits::*;
pub use values::*;

use layer::{non_blank, non_empty};
use limits::show;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tracing::level_filters::LevelFilter;

use crate::signals::{Rewrite, Sig};
use crate::steps::STEPS;

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
    pub metrics_why: &'static str,
    /// Whether the shutdown is exported as a trace: from the OpenTelemetry variables of the environment
    /// (set by `cli`, [`crate::trace::Traces::from_env`]), off until then.
    pub traces: crate::trace::Traces,
}

#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// `None` when the health server is turned off (the default: off unless enabled or given an address).
    pub address: Option<SocketAddr>,
    /// Why it is on or off, as `check-config` prints it.
    pub why: &'static str,
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

/// The port rule: like tini, quiesce binds nothing nobody asked for. A server is on when it is enabled
/// (`enabled = true`, at the default port) or given an address, and `enabled = false` turns it off either
/// way. Returns the address to bind and the reason, for `check-config`.
fn serve(
    what: &'static str,
    enabled: Option<bool>,
    address: Option<SocketAddr>,
    default_port: u16,
) -> (Option<SocketAddr>, &'static str) {
    let on =
        |a: Option<SocketAddr>| Some(a.unwrap_or(SocketAddr::from(([0, 0, 0, 0], default_port))));
    let health = what == "health";
    match (enabled, address) {
        (Some(false), _) if health => (None, "off: health.enabled = false"),
        (Some(false), _) => (None, "off: metrics.enabled = false"),
        (Some(true), a) if health => (on(a), "on: health.enabled = true"),
        (Some(true), a) => (on(a), "on: metrics.enabled = true"),
        (None, Some(a)) if health => (Some(a), "on: health.address is set"),
        (None, Some(a)) => (Some(a), "on: metrics.address is set"),
        (None, None) if health => (
            None,
            "off: not asked for; set health.enabled = true or health.address",
        ),
        (None, None) => (
            None,
            "off: not asked for; set metrics.enabled = true or metrics.address",
        ),
    }
}

fn dur(v: Option<Dur>, default: Duration) -> Duration {
    v.map(|d| d.0).unwrap_or(default)
}

impl HealthConfig {
    fn with_defaults(l: HealthLayer) -> HealthConfig {
        let (address, why) = serve("health", l.enabled, l.address, 50051);
        HealthConfig {
            address,
            why,
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
        let (metrics_address, metrics_why) =
            serve("metrics", l.metrics.enabled, l.metrics.address, 9090);
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
            metrics_why,
            traces: crate::trace::Traces::Off,
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

    /// Whether the stop's narration (its start, each step, the child's end) is logged at INFO: in control
    /// mode. In signal mode it is DEBUG, so a default run logs like tini, a start line and the `exiting`
    /// line whose reason tells the story.
    pub fn narrates_steps(&self) -> bool {
        self.mode() == Mode::Control
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
    use limits::HOUR;
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::resolve(parse_toml(Path::new("q.toml"), text)?)
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::resolve(Layer::default()).expect("defaults are valid");
        assert_eq!(c.grace_period, Duration::from_secs(30));
        assert_eq!(c.stop_window(), Duration::from_secs(28));
        assert_eq!(c.stop_signal, Sig::TERM);
        assert_eq!(c.health.address, None, "no port unless asked");
        assert_eq!(c.metrics_address, None, "no port unless asked");
        assert_eq!(
            c.termination_log.as_deref(),
            Some(Path::new("/dev/termination-log"))
        );
        assert!(c.control_socket.is_none());
    }

    #[test]
    fn a_server_is_on_when_enabled_or_given_an_address_and_off_when_disabled() {
        let at = |a: &str| Some(a.parse::<SocketAddr>().expect("addr"));
        let health = |toml: &str| parse(toml).expect("valid").health.address;
        assert_eq!(health("[health]\nenabled = true\n"), at("0.0.0.0:50051"));
        assert_eq!(
            health("[health]\naddress = \"127.0.0.1:7\"\n"),
            at("127.0.0.1:7")
        );
        assert_eq!(
            health("[health]\nenabled = false\naddress = \"127.0.0.1:7\"\n"),
            None
        );
        let metrics = parse("[metrics]\nenabled = true\n").expect("valid");
        assert_eq!(metrics.metrics_address, at("0.0.0.0:9090"));
        assert_eq!(metrics.metrics_why, "on: metrics.enabled = true");
        assert!(
            parse("")
                .expect("valid")
                .health
                .why
                .contains("set health.enabled = true")
        );
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
