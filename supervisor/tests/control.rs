//! Control mode end to end: the real supervisor drives the agent-based fixture app through the nine steps.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);
const SUBSTEPS: [&str; 8] = [
    "stop-accepting",
    "drain-in-flight",
    "stop-cron",
    "stop-consumer",
    "stop-poller",
    "close-mq",
    "close-redis",
    "close-db",
];

/// quiesce in control mode over the fixture app, with small budgets (400 ms a step unless the test sets
/// `QUIESCE_STEPS_*` itself) so every run is quick.
fn start(s: &Scratch, quiesce_args: &[&str], app_args: &[&str]) -> Child {
    let mut c = quiesce(s);
    c.arg("--control-socket").arg(s.path("control.sock"));
    c.args(["--control-connect-timeout", "20s"]);
    for k in SUBSTEPS {
        c.env(
            format!("QUIESCE_STEPS_{}", k.to_uppercase().replace('-', "_")),
            "400ms",
        );
    }
    c.args(quiesce_args)
        .arg("--")
        .arg(fixture_app())
        .arg("--event-log")
        .arg(s.path("events"))
        .args(app_args);
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn quiesce")
}

fn wait_connected(s: &Scratch) {
    assert!(
        wait_until(T, || admin_status(s)["control"] == "connected"),
        "the supervisor never connected to the app"
    );
}

/// Waits for the control connection, sends SIGTERM, and returns the exit status and the message.
fn stop(s: &Scratch, sup: &mut Child) -> (std::process::ExitStatus, String) {
    wait_connected(s);
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(sup, T);
    (status, message(s))
}

fn message(s: &Scratch) -> String {
    std::fs::read_to_string(s.path("termination-log")).expect("termination message")
}

/// The outcome column of a step row in the termination message.
fn outcome(msg: &str, step: &str) -> String {
    msg.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(step))
        .and_then(|l| l.split_whitespace().nth(2).map(String::from))
        .unwrap_or_else(|| panic!("no row for {step} in:\n{msg}"))
}

fn verbs(s: &Scratch) -> Vec<String> {
    events(&s.path("events"))
        .into_iter()
        .filter_map(|(_, e)| {
            e.strip_prefix("verb ")
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        })
        .filter(|v| !matches!(v.as_str(), "hello" | "status" | "health"))
        .collect()
}

#[test]
fn full_sequence_runs_in_order_and_readiness_drops_first() {
    let s = Scratch::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut sup = start(
        &s,
        &[
            "--prestop-delay",
            "300ms",
            "--health-enabled",
            "true",
            "--health-address",
            &addr,
        ],
        &["--behave", "drain-in-flight=finish:50"],
    );
    wait_connected(&s);
    // A kubelet-like probe loop; the test timestamps each answer on the shared monotonic clock.
    let mut probe = Command::new(python());
    probe
        .arg(probe_script())
        .args(["poll", &addr, "20", "readiness"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut probe = probe.spawn().expect("probe loop");
    let lines = BufReader::new(probe.stdout.take().expect("stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.lines().map_while(Result::ok) {
            if tx.send((monotonic_ns(), l)).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + T;
    let mut serving = false;
    while !serving && Instant::now() < deadline {
        if let Ok((_, l)) = rx.recv_timeout(T) {
            serving = l == "readiness SERVING";
        }
    }
    assert!(
        serving,
        "kubelet never saw readiness SERVING before the stop"
    );
    send(sup.id(), libc::SIGTERM);
    let mut first_not_serving = None;
    while Instant::now() < deadline {
        if let Ok((t, l)) = rx.recv_timeout(T)
            && l == "readiness NOT_SERVING"
        {
            first_not_serving = Some(t);
            break;
        }
    }
    let status = wait_timeout(&mut sup, T);
    let _ = probe.kill();
    let _ = probe.wait();
    assert_eq!(status.code(), Some(0), "{}", message(&s));
    let seen = first_not_serving.expect("kubelet never saw NOT_SERVING");
    let first_verb = events(&s.path("events"))
        .into_iter()
        .find(|(_, e)| e.starts_with("verb drain"))
        .expect("drain sent")
        .0;
    assert!(
        seen < first_verb,
        "readiness was still SERVING when the first control step was sent"
    );
    assert_eq!(
        verbs(&s),
        [
            "drain",
            "stop-cron",
            "stop-consumer",
            "stop-poller",
            "close"
        ]
    );
    let msg = message(&s);
    let rows: Vec<&str> = msg
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|n| SUBSTEPS.contains(n) || *n == "health-not-serving")
        .collect();
    assert_eq!(
        rows,
        [
            "health-not-serving",
            "stop-accepting",
            "drain-in-flight",
            "stop-cron",
            "stop-consumer",
            "stop-poller",
            "close-mq",
            "close-redis",
            "close-db"
        ],
        "{msg}"
    );
    for step in SUBSTEPS {
        assert_eq!(outcome(&msg, step), "ok", "{msg}");
    }
    assert!(
        msg.starts_with("quiesce: exit code 0 - stop by SIGTERM: app exited with code 0"),
        "{msg}"
    );
}

#[test]
fn a_hang_in_any_step_is_cut_at_its_deadline_and_the_rest_still_run() {
    for hung in SUBSTEPS {
        let s = Scratch::new();
        let mut sup = start(&s, &[], &["--behave", &format!("{hung}=hang")]);
        wait_connected(&s);
        send(sup.id(), libc::SIGTERM);
        let status = wait_timeout(&mut sup, T);
        let msg = message(&s);
        assert_eq!(status.code(), Some(0), "{hung}: {msg}");
        for step in SUBSTEPS {
            let want = if step == hung { "timeout" } else { "ok" };
            assert_eq!(outcome(&msg, step), want, "{hung} hung; {step}:\n{msg}");
        }
        assert_eq!(verbs(&s).len(), 5, "{hung}: every verb still sent");
    }
}

#[test]
fn a_frozen_app_is_killed_before_the_grace_period_and_the_message_names_the_step() {
    let s = Scratch::new();
    let mut sup = start(
        &s,
        &[
            "--grace-period",
            "3s",
            "--safety-margin",
            "1s",
            "--steps-drain-in-flight",
            "10s",
        ],
        &["--behave", "drain-in-flight=freeze"],
    );
    // The frozen step's budget (10 s) is more than the whole 2 s window: it eats everything.
    wait_connected(&s);
    let began = Instant::now();
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(&mut sup, T);
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "outlived the grace period: {took:?}"
    );
    assert_eq!(
        status.code(),
        Some(137),
        "SIGKILL at the deadline is reported"
    );
    let msg = message(&s);
    assert_eq!(outcome(&msg, "drain-in-flight"), "timeout", "{msg}");
    assert!(
        msg.lines()
            .any(|l| l.contains("drain-in-flight") && l.ends_with("<-")),
        "{msg}"
    );
    assert!(msg.contains("SIGKILL to the process group"), "{msg}");
    for later in ["stop-cron", "close-db"] {
        assert_eq!(outcome(&msg, later), "skipped", "{msg}");
    }
}

#[test]
fn an_app_crashing_mid_sequence_skips_the_rest_and_keeps_its_code() {
    let s = Scratch::new();
    let mut sup = start(&s, &[], &["--behave", "stop-consumer=crash:3"]);
    wait_connected(&s);
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(&mut sup, T);
    assert_eq!(status.code(), Some(3));
    let msg = message(&s);
    assert_eq!(outcome(&msg, "stop-cron"), "ok", "{msg}");
    assert_eq!(outcome(&msg, "stop-consumer"), "error", "{msg}");
    assert!(
        msg.contains("app exited with code 3 during this step"),
        "{msg}"
    );
    assert_eq!(outcome(&msg, "stop-poller"), "skipped", "{msg}");
    assert_eq!(outcome(&msg, "close-db"), "skipped", "{msg}");
    assert!(msg.contains("app exited with code 3"), "{msg}");
}

#[test]
fn strangers_on_the_control_socket_change_nothing() {
    let s = Scratch::new();
    let mut sup = start(&s, &[], &["--behave", "stop-cron=finish:200"]);
    wait_connected(&s);
    // Human-inspectable, as documented: socat shows the state.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo status | socat - UNIX-CONNECT:{}",
            s.path("control.sock").display()
        ))
        .output()
        .expect("socat");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status reply");
    assert_eq!(status["ok"], true);
    assert_eq!(status["phase"], "serving");
    let mut conn = UnixStream::connect(s.path("control.sock")).expect("connect");
    conn.set_read_timeout(Some(T)).expect("timeout");
    let mut lines = BufReader::new(conn.try_clone().expect("clone")).lines();
    let mut ask = |line: &[u8]| -> serde_json::Value {
        conn.write_all(line).expect("write");
        serde_json::from_str(&lines.next().expect("reply").expect("line")).expect("json")
    };
    assert_eq!(
        ask(b"hello role=driver\n")["error"],
        "driver_taken",
        "quiesce holds the driver slot"
    );
    assert_eq!(ask(b"drain deadline_ms=10\n")["error"], "not_driver");
    assert_eq!(ask(b"close deadline_ms=10\n")["error"], "not_driver");
    assert_eq!(ask(b"reboot\n")["error"], "unknown_verb");
    assert_eq!(ask(&[0xc3, 0x28, b'\n'])["error"], "invalid_utf8");
    assert_eq!(
        ask(&[b"a".repeat(5000), b"\n".to_vec()].concat())["error"],
        "line_too_long"
    );
    assert_eq!(ask(b"status\n")["next_step"], "drain", "nothing moved");
    let refused = verbs(&s).len();
    drop(conn);
    send(sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
    let msg = message(&s);
    for step in SUBSTEPS {
        assert_eq!(outcome(&msg, step), "ok", "{msg}");
    }
    assert_eq!(
        verbs(&s)[refused..],
        [
            "drain",
            "stop-cron",
            "stop-consumer",
            "stop-poller",
            "close"
        ]
    );
}

#[test]
fn an_app_that_never_says_hello_is_stopped_with_the_signal() {
    let s = Scratch::new();
    let mut c = quiesce(&s);
    c.arg("--control-socket").arg(s.path("control.sock")).args([
        "--control-connect-timeout",
        "300ms",
        "--",
    ]);
    c.arg(testbin()).arg("sleep");
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    assert!(wait_until(T, || admin_status(&s)["control"] == "never connected"));
    send(sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
    let msg = message(&s);
    assert_eq!(outcome(&msg, "drain-in-flight"), "skipped", "{msg}");
    assert!(msg.contains("no control connection"), "{msg}");
}

#[test]
fn the_close_reply_always_arrives_before_the_app_exits() {
    // The app exits as soon as `close` finished; the agent must still deliver the reply first.
    for round in 0..10 {
        let s = Scratch::new();
        let mut sup = start(&s, &[], &[]);
        wait_connected(&s);
        send(sup.id(), libc::SIGTERM);
        assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
        let msg = message(&s);
        for step in ["close-mq", "close-redis", "close-db"] {
            assert_eq!(outcome(&msg, step), "ok", "round {round}:\n{msg}");
        }
    }
}

/// quiesce in control mode over `raw_app.py` (an app side written from PROTOCOL.md, scriptable to
/// misbehave in ways the Rust agent never does).
fn start_raw(s: &Scratch, quiesce_args: &[&str], app_args: &[&str]) -> Child {
    start_raw_env(s, quiesce_args, app_args, &[])
}

/// [`start_raw`] with extra environment for quiesce (and so for the app).
fn start_raw_env(
    s: &Scratch,
    quiesce_args: &[&str],
    app_args: &[&str],
    env: &[(&str, &str)],
) -> Child {
    let mut c = quiesce(s);
    c.envs(env.iter().copied());
    c.arg("--control-socket").arg(s.path("control.sock"));
    c.args(["--control-connect-timeout", "20s"])
        .args(quiesce_args)
        .arg("--")
        .arg("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/raw_app.py"))
        .arg(s.path("raw-events"))
        .args(app_args);
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn quiesce")
}

fn raw_events(s: &Scratch) -> Vec<String> {
    std::fs::read_to_string(s.path("raw-events"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn a_reply_that_is_not_json_closes_the_connection_then_the_verb_is_resent_once() {
    let s = Scratch::new();
    let mut sup = start_raw(&s, &[], &["--garbage-once", "drain"]);
    let (status, msg) = stop(&s, &mut sup);
    let ev = raw_events(&s);
    assert_eq!(status.code(), Some(0), "{msg}\n{ev:?}");
    for step in SUBSTEPS {
        assert_eq!(outcome(&msg, step), "ok", "{msg}\n{ev:?}");
    }
    assert!(ev.iter().any(|e| e == "garbage drain"), "{ev:?}");
    let drains = ev.iter().filter(|e| e.starts_with("verb drain")).count();
    assert_eq!(drains, 2, "sent once more after the garbage: {ev:?}");
    // The old connection is closed before the slot is claimed again: at most one refusal (the app may
    // not have seen the close yet), never a fight of many.
    let refused = ev.iter().filter(|e| e.starts_with("refused")).count();
    assert!(refused <= 1, "{refused} driver_taken refusals: {ev:?}");
    let hellos: Vec<usize> = (0..ev.len())
        .filter(|&i| ev[i].starts_with("hello driver"))
        .collect();
    assert_eq!(hellos.len(), 2, "{ev:?}");
    let first = ev[hellos[0]].rsplit('=').next().expect("conn");
    let eof = ev
        .iter()
        .position(|e| *e == format!("eof conn={first}"))
        .expect("old connection closed");
    assert!(
        eof < hellos[1],
        "old connection still open at the new hello: {ev:?}"
    );
}

#[test]
fn overcommitted_budgets_still_leave_close_a_usable_deadline() {
    for hung in ["stop-accepting", "stop-consumer"] {
        let s = Scratch::new();
        // A 4 s window for 24 s of budgets.
        let mut args = vec!["--grace-period", "5s", "--safety-margin", "1s"];
        let flags: Vec<String> = SUBSTEPS.iter().map(|k| format!("--steps-{k}")).collect();
        for f in &flags {
            args.extend([f.as_str(), "3s"]);
        }
        let mut sup = start(&s, &args, &["--behave", &format!("{hung}=hang")]);
        wait_connected(&s);
        let began = Instant::now();
        send(sup.id(), libc::SIGTERM);
        let status = wait_timeout(&mut sup, T);
        let took = began.elapsed();
        let msg = message(&s);
        assert_eq!(status.code(), Some(0), "{hung}: {msg}");
        assert!(
            took < Duration::from_millis(4200),
            "{hung}: outlived the window: {took:?}"
        );
        assert_eq!(outcome(&msg, hung), "timeout", "{msg}");
        for step in ["close-mq", "close-redis", "close-db"] {
            assert_eq!(outcome(&msg, step), "ok", "{hung}: {msg}");
        }
        let close = events(&s.path("events"))
            .into_iter()
            .find_map(|(_, e)| e.strip_prefix("verb close ").map(String::from))
            .expect("close sent");
        let deadline_ms: u64 = close
            .split_whitespace()
            .find_map(|w| w.strip_prefix("deadline_ms="))
            .and_then(|v| v.parse().ok())
            .expect("deadline_ms");
        // close's 9 s of the 24 s get the same share of the window as everyone else: ~1.4 s.
        assert!(deadline_ms >= 1000, "{hung}: close sent with {close}");
    }
}

#[test]
fn the_forced_stop_ends_at_the_window_not_after_it() {
    let s = Scratch::new();
    // A 4 s window; the app freezes in drain, so only the deadline's SIGTERM and SIGKILL end it.
    let mut sup = start(
        &s,
        &["--grace-period", "6s", "--safety-margin", "2s"],
        &["--behave", "drain-in-flight=freeze"],
    );
    wait_connected(&s);
    let began = Instant::now();
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(&mut sup, T);
    let took = began.elapsed();
    let msg = message(&s);
    assert_eq!(status.code(), Some(137), "{msg}");
    assert!(
        took >= Duration::from_millis(3900) && took <= Duration::from_millis(4200),
        "exited {took:?} after SIGTERM for a 4 s window:\n{msg}"
    );
    assert!(
        msg.contains("SIGTERM, then SIGKILL to the process group"),
        "{msg}"
    );
}

#[test]
fn an_app_that_exits_0_after_the_deadline_sigterm_is_not_in_time() {
    let s = Scratch::new();
    let mut sup = start_raw(
        &s,
        &["--grace-period", "3s", "--safety-margin", "1s"],
        &["--stay-after-close"],
    );
    let (status, msg) = stop(&s, &mut sup);
    assert!(raw_events(&s).iter().any(|e| e == "sigterm"), "{msg}");
    assert_eq!(status.code(), Some(143), "{msg}");
    assert_eq!(outcome(&msg, "app-exit"), "timeout", "{msg}");
    assert!(msg.starts_with("quiesce: exit code 143"), "{msg}");
}

#[test]
fn a_death_inside_a_multi_step_verb_blames_no_finished_step() {
    let s = Scratch::new();
    // stop-accepting finishes, then the app dies in drain-in-flight: one `drain` request for both.
    let mut sup = start(&s, &[], &["--behave", "drain-in-flight=crash:3"]);
    let (status, msg) = stop(&s, &mut sup);
    assert_eq!(status.code(), Some(3), "{msg}");
    let ended = events(&s.path("events"))
        .into_iter()
        .any(|(_, e)| e == "substep stop-accepting end ok");
    assert!(ended, "the fixture finished stop-accepting first");
    for step in ["stop-accepting", "drain-in-flight"] {
        assert_eq!(outcome(&msg, step), "unknown", "{msg}");
    }
    assert!(
        msg.contains("which of its sub-steps had finished is not known"),
        "{msg}"
    );
    assert_eq!(outcome(&msg, "stop-cron"), "skipped", "{msg}");
}

#[test]
fn sigint_without_a_control_connection_asks_the_app_with_sigint_as_signal_mode_does() {
    let s = Scratch::new();
    let sock = s.path("control.sock");
    let sock = sock.to_str().expect("utf-8 path");
    let (mut sup, read) = start_recorder(
        &s,
        &[
            "--control-socket",
            sock,
            "--control-connect-timeout",
            "300ms",
            "--grace-period",
            "3s",
            "--safety-margin",
            "1s",
        ],
        &[],
    );
    assert!(wait_until(T, || admin_status(&s)["control"] == "never connected"));
    send(sup.id(), libc::SIGINT);
    assert!(
        wait_until(T, || read().lines().any(|l| l == "SIGINT")),
        "the app never got SIGINT: {}",
        read()
    );
    let _ = wait_timeout(&mut sup, T);
    assert!(!read().lines().any(|l| l == "SIGTERM"), "{}", read());
}

#[test]
fn an_impostor_listening_first_at_the_control_socket_is_refused_and_never_driven() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    // The socket's directory is writable by everyone, as a Kubernetes emptyDir is.
    let shared = s.path("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    for (p, mode) in [(s.0.path().to_path_buf(), 0o755), (shared.clone(), 0o777)] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let sock = shared.join("control.sock");
    let events = shared.join("impostor-events");
    // Another uid listens there first, with an app side that would happily take every step.
    let mut imp = Command::new("setpriv");
    imp.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        // The id change clears a parent-death signal set before it; setpriv sets this one after it.
        "--pdeathsig",
        "KILL",
        "/usr/bin/python3",
    ])
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/raw_app.py"))
    .arg(&events)
    .env("QUIESCE_CONTROL_SOCKET", &sock)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    die_with_test(&mut imp);
    let mut imp = imp.spawn().expect("impostor");
    let impostor_events = || std::fs::read_to_string(&events).unwrap_or_default();
    assert!(wait_until(T, || impostor_events().contains("listening")));

    let mut c = quiesce(&s);
    c.arg("--control-socket")
        .arg(&sock)
        .args(["--control-connect-timeout", "1s", "--"])
        .arg(testbin())
        .arg("sleep");
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn quiesce");
    assert!(wait_until(T, || admin_status(&s)["control"] == "never connected"));
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(&mut sup, T);
    let _ = imp.kill();
    let _ = imp.wait();
    let mut log = String::new();
    let _ = sup.stderr.take().expect("stderr").read_to_string(&mut log);
    let msg = message(&s);
    assert_eq!(status.code(), Some(0), "{msg}");
    let seen = impostor_events();
    assert!(
        !seen.contains("hello driver"),
        "the impostor was said hello to: {seen}"
    );
    assert!(!seen.contains("verb "), "the impostor was driven: {seen}");
    assert!(msg.contains("no control connection"), "{msg}");
    assert!(
        log.contains("refusing the process listening at the control socket")
            && log.contains("runs as uid 65534"),
        "{log}"
    );
    assert!(log.contains("writable by other users"), "{log}");
}

/// A process frozen by the cgroup v1 freezer: SIGKILL leaves it in D state until it is thawed, like an app
/// stuck in the kernel. Thawed (and so killed) and removed on drop, pass or fail.
struct Frozen(std::path::PathBuf);

impl Frozen {
    fn new(pid: i32) -> Frozen {
        let root = Path::new("/sys/fs/cgroup/freezer");
        assert!(
            root.join("tasks").exists(),
            "this test needs the cgroup v1 freezer at {}",
            root.display()
        );
        let dir = root.join(format!("quiesce-test-{pid}"));
        std::fs::create_dir(&dir).expect("create the freezer cgroup");
        let f = Frozen(dir);
        std::fs::write(f.0.join("cgroup.procs"), pid.to_string()).expect("move the app");
        std::fs::write(f.0.join("freezer.state"), "FROZEN").expect("freeze");
        let state = || std::fs::read_to_string(f.0.join("freezer.state")).unwrap_or_default();
        assert!(wait_until(T, || state().trim() == "FROZEN"), "never froze");
        f
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        let _ = wait_until(T, || std::fs::remove_dir(&self.0).is_ok());
    }
}

#[test]
fn an_app_stuck_in_the_kernel_still_gets_its_report_inside_the_margin() {
    let s = Scratch::new();
    // grace 4 s, margin 2 s: the window ends at 2 s, and quiesce must be gone by 3 s (half the margin).
    let mut sup = start(&s, &["--grace-period", "4s", "--safety-margin", "2s"], &[]);
    wait_connected(&s);
    let pid = admin_status(&s)["child_pid"].as_i64().expect("child pid") as i32;
    let frozen = Frozen::new(pid);
    let began = Instant::now();
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(&mut sup, T);
    let took = began.elapsed();
    drop(frozen);
    let msg = message(&s);
    assert!(
        took <= Duration::from_millis(3150),
        "exited {took:?} after SIGTERM; half the 2 s margin ends at 3 s:\n{msg}"
    );
    assert_eq!(status.code(), Some(137), "{msg}");
    assert!(msg.contains("SIGKILL to the process group"), "{msg}");
    assert!(msg.contains(" cleanup "), "{msg}");
}

#[test]
fn an_app_announcing_thousands_of_services_gets_a_bounded_few() {
    let s = Scratch::new();
    let mut sup = start_raw(&s, &[], &["--services", "40000"]);
    wait_connected(&s);
    let health = admin_status(&s)["health"].clone();
    let n = health.as_object().map_or(0, |m| m.len());
    // liveness, readiness, startup, "" and at most 64 of the app's.
    assert!(n <= 4 + 64, "{n} health services");
    assert!(
        health.get("svc.63").is_some() && health.get("svc.64").is_none(),
        "{health}"
    );
    assert!(health.get("bad name").is_none());
    let (status, msg) = stop(&s, &mut sup);
    assert_eq!(status.code(), Some(0), "{msg}");
}

#[test]
fn an_apps_failure_text_cannot_forge_rows_or_reach_a_terminal_through_logs_or_the_message() {
    let s = Scratch::new();
    let forged = "boom\n 9  close-db             ok  FORGED\u{1b}]0;owned\u{7}\u{1b}[2J";
    let mut c = quiesce(&s);
    c.env("QUIESCE_LOG_FORMAT", "human")
        .arg("--control-socket")
        .arg(s.path("control.sock"))
        .args(["--control-connect-timeout", "20s", "--"])
        .arg(fixture_app())
        .args(["--behave", &format!("stop-cron=fail:{forged}")]);
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn quiesce");
    let (status, msg) = stop(&s, &mut sup);
    let mut log = String::new();
    let _ = std::io::Read::read_to_string(&mut sup.stderr.take().expect("stderr"), &mut log);
    assert_eq!(status.code(), Some(0), "{msg}");
    assert_eq!(outcome(&msg, "stop-cron"), "error", "{msg}");
    for (what, text) in [("message", &msg), ("log", &log)] {
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{what}: {text:?}"
        );
        // The forged text stays inside its own line, after "boom".
        assert!(
            text.lines()
                .filter(|l| l.contains("FORGED"))
                .all(|l| l.contains("boom")),
            "{what} has a forged row: {text}"
        );
        assert!(text.contains("FORGED"), "{what}: {text}");
    }
}

#[test]
fn an_app_that_reports_absurd_durations_cannot_crash_the_supervisor() {
    // 2^64-1 ms per sub-step: the row offsets are clock arithmetic on them.
    let s = Scratch::new();
    let mut sup = start_raw(&s, &[], &["--huge-durations"]);
    let (status, msg) = stop(&s, &mut sup);
    // Nor fill its report with them: no sub-step took longer than its verb, as measured here.
    assert!(!msg.contains("18446744073709551"), "{msg}");
    assert_eq!(status.code(), Some(0), "{msg}");
    for step in SUBSTEPS {
        assert_eq!(outcome(&msg, step), "ok", "{msg}");
    }
}

#[test]
fn a_malformed_extensions_list_in_hello_keeps_control_mode() {
    for ext in ["null", "\"traceparent\"", "[1, {}]"] {
        let s = Scratch::new();
        let mut sup = start_raw(&s, &[], &["--extensions", ext]);
        let (status, msg) = stop(&s, &mut sup);
        assert_eq!(status.code(), Some(0), "{ext}: {msg}");
        for step in SUBSTEPS {
            assert_eq!(
                outcome(&msg, step),
                "ok",
                "{ext}: the nine steps, not the stop signal:\n{msg}"
            );
        }
    }
}

#[test]
fn trace_context_goes_only_to_an_app_that_announced_it_and_a_refusal_drops_only_it() {
    // Traced (the endpoint's collector is down: the export fails after the stop, which is fine here).
    let traced = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")];
    let step_lines = |s: &Scratch| -> Vec<String> {
        raw_events(s)
            .into_iter()
            .filter(|e| e.starts_with("verb "))
            .collect()
    };
    // No `extensions` in hello: never a traceparent.
    let s = Scratch::new();
    let mut sup = start_raw_env(&s, &[], &[], &traced);
    let (status, msg) = stop(&s, &mut sup);
    assert_eq!(status.code(), Some(0), "{msg}");
    let lines = step_lines(&s);
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(
        lines.iter().all(|l| !l.contains("traceparent=")),
        "{lines:?}"
    );
    // Announced: every verb carries one W3C traceparent per sub-step, all in one trace.
    let s = Scratch::new();
    let mut sup = start_raw_env(&s, &[], &["--extensions", "[\"traceparent\"]"], &traced);
    let (status, msg) = stop(&s, &mut sup);
    assert_eq!(status.code(), Some(0), "{msg}");
    let lines = step_lines(&s);
    assert_eq!(lines.len(), 5, "{lines:?}");
    let mut traces = std::collections::BTreeSet::new();
    for l in &lines {
        let tp = l
            .split_whitespace()
            .find_map(|w| w.strip_prefix("traceparent="))
            .unwrap_or_else(|| panic!("no traceparent: {l}"));
        let verb = l.split_whitespace().nth(1).expect("verb");
        let parts: Vec<&str> = tp.split(',').collect();
        let want = match verb {
            "drain" => 2,
            "close" => 3,
            _ => 1,
        };
        assert_eq!(parts.len(), want, "{l}");
        for p in parts {
            let f: Vec<&str> = p.split('-').collect();
            assert_eq!(
                (f[0], f[1].len(), f[2].len(), f[3]),
                ("00", 32, 16, "01"),
                "{l}"
            );
            traces.insert(f[1].to_string());
        }
    }
    assert_eq!(traces.len(), 1, "one trace for the whole stop: {lines:?}");
    // Announced but refused: the verb is sent once more without it (its budgets kept), never again.
    let s = Scratch::new();
    let mut sup = start_raw_env(
        &s,
        &[],
        &["--extensions", "[\"traceparent\"]", "--refuse-traceparent"],
        &traced,
    );
    let (status, msg) = stop(&s, &mut sup);
    assert_eq!(status.code(), Some(0), "{msg}");
    for step in SUBSTEPS {
        assert_eq!(outcome(&msg, step), "ok", "{msg}");
    }
    let lines = step_lines(&s);
    assert_eq!(lines.len(), 6, "drain twice, then one each: {lines:?}");
    assert!(
        lines[0].starts_with("verb drain ") && lines[0].contains("traceparent="),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("verb drain ") && !lines[1].contains("traceparent="),
        "{lines:?}"
    );
    assert!(
        lines[1..].iter().all(|l| l.contains("budgets_ms=")),
        "budgets kept: {lines:?}"
    );
    assert!(
        lines[2..].iter().all(|l| !l.contains("traceparent=")),
        "{lines:?}"
    );
}
