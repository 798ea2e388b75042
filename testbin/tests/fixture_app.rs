//! `fixture-app` behaves as documented in its header: driven over its real control socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use quiesce_protocol::client::{Client, ClientError};
use quiesce_protocol::wire::{Outcome, StepVerb, SubStep};
use tokio::time::Instant;

const PATIENCE: Duration = Duration::from_secs(10);

/// A running fixture-app with its own directory; killed when dropped.
struct App {
    child: Child,
    dir: tempfile::TempDir,
}

impl App {
    fn spawn(args: &[&str]) -> App {
        App::spawn_with(args, true)
    }

    /// `with_socket`: whether QUIESCE_CONTROL_SOCKET is set (as under quiesce) or not.
    fn spawn_with(args: &[&str], with_socket: bool) -> App {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_fixture-app"));
        command
            .args(["--socket-from-env", "--event-log"])
            .arg(dir.path().join("events.log"))
            .args(args)
            .env_remove("QUIESCE_CONTROL_SOCKET")
            .stdin(Stdio::null());
        if with_socket {
            command.env("QUIESCE_CONTROL_SOCKET", dir.path().join("control.sock"));
        }
        let child = command.spawn().expect("start fixture-app");
        App { child, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn connect(&self) -> Client {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match Client::connect(self.socket()).await {
                Ok(client) => return client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("fixture-app never listened: {e}"),
            }
        }
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "fixture-app did not exit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `(CLOCK_MONOTONIC ns, event)` lines of the event log.
    fn events(&self) -> Vec<(u128, String)> {
        read_events(&self.file("events.log"))
    }

    async fn wait_event(&self, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.events().iter().any(|(_, e)| e.starts_with(what)) {
            assert!(
                Instant::now() < deadline,
                "no `{what}` event: {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_events(path: &Path) -> Vec<(u128, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let (ns, event) = line.split_once(' ').expect("`<ns> <event>`");
            (ns.parse().expect("nanoseconds"), event.to_owned())
        })
        .collect()
}

fn monotonic_ns() -> u128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    u128::try_from(t.tv_sec()).unwrap() * 1_000_000_000 + u128::try_from(t.tv_nsec()).unwrap()
}

#[tokio::test]
async fn a_full_drive_is_logged_in_order_and_exits_zero() {
    let before = monotonic_ns();
    let mut app = App::spawn(&["--services", "order.v1.OrderService", "--app", "fixture"]);
    let mut client = app.connect().await;
    let hello = client.hello_driver().await.unwrap();
    assert_eq!(hello.app, "fixture");
    assert_eq!(hello.services, ["order.v1.OrderService"]);
    assert_eq!(hello.registered, SubStep::ALL);
    assert!(client.health().await.unwrap().healthy);
    for verb in StepVerb::ALL {
        let reply = client.step(verb, Duration::from_secs(2)).await.unwrap();
        assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    }
    assert!(app.wait_exit().await.success());
    let after = monotonic_ns();

    let events = app.events();
    assert!(events.windows(2).all(|w| w[0].0 <= w[1].0), "{events:?}");
    assert!(events.first().unwrap().0 >= before && events.last().unwrap().0 <= after);
    let verbs: Vec<&str> = events
        .iter()
        .filter_map(|(_, e)| e.strip_prefix("verb "))
        .collect();
    assert_eq!(
        verbs,
        [
            "hello role=driver version=1",
            "health",
            "drain deadline_ms=2000",
            "stop-cron deadline_ms=2000",
            "stop-consumer deadline_ms=2000",
            "stop-poller deadline_ms=2000",
            "close deadline_ms=2000",
        ]
    );
    let begun: Vec<String> = events
        .iter()
        .filter_map(|(_, e)| e.strip_prefix("substep "))
        .filter_map(|e| e.strip_suffix(" begin finish:0"))
        .map(str::to_owned)
        .collect();
    assert_eq!(begun, SubStep::ALL.map(|s| s.as_str().to_owned()));
    assert!(events.iter().any(|(_, e)| e == "closed"));
    assert_eq!(events.last().unwrap().1, "exit code=0");
}

#[tokio::test]
async fn hang_is_cut_at_the_deadline_and_fail_is_an_error() {
    let app = App::spawn(&[
        "--behave",
        "drain-in-flight=hang",
        "--behave",
        "stop-poller=fail:outbox exploded",
        "--behave",
        "stop-cron=finish:50",
        "--behave",
        "close-redis=none",
    ]);
    let mut client = app.connect().await;
    client.hello_driver().await.unwrap();
    let started = Instant::now();
    let drain = client
        .step(StepVerb::Drain, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(drain.outcome, Outcome::Timeout);
    assert!(started.elapsed() >= Duration::from_millis(200));
    let cron = client
        .step(StepVerb::StopCron, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(cron.outcome, Outcome::Ok);
    assert!(cron.duration_ms >= 50);
    client
        .step(StepVerb::StopConsumer, Duration::from_secs(2))
        .await
        .unwrap();
    let poller = client
        .step(StepVerb::StopPoller, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(poller.outcome, Outcome::Error);
    assert_eq!(
        poller.substeps[0].message.as_deref(),
        Some("outbox exploded")
    );
    let close = client
        .step(StepVerb::Close, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(
        close.substeps[1].note.as_deref(),
        Some("nothing registered")
    );
}

#[tokio::test]
async fn budgets_cut_a_hung_substep_and_leave_the_next_its_own_time() {
    let app = App::spawn(&["--behave", "stop-accepting=hang"]);
    let mut client = app.connect().await;
    client.hello_driver().await.unwrap();
    let ms = Duration::from_millis;
    let started = Instant::now();
    let drain = client
        .step_with_budgets(StepVerb::Drain, ms(8000), &[ms(250), ms(4000)])
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(drain.outcome, Outcome::Timeout);
    assert_eq!(drain.substeps[0].outcome, Outcome::Timeout);
    assert_eq!(drain.substeps[1].outcome, Outcome::Ok, "{drain:?}");
    assert!(took >= ms(250) && took < ms(2000), "{took:?}");

    let events = app.events();
    let at = |what: &str| {
        events
            .iter()
            .find(|(_, e)| e == what)
            .unwrap_or_else(|| panic!("no `{what}` event: {events:?}"))
            .0
    };
    assert!(
        events
            .iter()
            .any(|(_, e)| e == "verb drain deadline_ms=8000 budgets_ms=250,4000")
    );
    // drain-in-flight started once stop-accepting's own 250 ms were up, not at the deadline.
    let gap =
        at("substep drain-in-flight begin finish:0") - at("substep stop-accepting begin hang");
    assert!(
        (250_000_000..1_000_000_000).contains(&gap),
        "drain-in-flight began {gap} ns after stop-accepting"
    );
    assert!(
        !events
            .iter()
            .any(|(_, e)| e.starts_with("substep stop-accepting end"))
    );
    assert!(
        events
            .iter()
            .any(|(_, e)| e == "substep drain-in-flight end ok")
    );
}

#[tokio::test]
async fn crash_exits_with_its_code_mid_step() {
    let mut app = App::spawn(&["--behave", "close-db=crash:3"]);
    let mut client = app.connect().await;
    client.hello_driver().await.unwrap();
    for verb in &StepVerb::ALL[..4] {
        client.step(*verb, Duration::from_secs(2)).await.unwrap();
    }
    let error = client
        .step(StepVerb::Close, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Closed { .. }), "{error:?}");
    assert_eq!(app.wait_exit().await.code(), Some(3));
    let events = app.events();
    assert!(events.iter().any(|(_, e)| e == "crash close-db code=3"));
    assert!(!events.iter().any(|(_, e)| e == "closed"));
}

#[tokio::test]
async fn freeze_stops_every_answer() {
    let app = App::spawn(&["--behave", "stop-cron=freeze"]);
    let mut client = app.connect().await;
    client.hello_driver().await.unwrap();
    client
        .step(StepVerb::Drain, Duration::from_secs(2))
        .await
        .unwrap();
    let error = client
        .call_raw("stop-cron deadline_ms=100", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    // Not even an observer gets an answer: the whole process is blocked.
    let mut observer = Client::connect(app.socket()).await.unwrap();
    let error = observer
        .call_raw("status", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
}

#[tokio::test]
async fn deps_file_drives_health_and_freeze_file_stops_answers() {
    let files = tempfile::tempdir().unwrap();
    let deps = files.path().join("deps");
    let freeze = files.path().join("freeze");
    let app = App::spawn(&[
        "--deps-file",
        deps.to_str().unwrap(),
        "--freeze-file",
        freeze.to_str().unwrap(),
        "--checks",
        "db,redis,cache?",
    ]);
    let mut client = app.connect().await;
    assert!(client.health().await.unwrap().healthy, "no file: all up");

    std::fs::write(&deps, "db=down\ncache=down:evicted\n").unwrap();
    let health = client.health().await.unwrap();
    assert!(!health.healthy);
    assert_eq!(health.checks[0].error.as_deref(), Some("db is down"));
    assert_eq!(health.checks[2].error.as_deref(), Some("evicted"));
    assert!(!health.checks[2].required);

    std::fs::write(&deps, "db=up\nredis=slow:50\ncache=hang\n").unwrap();
    let health = client.health().await.unwrap();
    assert!(health.healthy, "{health:?}");
    assert!(health.checks[1].latency_ms >= 50.0);
    assert_eq!(
        health.checks[2].error.as_deref(),
        Some("timed out after 1s")
    );

    std::fs::write(&freeze, "").unwrap();
    app.wait_event("freeze begin").await;
    let mut frozen = Client::connect(app.socket()).await.unwrap();
    let error = frozen
        .call_raw("status", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    std::fs::remove_file(&freeze).unwrap();
    let mut thawed = app.connect().await;
    thawed.set_timeout(PATIENCE);
    assert!(thawed.status().await.is_ok());
}

#[tokio::test]
async fn sigterm_without_a_socket_runs_every_step_locally() {
    let mut app = App::spawn_with(
        &[
            "--behave",
            "stop-consumer=hang",
            "--local-budget-ms",
            "1000",
        ],
        false,
    );
    app.wait_event("start").await;
    assert!(!app.socket().exists());
    app.sigterm();
    let status = app.wait_exit().await;
    assert!(status.success(), "{status:?}");
    let events = app.events();
    let begun: Vec<&str> = events
        .iter()
        .filter_map(|(_, e)| e.strip_prefix("substep "))
        .filter_map(|e| e.split_once(" begin").map(|(name, _)| name))
        .collect();
    assert_eq!(begun, SubStep::ALL.map(|s| s.as_str()));
    let names: Vec<&str> = events.iter().map(|(_, e)| e.as_str()).collect();
    assert!(names.contains(&"signal SIGTERM"));
    assert!(names.contains(&"local-shutdown end"));
}

#[test]
fn bad_arguments_are_a_usage_error() {
    for args in [
        &["--behave", "drain=hang"][..],
        &["--wat"],
        &["--exit-code"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fixture-app"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}
