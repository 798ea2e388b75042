//! quiesce as a subreaper (not PID 1) in signal mode: the stop, its deadline, leftovers, mask and ids.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn last_log(stderr: &[u8]) -> serde_json::Value {
    json_lines(stderr)
        .pop()
        .expect("at least one JSON log line")
}

/// Runs `testbin sleep` under quiesce with `args`, sends `signals` once the app runs, and returns the exit
/// status and quiesce's stderr.
fn stop_sleeping_app(
    s: &Scratch,
    args: &[&str],
    signals: &[i32],
) -> (std::process::ExitStatus, Vec<u8>) {
    let mut c = quiesce(s);
    c.args(args).arg("--").arg(testbin()).arg("sleep");
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    assert!(
        wait_until(T, || !common::descendants(pid).is_empty()),
        "app never started"
    );
    for sig in signals {
        send(pid, *sig);
    }
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut buf);
        buf
    });
    let status = wait_timeout(&mut child, T);
    (status, reader.join().expect("stderr reader"))
}

#[test]
fn sigterm_stops_the_app_and_exits_zero_with_a_report() {
    let s = Scratch::new();
    let (status, _) = stop_sleeping_app(&s, &[], &[libc::SIGTERM]);
    assert_eq!(status.code(), Some(0));
    let msg =
        std::fs::read_to_string(s.path("termination-log")).expect("termination message written");
    assert!(
        msg.starts_with("quiesce: exit code 0 - stop by SIGTERM: app killed by SIGTERM in time"),
        "{msg}"
    );
    assert!(msg.contains("health-not-serving"), "{msg}");
    assert!(msg.contains("stop-signal"), "{msg}");
    assert!(msg.len() < 4096);
}

#[test]
fn stop_exit_code_signal_keeps_143_and_final_log_line_says_so() {
    let s = Scratch::new();
    let (status, buf) = stop_sleeping_app(&s, &["--stop-exit-code", "signal"], &[libc::SIGTERM]);
    assert_eq!(status.code(), Some(143));
    let last = last_log(&buf);
    assert_eq!(last["message"], "exiting");
    assert_eq!(last["code"], 143);
    assert!(
        last["reason"]
            .as_str()
            .expect("reason")
            .contains("killed by SIGTERM")
    );
}

#[test]
fn app_ignoring_sigterm_is_killed_before_the_grace_period() {
    let s = Scratch::new();
    let mut c = quiesce(&s);
    c.args(["--grace-period", "3s", "--safety-margin", "1s", "--"])
        .arg(testbin())
        .arg("ignore-sigterm");
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for_line(&mut child, T, |l| l == "ignoring SIGTERM");
    let began = Instant::now();
    send(child.id(), libc::SIGTERM);
    // A second SIGTERM must not restart the sequence (the deadline stays where it was).
    send(child.id(), libc::SIGTERM);
    let status = wait_timeout(&mut child, Duration::from_secs(3));
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "outlived the grace period: {:?}",
        began.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(137),
        "a forced kill is reported, never hidden"
    );
    let msg = std::fs::read_to_string(s.path("termination-log")).expect("report");
    assert!(msg.contains("stop-signal          timeout"), "{msg}");
    assert!(msg.contains("SIGKILL to the process group"), "{msg}");
}

#[test]
fn second_sigterm_does_not_restart_the_stop() {
    let s = Scratch::new();
    let signals = [libc::SIGTERM, libc::SIGTERM, libc::SIGINT];
    // The stop's narration is DEBUG in signal mode.
    let (status, buf) = stop_sleeping_app(
        &s,
        &["--prestop-delay", "1s", "--log-level", "debug"],
        &signals,
    );
    assert_eq!(status.code(), Some(0));
    let logs = json_lines(&buf);
    let starts = logs
        .iter()
        .filter(|l| l["message"] == "shutdown started")
        .count();
    assert_eq!(starts, 1, "{logs:?}");
    assert!(
        logs.iter()
            .any(|l| l["message"] == "shutdown already under way; not restarting it")
    );
}

#[test]
fn signal_mask_and_ignored_signals_are_restored_like_tini() {
    let s = Scratch::new();
    let run = |init: Vec<std::path::PathBuf>| -> String {
        let mut c = std::process::Command::new(testbin());
        c.args(["block", "SIGUSR1", "--"])
            .args(&init)
            .arg("--")
            .arg(testbin())
            .arg("print-sigmask");
        isolate(&mut c, &s);
        let out = output_timeout(c, T);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ours = run(vec![quiesce_bin()]);
    let theirs = run(vec![tini(), "-s".into()]);
    assert_eq!(ours, theirs);
    let usr1_bit = 1u64 << (libc::SIGUSR1 - 1);
    let blk = ours
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .expect("SigBlk");
    let ign = ours
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .expect("SigIgn");
    assert_eq!(
        u64::from_str_radix(blk.trim(), 16).expect("hex"),
        usr1_bit,
        "inherited mask restored"
    );
    let tty_bits = (1u64 << (libc::SIGTTIN - 1)) | (1u64 << (libc::SIGTTOU - 1));
    let ign = u64::from_str_radix(ign.trim(), 16).expect("hex");
    assert_eq!(
        ign & tty_bits,
        0,
        "SIGTTIN/SIGTTOU back to default (the supervisor itself ignores them)"
    );
}

#[test]
fn orphan_storm_leaves_no_zombie_as_subreaper() {
    let s = Scratch::new();
    let mut c = quiesce(&s);
    c.arg("--")
        .arg(testbin())
        .args(["spawn-orphans", "5000", "sleep"]);
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    wait_for_line(&mut child, T, |l| l == "spawned 5000");
    assert!(
        wait_until(T, || zombies_of(pid) == 0),
        "zombies left: {}",
        zombies_of(pid)
    );
    send(pid as u32, libc::SIGTERM);
    assert_eq!(wait_timeout(&mut child, T).code(), Some(0));
}

fn leftover(stubborn: bool) {
    let s = Scratch::new();
    let mut c = quiesce(&s);
    c.args(["--cleanup-timeout", "500ms", "--"])
        .arg(testbin())
        .arg("leave-daemon");
    if stubborn {
        c.arg("stubborn");
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let line = wait_for_line(&mut child, T, |l| l.starts_with("daemon "));
    let daemon: i32 = line["daemon ".len()..].parse().expect("pid");
    let status = wait_timeout(&mut child, T);
    assert_eq!(status.code(), Some(0), "the app's own exit code");
    assert!(!alive(daemon), "leftover daemon {daemon} still running");
    let msg = std::fs::read_to_string(s.path("termination-log")).expect("report");
    let expect = if stubborn {
        "SIGKILL"
    } else {
        "exited after SIGTERM"
    };
    assert!(msg.contains("cleanup") && msg.contains(expect), "{msg}");
}

#[test]
fn leftover_descendants_get_sigterm() {
    leftover(false);
}

#[test]
fn leftover_descendants_ignoring_sigterm_get_sigkill() {
    leftover(true);
}

#[test]
fn child_runs_as_the_configured_user_with_no_supplementary_groups() {
    let s = Scratch::new();
    let mut c = quiesce(&s);
    c.args(["--user", "nobody", "--group", "nogroup", "--"])
        .arg(testbin())
        .arg("sleep");
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut kids = Vec::new();
    assert!(wait_until(T, || {
        kids = common::descendants(pid);
        !kids.is_empty()
    }));
    let mut status = String::new();
    assert!(wait_until(T, || {
        status = std::fs::read_to_string(format!("/proc/{}/status", kids[0])).unwrap_or_default();
        status.contains("testbin") || status.lines().any(|l| l.starts_with("Uid:\t65534"))
    }));
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), ["65534"; 4], "{status}");
    assert_eq!(field("Gid:"), ["65534"; 4], "{status}");
    assert!(field("Groups:").is_empty(), "{status}");
    send(pid, libc::SIGTERM);
    assert_eq!(wait_timeout(&mut child, T).code(), Some(0));
}

/// The process group of `pid`, from /proc.
fn pgid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    after.split(' ').nth(2)?.parse().ok()
}

#[test]
fn rewrite_map_and_group_forwarding() {
    let s = Scratch::new();
    let member = s.path("member");
    let member_arg = member.to_str().expect("utf-8 path").to_owned();
    // The app forks a second recorder into its process group: with `--forward-to group` it must
    // get the (rewritten) signal as well, not only the app itself.
    let (mut child, read) = start_recorder(
        &s,
        &[
            "--signals-rewrite",
            "SIGHUP=SIGUSR2",
            "--forward-to",
            "group",
        ],
        &["--member", &member_arg],
    );
    let read_member = || std::fs::read_to_string(&member).unwrap_or_default();
    assert!(
        wait_until(T, || read_member().starts_with("ready")),
        "the group member never got ready"
    );
    let tree = descendants(child.id());
    let [app, second] = tree[..] else {
        panic!("expected the app and its group member under quiesce, found {tree:?}");
    };
    assert_eq!(
        pgid_of(app),
        Some(app),
        "the app leads its own process group"
    );
    assert_eq!(
        pgid_of(second),
        Some(app),
        "the member is in the app's group"
    );

    send(child.id(), libc::SIGHUP);
    assert!(
        wait_until(T, || read().contains("SIGUSR2")),
        "rewritten signal not received by the app: {}",
        read()
    );
    assert!(
        wait_until(T, || read_member().contains("SIGUSR2")),
        "rewritten signal not received by the rest of the group: {}",
        read_member()
    );
    assert!(!read().contains("SIGHUP"), "{}", read());
    assert!(!read_member().contains("SIGHUP"), "{}", read_member());
    send(child.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut child, T).code(), Some(0));
    assert!(
        !alive(second),
        "the group member {second} outlived the stop"
    );
}

#[test]
fn on_a_terminal_the_app_gets_its_own_foreground_process_group() {
    let s = Scratch::new();
    // `script` runs the command on a fresh pseudo-terminal, as `docker run -t` would.
    let inner = format!(
        "{} -- {} print-foreground",
        quiesce_bin().display(),
        testbin().display()
    );
    let mut c = std::process::Command::new("script");
    c.args(["-qec", &inner, "/dev/null"]);
    isolate(&mut c, &s);
    let out = output_timeout(c, T);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("foreground="))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.starts_with("foreground=yes"), "{line}");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .map(str::to_string)
    };
    assert_eq!(
        field("pgrp="),
        field("pid="),
        "the app leads its own process group: {line}"
    );
}

#[test]
fn environment_and_working_directory_reach_the_app() {
    let s = Scratch::new();
    let file = s.path("q.toml");
    std::fs::write(&file, "[env]\nFROM_FILE = \"1\"\n").expect("config");
    let mut c = quiesce(&s);
    c.arg("--config").arg(&file).args([
        "--env",
        "FROM_FLAG=two words",
        "--workdir",
        "/tmp",
        "--",
        "/usr/bin/env",
    ]);
    let out = output_timeout(c, T);
    let env = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(env.lines().any(|l| l == "FROM_FILE=1"), "{env}");
    assert!(env.lines().any(|l| l == "FROM_FLAG=two words"), "{env}");
    let mut c = quiesce(&s);
    c.args(["--workdir", "/tmp", "--", "/bin/pwd"]);
    let pwd = output_timeout(c, T);
    assert_eq!(String::from_utf8_lossy(&pwd.stdout).trim(), "/tmp");
}

#[test]
fn the_configured_stop_signal_is_what_the_app_receives() {
    let s = Scratch::new();
    let (mut child, read) = start_recorder(
        &s,
        &[
            "--stop-signal",
            "SIGUSR1",
            "--grace-period",
            "3s",
            "--safety-margin",
            "1s",
        ],
        &[],
    );
    send(child.id(), libc::SIGTERM);
    assert!(wait_until(T, || read().contains("SIGUSR1")), "{}", read());
    // The fixture only exits on SIGTERM, which it never gets: the deadline's SIGKILL ends it.
    assert_eq!(wait_timeout(&mut child, T).code(), Some(137));
    assert!(!read().contains("SIGTERM"), "{}", read());
}

#[test]
fn the_supervisors_own_sigpipe_is_not_forwarded() {
    let s = Scratch::new();
    let rec = s.path("rec");
    let mut c = quiesce(&s);
    c.args([
        "--grace-period",
        "3s",
        "--safety-margin",
        "1s",
        "--log-format",
        "human",
        "--",
    ])
    .arg(testbin())
    .args(["record-signals"])
    .arg(&rec)
    .arg("--stay");
    // Its log pipe's reader goes away (a log collector restarting): the next log line raises SIGPIPE in
    // the supervisor, which the kernel reports as sent by the supervisor itself.
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stderr.take());
    let read = || std::fs::read_to_string(&rec).unwrap_or_default();
    assert!(wait_until(T, || read().starts_with("ready")));
    // SIGTERM makes it log; the app stays, recording everything it gets until the deadline's SIGKILL.
    send(child.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut child, T).code(), Some(137));
    assert!(read().contains("SIGTERM"), "{}", read());
    assert!(
        !read().contains("SIGPIPE"),
        "the supervisor's own SIGPIPE was forwarded: {}",
        read()
    );
}

#[test]
fn sigint_and_sigterm_back_to_back_both_reach_the_app() {
    let s = Scratch::new();
    // The app stops only on SIGTERM; SIGINT arrives first (pending signals are reported in number order).
    let (mut sup, read) = start_recorder(&s, &["--grace-period", "20s"], &[]);
    let began = std::time::Instant::now();
    send(sup.id(), libc::SIGINT);
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(&mut sup, T);
    assert_eq!(status.code(), Some(0), "{}", read());
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "the app waited for the deadline: {}",
        read()
    );
    let got: Vec<String> = read().lines().skip(1).map(String::from).collect();
    assert!(
        got.contains(&"SIGINT".to_string()) && got.contains(&"SIGTERM".to_string()),
        "{got:?}"
    );
}

#[test]
fn a_second_ctrl_c_reaches_the_app() {
    let s = Scratch::new();
    let (mut sup, read) = start_recorder(&s, &["--grace-period", "20s"], &["--stay"]);
    let count = |what: &str| read().lines().filter(|l| *l == what).count();
    send(sup.id(), libc::SIGINT);
    assert!(wait_until(T, || count("SIGINT") == 1), "{}", read());
    send(sup.id(), libc::SIGINT);
    assert!(
        wait_until(T, || count("SIGINT") == 2),
        "the second Ctrl-C was swallowed: {}",
        read()
    );
    sup.kill().expect("kill");
    let _ = sup.wait();
}

#[test]
fn kubelets_sigterm_after_the_prestop_hook_is_not_sent_twice() {
    let s = Scratch::new();
    let (mut sup, read) = start_recorder(
        &s,
        &["--grace-period", "3s", "--safety-margin", "1s"],
        &["--stay"],
    );
    // The hook (here `ctl shutdown`, the same path) makes quiesce send SIGTERM; kubelet's follows.
    let mut c = std::process::Command::new(quiesce_bin());
    c.env_clear()
        .args(["ctl", "shutdown", "--admin-socket"])
        .arg(s.path("admin.sock"));
    assert!(output_timeout(c, T).status.success());
    assert!(
        wait_until(T, || read().lines().any(|l| l == "SIGTERM")),
        "{}",
        read()
    );
    send(sup.id(), libc::SIGTERM);
    // The app ignores it (--stay): SIGKILL at the 2 s deadline ends the run.
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(137));
    let terms = read().lines().filter(|l| *l == "SIGTERM").count();
    assert_eq!(terms, 1, "{}", read());
}

#[test]
fn a_fifo_or_a_symlink_at_the_termination_log_path_never_hangs_or_redirects_pid1() {
    let s = Scratch::new();
    let fifo = s.path("fifo-log");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let target = s.path("precious");
    std::fs::write(&target, "keep").expect("target");
    let link = s.path("link-log");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    for (path, why) in [(&fifo, "FIFO"), (&link, "symbolic link")] {
        let mut c = quiesce(&s);
        c.env("QUIESCE_TERMINATION_LOG", path)
            .args(["--", "/bin/sh", "-c", "exit 3"]);
        let out = output_timeout(c, T);
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no termination message will be written") && err.contains(why),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
}

#[test]
fn out_of_descriptors_the_termination_message_is_still_written() {
    let s = Scratch::new();
    // 24 descriptors: a few more than quiesce needs; idle admin connections take the rest (no TCP port, so
    // no other test can race for it).
    let mut c = std::process::Command::new("prlimit");
    isolate(&mut c, &s);
    die_with_test(&mut c);
    c.arg("--nofile=24:24")
        .arg(quiesce_bin())
        .arg("--")
        .arg(testbin())
        .arg("sleep");
    let log = std::fs::File::create(s.path("log")).expect("log");
    let mut sup = c.stdout(Stdio::null()).stderr(log).spawn().expect("spawn");
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let admin = s.path("admin.sock");
    assert!(wait_until(T, || std::os::unix::net::UnixStream::connect(
        &admin
    )
    .is_ok()));
    let held: Vec<_> = (0..16)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&admin).ok())
        .collect();
    assert!(
        wait_until(T, || fds(sup.id()) >= 24),
        "descriptors never ran out: {} open; quiesce said: {}",
        fds(sup.id()),
        std::fs::read_to_string(s.path("log")).unwrap_or_default()
    );
    send(sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
    drop(held);
    let msg = std::fs::read_to_string(s.path("termination-log")).unwrap_or_default();
    assert!(
        msg.contains("stop by SIGTERM"),
        "no termination message: {msg:?}"
    );
}

/// The TCP sockets `pid` holds open (listening or not), from its descriptors and /proc/net/tcp{,6}.
fn tcp_sockets_of(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(String::from)
        })
        .collect();
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && inodes.iter().any(|i| i == cols[9]) {
                found.push(format!("{table} {}", cols[1]));
            }
        }
    }
    found
}

/// Starts quiesce over `testbin sleep` with `env` (nothing else configured but the scratch paths), returns
/// the TCP sockets it holds once the app runs, then stops it.
fn tcp_sockets_with(env: &[(&str, &str)]) -> Vec<String> {
    let s = Scratch::new();
    let mut c = Command::new(common::quiesce_bin());
    c.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("QUIESCE_ADMIN_SOCKET", s.path("admin.sock"))
        .env("QUIESCE_TERMINATION_LOG", s.path("termination-log"))
        .envs(env.iter().copied())
        .arg("--")
        .arg(testbin())
        .arg("sleep");
    common::die_with_test(&mut c);
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    assert!(
        wait_until(T, || !common::descendants(pid).is_empty()),
        "app never started"
    );
    let found = tcp_sockets_of(pid);
    send(pid, libc::SIGTERM);
    wait_timeout(&mut child, T);
    found
}

#[test]
fn with_no_configuration_it_binds_no_port_and_asked_for_it_binds_exactly_those() {
    assert_eq!(
        tcp_sockets_with(&[]),
        Vec::<String>::new(),
        "no port unless asked"
    );
    // The same look finds the ports once they are asked for (so the empty answer above means something).
    let asked = tcp_sockets_with(&[
        ("QUIESCE_HEALTH_ADDRESS", "127.0.0.1:0"),
        ("QUIESCE_METRICS_ENABLED", "true"),
        ("QUIESCE_METRICS_ADDRESS", "127.0.0.2:0"),
    ]);
    assert_eq!(asked.len(), 2, "{asked:?}");
}

#[test]
fn a_default_run_logs_a_start_line_and_the_exiting_line_only() {
    let s = Scratch::new();
    let (status, buf) = stop_sleeping_app(&s, &[], &[libc::SIGTERM]);
    assert_eq!(status.code(), Some(0));
    let logs = json_lines(&buf);
    let messages: Vec<&str> = logs.iter().filter_map(|l| l["message"].as_str()).collect();
    assert_eq!(messages, ["child started", "exiting"], "{logs:?}");
    assert!(
        logs[0]["command"].is_array(),
        "a list is a JSON array: {}",
        logs[0]
    );
    assert!(
        logs[0]["pid"].is_u64() && logs[1]["code"].is_i64(),
        "{logs:?}"
    );
}

#[test]
fn one_health_transition_is_one_line_listing_the_services_it_changed() {
    let s = Scratch::new();
    let mut c = quiesce(&s);
    c.args([
        "--health-enabled",
        "true",
        "--health-address",
        "127.0.0.1:0",
    ])
    .arg("--")
    .arg(testbin())
    .arg("sleep");
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "health changed"
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    // The first transition, before any stop: every service turns serving, in one line.
    let first = rx.recv_timeout(T).expect("a health line");
    assert_eq!(
        first["serving"],
        serde_json::json!(["overall", "liveness", "readiness", "startup"]),
        "{first}"
    );
    assert_eq!(first["not_serving"], serde_json::json!([]), "{first}");
    send(child.id(), libc::SIGTERM);
    wait_timeout(&mut child, T);
    // Until the reader has seen stderr's end (the sender then drops).
    let rest: Vec<serde_json::Value> = std::iter::from_fn(|| rx.recv_timeout(T).ok()).collect();
    // The stop: readiness and startup go first, liveness once the app is gone; never one line per service.
    assert!((1..=2).contains(&rest.len()), "{rest:?}");
    let down: Vec<&str> = rest
        .iter()
        .flat_map(|c| c["not_serving"].as_array().expect("an array").iter())
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(down.len(), 4, "every service went down once: {rest:?}");
}
