//! A Unix socket file a server owns: bind it, check each peer, remove it at the end.
//!
//! The app's control socket and the supervisor's admin socket follow one rule, so it lives here:
//!
//! - **bind**: a file already at the path is removed only when it is a socket nobody answers on
//!   (a stale one, left by a crash). A socket that answers belongs to another live server and is
//!   refused; anything that is not a socket is refused and never deleted, so a misconfigured
//!   path cannot cost a file. The new file gets the mode asked for.
//! - **peers**: SO_PEERCRED decides. Root and the socket file's owner may connect; with a
//!   group-accessible mode, so may processes whose effective gid is the file's group. The rule
//!   is fixed at bind: widening the file's mode later lets nobody else in.
//! - **remove**: the file's device and inode are remembered at bind, and only that file is
//!   removed at the end, never one someone has put at the path since.
//!
//! Each caller words its own errors (it knows which setting names the path); [`BindError`] says
//! which part of the rule stopped the bind.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};

/// Why [`bind`] did not bind.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A socket at the path answers: another server is listening there.
    #[error("{}: another process is already listening there", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path; it is left alone.
    #[error("{}: a file that is not a socket is there; refusing to remove it", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The file at the path could not be inspected, or it could not be told whether anyone
    /// answers on it.
    #[error("{}: cannot check the existing file: {source}", path.display())]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The stale socket file could not be removed.
    #[error("{}: cannot remove the stale socket file: {source}", path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `bind(2)` failed, or the listener could not be made non-blocking.
    #[error("{}: cannot bind: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The new file's mode could not be set, or the file could not be read back.
    #[error("{}: cannot set mode {mode:o}: {source}", path.display())]
    Mode {
        /// The socket path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// The cause.
        source: io::Error,
    },
}

/// Who may connect: root, the socket file's owner, and (with a group-accessible mode) the file's
/// group. Fixed at bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    uid: u32,
    gid: u32,
    group_access: bool,
}

/// What [`Owner::check`] found out about a peer.
#[derive(Debug)]
pub enum Peer {
    /// Root, the owner, or (with group access) a member of the file's group.
    Allowed,
    /// Anyone else.
    Refused {
        /// The peer's uid.
        uid: u32,
        /// The peer's gid.
        gid: u32,
        /// The peer's pid, when the kernel tells it.
        pid: Option<i32>,
    },
    /// SO_PEERCRED failed, so the peer cannot be judged (and is not let in).
    Unknown(io::Error),
}

impl Owner {
    /// The uid of the socket file's owner.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The group admitted besides root and the owner, if the mode grants group access.
    pub fn group(&self) -> Option<u32> {
        self.group_access.then_some(self.gid)
    }

    /// Whether a peer with `uid` and `gid` may connect.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || uid == self.uid || (self.group_access && gid == self.gid)
    }

    /// Judges the peer of `stream` by its SO_PEERCRED credentials.
    pub fn check(&self, stream: &tokio::net::UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) if self.allows(cred.uid(), cred.gid()) => Peer::Allowed,
            Ok(cred) => Peer::Refused {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            },
            Err(e) => Peer::Unknown(e),
        }
    }
}

/// The socket file [`bind`] created: who may connect, and which file to remove at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    owner: Owner,
}

impl SocketFile {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Who may connect.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Removes the file at the path if it is still the one [`bind`] created; anything put there
    /// since is left alone.
    pub fn remove(&self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds a non-blocking listener at `path` after removing a stale socket file there, and gives
/// the new file `mode` (permission bits only).
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), BindError> {
    let mode = mode & 0o777;
    remove_stale(path)?;
    let bind_error = |source| BindError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let mode_error = |source| BindError::Mode {
        path: path.to_path_buf(),
        mode,
        source,
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(mode_error)?;
    // The file's owner is this process's (fs)uid and its group the one the mode bits grant
    // access to, so the peer check compares against the file itself.
    let meta = fs::symlink_metadata(path).map_err(mode_error)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
        owner: Owner {
            uid: meta.uid(),
            gid: meta.gid(),
            group_access: mode & 0o070 != 0,
        },
    };
    Ok((listener, file))
}

/// Removes the file at `path` only if it is a socket nobody answers on.
fn remove_stale(path: &Path) -> Result<(), BindError> {
    let inspect = |source| BindError::Inspect {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(inspect(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse {
            path: path.to_path_buf(),
        }),
        // Refused: nobody listens. Not found: it went away meanwhile. Anything else (a
        // permission error, say) leaves open whether someone answers, so the file stays.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            match fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a stale socket file");
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(BindError::RemoveStale {
                    path: path.to_path_buf(),
                    source: e,
                }),
            }
        }
        Err(e) => Err(inspect(e)),
    }
}
