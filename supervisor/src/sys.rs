//! The few calls that need `unsafe`: code run in the forked child before `exec`, and signal dispositions.
//!
//! Everything in the `pre_exec` closure must be async-signal-safe: the child of a multi-threaded process
//! may only make raw syscalls until it execs.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, pthread_sigmask, signal};
use nix::unistd::{Gid, Pid, Uid, getpid, getppid, isatty, setgid, setgroups, setuid, tcsetpgrp};

/// What the child does between fork and exec.
#[derive(Clone, Debug)]
pub struct ExecPlan {
    /// The signal mask the supervisor itself inherited; the child gets it back.
    pub mask: SigSet,
    /// Make the child's process group the terminal's foreground group (stdin is a TTY).
    pub foreground: bool,
    /// Drop to these ids, clearing supplementary groups.
    pub ids: Option<(Uid, Gid)>,
    /// Signals that were ignored when the supervisor started (bit N-1 for signal N): the child gets them
    /// ignored again, as under tini. Handlers the supervisor installed since (its own, and the C library's
    /// once threads exist) would otherwise reset them to the default at exec.
    pub ignored: u64,
    /// When the supervisor is not PID 1, its pid: the child gets SIGKILL if the supervisor dies (tini's
    /// `-p SIGKILL`), so an app never outlives a killed supervisor. As PID 1 the kernel does that already.
    pub parent: Option<Pid>,
}

/// Installs the plan as the command's `pre_exec` hook.
pub fn install(cmd: &mut Command, plan: ExecPlan) {
    let hook = move || -> std::io::Result<()> {
        if plan.foreground {
            // Still ignoring SIGTTOU (inherited from the supervisor), so a background group may take the
            // terminal. Errors (no controlling terminal) are ignored, as tini does.
            // SAFETY: fd 0 stays open for the duration of the call; borrowing it allocates nothing
            // (unlike `std::io::stdin()`, which must not be first touched after fork).
            let stdin = unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::STDIN_FILENO) };
            let _ = tcsetpgrp(stdin, getpid());
        }
        // The supervisor ignores these so its terminal never stops it; the app gets the defaults back.
        // SAFETY: setting SIG_DFL installs no handler; async-signal-safe.
        unsafe {
            signal(Signal::SIGTTIN, SigHandler::SigDfl).map_err(std::io::Error::from)?;
            signal(Signal::SIGTTOU, SigHandler::SigDfl).map_err(std::io::Error::from)?;
        }
        if let Some((uid, gid)) = plan.ids {
            setgroups(&[]).map_err(std::io::Error::from)?;
            setgid(gid).map_err(std::io::Error::from)?;
            setuid(uid).map_err(std::io::Error::from)?;
        }
        for sig in 1..=64 {
            if plan.ignored & (1 << (sig - 1)) != 0 && sig != libc::SIGTTIN && sig != libc::SIGTTOU
            {
                let _ = raw_sigaction(sig, Some(libc::SIG_IGN));
            }
        }
        if let Some(parent) = plan.parent {
            // After the id drop: a credential change clears the parent-death signal.
            set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if getppid() != parent {
                // The supervisor died between fork and here: the signal would never come.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&plan.mask), None)
            .map_err(std::io::Error::from)?;
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe syscalls (tcsetpgrp, sigaction, setgroups, setgid, setuid,
    // prctl, getppid, sigprocmask) and allocates nothing.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// The kernel's `struct sigaction` (x86_64 and arm64 layout): the C library's wrapper refuses the two
/// signals it reserves for itself (32 and 33), so the raw system call is used to read and restore those too.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// rt_sigaction(2): reads signal `sig`'s handler, or sets it to `set` (flags, mask and restorer cleared).
fn raw_sigaction(sig: i32, set: Option<libc::sighandler_t>) -> Option<usize> {
    let mut old = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let new = set.map(|h| KernelSigaction {
        handler: h,
        flags: 0,
        restorer: 0,
        mask: 0,
    });
    let new_ptr = new
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const KernelSigaction);
    // SAFETY: both pointers are to live structs of the kernel's layout, the size is the kernel's sigset (8
    // bytes); a raw syscall allocates nothing and is async-signal-safe.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            new_ptr,
            &mut old as *mut KernelSigaction,
            8usize,
        )
    };
    (rc == 0).then_some(old.handler)
}

/// Which signals are ignored now (bit N-1 for signal N). Called first thing, before any handler or thread.
pub fn ignored_now() -> u64 {
    (1..=64)
        .filter(|&sig| raw_sigaction(sig, None) == Some(libc::SIG_IGN))
        .fold(0, |bits, sig| bits | 1 << (sig - 1))
}

/// Ignores SIGTTIN/SIGTTOU in the supervisor (tini does the same) and returns whether stdin is a TTY.
pub fn ignore_tty_signals() -> bool {
    // SAFETY: SIG_IGN installs no handler code.
    unsafe {
        let _ = signal(Signal::SIGTTIN, SigHandler::SigIgn);
        let _ = signal(Signal::SIGTTOU, SigHandler::SigIgn);
    }
    isatty(std::io::stdin()).unwrap_or(false)
}

/// Blocks every signal and returns the mask the process started with (the child gets that one back).
///
/// Called first thing in `main`: until the handlers are installed, a signal stays pending instead of being
/// lost (as PID 1 of a namespace the kernel drops a signal whose action is still the default, but never a
/// blocked one). [`unblock_all`] opens the mask once the handlers are in place, whatever was inherited, so
/// a supervisor started with SIGTERM blocked still stops on SIGTERM.
pub fn block_all() -> SigSet {
    let mut old = SigSet::empty();
    let _ = pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    );
    old
}

/// Restores `mask` (the subcommands that run no child: `ctl`, `prestop`, `check-config`).
pub fn set_mask(mask: &SigSet) {
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
}

/// Unblocks every signal on this thread: the run loop's handlers are installed.
pub fn unblock_all() {
    set_mask(&SigSet::empty());
}

/// Where a signal goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// One process.
    Process(i32),
    /// The process group whose id is this pid (the app's: it is spawned as a group leader).
    Group(i32),
    /// Every process the caller may signal except itself: as PID 1, the whole PID namespace.
    Everyone,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Process(p) => write!(f, "pid {p}"),
            Target::Group(g) => write!(f, "process group {g}"),
            Target::Everyone => f.write_str("every process"),
        }
    }
}

/// The one way the supervisor sends a signal: kill(2) with any number, the realtime range included (which
/// `nix::Signal` cannot name).
pub fn send(target: Target, sig: crate::signals::Sig) -> nix::Result<()> {
    let pid = match target {
        Target::Process(p) => p,
        Target::Group(g) => -g,
        Target::Everyone => -1,
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig.0) };
    nix::errno::Errno::result(rc).map(drop)
}

/// When the first SIGTERM/SIGINT not yet taken by the run loop arrived (CLOCK_MONOTONIC ns; 0: none).
static STOP_SIGNAL_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Stamps the arrival of SIGTERM and SIGINT from inside the signal handler, so the stop's start (and with
/// it every deadline) is the signal's arrival, not the moment a busy run loop got to it.
pub fn stamp_stop_signals() -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the action only reads the clock and does one atomic compare-exchange: async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, || {
                let _ = STOP_SIGNAL_AT.compare_exchange(
                    0,
                    monotonic_ns(),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            })?;
        }
    }
    Ok(())
}

/// How long ago the oldest stop signal not yet taken arrived; clears the stamp.
pub fn take_stop_signal_age() -> Option<std::time::Duration> {
    let at = STOP_SIGNAL_AT.swap(0, std::sync::atomic::Ordering::SeqCst);
    (at != 0).then(|| std::time::Duration::from_nanos(monotonic_ns().saturating_sub(at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_signal_is_stamped_on_arrival_and_taken_once() {
        stamp_stop_signals().expect("register");
        assert_eq!(take_stop_signal_age(), None);
        // SAFETY: raise(3) on our own process; the handler above replaced SIGTERM's default action.
        unsafe { libc::raise(libc::SIGTERM) };
        std::thread::sleep(std::time::Duration::from_millis(20));
        let age = take_stop_signal_age().expect("stamped");
        assert!(age >= std::time::Duration::from_millis(20), "{age:?}");
        assert_eq!(take_stop_signal_age(), None, "taken once");
    }
}
