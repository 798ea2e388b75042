//! Starting the one application process: argv exec (no shell), its own process group, terminal, ids.
//!
//! `std::process::Command` does the fork/exec and reports exec failures through its CLOEXEC pipe. We never
//! wait on the returned handle: the reaper owns every exit status (see the crate docs).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{Gid, Uid};

use crate::exit::code;
use crate::sys::{self, ExecPlan};
use crate::users;

/// Everything needed to start the child.
#[derive(Clone, Debug)]
pub struct SpawnSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub ids: Option<(Uid, Gid)>,
    pub foreground: bool,
    pub mask: nix::sys::signal::SigSet,
    /// Signals ignored when the supervisor started ([`sys::ignored_now`]).
    pub ignored: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(
        "no command to run: pass it after `--` (quiesce -- /app/server --flag) or set `command` in the config file"
    )]
    NoCommand,
    #[error("cannot run '{program}': command not found ({source}); check the path or PATH")]
    NotFound { program: String, source: io::Error },
    #[error(
        "cannot run '{program}': not executable ({source}); check its mode and that it is a program"
    )]
    NotExecutable { program: String, source: io::Error },
    #[error("cannot start '{program}': {source}")]
    Other { program: String, source: io::Error },
    #[error("privilege drop: {0}")]
    Privilege(String),
}

impl SpawnError {
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::NoCommand => code::USAGE,
            SpawnError::NotFound { .. } => code::NOT_FOUND,
            SpawnError::NotExecutable { .. } => code::NOT_EXECUTABLE,
            SpawnError::Other { .. } => code::SPAWN,
            SpawnError::Privilege(_) => code::PRIVILEGE,
        }
    }
}

/// Resolves `user`/`group` (names or numbers) to ids. The group defaults to the user's primary group.
pub fn resolve_ids(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<(Uid, Gid)>, SpawnError> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    // `user = "USER:GROUP"`, as `docker run --user` and Dockerfile `USER` spell it.
    let (user, group) = match user.and_then(|u| u.split_once(':')) {
        None => (user, group),
        Some((u, g)) if group.is_none() => (Some(u), Some(g)),
        Some(_) => {
            return Err(SpawnError::Privilege(format!(
                "user '{}' names a group and `group` is set too: give the group once",
                user.unwrap_or_default()
            )));
        }
    };
    let lookup_user = |u: &str| -> Result<(Uid, Option<Gid>), SpawnError> {
        let passwd = Path::new(users::PASSWD);
        let found = match u.parse::<u32>() {
            // A number needs no file; the file, when it lists it, gives its primary group.
            Ok(n) => Ok(Some(
                users::user_by_id(passwd, n).map_or((Uid::from_raw(n), None), |a| {
                    (Uid::from_raw(a.uid), Some(Gid::from_raw(a.gid)))
                }),
            )),
            Err(_) => users::user_by_name(passwd, u)
                .map(|a| a.map(|a| (Uid::from_raw(a.uid), Some(Gid::from_raw(a.gid))))),
        };
        match found {
            Ok(Some(ids)) => Ok(ids),
            Ok(None) => Err(SpawnError::Privilege(format!(
                "user '{u}' does not exist in {}; use an existing name or a numeric uid",
                users::PASSWD
            ))),
            Err(why) => Err(SpawnError::Privilege(format!(
                "user '{u}': {why}; use a numeric uid, or add the file to the image"
            ))),
        }
    };
    let lookup_group = |g: &str| -> Result<Gid, SpawnError> {
        if let Ok(n) = g.parse::<u32>() {
            return Ok(Gid::from_raw(n));
        }
        match users::group_by_name(Path::new(users::GROUP), g) {
            Ok(Some(gid)) => Ok(Gid::from_raw(gid)),
            Ok(None) => Err(SpawnError::Privilege(format!(
                "group '{g}' does not exist in {}; use an existing name or a numeric gid",
                users::GROUP
            ))),
            Err(why) => Err(SpawnError::Privilege(format!(
                "group '{g}': {why}; use a numeric gid, or add the file to the image"
            ))),
        }
    };
    let (uid, primary) = match user {
        Some(u) => lookup_user(u)?,
        None => (Uid::current(), None),
    };
    let gid = match group {
        Some(g) => lookup_group(g)?,
        None => primary.unwrap_or_else(Gid::current),
    };
    refuse_minus_one(uid, gid)?;
    if !Uid::effective().is_root() && uid == Uid::effective() && gid == Gid::effective() {
        // Already those ids: nothing to drop (and setgroups would need CAP_SETGID).
        return Ok(None);
    }
    if !Uid::effective().is_root() {
        return Err(SpawnError::Privilege(format!(
            "switching to uid {uid} gid {gid} needs root, but the supervisor runs as uid {}; run it as root or drop `user`/`group`",
            Uid::effective()
        )));
    }
    Ok(Some((uid, gid)))
}

/// uid/gid 4294967295 is `(uid_t)-1`, which setuid(2)/setgid(2) take as "leave unchanged" (the kernel then
/// says EINVAL at exec): refused before anything starts.
fn refuse_minus_one(uid: Uid, gid: Gid) -> Result<(), SpawnError> {
    let refuse = |what: &str, n: u32| {
        SpawnError::Privilege(format!(
            "{what} {n} is -1, which set{what}(2) takes as \"leave unchanged\": use another {what}"
        ))
    };
    if uid.as_raw() == u32::MAX {
        return Err(refuse("uid", uid.as_raw()));
    }
    if gid.as_raw() == u32::MAX {
        return Err(refuse("gid", gid.as_raw()));
    }
    Ok(())
}

/// Starts the child and returns its pid. Must be called before the reaper starts calling `waitpid(-1)`:
/// on exec failure `Command::spawn` reaps the failed child itself.
pub fn spawn(spec: &SpawnSpec) -> Result<i32, SpawnError> {
    let (program, args) = spec.argv.split_first().ok_or(SpawnError::NoCommand)?;
    let mut cmd = Command::new(program);
    cmd.args(args).envs(&spec.env).process_group(0);
    if let Some(dir) = &spec.workdir {
        cmd.current_dir(dir);
    }
    sys::install(
        &mut cmd,
        ExecPlan {
            mask: spec.mask,
            ignored: spec.ignored,
            foreground: spec.foreground,
            ids: spec.ids,
            parent: (std::process::id() != 1).then(nix::unistd::getpid),
        },
    );
    match cmd.spawn() {
        Ok(child) => Ok(child.id() as i32),
        Err(source) => {
            let program = program.clone();
            Err(match source.raw_os_error() {
                Some(libc::ENOENT) if spec.workdir.as_ref().is_some_and(|d| !d.is_dir()) => {
                    SpawnError::Other {
                        program,
                        source: io::Error::other(format!(
                            "working directory {} does not exist",
                            spec.workdir
                                .as_ref()
                                .map(|d| d.display().to_string())
                                .unwrap_or_default()
                        )),
                    }
                }
                Some(libc::ENOENT) => SpawnError::NotFound { program, source },
                Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY) => {
                    SpawnError::NotExecutable { program, source }
                }
                Some(libc::EPERM) if spec.ids.is_some() => SpawnError::Privilege(format!(
                    "the kernel refused to switch ids for '{program}': {source}"
                )),
                _ => SpawnError::Other { program, source },
            })
        }
    }
}
