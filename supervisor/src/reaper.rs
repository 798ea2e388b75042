//! The one reaper: `waitpid(-1)` on every SIGCHLD, and the leftover-process sweep.
//!
//! Nothing else in the process waits for children, so no exit status is ever stolen; the main child's status
//! is handed to the rest of the supervisor from here.

use crate::sys::{Target, send};
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpid};

use crate::exit::ChildEnd;
use crate::signals::Sig;

/// What one sweep of `waitpid(-1, WNOHANG)` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// The main child's end, if it was among them.
    pub main: Option<ChildEnd>,
    /// Processes reaped in this sweep (main child included).
    pub count: u64,
    /// No children at all remain (ECHILD).
    pub none_left: bool,
}

/// Reaps every child that has exited.
pub fn reap(main_pid: i32) -> Reaped {
    let mut out = Reaped::default();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return out,
            Ok(status) => {
                let Some(pid) = status.pid() else { continue };
                if let Some(end) = ChildEnd::from_wait(status) {
                    out.count += 1;
                    if pid.as_raw() == main_pid {
                        out.main = Some(end);
                    }
                }
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => {
                out.none_left = true;
                return out;
            }
            Err(_) => return out,
        }
    }
}

/// Sends `sig` to every process the supervisor is responsible for, other than itself.
///
/// As PID 1 that is everyone in the PID namespace (`kill(-1)`); as a subreaper it is every descendant, found
/// by walking parent links in /proc. Returns how many processes were signalled (as PID 1: whether any were).
pub fn signal_all_descendants(sig: Sig) -> usize {
    let me = getpid().as_raw();
    if me == 1 {
        return usize::from(send(Target::Everyone, sig).is_ok());
    }
    let pids = descendants(me);
    for pid in &pids {
        let _ = send(Target::Process(*pid), sig);
    }
    pids.len()
}

/// Every live descendant of `root`, parents before children.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = read_ppid(pid) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parent_of {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// The parent of a live process (None for a zombie or a pid that is gone).
pub fn read_ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?;
    if state == "Z" {
        return None; // a zombie is already dead; it only needs reaping
    }
    fields.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_of_self_is_parent() {
        let me = std::process::id() as i32;
        assert_eq!(read_ppid(me), Some(nix::unistd::getppid().as_raw()));
    }
}
