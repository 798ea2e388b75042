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

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s.get(i + 2..i + 3))
            .is_some_and(|state| state != "Z")
    })
}

/// Starts `program args` under a shell, SIGKILLs the shell, and asserts the program dies too.
fn dies_with_its_parent(program: &str, args: &str) {
    let mut shell = Command::new("sh")
        .args([
            "-c",
            &format!("\"$0\" {args} & echo $!; exec sleep 60"),
            program,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sh");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(shell.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("the program's pid");
    let pid: i32 = line.trim().parse().expect("a pid");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.contains(program.rsplit('/').next().unwrap_or(program)))
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{program} never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Let it get past its first instructions (where the parent-death signal is set).
    std::thread::sleep(std::time::Duration::from_millis(200));
    let _ = shell.kill();
    let _ = shell.wait();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let survived = alive(pid);
    if survived {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(!survived, "{program} {args} outlived its killed parent");
}

#[test]
fn fixtures_die_with_the_process_that_started_them() {
    dies_with_its_parent(env!("CARGO_BIN_EXE_testbin"), "sleep");
    dies_with_its_parent(env!("CARGO_BIN_EXE_fixture-app"), "--no-socket");
}
