//! The fixture itself behaves as the process tests assume.

use std::process::Command;

fn testbin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_testbin"))
}

#[test]
fn exit_codes_and_signal_deaths() {
    let s = testbin().args(["exit", "42"]).status().expect("run");
    assert_eq!(s.code(), Some(42));
    let s = testbin().args(["die-by", "SIGUSR1"]).status().expect("run");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&s),
        Some(libc::SIGUSR1)
    );
}

#[test]
fn unknown_mode_is_a_usage_error() {
    let out = testbin().arg("nope").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}
