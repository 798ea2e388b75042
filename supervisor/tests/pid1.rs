//! quiesce as true PID 1 of a fresh PID namespace, side by side with tini: reaping, exit codes, signals.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// The exit code as a shell reports it (128+N for a signal death of the init itself).
fn code_of(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

fn run_pid1(init: &[&std::path::Path], scratch: &Scratch, args: &[&str]) -> i32 {
    let mut argv: Vec<&std::path::Path> = init.to_vec();
    let tb = testbin();
    argv.push(std::path::Path::new("--"));
    argv.push(&tb);
    let extra: Vec<&std::path::Path> = args.iter().map(std::path::Path::new).collect();
    argv.extend(extra);
    let mut c = in_pid_namespace(&argv);
    isolate(&mut c, scratch);
    let out = output_timeout(c, T);
    code_of(out.status)
}

#[test]
fn exit_codes_match_tini_for_every_code_and_signal_death() {
    let s = Scratch::new();
    let q = quiesce_bin();
    let t = tini();
    let mut checked = 0;
    for n in 0..=255 {
        let arg = n.to_string();
        let ours = run_pid1(&[&q], &s, &["exit", &arg]);
        let theirs = run_pid1(&[&t], &s, &["exit", &arg]);
        assert_eq!(ours, n, "exit {n} under quiesce");
        assert_eq!(ours, theirs, "exit {n}: quiesce vs tini");
        checked += 1;
    }
    for sig in ["SIGTERM", "SIGKILL", "SIGSEGV", "SIGUSR1", "SIGABRT"] {
        let ours = run_pid1(&[&q], &s, &["die-by", sig]);
        let theirs = run_pid1(&[&t], &s, &["die-by", sig]);
        assert_eq!(ours, theirs, "die-by {sig}: quiesce vs tini");
        assert!(ours > 128, "die-by {sig} gave {ours}");
    }
    assert_eq!(checked, 256);
}

#[test]
fn orphan_storm_leaves_no_zombie_as_pid1() {
    let s = Scratch::new();
    let q = quiesce_bin();
    let tb = testbin();
    let mut c = in_pid_namespace(&[
        &q,
        std::path::Path::new("--"),
        &tb,
        "spawn-orphans".as_ref(),
        "5000".as_ref(),
        "sleep".as_ref(),
    ]);
    isolate(&mut c, &s);
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let init = ns_init_pid(child.id()) as i32;
    wait_for_line(&mut child, T, |l| l == "spawned 5000");
    // The 5000 grandchildren were orphaned to PID 1, so PID 1 is what reaped them: its own count
    // says they existed and were collected (zero zombies alone would also hold if none ever
    // reached it).
    let mut reaped = 0;
    assert!(
        wait_until(T, || {
            reaped = admin_status(&s)["zombies_reaped"].as_u64().unwrap_or(0);
            reaped >= 5000
        }),
        "PID 1 reaped {reaped} processes, expected the 5000 orphans"
    );
    assert!(
        wait_until(T, || zombies_of(init) == 0),
        "zombies left under PID 1: {}",
        zombies_of(init)
    );
    send(init as u32, libc::SIGTERM);
    let status = wait_timeout(&mut child, T);
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM stop of a sleeping app exits 0"
    );
}

/// Sends every catchable standard signal and two realtime ones to an init running `record-signals`; returns
/// the names the app received. Each probe is followed by SIGRTMAX as a marker: realtime signals are delivered
/// after standard ones, so once the marker is recorded the probe either arrived or was not forwarded.
fn forwarded_by(init_argv: &[&std::path::Path]) -> Vec<String> {
    let s = Scratch::new();
    let rec = s.path("signals");
    let tb = testbin();
    let mut argv: Vec<&std::path::Path> = init_argv.to_vec();
    argv.extend([
        std::path::Path::new("--"),
        &tb,
        "record-signals".as_ref(),
        rec.as_ref(),
        "--stay".as_ref(),
    ]);
    let mut c = in_pid_namespace(&argv);
    isolate(&mut c, &s);
    c.env("QUIESCE_GRACE_PERIOD", "120s");
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let init = ns_init_pid(child.id());
    let read = || std::fs::read_to_string(&rec).unwrap_or_default();
    assert!(
        wait_until(T, || read().starts_with("ready")),
        "fixture not ready"
    );
    let marker = libc::SIGRTMAX();
    let mut probes: Vec<i32> = (1..32)
        .filter(|&n| {
            ![
                libc::SIGKILL,
                libc::SIGSTOP,
                libc::SIGCHLD,
                libc::SIGTERM,
                libc::SIGINT,
            ]
            .contains(&n)
        })
        .collect();
    probes.extend([libc::SIGRTMIN(), libc::SIGRTMIN() + 3]);
    for (i, sig) in probes.iter().enumerate() {
        send(init, *sig);
        send(init, marker);
        let seen = wait_until(T, || {
            read()
                .lines()
                .filter(|l| *l == format!("SIGRTMIN+{}", marker - libc::SIGRTMIN()))
                .count()
                > i
        });
        assert!(seen, "marker after signal {sig} never arrived");
    }
    let _ = child.kill();
    let _ = child.wait();
    let marker_name = format!("SIGRTMIN+{}", marker - libc::SIGRTMIN());
    read()
        .lines()
        .filter(|l| *l != "ready" && *l != marker_name)
        .map(String::from)
        .collect()
}

#[test]
fn forwarded_signal_set_equals_tinis() {
    let ours = forwarded_by(&[&quiesce_bin()]);
    let theirs = forwarded_by(&[&tini()]);
    assert_eq!(ours, theirs);
    for expected in [
        "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGALRM", "SIGPWR", "SIGURG",
        "SIGCONT", "SIGTSTP",
    ] {
        assert!(
            ours.iter().any(|s| s == expected),
            "{expected} not forwarded: {ours:?}"
        );
    }
    assert!(
        !ours.iter().any(|s| s == "SIGTTIN" || s == "SIGSEGV"),
        "{ours:?}"
    );
}

/// A SIGTERM that reaches PID 1 before its handlers are installed is kept, not dropped: quiesce blocks
/// every signal first thing. The config is read from a FIFO, so the test knows quiesce is still before its
/// handlers (blocked in `openat`) when the signal goes out.
#[test]
fn a_sigterm_in_the_first_milliseconds_is_not_lost_as_pid1() {
    let s = Scratch::new();
    let fifo = s.path("config.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let rec = s.path("rec");
    let q = quiesce_bin();
    let tb = testbin();
    let argv: Vec<&std::path::Path> = vec![
        &q,
        std::path::Path::new("--config"),
        &fifo,
        std::path::Path::new("--"),
        &tb,
        std::path::Path::new("record-signals"),
        &rec,
    ];
    let mut c = in_pid_namespace(&argv);
    isolate(&mut c, &s);
    let mut ns = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare");
    let init = ns_init_pid(ns.id());
    // openat is syscall 257 on x86_64: quiesce waits there for a writer on the FIFO.
    let syscall = format!("/proc/{init}/syscall");
    assert!(
        wait_until(T, || std::fs::read_to_string(&syscall)
            .is_ok_and(|l| l.starts_with("257 "))),
        "quiesce never blocked on its config FIFO"
    );
    send(init, libc::SIGTERM);
    std::fs::write(&fifo, "grace_period = \"5s\"\n").expect("write the config");
    let status = wait_timeout(&mut ns, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "the early SIGTERM was lost");
    let msg = std::fs::read_to_string(s.path("termination-log")).expect("termination message");
    assert!(msg.contains("stop by SIGTERM"), "{msg}");
}

/// Started with SIGTERM blocked (an inherited mask), quiesce still stops on SIGTERM; the app gets the
/// inherited mask back.
#[test]
fn an_inherited_blocked_sigterm_still_stops_quiesce() {
    let s = Scratch::new();
    let mut c = Command::new(testbin());
    c.args(["block", "SIGTERM", "--"])
        .arg(quiesce_bin())
        .arg("--")
        .arg(testbin())
        .arg("print-sigmask");
    isolate(&mut c, &s);
    die_with_test(&mut c);
    let out = output_timeout(c, T);
    let mask = String::from_utf8_lossy(&out.stdout).into_owned();
    // SIGTERM is signal 15: bit 14 of SigBlk.
    let blk = mask
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("SigBlk line");
    assert_ne!(
        blk & (1 << 14),
        0,
        "the app lost the inherited mask: {mask}"
    );

    let mut c = Command::new(testbin());
    c.args(["block", "SIGTERM", "--"])
        .arg(quiesce_bin())
        .args(["--grace-period", "3s", "--safety-margin", "1s", "--"])
        .arg(testbin())
        .arg("sleep");
    isolate(&mut c, &s);
    die_with_test(&mut c);
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    assert!(wait_until(T, || admin_status(&s)["phase"] == "running"));
    send(sup.id(), libc::SIGTERM);
    // The app keeps SIGTERM blocked (its inherited mask), so it is killed at the 2 s deadline.
    let status = wait_timeout(&mut sup, Duration::from_secs(10));
    let msg = std::fs::read_to_string(s.path("termination-log")).expect("termination message");
    assert!(
        msg.contains("stop by SIGTERM"),
        "SIGTERM did not stop quiesce: {msg}"
    );
    assert_eq!(status.code(), Some(137), "{msg}");
}
