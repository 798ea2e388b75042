//! What the fixture programs share: they never outlive the process that started them.
//!
//! A test that kills its supervisor (or panics, or times out) must not leave the fixture running,
//! reparented to the host's init. Each fixture program calls [`die_with_parent`] first thing.

use std::time::Duration;

use nix::sys::signal::Signal;

/// A PID 1 that started this long before us did not start us (an init that runs a fixture as
/// its command starts it at once): it adopted us.
const ADOPTED_AFTER: Duration = Duration::from_secs(10);

/// Has the kernel SIGKILL this process when its parent dies (`PR_SET_PDEATHSIG`). Call it first
/// in `main`, before any thread starts (the signal follows the death of the parent *thread* that
/// forked us; the supervisor and tini fork from their main thread).
///
/// The parent may have died between its fork and this call; we would then already have been
/// adopted and the signal would never come. So after setting it we look at our parent: PID 1 that
/// started well before us (the host's or container's init, see [`ADOPTED_AFTER`]) means we were
/// adopted, and we kill ourselves the way the signal would have. A PID 1 that started just
/// before us is the init that started us (the PID-namespace tests; its death takes the whole
/// namespace with it). Adoption by a subreaper other than PID 1 cannot be told apart from a
/// parent that started us and is not caught.
pub fn die_with_parent(program: &str) {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("{program}: cannot set a parent-death signal: {e}");
        return;
    }
    if nix::unistd::getppid().as_raw() == 1 && adopted_by_init() {
        eprintln!("{program}: the process that started us is gone (adopted by PID 1); exiting");
        let _ = nix::sys::signal::raise(Signal::SIGKILL);
        std::process::exit(137);
    }
}

/// After a `fork`: like [`die_with_parent`], for a child that knows its parent's pid.
pub fn die_with(parent: nix::unistd::Pid) {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() != parent {
        let _ = nix::sys::signal::raise(Signal::SIGKILL);
        std::process::exit(137);
    }
}

/// Whether PID 1 started more than [`ADOPTED_AFTER`] before this process.
fn adopted_by_init() -> bool {
    let (Some(ours), Some(init)) = (start_ticks("self"), start_ticks("1")) else {
        return false;
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100);
    ours.saturating_sub(init) > ADOPTED_AFTER.as_secs() * hz
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks after boot.
fn start_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last `)`.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    after.split(' ').nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_are_read_and_init_is_older() {
        let ours = start_ticks("self").expect("our start time");
        let init = start_ticks("1").expect("PID 1's start time");
        assert!(init <= ours, "PID 1 started at {init}, we at {ours}");
    }
}
