//! Exit status: how the app's end becomes the container's exit code, and the supervisor's own codes.

use std::fmt;

use crate::config::StopExitCode;
use crate::signals::Sig;

/// Codes for the supervisor's own failures: outside the range programs conventionally use for their own
/// errors (1–119), below the shell's 126/127 and the 128+N signal range.
pub mod code {
    /// Bad command line.
    pub const USAGE: i32 = 120;
    /// Bad configuration (file, env or flags).
    pub const CONFIG: i32 = 121;
    /// The child could not be started for a reason other than 126/127.
    pub const SPAWN: i32 = 122;
    /// The user/group drop could not be prepared or applied.
    pub const PRIVILEGE: i32 = 123;
    /// A socket (health, metrics, admin) could not be bound.
    pub const BIND: i32 = 124;
    /// Internal error of the supervisor.
    pub const INTERNAL: i32 = 125;
    /// The command exists but cannot be executed.
    pub const NOT_EXECUTABLE: i32 = 126;
    /// The command was not found.
    pub const NOT_FOUND: i32 = 127;
    /// `quiesce prestop` / `quiesce ctl` could not reach the supervisor (sysexits' EX_UNAVAILABLE).
    pub const UNREACHABLE: i32 = 69;
    /// `quiesce prestop` / `quiesce ctl` reached the supervisor, which refused the request (EX_NOPERM):
    /// another uid than root or the supervisor's own.
    pub const REFUSED: i32 = 77;
}

/// How the main child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(Sig),
}

impl ChildEnd {
    pub fn from_wait(status: nix::sys::wait::WaitStatus) -> Option<ChildEnd> {
        use nix::sys::wait::WaitStatus;
        match status {
            WaitStatus::Exited(_, c) => Some(ChildEnd::Exited(c)),
            WaitStatus::Signaled(_, s, _) => Some(ChildEnd::Signaled(Sig(s as i32))),
            _ => None,
        }
    }

    /// The shell convention, as tini reports it: the code, or 128+N.
    pub fn raw_code(self) -> i32 {
        match self {
            ChildEnd::Exited(c) => c,
            ChildEnd::Signaled(s) => 128 + s.0,
        }
    }
}

impl fmt::Display for ChildEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildEnd::Exited(c) => write!(f, "exited with code {c}"),
            ChildEnd::Signaled(s) => write!(f, "killed by {s}"),
        }
    }
}

/// What the supervisor knows about the stop when the child ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopResult {
    /// Signal the supervisor sent to ask for the stop, if any (signal mode, or the deadline's SIGTERM).
    pub asked_with: Option<Sig>,
    /// The supervisor had to SIGKILL at the deadline.
    pub forced: bool,
}

/// The container's exit code.
///
/// With [`StopExitCode::Zero`], a stop the supervisor started and the app finished in time exits 0 when the
/// app ended the way a well-behaved app does: code 0, death by the signal it was sent, or the `128+N` code a
/// runtime such as the JVM exits with after that signal.
///
/// A stop that reached the overall deadline is never reported as in time: an app that exits 0 after the
/// deadline's SIGTERM gives 143 (128+SIGTERM), the code it would have had, had it died of that signal.
pub fn exit_code(end: ChildEnd, stop: Option<StopResult>, policy: StopExitCode) -> i32 {
    let raw = end.raw_code();
    let Some(stop) = stop else { return raw };
    if stop.forced {
        return if raw == 0 { 128 + libc::SIGTERM } else { raw };
    }
    if policy == StopExitCode::Signal {
        return raw;
    }
    match (end, stop.asked_with) {
        (ChildEnd::Signaled(s), Some(sent)) if s == sent => 0,
        (ChildEnd::Exited(c), Some(sent)) if c == 128 + sent.0 => 0,
        _ => raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZERO: StopExitCode = StopExitCode::Zero;

    fn asked(s: Sig) -> Option<StopResult> {
        Some(StopResult {
            asked_with: Some(s),
            forced: false,
        })
    }

    #[test]
    fn codes_pass_through_without_a_stop() {
        for c in 0..=255 {
            assert_eq!(exit_code(ChildEnd::Exited(c), None, ZERO), c);
        }
        assert_eq!(
            exit_code(ChildEnd::Signaled(Sig(libc::SIGSEGV)), None, ZERO),
            139
        );
        assert_eq!(exit_code(ChildEnd::Signaled(Sig::TERM), None, ZERO), 143);
    }

    #[test]
    fn stop_signal_death_becomes_zero_only_under_policy() {
        assert_eq!(
            exit_code(ChildEnd::Signaled(Sig::TERM), asked(Sig::TERM), ZERO),
            0
        );
        assert_eq!(exit_code(ChildEnd::Exited(143), asked(Sig::TERM), ZERO), 0);
        assert_eq!(
            exit_code(
                ChildEnd::Signaled(Sig::TERM),
                asked(Sig::TERM),
                StopExitCode::Signal
            ),
            143
        );
        // Another signal, or an error code, is still reported.
        assert_eq!(
            exit_code(
                ChildEnd::Signaled(Sig(libc::SIGSEGV)),
                asked(Sig::TERM),
                ZERO
            ),
            139
        );
        assert_eq!(exit_code(ChildEnd::Exited(3), asked(Sig::TERM), ZERO), 3);
    }

    #[test]
    fn forced_kill_is_never_hidden() {
        let forced = Some(StopResult {
            asked_with: Some(Sig::TERM),
            forced: true,
        });
        assert_eq!(exit_code(ChildEnd::Signaled(Sig::KILL), forced, ZERO), 137);
    }

    #[test]
    fn a_stop_that_hit_the_deadline_never_exits_zero() {
        let forced = Some(StopResult {
            asked_with: Some(Sig::TERM),
            forced: true,
        });
        // The app outlived the steps, got the deadline's SIGTERM and then exited 0: not "in time".
        assert_eq!(exit_code(ChildEnd::Exited(0), forced, ZERO), 143);
        assert_eq!(
            exit_code(ChildEnd::Exited(0), forced, StopExitCode::Signal),
            143
        );
        assert_eq!(exit_code(ChildEnd::Exited(4), forced, ZERO), 4);
    }
}
