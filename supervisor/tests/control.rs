//! Control mode end to end: the real supervisor drives the agent-based fixture app through the nine steps.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
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
    while Instant::now() < deadline {
        if let Ok((_, l)) = rx.recv_timeout(T)
            && l == "readiness SERVING"
        {
            break;
        }
    }
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
