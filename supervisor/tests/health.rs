//! Probes as kubelet sees them, through an independent client (Python grpcio-health-checking), and the
//! metrics a Prometheus scrape sees.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

struct Pod {
    sup: Child,
    addr: String,
    metrics: String,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.sup.kill();
        let _ = self.sup.wait();
    }
}

fn start(s: &Scratch, extra: &[&str], app_args: &[&str]) -> Pod {
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut c = quiesce(s);
    c.arg("--control-socket").arg(s.path("control.sock"));
    c.args([
        "--health-enabled",
        "true",
        "--health-address",
        &addr,
        "--metrics-enabled",
        "true",
        "--metrics-address",
        &metrics,
    ]);
    c.args([
        "--health-poll-interval",
        "300ms",
        "--health-liveness-timeout",
        "300ms",
    ]);
    c.args(extra)
        .arg("--")
        .arg(fixture_app())
        .arg("--deps-file")
        .arg(s.path("deps"))
        .arg("--freeze-file")
        .arg(s.path("freeze"));
    c.args(["--services", "order.v1.OrderService"])
        .args(app_args);
    let sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    Pod { sup, addr, metrics }
}

/// A kubelet-like probe loop: every line "SERVICE STATUS" with the moment the test read it.
fn probe_loop(
    addr: &str,
    services: &[&str],
    ua: Option<&str>,
) -> (Child, Receiver<(Instant, String)>) {
    let mut c = Command::new(python());
    c.arg(probe_script())
        .args(["poll", addr, "20"])
        .args(services);
    if let Some(ua) = ua {
        c.args(["--ua", ua]);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("probe loop");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for a line from the probe loop; returns when it was read.
fn until_line(rx: &Receiver<(Instant, String)>, want: &str) -> Instant {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if let Ok((at, l)) = rx.recv_timeout(T)
            && l == want
        {
            return at;
        }
    }
    panic!("probe never answered {want:?}");
}

fn scrape(addr: &str) -> String {
    let out = output_timeout(
        {
            let mut c = Command::new("curl");
            c.args(["-sf", &format!("http://{addr}/metrics")]);
            c
        },
        T,
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn startup_readiness_and_liveness_follow_the_app() {
    let s = Scratch::new();
    let pod = start(&s, &[], &["--startup-delay-ms", "1500"]);
    // Until the app says hello: alive, but neither started up nor ready.
    let (mut early, rx) = probe_loop(&pod.addr, &["liveness", "startup", "readiness"], None);
    let mut seen = std::collections::BTreeMap::<String, Vec<String>>::new();
    let deadline = Instant::now() + T;
    while Instant::now() < deadline
        && !(seen
            .get("startup")
            .is_some_and(|v| v.contains(&"SERVING".to_string())))
    {
        if let Ok((_, l)) = rx.recv_timeout(T)
            && let Some((svc, st)) = l.split_once(' ')
        {
            seen.entry(svc.into()).or_default().push(st.into());
        }
    }
    let _ = early.kill();
    let _ = early.wait();
    for svc in ["startup", "readiness"] {
        let v = &seen[svc];
        assert_eq!(
            v.first().map(String::as_str),
            Some("NOT_SERVING"),
            "{svc} before hello: {v:?}"
        );
    }
    assert!(
        seen["liveness"].contains(&"SERVING".to_string()),
        "{seen:?}"
    );
    assert!(
        seen["startup"].contains(&"SERVING".to_string()),
        "startup never SERVING after hello: {seen:?}"
    );
    assert!(wait_until(T, || check(&pod.addr, "readiness") == "SERVING"));
    assert_eq!(check(&pod.addr, ""), "SERVING");
    assert_eq!(
        check(&pod.addr, "order.v1.OrderService"),
        "SERVING",
        "announced service follows readiness"
    );
    assert_eq!(check(&pod.addr, "no.such.Service"), "NOT_FOUND");

    // A required dependency goes down: unready, never dead.
    let (mut probe, rx) = probe_loop(&pod.addr, &["readiness", "liveness"], None);
    std::fs::write(s.path("deps"), "db=down:connection refused\n").expect("deps");
    until_line(&rx, "readiness NOT_SERVING");
    assert_eq!(check(&pod.addr, "liveness"), "SERVING");
    assert_eq!(check(&pod.addr, "order.v1.OrderService"), "NOT_SERVING");
    // Back up: SERVING again within two poll intervals (600 ms), with one more for the probe's own period.
    let up = Instant::now();
    std::fs::write(s.path("deps"), "db=up\n").expect("deps");
    let back = until_line(&rx, "readiness SERVING");
    assert!(
        back - up < Duration::from_millis(900),
        "readiness came back after {:?}",
        back - up
    );

    // A frozen app (its socket stops answering) fails liveness; readiness is not what restarts pods.
    std::fs::write(s.path("freeze"), "").expect("freeze");
    until_line(&rx, "liveness NOT_SERVING");
    std::fs::remove_file(s.path("freeze")).expect("thaw");
    until_line(&rx, "liveness SERVING");
    let _ = probe.kill();
    let _ = probe.wait();
}

#[test]
fn watch_sees_each_transition_in_order() {
    let s = Scratch::new();
    let mut pod = start(&s, &["--prestop-delay", "500ms"], &[]);
    assert!(wait_until(T, || check(&pod.addr, "readiness") == "SERVING"));
    let mut w = Command::new(python());
    w.arg(probe_script())
        .args(["watch", &pod.addr, "readiness"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut w = w.spawn().expect("watch");
    let mut lines = BufReader::new(w.stdout.take().expect("stdout")).lines();
    let mut next = || lines.next().expect("watch line").expect("read");
    assert_eq!(next(), "SERVING");
    std::fs::write(s.path("deps"), "redis=down\n").expect("deps");
    assert_eq!(next(), "NOT_SERVING");
    std::fs::write(s.path("deps"), "").expect("deps");
    assert_eq!(next(), "SERVING");
    send(pod.sup.id(), libc::SIGTERM);
    assert_eq!(next(), "NOT_SERVING");
    assert_eq!(wait_timeout(&mut pod.sup, T).code(), Some(0));
    let _ = w.kill();
    let _ = w.wait();
}

#[test]
fn observed_kubelet_probes_end_the_prestop_delay_early() {
    let s = Scratch::new();
    let mut pod = start(
        &s,
        &[
            "--prestop-delay",
            "20s",
            "--grace-period",
            "40s",
            "--health-observed-probes",
            "3",
            "--health-propagation-margin",
            "300ms",
        ],
        &[],
    );
    assert!(wait_until(T, || check(&pod.addr, "readiness") == "SERVING"));
    let (mut probe, _rx) = probe_loop(&pod.addr, &["readiness"], Some("kube-probe/1.31"));
    send(pod.sup.id(), libc::SIGTERM);
    // Exits long before the 20 s delay would have passed (the test's hard timeout is below it).
    let status = wait_timeout(&mut pod.sup, Duration::from_secs(15));
    let _ = probe.kill();
    let _ = probe.wait();
    assert_eq!(status.code(), Some(0));
    let msg = std::fs::read_to_string(s.path("termination-log")).expect("report");
    assert!(
        msg.contains("kubelet saw it 3 times; 20s delay ended early"),
        "{msg}"
    );
}

#[test]
fn other_clients_do_not_count_as_kubelet() {
    let s = Scratch::new();
    let mut pod = start(
        &s,
        &[
            "--prestop-delay",
            "1500ms",
            "--health-observed-probes",
            "1",
            "--health-propagation-margin",
            "0s",
        ],
        &[],
    );
    assert!(wait_until(T, || check(&pod.addr, "readiness") == "SERVING"));
    let (mut probe, _rx) = probe_loop(&pod.addr, &["readiness"], Some("curl/8"));
    send(pod.sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut pod.sup, T).code(), Some(0));
    let _ = probe.kill();
    let _ = probe.wait();
    let msg = std::fs::read_to_string(s.path("termination-log")).expect("report");
    assert!(msg.contains("preStop delay 1s 500ms"), "{msg}");
}

#[test]
fn metrics_pass_promtool_and_move() {
    let s = Scratch::new();
    let mut pod = start(&s, &[], &["--behave", "stop-poller=finish:1500"]);
    assert!(wait_until(T, || check(&pod.addr, "readiness") == "SERVING"));
    let text = scrape(&pod.metrics);
    let mut promtool = Command::new("promtool");
    promtool
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = promtool
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    std::io::Write::write_all(&mut p.stdin.take().expect("stdin"), text.as_bytes())
        .expect("feed promtool");
    let st = wait_timeout(&mut p, T);
    assert!(st.success(), "promtool check metrics failed");
    assert_eq!(
        metric(&text, "quiesce_health_status{service=\"readiness\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "quiesce_build_info{version=\"0.1.0\"}"),
        Some(1.0)
    );
    assert!(text.contains("process_resident_memory_bytes"));

    std::fs::write(s.path("deps"), "mq=down\n").expect("deps");
    assert!(wait_until(T, || metric(
        &scrape(&pod.metrics),
        "quiesce_health_status{service=\"readiness\"}"
    ) == Some(0.0)));
    let rtt =
        |t: &str| metric(t, "quiesce_control_rtt_seconds_count{verb=\"health\"}").unwrap_or(0.0);
    let before = rtt(&scrape(&pod.metrics));
    assert!(
        wait_until(T, || rtt(&scrape(&pod.metrics)) > before),
        "control round trips not counted"
    );

    send(pod.sup.id(), libc::SIGWINCH);
    assert!(wait_until(T, || metric(
        &scrape(&pod.metrics),
        "quiesce_signals_received_total{signal=\"SIGWINCH\"}"
    ) == Some(1.0)));

    send(pod.sup.id(), libc::SIGTERM);
    // stop-poller takes 1.5 s: the earlier steps are already counted while it runs.
    assert!(wait_until(T, || {
        metric(
            &scrape(&pod.metrics),
            "quiesce_shutdown_step_outcome_total{outcome=\"ok\",step=\"stop-consumer\"}",
        ) == Some(1.0)
    }));
    let t = scrape(&pod.metrics);
    assert_eq!(
        metric(&t, "quiesce_health_status{service=\"readiness\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(&t, "quiesce_health_status{service=\"liveness\"}"),
        Some(1.0),
        "liveness stays up while stopping"
    );
    assert!(
        metric(
            &t,
            "quiesce_shutdown_step_duration_seconds{step=\"health-not-serving\"}"
        )
        .is_some()
    );
    assert_eq!(wait_timeout(&mut pod.sup, T).code(), Some(0));
}

#[test]
fn zombies_reaped_counter_moves_in_signal_mode() {
    let s = Scratch::new();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut c = quiesce(&s);
    c.args([
        "--metrics-enabled",
        "true",
        "--metrics-address",
        &metrics,
        "--",
    ])
    .arg(testbin())
    .args(["spawn-orphans", "50", "sleep"]);
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    assert!(wait_until(T, || metric(
        &scrape(&metrics),
        "quiesce_zombies_reaped_total"
    )
    .is_some_and(|n| n >= 50.0)));
    send(sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut sup, T).code(), Some(0));
}

#[test]
fn a_taken_probe_port_is_a_startup_error_naming_the_address() {
    let s = Scratch::new();
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let marker = s.path("started");
    let mut c = quiesce(&s);
    c.args([
        "--health-enabled",
        "true",
        "--health-address",
        &addr,
        "--",
        "/usr/bin/touch",
    ])
    .arg(&marker);
    let out = output_timeout(c, T);
    assert_eq!(out.status.code(), Some(124));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot bind the health address {addr}")),
        "{err}"
    );
    assert!(!marker.exists(), "the child must not start");
}

#[test]
fn readiness_waits_for_the_first_health_answer() {
    let s = Scratch::new();
    std::fs::write(s.path("deps"), "db=down\n").expect("deps");
    let pod = start(&s, &[], &[]);
    let (mut probe, rx) = probe_loop(&pod.addr, &["startup", "readiness"], None);
    until_line(&rx, "startup SERVING");
    // For the next second (three poll intervals) the pod must never look ready: its database is down.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        if let Ok((_, l)) = rx.recv_timeout(Duration::from_millis(200)) {
            assert_ne!(l, "readiness SERVING", "ready with its database down");
        }
    }
    let _ = probe.kill();
    let _ = probe.wait();
}

#[test]
fn kubelet_probes_seen_before_the_stop_do_not_shorten_the_delay() {
    let s = Scratch::new();
    let mut pod = start(
        &s,
        &[
            "--prestop-delay",
            "1500ms",
            "--health-observed-probes",
            "2",
            "--health-propagation-margin",
            "0s",
        ],
        &[],
    );
    assert!(wait_until(T, || check(&pod.addr, "readiness") == "SERVING"));
    // A dependency outage while kubelet probes: many NOT_SERVING answers, long before any stop.
    let (mut probe, rx) = probe_loop(&pod.addr, &["readiness"], Some("kube-probe/1.31"));
    std::fs::write(s.path("deps"), "db=down\n").expect("deps");
    until_line(&rx, "readiness NOT_SERVING");
    until_line(&rx, "readiness NOT_SERVING");
    until_line(&rx, "readiness NOT_SERVING");
    let _ = probe.kill();
    let _ = probe.wait();
    // No probe during the stop: the delay must run in full.
    send(pod.sup.id(), libc::SIGTERM);
    assert_eq!(wait_timeout(&mut pod.sup, T).code(), Some(0));
    let msg = std::fs::read_to_string(s.path("termination-log")).expect("report");
    assert!(msg.contains("preStop delay 1s 500ms"), "{msg}");
}
