//! Why the service could not start. Each variant names the dependency or resource, and the
//! message says how to fix it (the command that starts a local dependency, the env var to set).

use std::net::SocketAddr;

use crate::config::ConfigError;

/// A start-up failure; `main` maps each to an exit code (see `exit_code`).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A dependency did not answer within `dependency_wait`.
    #[error(
        "cannot reach {dependency} at {url} ({detail}); start it with `{start_command}` or point {env_var} at a running one"
    )]
    Dependency {
        /// "PostgreSQL", "Redis" or "RabbitMQ".
        dependency: &'static str,
        /// The URL, password redacted.
        url: String,
        /// The client library's error.
        detail: String,
        /// How to start it on a Debian machine.
        start_command: &'static str,
        /// The variable that selects it.
        env_var: &'static str,
    },
    /// The schema migrations failed.
    #[error("cannot apply the database migrations to {url}: {detail}")]
    Migrate {
        /// The URL, password redacted.
        url: String,
        /// sqlx's error.
        detail: String,
    },
    /// The RabbitMQ exchanges/queues could not be declared.
    #[error(
        "cannot declare the RabbitMQ exchanges and queues ({detail}); a queue declared earlier with other arguments must be deleted first (rabbitmqctl delete_queue NAME)"
    )]
    Topology {
        /// lapin's error.
        detail: String,
    },
    /// The control socket (`QUIESCE_CONTROL_SOCKET`) could not be served.
    #[error(
        "cannot serve the control socket: {detail}; check QUIESCE_CONTROL_SOCKET and its directory's permissions"
    )]
    Control {
        /// The agent's error.
        detail: String,
    },
    /// A listen address is taken or not allowed.
    #[error("cannot listen for {what} on {addr}: {source}; choose another address with {env_var}")]
    Bind {
        /// "gRPC" or "metrics".
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
        /// The variable that sets it.
        env_var: &'static str,
    },
}

impl StartError {
    /// The process exit code for this failure (sysexits.h: 78 config, 69 unavailable, 71 OS).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 78,
            Self::Dependency { .. } | Self::Migrate { .. } | Self::Topology { .. } => 69,
            Self::Bind { .. } | Self::Control { .. } => 71,
        }
    }
}
