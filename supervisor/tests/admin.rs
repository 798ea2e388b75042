//! The admin socket: `quiesce prestop` (as kubelet's exec hook runs it), `quiesce ctl`, and bad peers.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn ctl(s: &Scratch, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(quiesce_bin());
    c.env_clear()
        .args(args)
        .arg("--admin-socket")
        .arg(s.path("admin.sock"));
    output_timeout(c, T)
}

/// quiesce with `args` over `testbin ignore-sigterm`, once the app is ready and the admin socket answers.
fn start_ignoring_sigterm(s: &Scratch, args: &[&str]) -> Child {
    let mut c = quiesce(s);
    c.args(args).arg("--").arg(testbin()).arg("ignore-sigterm");
    let mut sup = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for_line(&mut sup, T, |l| l == "ignoring SIGTERM");
    wait_admin(s);
    sup
}

fn wait_admin(s: &Scratch) {
    assert!(
        wait_until(T, || UnixStream::connect(s.path("admin.sock")).is_ok()),
        "admin socket never came up"
    );
}

#[test]
fn prestop_under_empty_env_waits_the_delay_and_sigterm_does_not_wait_again() {
    let s = Scratch::new();
    let mut sup = start_ignoring_sigterm(
        &s,
        &[
            "--prestop-delay",
            "1s",
            "--grace-period",
            "4s",
            "--safety-margin",
            "1s",
        ],
    );
    let began = Instant::now();
    // As kubelet runs an exec hook in a distroless image: no shell, no environment.
    let mut hook = Command::new("env");
    hook.arg("-i")
        .arg(quiesce_bin())
        .arg("prestop")
        .arg("--admin-socket")
        .arg(s.path("admin.sock"));
    let out = output_timeout(hook, T);
    let hook_took = began.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("preStop delay over after"),
        "{:?}",
        out
    );
    assert!(
        hook_took >= Duration::from_secs(1),
        "returned before the delay: {hook_took:?}"
    );
    // Kubelet's SIGTERM follows the hook: it joins the running stop.
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(&mut sup, T);
    let total = began.elapsed();
    assert_eq!(status.code(), Some(137));
    // The grace countdown started at the preStop call: the supervisor is gone before preStop + grace.
    assert!(
        total < Duration::from_secs(4),
        "outlived the grace period counted from preStop: {total:?}"
    );
    let msg = std::fs::read_to_string(s.path("termination-log")).expect("report");
    assert!(msg.contains("stop requested by: preStop hook"), "{msg}");
    assert_eq!(msg.matches("health-not-serving").count(), 1, "{msg}");
}

#[test]
fn prestop_without_a_supervisor_fails_clearly() {
    let s = Scratch::new();
    let out = ctl(&s, &["prestop"]);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the supervisor at") && err.contains("admin.sock"),
        "{err}"
    );
}

#[test]
fn ctl_status_and_shutdown() {
    let s = Scratch::new();
    let mut sup = start_ignoring_sigterm(&s, &["--grace-period", "20s"]);
    let out = ctl(&s, &["ctl", "status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("phase:      running") && text.contains("steps:      none run yet"),
        "{text}"
    );
    let out = ctl(&s, &["ctl", "shutdown"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "shutdown started"
    );
    let out = ctl(&s, &["ctl", "shutdown"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "shutdown already under way"
    );
    let mut json = serde_json::Value::Null;
    assert!(wait_until(T, || {
        let out = ctl(&s, &["ctl", "status", "--json"]);
        json = serde_json::from_slice(&out.stdout).unwrap_or_default();
        json["steps"].as_array().is_some_and(|a| !a.is_empty())
    }));
    assert_eq!(json["phase"], "stopping");
    assert_eq!(json["trigger"]["kind"], "operator");
    assert_eq!(json["steps"][0]["name"], "health-not-serving");
    assert_eq!(json["steps"][0]["outcome"], "ok");
    let text = String::from_utf8_lossy(&ctl(&s, &["ctl", "status"]).stdout).into_owned();
    assert!(text.contains(" 1  health-not-serving   ok"), "{text}");
    sup.kill().expect("kill");
    let _ = sup.wait();
}

#[test]
fn admin_socket_rejects_garbage_and_strangers() {
    let s = Scratch::new();
    let mut c = quiesce(&s);
    c.arg("--").arg(testbin()).arg("sleep");
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_admin(&s);
    // Wait until the child runs: the phase below must be seen unchanged by the bad input.
    assert!(wait_until(T, || admin_status(&s)["phase"] == "running"));
    let path = s.path("admin.sock");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut conn = UnixStream::connect(&path).expect("connect");
    conn.set_read_timeout(Some(T)).expect("timeout");
    let mut lines = BufReader::new(conn.try_clone().expect("clone")).lines();
    for (input, code) in [
        (b"launch-missiles\n".to_vec(), "unknown_verb"),
        // The verb is judged first: an unknown one with an argument is still an unknown verb.
        (b"launch-missiles now=1\n".to_vec(), "unknown_verb"),
        (b"status now=1\n".to_vec(), "bad_argument"),
        (vec![0xff, 0xfe, b'\n'], "invalid_utf8"),
        (
            [b"x".repeat(10_000), b"\n".to_vec()].concat(),
            "line_too_long",
        ),
    ] {
        conn.write_all(&input).expect("write");
        let reply: serde_json::Value =
            serde_json::from_str(&lines.next().expect("reply").expect("line")).expect("json");
        assert_eq!(reply["ok"], false);
        assert_eq!(reply["error"], code, "{reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    conn.write_all(b"status\n").expect("write");
    let reply: serde_json::Value =
        serde_json::from_str(&lines.next().expect("reply").expect("line")).expect("json");
    assert_eq!(reply["ok"], true, "the connection survived: {reply}");
    assert_eq!(reply["phase"], "running", "and nothing changed");

    // Another uid is refused even when the file mode would let it in.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let mut c = Command::new("setpriv");
    c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(quiesce_bin())
        .args(["ctl", "status", "--admin-socket"])
        .arg(&path);
    c.env_clear();
    let out = output_timeout(c, T);
    // Reached and refused: its own code, not "could not be reached" (69).
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only root or the supervisor's own user"),
        "{out:?}"
    );
    assert!(
        err.contains("the supervisor")
            && !err.contains("the app")
            && !err.contains("control socket"),
        "{err}"
    );

    // A second supervisor on the same admin socket refuses to start.
    let mut c2 = quiesce(&s);
    c2.arg("--").arg("/bin/true");
    let out = output_timeout(c2, T);
    assert_eq!(out.status.code(), Some(124));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("another supervisor is already listening there")
    );
    send(sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
}

#[test]
fn a_file_that_is_not_a_socket_is_never_removed() {
    let s = Scratch::new();
    let path = s.path("admin.sock");
    std::fs::write(&path, "precious").expect("write");
    let mut c = quiesce(&s);
    c.arg("--").arg("/bin/true");
    let out = output_timeout(c, T);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("not a socket is there; refusing to remove it"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("still there"),
        "precious"
    );
}

#[test]
fn exit_removes_only_the_socket_it_created() {
    let s = Scratch::new();
    let path = s.path("admin.sock");
    let mut c = quiesce(&s);
    c.arg("--").arg(testbin()).arg("sleep");
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_admin(&s);
    // Someone replaces the socket while the supervisor runs: that file is not ours to delete.
    std::fs::remove_file(&path).expect("rm");
    std::fs::write(&path, "someone else's").expect("write");
    send(sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&path).expect("still there"),
        "someone else's"
    );

    // Its own socket it does remove.
    let mut c = quiesce(&Scratch(tempfile::tempdir().expect("tempdir")));
    let own = s.path("own.sock");
    c.env("QUIESCE_ADMIN_SOCKET", &own)
        .arg("--")
        .arg(testbin())
        .arg("sleep");
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    assert!(wait_until(T, || UnixStream::connect(&own).is_ok()));
    send(sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
    assert!(!own.exists(), "its own socket is left behind");
}

#[test]
fn ctl_status_shows_health_by_service_with_since_and_why() {
    let s = Scratch::new();
    let deps = s.path("deps");
    std::fs::write(&deps, "db=down:connection refused\n").expect("deps");
    let mut c = quiesce(&s);
    c.arg("--control-socket")
        .arg(s.path("control.sock"))
        .args(["--health-poll-interval", "100ms", "--"])
        .arg(fixture_app())
        .arg("--deps-file")
        .arg(&deps);
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_admin(&s);
    let mut v = serde_json::Value::Null;
    assert!(
        wait_until(T, || {
            v = admin_status(&s);
            v["health"]["readiness"]["why"]
                .as_str()
                .is_some_and(|w| w.contains("db"))
        }),
        "{v}"
    );
    assert_eq!(v["health"]["readiness"]["status"], "NOT_SERVING", "{v}");
    assert_eq!(v["health"]["liveness"]["status"], "SERVING", "{v}");
    assert!(
        v["health"]["readiness"]["since"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() > 19),
        "{v}"
    );
    let text = String::from_utf8_lossy(&ctl(&s, &["ctl", "status"]).stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("readiness"))
        .unwrap_or_else(|| panic!("no readiness line:\n{text}"));
    assert!(line.contains("NOT_SERVING since "), "{text}");
    assert!(line.contains("(db (connection refused) down)"), "{text}");

    std::fs::write(&deps, "db=up\n").expect("deps");
    assert!(wait_until(
        T,
        || admin_status(&s)["health"]["readiness"]["status"] == "SERVING"
    ));
    send(sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
}

#[test]
fn an_admin_socket_flood_never_delays_the_stop_past_its_window() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = Scratch::new();
    // The app ignores SIGTERM: the run ends with SIGKILL at the 3 s window, and quiesce must be gone by 3.5 s
    // (half the margin) however busy its admin socket is.
    let mut sup = start_ignoring_sigterm(&s, &["--grace-period", "4s", "--safety-margin", "1s"]);
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let (stop, path) = (stop.clone(), s.path("admin.sock"));
            std::thread::spawn(move || {
                let burst = b"status\n".repeat(2000);
                let mut open = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut c) = UnixStream::connect(&path) {
                        let _ = c.set_nonblocking(true);
                        let _ = c.write_all(&burst);
                        open.push(c);
                    }
                    if open.len() > 1000 {
                        open.remove(0);
                    }
                }
            })
        })
        .collect();
    let began = Instant::now();
    send(sup.id(), libc::SIGTERM);
    let status = wait_timeout(&mut sup, T);
    let took = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        let _ = f.join();
    }
    assert_eq!(status.code(), Some(137));
    assert!(
        took <= Duration::from_millis(3700),
        "the stop ended {took:?} after SIGTERM under the flood (window 3 s, hard end 3.5 s)"
    );
}
