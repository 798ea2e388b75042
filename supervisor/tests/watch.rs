//! `quiesce ctl status --watch` against real stops: the rows as they finish, the supervisor's outcome at the
//! end, and no hang when there is no supervisor or it dies mid-watch.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

/// quiesce in control mode over the fixture app, its drain taking `drain_ms`, once it drives the app.
fn start(s: &Scratch, drain_ms: u64) -> Child {
    let mut c = quiesce(s);
    c.arg("--control-socket").arg(s.path("control.sock"));
    c.args(["--control-connect-timeout", "20s"]);
    c.env("QUIESCE_STEPS_DRAIN_IN_FLIGHT", "20s");
    c.arg("--")
        .arg(fixture_app())
        .arg("--behave")
        .arg(format!("drain-in-flight=finish:{drain_ms}"));
    let sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn quiesce");
    assert!(
        wait_until(T, || admin_status(s)["control"] == "connected"),
        "the supervisor never connected to the app"
    );
    sup
}

/// A running `ctl status --watch` with its stdout piped: each line as it arrives, with when it did.
struct Watch {
    child: Child,
    lines: Receiver<(Instant, String)>,
    stderr: ChildStderr,
}

impl Watch {
    fn start(s: &Scratch) -> Watch {
        let mut c = Command::new(quiesce_bin());
        c.env_clear()
            .args(["ctl", "status", "--watch", "--admin-socket"])
            .arg(s.path("admin.sock"));
        die_with_test(&mut c);
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn watch");
        let out = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        });
        Watch {
            child,
            lines,
            stderr,
        }
    }

    /// The next line, within the test's limit.
    fn line(&self) -> (Instant, String) {
        self.lines
            .recv_timeout(T)
            .unwrap_or_else(|_| panic!("no line from the watch within {T:?}"))
    }

    /// Waits (hard limit) for the watch to end by itself: its status, the lines it had left, its stderr.
    fn end(mut self) -> (ExitStatus, Vec<(Instant, String)>, String) {
        let status = wait_timeout(&mut self.child, T);
        let rest = self.lines.iter().collect();
        let mut err = String::new();
        let _ = self.stderr.read_to_string(&mut err);
        (status, rest, err)
    }
}

fn ctl(s: &Scratch, verb: &str) -> std::process::Output {
    let mut c = Command::new(quiesce_bin());
    c.env_clear()
        .args(["ctl", verb, "--admin-socket"])
        .arg(s.path("admin.sock"));
    output_timeout(c, T)
}

/// The index of the first line that starts with `prefix`.
fn position(lines: &[(Instant, String)], prefix: &str) -> usize {
    lines
        .iter()
        .position(|(_, l)| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {lines:#?}"))
}

#[test]
fn watch_follows_a_stop_row_by_row_to_the_supervisors_outcome() {
    let s = Scratch::new();
    let mut sup = start(&s, 800);
    let w = Watch::start(&s);
    let (_, first) = w.line();
    assert!(
        first.starts_with("watching supervisor pid ") && first.ends_with("phase running"),
        "{first}"
    );
    assert!(ctl(&s, "shutdown").status.success());
    let (status, lines, err) = w.end();
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));

    let stopping = position(
        &lines,
        "phase stopping (stop requested by quiesce ctl shutdown)",
    );
    let names = [
        "health-not-serving",
        "stop-accepting",
        "drain-in-flight",
        "stop-cron",
        "stop-consumer",
        "stop-poller",
        "close-mq",
        "close-redis",
        "close-db",
    ];
    let rows: Vec<usize> = (1..=9)
        .map(|n| position(&lines, &format!("step {n} {}: ok, took ", names[n - 1])))
        .collect();
    let exiting = position(&lines, "phase exiting (child exited with code 0)");
    assert!(
        stopping < rows[0] && rows.windows(2).all(|w| w[0] < w[1]) && rows[8] < exiting,
        "out of order: {lines:#?}"
    );
    let shown = |i: usize| lines[i].0;
    // Each step the app runs is shown when it starts, before its row (the supervisor announces both; step 1
    // with no preStop delay ends before anything can look): the 800 ms drain (steps 2 and 3) while it runs.
    for n in 2..=9 {
        let at = position(
            &lines,
            &format!("step {n} {}: running, budget ", names[n - 1]),
        );
        assert!(
            at < rows[n - 1],
            "step {n}'s start after its end: {lines:#?}"
        );
    }
    let drain = position(&lines, "step 3 drain-in-flight: running, budget ");
    assert!(position(&lines, "step 2 stop-accepting: running, budget ") < drain);
    assert!(
        shown(rows[2]).duration_since(shown(drain)) >= Duration::from_millis(500),
        "the drain's start was not shown while it ran: {lines:#?}"
    );
    // Streamed, not printed at the end: step 1's row was shown while the 800 ms drain still ran.
    assert!(
        shown(rows[2]).duration_since(shown(rows[0])) >= Duration::from_millis(500),
        "the rows came together: {lines:#?}"
    );
    let last = &lines.last().expect("lines").1;
    assert_eq!(
        last,
        "supervisor exited: exit code 0 - stop by quiesce ctl shutdown: app exited with code 0"
    );
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(exiting < lines.len() - 1, "{lines:#?}");
}

#[test]
fn watch_without_a_supervisor_fails_clearly() {
    let s = Scratch::new();
    let w = Watch::start(&s);
    let (status, lines, err) = w.end();
    assert_eq!(status.code(), Some(69));
    assert!(lines.is_empty(), "{lines:?}");
    assert!(
        err.contains("cannot reach the supervisor at its admin socket")
            && err.contains("admin.sock"),
        "{err}"
    );
}

#[test]
fn watch_ends_with_the_last_state_when_the_supervisor_is_killed_mid_stop() {
    let s = Scratch::new();
    let mut sup = start(&s, 20_000);
    let app = admin_status(&s)["child_pid"].as_i64().expect("child pid") as i32;
    let w = Watch::start(&s);
    assert!(ctl(&s, "shutdown").status.success());
    // Killed while the drain runs: after the row of step 1, before those of steps 2 and 3 (one verb).
    while !w.line().1.starts_with("step 1 health-not-serving: ok") {}
    let (_, running) = w.line();
    assert!(
        running.starts_with("step 2 stop-accepting: running"),
        "{running}"
    );
    let (_, running) = w.line();
    assert!(
        running.starts_with("step 3 drain-in-flight: running"),
        "{running}"
    );
    let killed = Instant::now();
    send(sup.id(), libc::SIGKILL);
    let (status, lines, err) = w.end();
    let _ = wait_timeout(&mut sup, T);
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "the watch lingered {:?}",
        killed.elapsed()
    );
    assert_eq!(status.code(), Some(69), "{err}");
    assert!(lines.is_empty(), "nothing after the kill: {lines:#?}");
    assert!(
        err.contains("the supervisor went away without telling its outcome")
            && err.contains(
                "last seen: phase stopping, 1 step row, the last step 1 health-not-serving"
            ),
        "{err}"
    );
    // The app follows its supervisor (parent-death signal): nothing is left running.
    assert!(
        wait_until(T, || !alive(app)),
        "the app {app} outlived its supervisor"
    );
}

#[test]
fn a_quiet_watch_outlives_the_idle_timeout() {
    let s = Scratch::new();
    let mut sup = start(&s, 0);
    let w = Watch::start(&s);
    let (began, _) = w.line();
    // Nothing changes for longer than the admin socket's 10 s idle timeout.
    while began.elapsed() < Duration::from_secs(11) {
        if let Ok((_, l)) = w.lines.recv_timeout(Duration::from_millis(200)) {
            panic!("a line while nothing changed: {l}");
        }
    }
    assert!(ctl(&s, "shutdown").status.success());
    let (status, lines, err) = w.end();
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
    position(&lines, "phase exiting (child exited with code 0)");
    assert!(
        status.code() == Some(0),
        "the watch was cut: {status:?} {err}"
    );
}

#[test]
fn watchers_are_capped_and_leave_room_for_other_clients() {
    let s = Scratch::new();
    let mut sup = start(&s, 0);
    let held: Vec<BufReader<UnixStream>> = (0..4)
        .map(|_| {
            let mut c = UnixStream::connect(s.path("admin.sock")).expect("connect");
            c.set_read_timeout(Some(T)).expect("timeout");
            std::io::Write::write_all(&mut c, b"watch\n").expect("send");
            let mut r = BufReader::new(c);
            let mut line = String::new();
            r.read_line(&mut line).expect("first state");
            assert!(line.contains(r#""event":"status""#), "{line}");
            r
        })
        .collect();
    let w = Watch::start(&s);
    let (status, lines, err) = w.end();
    assert_eq!(status.code(), Some(77), "{lines:?} {err}");
    assert!(err.contains("4 watches are already running"), "{err}");
    assert!(ctl(&s, "status").status.success(), "status is still served");
    drop(held);
    assert!(ctl(&s, "shutdown").status.success());
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
}
