//! Service configuration: defaults, overridden by an optional TOML file, overridden by the
//! environment / command line — so `order-service` with no arguments runs against the local
//! PostgreSQL, Redis and RabbitMQ, and tests override only what isolates them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// A connection URL that may carry a password: `Debug` and `Display` show it redacted, so a
/// logged config or error never leaks the secret. [`SecretUrl::expose`] gives the real value.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for the client library only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

/// Replaces the password of `scheme://user:password@host/...` with `***`; URLs without one are
/// returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..rest_start],
        &userinfo[..colon],
        &rest[at..]
    )
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines when stderr is not a terminal, human text when it is.
    Auto,
    /// Always JSON lines.
    Json,
    /// Always human text.
    Text,
}

/// The complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL URL; the database is created at start if missing.
    pub database_url: SecretUrl,
    /// Redis URL.
    pub redis_url: SecretUrl,
    /// AMQP URL.
    pub amqp_url: SecretUrl,
    /// gRPC listen address (the supervisor owns 50051, so the default is 8080).
    pub grpc_addr: SocketAddr,
    /// Prometheus `/metrics` listen address; `None` disables the endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Prefix of every exchange and queue name (tests use a random one).
    pub mq_prefix: String,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// How long the outbox poller waits when it found nothing to relay.
    pub poll_interval: Duration,
    /// Most outbox rows claimed per batch.
    pub poll_batch: u32,
    /// How often the expiry job runs.
    pub cron_interval: Duration,
    /// A pending order older than this is expired by the cron job.
    pub expire_after: Duration,
    /// A pending order older than this counts in `saga_stuck_total`.
    pub stuck_after: Duration,
    /// RabbitMQ prefetch (basic.qos) of the payment consumer.
    pub prefetch: u16,
    /// Payment messages handled concurrently.
    pub consumer_concurrency: usize,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// Longest lease of a key's `pending` marker; a request's own deadline (`grpc-timeout`)
    /// shortens it. Bounds how long a marker can outlive a process killed mid-request.
    pub idempotency_lease: Duration,
    /// PostgreSQL pool size.
    pub db_max_connections: u32,
    /// Budget of the local ordered stop (SIGTERM without a supervisor).
    pub shutdown_budget: Duration,
    /// How long to keep retrying a dependency that is down at start before giving up.
    pub dependency_wait: Duration,
    /// Consecutive publish failures that open the outbox circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a half-open trial batch.
    pub breaker_open_for: Duration,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: SecretUrl::new("postgres://postgres@127.0.0.1:5432/orders"),
            redis_url: SecretUrl::new("redis://127.0.0.1:6379"),
            amqp_url: SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9091))),
            mq_prefix: "orders".to_owned(),
            redis_prefix: "order-service:".to_owned(),
            poll_interval: Duration::from_millis(200),
            poll_batch: 500,
            cron_interval: Duration::from_secs(30),
            expire_after: Duration::from_secs(30 * 60),
            stuck_after: Duration::from_secs(5 * 60),
            prefetch: 256,
            consumer_concurrency: 32,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            idempotency_lease: Duration::from_secs(10),
            db_max_connections: 32,
            shutdown_budget: Duration::from_secs(25),
            dependency_wait: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(5),
            log_format: LogFormat::Auto,
        }
    }
}

/// A configuration that cannot be used; the message names the key and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML file is malformed or has an unknown key (the message carries the line).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A key has a value that parses but cannot be used.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key (TOML name; the env var is in the docs and `--help`).
        key: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// Command line; every option also reads its environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "order-service",
    version,
    about = "Reference order service run under quiesce"
)]
pub struct Cli {
    /// Optional TOML file with the same keys as the options below (snake_case).
    #[arg(long, env = "APP_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL [default: postgres://postgres@127.0.0.1:5432/orders].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Redis URL [default: redis://127.0.0.1:6379].
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// AMQP URL [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// gRPC listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "APP_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// /metrics listen address, or `off` [default: 0.0.0.0:9091].
    #[arg(long, env = "APP_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Exchange/queue name prefix [default: orders].
    #[arg(long, env = "APP_MQ_PREFIX")]
    pub mq_prefix: Option<String>,
    /// Redis key prefix [default: order-service:].
    #[arg(long, env = "APP_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Outbox poll interval when idle [default: 200ms].
    #[arg(long, env = "APP_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    pub poll_interval: Option<Duration>,
    /// Outbox rows per batch [default: 500].
    #[arg(long, env = "APP_POLL_BATCH")]
    pub poll_batch: Option<u32>,
    /// Expiry job interval [default: 30s].
    #[arg(long, env = "APP_CRON_INTERVAL", value_parser = humantime::parse_duration)]
    pub cron_interval: Option<Duration>,
    /// Pending orders older than this expire [default: 30m].
    #[arg(long, env = "APP_EXPIRE_AFTER", value_parser = humantime::parse_duration)]
    pub expire_after: Option<Duration>,
    /// Pending orders older than this count as stuck sagas [default: 5m].
    #[arg(long, env = "APP_STUCK_AFTER", value_parser = humantime::parse_duration)]
    pub stuck_after: Option<Duration>,
    /// Consumer prefetch [default: 256].
    #[arg(long, env = "APP_PREFETCH")]
    pub prefetch: Option<u16>,
    /// Payment messages handled concurrently [default: 32].
    #[arg(long, env = "APP_CONSUMER_CONCURRENCY")]
    pub consumer_concurrency: Option<usize>,
    /// Idempotency key lifetime [default: 24h].
    #[arg(long, env = "APP_IDEMPOTENCY_TTL", value_parser = humantime::parse_duration)]
    pub idempotency_ttl: Option<Duration>,
    /// Longest lease of an idempotency key's pending marker [default: 10s].
    #[arg(long, env = "APP_IDEMPOTENCY_LEASE", value_parser = humantime::parse_duration)]
    pub idempotency_lease: Option<Duration>,
    /// PostgreSQL pool size [default: 32].
    #[arg(long, env = "APP_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,
    /// Local ordered-stop budget on SIGTERM without a supervisor [default: 25s].
    #[arg(long, env = "APP_SHUTDOWN_BUDGET", value_parser = humantime::parse_duration)]
    pub shutdown_budget: Option<Duration>,
    /// How long to retry a dependency that is down at start [default: 5s].
    #[arg(long, env = "APP_DEPENDENCY_WAIT", value_parser = humantime::parse_duration)]
    pub dependency_wait: Option<Duration>,
    /// Publish failures in a row that open the circuit breaker [default: 5].
    #[arg(long, env = "APP_BREAKER_FAILURES")]
    pub breaker_failures: Option<u32>,
    /// How long the breaker stays open [default: 5s].
    #[arg(long, env = "APP_BREAKER_OPEN_FOR", value_parser = humantime::parse_duration)]
    pub breaker_open_for: Option<Duration>,
    /// Log format: auto (JSON unless stderr is a terminal), json, text [default: auto].
    #[arg(long, env = "APP_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The TOML file's shape: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    redis_url: Option<String>,
    amqp_url: Option<String>,
    grpc_addr: Option<SocketAddr>,
    metrics_addr: Option<String>,
    mq_prefix: Option<String>,
    redis_prefix: Option<String>,
    #[serde(default, with = "opt_duration")]
    poll_interval: Option<Duration>,
    poll_batch: Option<u32>,
    #[serde(default, with = "opt_duration")]
    cron_interval: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    expire_after: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    stuck_after: Option<Duration>,
    prefetch: Option<u16>,
    consumer_concurrency: Option<usize>,
    #[serde(default, with = "opt_duration")]
    idempotency_ttl: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    idempotency_lease: Option<Duration>,
    db_max_connections: Option<u32>,
    #[serde(default, with = "opt_duration")]
    shutdown_budget: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    dependency_wait: Option<Duration>,
    breaker_failures: Option<u32>,
    #[serde(default, with = "opt_duration")]
    breaker_open_for: Option<Duration>,
    log_format: Option<LogFormat>,
}

/// Human durations ("250ms", "5s") in TOML.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "{e}: expected a duration such as \"250ms\", \"5s\" or \"30m\""
            ))
        })
    }
}

fn parse_metrics_addr(value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|e| ConfigError::Invalid {
        key: "metrics_addr",
        message: format!(
            "`{value}` is not an address ({e}); use host:port such as 0.0.0.0:9091, or `off`"
        ),
    })
}

impl Config {
    /// Reads the command line and environment, then the TOML file they name (if any), and
    /// merges both over the defaults (command line/environment win).
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_cli(Cli::parse())
    }

    /// Builds the configuration from parsed arguments (used by [`Config::load`] and tests).
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = Config::default();
        config.apply_file(file)?;
        config.apply_cli(cli)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_file(&mut self, f: FileConfig) -> Result<(), ConfigError> {
        if let Some(v) = f.database_url {
            self.database_url = SecretUrl::new(v);
        }
        if let Some(v) = f.redis_url {
            self.redis_url = SecretUrl::new(v);
        }
        if let Some(v) = f.amqp_url {
            self.amqp_url = SecretUrl::new(v);
        }
        if let Some(v) = f.grpc_addr {
            self.grpc_addr = v;
        }
        if let Some(v) = f.metrics_addr {
            self.metrics_addr = parse_metrics_addr(&v)?;
        }
        set(&mut self.mq_prefix, f.mq_prefix);
        set(&mut self.redis_prefix, f.redis_prefix);
        set(&mut self.poll_interval, f.poll_interval);
        set(&mut self.poll_batch, f.poll_batch);
        set(&mut self.cron_interval, f.cron_interval);
        set(&mut self.expire_after, f.expire_after);
        set(&mut self.stuck_after, f.stuck_after);
        set(&mut self.prefetch, f.prefetch);
        set(&mut self.consumer_concurrency, f.consumer_concurrency);
        set(&mut self.idempotency_ttl, f.idempotency_ttl);
        set(&mut self.idempotency_lease, f.idempotency_lease);
        set(&mut self.db_max_connections, f.db_max_connections);
        set(&mut self.shutdown_budget, f.shutdown_budget);
        set(&mut self.dependency_wait, f.dependency_wait);
        set(&mut self.breaker_failures, f.breaker_failures);
        set(&mut self.breaker_open_for, f.breaker_open_for);
        set(&mut self.log_format, f.log_format);
        Ok(())
    }

    fn apply_cli(&mut self, c: Cli) -> Result<(), ConfigError> {
        if let Some(v) = c.database_url {
            self.database_url = SecretUrl::new(v);
        }
        if let Some(v) = c.redis_url {
            self.redis_url = SecretUrl::new(v);
        }
        if let Some(v) = c.amqp_url {
            self.amqp_url = SecretUrl::new(v);
        }
        set(&mut self.grpc_addr, c.grpc_addr);
        if let Some(v) = c.metrics_addr {
            self.metrics_addr = parse_metrics_addr(&v)?;
        }
        set(&mut self.mq_prefix, c.mq_prefix);
        set(&mut self.redis_prefix, c.redis_prefix);
        set(&mut self.poll_interval, c.poll_interval);
        set(&mut self.poll_batch, c.poll_batch);
        set(&mut self.cron_interval, c.cron_interval);
        set(&mut self.expire_after, c.expire_after);
        set(&mut self.stuck_after, c.stuck_after);
        set(&mut self.prefetch, c.prefetch);
        set(&mut self.consumer_concurrency, c.consumer_concurrency);
        set(&mut self.idempotency_ttl, c.idempotency_ttl);
        set(&mut self.idempotency_lease, c.idempotency_lease);
        set(&mut self.db_max_connections, c.db_max_connections);
        set(&mut self.shutdown_budget, c.shutdown_budget);
        set(&mut self.dependency_wait, c.dependency_wait);
        set(&mut self.breaker_failures, c.breaker_failures);
        set(&mut self.breaker_open_for, c.breaker_open_for);
        set(&mut self.log_format, c.log_format);
        Ok(())
    }

    /// Checks the values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if self.poll_batch == 0 || self.poll_batch > 10_000 {
            return invalid("poll_batch", "must be between 1 and 10000");
        }
        if self.prefetch == 0 {
            return invalid(
                "prefetch",
                "must be at least 1 (0 would mean unbounded prefetch)",
            );
        }
        if self.consumer_concurrency == 0 {
            return invalid("consumer_concurrency", "must be at least 1");
        }
        if self.db_max_connections < 2 {
            return invalid(
                "db_max_connections",
                "must be at least 2 (the poller holds one connection per batch)",
            );
        }
        if self.poll_interval.is_zero() || self.cron_interval.is_zero() {
            return invalid(
                "poll_interval/cron_interval",
                "must be greater than 0 (e.g. \"200ms\")",
            );
        }
        if self.idempotency_ttl.as_secs() == 0 {
            return invalid("idempotency_ttl", "must be at least 1s");
        }
        if self.idempotency_lease < Duration::from_millis(100)
            || self.idempotency_lease > self.idempotency_ttl
        {
            return invalid(
                "idempotency_lease",
                "must be at least 100ms and at most idempotency_ttl (e.g. \"10s\")",
            );
        }
        if self.breaker_failures == 0 {
            return invalid("breaker_failures", "must be at least 1");
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 100
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !name_ok(&self.mq_prefix) {
            return invalid(
                "mq_prefix",
                "must be 1-100 characters of [A-Za-z0-9._-] (it prefixes exchange and queue names)",
            );
        }
        for (key, url, schemes) in [
            (
                "database_url",
                &self.database_url,
                &["postgres", "postgresql"][..],
            ),
            ("redis_url", &self.redis_url, &["redis", "rediss"][..]),
            ("amqp_url", &self.amqp_url, &["amqp", "amqps"][..]),
        ] {
            let scheme = url.expose().split("://").next().unwrap_or_default();
            if !url.expose().contains("://") || !schemes.contains(&scheme) {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("{url} must start with {}://", schemes.join(":// or ")),
                });
            }
        }
        Ok(())
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/orders"),
            "postgres://postgres@127.0.0.1:5432/orders"
        );
        assert_eq!(
            redact_url("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@h/db?sslmode=require"),
            "postgres://u:***@h/db?sslmode=require"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        let secret = SecretUrl::new("amqp://u:topsecret@h/");
        assert!(!format!("{secret} {secret:?}").contains("topsecret"));
    }

    #[test]
    fn file_then_cli_override_defaults() {
        let dir = std::env::temp_dir().join(format!("order-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "poll_batch = 7\npoll_interval = \"50ms\"\nmq_prefix = \"file\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "order-service",
            "--config",
            path.to_str().unwrap(),
            "--mq-prefix",
            "cli",
        ]);
        let config = Config::from_cli(cli).unwrap();
        assert_eq!(config.poll_batch, 7);
        assert_eq!(config.poll_interval, Duration::from_millis(50));
        assert_eq!(config.mq_prefix, "cli");
        assert_eq!(config.grpc_addr, Config::default().grpc_addr);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_key_and_bad_values_name_the_key() {
        let dir = std::env::temp_dir().join(format!("order-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "poll_batch = 7\npol_interval = \"5s\"\n").unwrap();
        let err = Config::from_cli(Cli::parse_from(["x", "--config", path.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pol_interval") && err.contains("line 2"),
            "{err}"
        );

        std::fs::write(&path, "poll_interval = \"soon\"\n").unwrap();
        let err = Config::from_cli(Cli::parse_from(["x", "--config", path.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("poll_interval") || err.contains("duration"),
            "{err}"
        );

        let err = Config::from_cli(Cli::parse_from(["x", "--poll-batch", "0"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("poll_batch"), "{err}");
        let err = Config::from_cli(Cli::parse_from(["x", "--amqp-url", "http://h/"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("amqp_url"), "{err}");
        let err = Config::from_cli(Cli::parse_from(["x", "--idempotency-lease", "10ms"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("idempotency_lease"), "{err}");
        let config = Config::from_cli(Cli::parse_from(["x", "--metrics-addr", "off"])).unwrap();
        assert_eq!(config.metrics_addr, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
