//! Why the control socket could not be served, worded for the app's operator: each error names
//! the socket and the setting ([`crate::CONTROL_SOCKET_ENV`]) or the fix.

use std::io;
use std::path::PathBuf;

use crate::CONTROL_SOCKET_ENV;
use crate::socket::BindError;

/// Starting or serving the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Another process answers on the path.
    #[error(
        "control socket {path}: another process is already listening there; stop it, or give this app another path in {CONTROL_SOCKET_ENV}"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A non-socket file is in the way; the agent will not delete it.
    #[error(
        "control socket {path}: a file that is not a socket is in the way; remove it or choose another path"
    )]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The stale socket file could not be checked or removed.
    #[error("control socket {path}: cannot check or remove the stale socket file: {source}")]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `bind(2)` failed.
    #[error(
        "control socket {path}: cannot bind: {source} (the directory must exist and be writable; the path must be under 108 bytes)"
    )]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `chmod(2)` on the new socket failed.
    #[error("control socket {path}: cannot set mode {mode:o}: {source}")]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// The cause.
        source: io::Error,
    },
}

impl From<BindError> for AgentError {
    fn from(error: BindError) -> AgentError {
        match error {
            BindError::InUse { path } => AgentError::InUse { path },
            BindError::NotASocket { path } => AgentError::NotASocket { path },
            BindError::Inspect { path, source } | BindError::RemoveStale { path, source } => {
                AgentError::Stale { path, source }
            }
            BindError::Bind { path, source } => AgentError::Bind { path, source },
            BindError::Mode { path, mode, source } => {
                AgentError::Permissions { path, mode, source }
            }
        }
    }
}
