//! The one call that needs `unsafe`: a hook run in the forked child before `exec`, asking the
//! kernel to SIGKILL the child when the kit dies (`PR_SET_PDEATHSIG`). The kit kills each
//! child's process group itself on every normal path; this covers the kit being killed (by a
//! test's hard timeout, or SIGKILL), so an app never outlives the kit that started it. The
//! signal follows the *thread* that forked, so the kit spawns only from its main thread.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::Signal;

/// Makes the child started by `command` die with the kit.
pub fn die_with_kit(command: &mut Command) {
    // SAFETY: the hook only makes the prctl(2) system call, which is async-signal-safe, and
    // touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}
