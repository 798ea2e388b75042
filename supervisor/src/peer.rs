//! Who may answer at the control socket: the app or one of its descendants, running as the app's uid.
//!
//! The socket usually lives in a directory other uids can write (a Kubernetes emptyDir is 0777, and a
//! non-root `user` forces one), so a process that listens there first could otherwise answer `hello` and be
//! driven through all nine steps while the real app gets nothing. The kernel records the listener's pid and
//! uid when it calls `listen`; the supervisor reads them (`SO_PEERCRED`) on every connection it opens and
//! refuses anyone else, then keeps retrying, so the real app is driven as soon as it listens.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;

use tokio::net::unix::UCred;

/// The process allowed at the socket, and the uid it runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub pid: i32,
    pub uid: u32,
}

static APP: OnceLock<Expected> = OnceLock::new();

/// Records the app once it is started (the run loop, right after the spawn).
pub fn set_app(app: Expected) {
    let _ = APP.set(app);
}

/// Whether the listener behind `cred` is the app or a descendant of it, with the app's uid.
pub fn check(cred: &UCred) -> Result<(), String> {
    let Some(app) = APP.get() else {
        return Err("the app has not been started yet".into());
    };
    let Some(pid) = cred.pid() else {
        return Err("the kernel gave no pid for the listener".into());
    };
    if cred.uid() != app.uid {
        return Err(format!(
            "the listener (pid {pid}) runs as uid {}, the app as uid {}",
            cred.uid(),
            app.uid
        ));
    }
    if !descends_from(pid, app.pid) {
        return Err(format!(
            "the listener (pid {pid}) is not the app (pid {}) or one of its descendants",
            app.pid
        ));
    }
    Ok(())
}

/// Walks the parent chain in /proc from `pid` up to `ancestor` (bounded: a chain longer than 64 is refused).
fn descends_from(mut pid: i32, ancestor: i32) -> bool {
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        match crate::reaper::read_ppid(pid) {
            Some(p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}

/// Warns when other users can create files in the socket's directory (a 0777 emptyDir, /tmp): the check
/// above keeps an impostor out, but a directory only the app's user can write is better.
pub fn warn_if_shared_dir(socket: &Path) {
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return;
    };
    if let Ok(m) = std::fs::metadata(dir) {
        let mode = m.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            tracing::warn!(
                directory = %dir.display(),
                mode = format!("{mode:o}"),
                "the control socket's directory is writable by other users: another process could listen \
                 there first (quiesce refuses any listener that is not the app); give it a directory only the \
                 app's user can write"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_the_parent_chain() {
        let me = std::process::id() as i32;
        let parent = crate::reaper::read_ppid(me).expect("ppid");
        assert!(descends_from(me, me));
        assert!(descends_from(me, parent));
        assert!(!descends_from(parent, me));
        assert!(!descends_from(me, -5));
    }
}
