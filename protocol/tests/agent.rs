//! The agent over a real Unix socket: order, roles, recorded repeats, deadlines, bad input.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use quiesce_protocol::agent::{Agent, AgentError, HandlerError, Report, StepCtx};
use quiesce_protocol::wire::{Phase, StepVerb, SubStep};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

#[tokio::test]
async fn full_sequence_runs_every_substep_in_order() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal).build();
    let handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;

    let hello = c.call("hello role=driver").await;
    assert_ok(&hello);
    assert_eq!(hello["role"], "driver");
    assert_eq!(hello["protocol"], 1);
    assert_eq!(hello["app"], "test-app");
    assert_eq!(hello["pid"], std::process::id());
    assert_eq!(hello["services"], serde_json::json!(["test.v1.Test"]));
    assert_eq!(hello["registered"].as_array().unwrap().len(), 8);

    for verb in StepVerb::ALL {
        assert!(!agent.is_closed());
        let reply = c.call(&format!("{verb} deadline_ms=2000")).await;
        assert_ok(&reply);
        assert_eq!(reply["step"], verb.as_str());
        assert_eq!(reply["outcome"], "ok");
        let names: Vec<&str> = reply["substeps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = verb.substeps().iter().map(|s| s.as_str()).collect();
        assert_eq!(names, expected);
        // Counts are summed over sub-steps.
        assert_eq!(reply["counts"]["calls"], verb.substeps().len());
        assert!(reply.get("repeated").is_none());
    }
    assert_eq!(journal.calls(), SubStep::ALL);
    tokio::time::timeout(PATIENCE, handle.closed())
        .await
        .expect("closed() resolves after close");
    assert_eq!(agent.phase(), Phase::Closed);
    let status = c.call("status").await;
    assert_eq!(status["phase"], "closed");
    assert_eq!(status["next_step"], Value::Null);
    assert!(step_states(&status).values().all(|s| s == "done"));
}

#[tokio::test]
async fn out_of_order_is_refused_and_changes_nothing() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let before = c.call("status").await;

    for line in ["stop-cron deadline_ms=100", "close deadline_ms=100"] {
        let reply = c.call(line).await;
        assert_eq!(error_code(&reply), "out_of_order");
        assert_eq!(reply["expected"], "drain");
        assert!(reply["message"].as_str().unwrap().contains("drain"));
    }
    assert_eq!(c.call("status").await, before);
    assert!(journal.calls().is_empty());

    assert_ok(&c.call("drain deadline_ms=1000").await);
    let reply = c.call("stop-consumer deadline_ms=100").await;
    assert_eq!(error_code(&reply), "out_of_order");
    assert_eq!(reply["expected"], "stop-cron");
    let status = c.call("status").await;
    assert_eq!(status["phase"], "stopping");
    assert_eq!(status["next_step"], "stop-cron");
    assert_eq!(step_states(&status)["stop-consumer"], "pending");
    assert_eq!(journal.count(SubStep::StopConsumer), 0);
}

#[tokio::test]
async fn one_driver_at_a_time_and_the_slot_frees_on_disconnect() {
    let dir = SocketDir::new();
    let agent = recording_agent(&Journal::default()).build();
    let _handle = serve(&agent, &dir).await;
    let mut first = Conn::open(&dir.path()).await;
    let mut second = Conn::open(&dir.path()).await;
    assert_ok(&first.call("hello role=driver").await);
    // Saying it again on the same connection is fine.
    assert_ok(&first.call("hello role=driver version=1").await);
    assert_eq!(
        error_code(&second.call("hello role=driver").await),
        "driver_taken"
    );
    // The refused connection is still a working observer.
    assert_ok(&second.call("status").await);
    assert_eq!(
        error_code(&second.call("drain deadline_ms=100").await),
        "not_driver"
    );
    drop(first);
    wait_until("the driver slot to free", PATIENCE, || {
        let path = dir.path();
        async move {
            let mut c = Conn::open(&path).await;
            c.call("hello role=driver").await["ok"] == true
        }
    })
    .await;
    // Stepping down to observer frees the slot too.
    let mut third = Conn::open(&dir.path()).await;
    assert_ok(&third.call("hello role=driver").await);
    assert_eq!(third.call("hello role=observer").await["role"], "observer");
    assert_ok(&second.call("hello role=driver").await);
}

#[tokio::test]
async fn observers_cannot_step() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    // Without hello, and after hello as observer (the default role).
    let reply = c.call("drain deadline_ms=100").await;
    assert_eq!(error_code(&reply), "not_driver");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("hello role=driver")
    );
    assert_eq!(c.call("hello").await["role"], "observer");
    assert_eq!(
        error_code(&c.call("drain deadline_ms=100").await),
        "not_driver"
    );
    assert_eq!(c.call("status").await["phase"], "serving");
    assert!(journal.calls().is_empty());
}

#[tokio::test]
async fn bad_requests_get_their_codes_and_harm_nothing() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let before = c.call("status").await;
    let cases: &[(&str, &str)] = &[
        ("frobnicate", "unknown_verb"),
        ("shutdown", "unknown_verb"),
        ("STATUS", "bad_request"),
        ("status please", "bad_request"),
        ("status x=1 x=2", "bad_request"),
        ("status verbose=1", "bad_argument"),
        ("hello role=king", "bad_argument"),
        ("hello version=2", "unsupported_version"),
        ("drain", "missing_argument"),
        ("drain deadline_ms=5s", "bad_argument"),
        ("drain deadline_ms=-5", "bad_argument"),
        ("drain deadline_ms=5 budget=1", "bad_argument"),
        ("GET / HTTP/1.1", "bad_request"),
    ];
    for (line, code) in cases {
        let reply = c.call(line).await;
        assert_eq!(error_code(&reply), *code, "for {line:?}: {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(c.call("status").await, before);
    assert!(journal.calls().is_empty());
    // Still the driver, still usable.
    assert_eq!(c.call("drain deadline_ms=1000").await["outcome"], "ok");
}

#[tokio::test]
async fn over_long_lines_are_discarded_and_the_connection_recovers() {
    let dir = SocketDir::new();
    let agent = recording_agent(&Journal::default()).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;

    let mut line = b"status pad=".to_vec();
    line.resize(4096, b'a');
    line.push(b'\n');
    // Exactly at the limit: parsed (and refused for its argument, not its length).
    assert_eq!(error_code(&c.call_bytes(&line).await), "bad_argument");

    line.insert(0, b'a');
    let reply = c.call_bytes(&line).await;
    assert_eq!(error_code(&reply), "line_too_long");
    assert!(reply["message"].as_str().unwrap().contains("4096"));
    assert_ok(&c.call("status").await);

    // A megabyte without a newline in between: one refusal, then business as usual.
    let mut huge = vec![b'x'; 1 << 20];
    huge.extend_from_slice(b"\nstatus\n");
    c.send(&huge).await;
    assert_eq!(error_code(&c.reply().await), "line_too_long");
    assert_ok(&c.reply().await);
}

#[tokio::test]
async fn invalid_utf8_and_control_bytes_are_refused() {
    let dir = SocketDir::new();
    let agent = recording_agent(&Journal::default()).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_eq!(
        error_code(&c.call_bytes(b"stat\xff\xfeus\n").await),
        "invalid_utf8"
    );
    assert_eq!(
        error_code(&c.call_bytes(b"status\x00\n").await),
        "bad_request"
    );
    assert_eq!(
        error_code(&c.call_bytes(b"\x16\x03\x01\x02\x00\x01\x00\n").await),
        "bad_request"
    );
    assert_ok(&c.call("status").await);
}

#[tokio::test]
async fn blank_lines_get_no_reply_and_pipelined_requests_are_answered_in_order() {
    let dir = SocketDir::new();
    let agent = recording_agent(&Journal::default()).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    c.send(b"\n\r\n   \nhello role=driver\r\nnope\nstatus\ndrain deadline_ms=1000\nstatus")
        .await;
    assert_eq!(c.reply().await["role"], "driver");
    assert_eq!(error_code(&c.reply().await), "unknown_verb");
    assert_eq!(c.reply().await["phase"], "serving");
    assert_eq!(c.reply().await["step"], "drain");
    // The last line had no newline; it is answered once the peer stops sending.
    let (mut reader, mut writer) = c.into_parts();
    tokio::io::AsyncWriteExt::shutdown(&mut writer)
        .await
        .unwrap();
    let mut last = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut last)
        .await
        .unwrap();
    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["phase"], "stopping");
}

/// A handler that waits for a gate, counting its runs.
fn gated_agent(gate: Arc<Notify>, runs: Arc<AtomicUsize>) -> Agent {
    Agent::builder("gated")
        .on(SubStep::DrainInFlight, move |_ctx: StepCtx| {
            let gate = Arc::clone(&gate);
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
                Ok::<_, HandlerError>(Report::new().count("requests_drained", 7))
            }
        })
        .status(|| serde_json::json!({"grpc": {"in_flight": 0}}))
        .build()
}

#[tokio::test]
async fn a_step_survives_its_driver_disconnecting_and_is_recorded() {
    let dir = SocketDir::new();
    let gate = Arc::new(Notify::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let agent = gated_agent(Arc::clone(&gate), Arc::clone(&runs));
    let _handle = serve(&agent, &dir).await;

    let mut driver = Conn::open(&dir.path()).await;
    assert_ok(&driver.call("hello role=driver").await);
    driver.send(b"drain deadline_ms=10000\n").await;
    wait_until("the handler to start", PATIENCE, || {
        let runs = Arc::clone(&runs);
        async move { runs.load(Ordering::SeqCst) == 1 }
    })
    .await;
    drop(driver);

    // An observer sees it running; a new driver can take over while it runs.
    let mut observer = Conn::open(&dir.path()).await;
    let status = observer.call("status").await;
    assert_eq!(status["phase"], "stopping");
    assert_eq!(step_states(&status)["drain"], "running");
    assert_eq!(status["components"]["grpc"]["in_flight"], 0);
    let mut next = Conn::open(&dir.path()).await;
    wait_until("the old driver's slot to free", PATIENCE, || {
        let path = dir.path();
        async move { Conn::open(&path).await.call("hello role=driver").await["ok"] == true }
    })
    .await;
    assert_ok(&next.call("hello role=driver").await);
    assert_eq!(
        error_code(&next.call("stop-cron deadline_ms=100").await),
        "out_of_order"
    );

    gate.notify_one();
    wait_until("drain to be recorded", PATIENCE, || {
        let path = dir.path();
        async move {
            let status = Conn::open(&path).await.call("status").await;
            step_states(&status)["drain"] == "done"
        }
    })
    .await;
    let again = next.call("drain deadline_ms=10000").await;
    assert_eq!(again["repeated"], true);
    assert_eq!(again["outcome"], "ok");
    assert_eq!(again["counts"]["requests_drained"], 7);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(
        next.call("stop-cron deadline_ms=100").await["outcome"],
        "ok"
    );
}

#[tokio::test]
async fn a_repeated_step_returns_the_recorded_reply_without_running_again() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let first = c.call("drain deadline_ms=1000").await;
    assert_ok(&c.call("stop-cron deadline_ms=1000").await);
    let mut second = c.call("drain deadline_ms=5").await;
    assert_eq!(second["repeated"], true);
    second.as_object_mut().unwrap().remove("repeated");
    assert_eq!(second, first, "same JSON plus repeated:true");
    assert_eq!(journal.count(SubStep::StopAccepting), 1);
    assert_eq!(journal.count(SubStep::DrainInFlight), 1);
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_hung_handler_is_cut_at_the_deadline_and_the_sequence_goes_on() {
    let dir = SocketDir::new();
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let journal = Journal::default();
    let agent = recording_agent(&journal)
        .on(SubStep::DrainInFlight, move |_ctx: StepCtx| {
            let guard = DropFlag(Arc::clone(&flag));
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok::<_, HandlerError>(Report::new())
            }
        })
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let started = Instant::now();
    let reply = c.call("drain deadline_ms=300").await;
    let took = started.elapsed();
    assert_ok(&reply);
    assert_eq!(reply["outcome"], "timeout");
    assert!(took >= Duration::from_millis(300), "cut early: {took:?}");
    assert!(took < Duration::from_millis(1000), "cut late: {took:?}");
    let drain_in_flight = &reply["substeps"][1];
    assert_eq!(drain_in_flight["outcome"], "timeout");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("drain-in-flight")
    );
    assert_eq!(reply["substeps"][0]["outcome"], "ok");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the hung future was dropped"
    );
    let status = c.call("status").await;
    assert_eq!(status["steps"][0]["outcome"], "timeout");
    assert_eq!(c.call("stop-cron deadline_ms=500").await["outcome"], "ok");
}

#[tokio::test]
async fn a_substep_with_no_time_left_is_not_started() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal)
        .on(SubStep::StopAccepting, |ctx: StepCtx| async move {
            tokio::time::sleep_until(ctx.deadline() + Duration::from_millis(50)).await;
            Ok::<_, HandlerError>(Report::new())
        })
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let reply = c.call("drain deadline_ms=100").await;
    assert_eq!(reply["substeps"][0]["outcome"], "timeout");
    assert_eq!(reply["substeps"][1]["outcome"], "timeout");
    assert!(
        reply["substeps"][1]["message"]
            .as_str()
            .unwrap()
            .contains("not started")
    );
    assert_eq!(journal.count(SubStep::DrainInFlight), 0);
}

#[tokio::test]
async fn handler_errors_and_panics_become_outcome_error() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal)
        .on(SubStep::StopPoller, |_ctx: StepCtx| async {
            Err::<Report, _>(HandlerError::msg("outbox batch rolled back"))
        })
        .on(SubStep::CloseMq, |_ctx: StepCtx| async {
            panic!("channel poisoned")
        })
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    for verb in ["drain", "stop-cron", "stop-consumer"] {
        assert_eq!(
            c.call(&format!("{verb} deadline_ms=1000")).await["outcome"],
            "ok"
        );
    }
    let poller = c.call("stop-poller deadline_ms=1000").await;
    assert_ok(&poller);
    assert_eq!(poller["outcome"], "error");
    assert_eq!(poller["substeps"][0]["message"], "outbox batch rolled back");
    assert_eq!(poller["message"], "stop-poller: outbox batch rolled back");
    let close = c.call("close deadline_ms=1000").await;
    assert_eq!(close["outcome"], "error");
    assert_eq!(close["substeps"][0]["outcome"], "error");
    assert!(
        close["substeps"][0]["message"]
            .as_str()
            .unwrap()
            .contains("channel poisoned")
    );
    // The other close sub-steps still ran.
    assert_eq!(close["substeps"][1]["outcome"], "ok");
    assert_eq!(close["substeps"][2]["outcome"], "ok");
    assert_eq!(journal.count(SubStep::CloseDb), 1);
    assert!(agent.is_closed());
}

#[tokio::test]
async fn unregistered_substeps_complete_with_a_note() {
    let dir = SocketDir::new();
    let agent = Agent::builder("empty").build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    let hello = c.call("hello role=driver").await;
    assert_eq!(hello["registered"], serde_json::json!([]));
    assert_eq!(hello["steps"].as_array().unwrap().len(), 5);
    let close = {
        for verb in ["drain", "stop-cron", "stop-consumer", "stop-poller"] {
            assert_ok(&c.call(&format!("{verb} deadline_ms=10")).await);
        }
        c.call("close deadline_ms=10").await
    };
    assert_eq!(close["outcome"], "ok");
    for sub in close["substeps"].as_array().unwrap() {
        assert_eq!(sub["note"], "nothing registered");
    }
}

#[tokio::test]
async fn socket_is_created_0600_or_as_configured() {
    let dir = SocketDir::new();
    let agent = Agent::builder("m").build();
    let handle = serve(&agent, &dir).await;
    let meta = std::fs::metadata(dir.path()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    handle.shutdown().await;
    assert!(!dir.path().exists(), "shutdown removes the socket file");

    let agent = Agent::builder("m").socket_mode(0o660).build();
    let _handle = serve(&agent, &dir).await;
    let meta = std::fs::metadata(dir.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
}

#[tokio::test]
async fn stale_sockets_are_replaced_but_live_ones_and_other_files_are_not() {
    let dir = SocketDir::new();
    // A socket file nobody listens on, as left by a crashed app.
    drop(std::os::unix::net::UnixListener::bind(dir.path()).unwrap());
    assert!(dir.path().exists());
    let agent = Agent::builder("m").build();
    let _handle = serve(&agent, &dir).await;
    assert_ok(&Conn::open(&dir.path()).await.call("status").await);

    let second = Agent::builder("m").build();
    match second.serve(dir.path()).await {
        Err(AgentError::InUse { .. }) => {}
        other => panic!("expected InUse, got {other:?}"),
    }
    assert_ok(&Conn::open(&dir.path()).await.call("status").await);

    let file = dir.dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    match second.serve(&file).await {
        Err(e @ AgentError::NotASocket { .. }) => {
            assert!(e.to_string().contains("not a socket"), "{e}");
        }
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let missing = dir.dir.path().join("no/such/dir/control.sock");
    let error = second.serve(&missing).await.unwrap_err();
    assert!(error.to_string().contains("cannot bind"), "{error}");
}

#[tokio::test]
async fn health_runs_checks_concurrently_with_timeouts() {
    let dir = SocketDir::new();
    let slow = || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<(), HandlerError>(())
    };
    let agent = Agent::builder("h")
        .check("db", true, slow)
        .check("redis", true, slow)
        .check("mq", false, || async {
            Err::<(), _>(HandlerError::msg("connection refused"))
        })
        .check_with_timeout("cache", false, Duration::from_millis(200), || async {
            std::future::pending::<Result<(), HandlerError>>().await
        })
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    let started = Instant::now();
    let health = c.call("health").await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(550),
        "checks ran one after another: {took:?}"
    );
    assert_eq!(
        health["healthy"], true,
        "only optional checks are down: {health}"
    );
    let checks = health["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["db", "redis", "mq", "cache"]);
    assert_eq!(checks[0]["up"], true);
    assert!(checks[0]["latency_ms"].as_f64().unwrap() >= 300.0);
    assert!(checks[0].get("error").is_none());
    assert_eq!(checks[2]["error"], "connection refused");
    assert_eq!(checks[3]["up"], false);
    assert_eq!(checks[3]["error"], "timed out after 200ms");
    assert_eq!(checks[3]["latency_ms"], 200.0);

    let down = Agent::builder("h")
        .check_timeout(Duration::from_millis(50))
        .check("db", true, || async {
            std::future::pending::<Result<(), HandlerError>>().await
        })
        .build();
    let health = down.health().await;
    assert!(!health.healthy);
    assert_eq!(
        health.checks[0].error.as_deref(),
        Some("timed out after 50ms")
    );
}

#[tokio::test]
async fn run_local_runs_the_remaining_steps_in_order() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    assert_ok(&c.call("drain deadline_ms=1000").await);

    let replies = tokio::time::timeout(PATIENCE, agent.run_local(Duration::from_secs(5)))
        .await
        .expect("run_local finishes");
    let verbs: Vec<StepVerb> = replies.iter().map(|r| r.step).collect();
    assert_eq!(verbs, StepVerb::ALL);
    assert!(replies[0].repeated, "drain had already run");
    assert!(replies[1..].iter().all(|r| !r.repeated));
    assert_eq!(journal.calls(), SubStep::ALL);
    assert!(agent.is_closed());
    // The driver sees the local run's results.
    assert_eq!(c.call("close deadline_ms=10").await["repeated"], true);
}

#[tokio::test]
async fn run_local_shares_its_budget_and_cuts_hung_steps() {
    let journal = Journal::default();
    let agent = recording_agent(&journal)
        .on(SubStep::StopCron, |_ctx: StepCtx| async {
            std::future::pending::<Result<Report, HandlerError>>().await
        })
        .build();
    let started = Instant::now();
    let replies = agent.run_local(Duration::from_millis(1000)).await;
    let took = started.elapsed();
    assert_eq!(replies.len(), 5);
    assert_eq!(replies[1].outcome, quiesce_protocol::wire::Outcome::Timeout);
    assert!(
        took < Duration::from_millis(1400),
        "the total budget holds: {took:?}"
    );
    // stop-cron's share is 1/6 of what drain left (about 1 s): it must not eat the rest.
    assert!(replies[1].duration_ms < 400, "{:?}", replies[1]);
    assert_eq!(journal.count(SubStep::CloseDb), 1);
    assert!(agent.is_closed());
}

#[tokio::test]
async fn context_tells_the_handler_its_deadline() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let record = Arc::clone(&seen);
    let agent = Agent::builder("ctx")
        .on(SubStep::DrainInFlight, move |ctx: StepCtx| {
            let record = Arc::clone(&record);
            async move {
                let remaining = ctx.remaining();
                ctx.cancelled().await;
                // Wrapping up after cancelled(): still before the hard deadline.
                *record.lock().unwrap() = Some((remaining, ctx.is_local(), ctx.verb()));
                Ok::<_, HandlerError>(Report::new().count("requests_cancelled", 2))
            }
        })
        .build();
    let reply = agent
        .step(StepVerb::Drain, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(reply.outcome, quiesce_protocol::wire::Outcome::Ok);
    assert_eq!(reply.counts["requests_cancelled"], 2);
    let (remaining, local, verb) = seen.lock().unwrap().take().unwrap();
    assert!(remaining <= Duration::from_millis(500) && remaining > Duration::from_millis(400));
    assert!(local);
    assert_eq!(verb, StepVerb::Drain);
}

#[tokio::test]
async fn on_request_sees_every_well_formed_request() {
    let dir = SocketDir::new();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let agent = Agent::builder("hook")
        .on_request(move |r| record.lock().unwrap().push(r.render()))
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    c.call("hello  role=driver").await;
    c.call("nope").await;
    c.call_bytes(b"\xff\n").await;
    c.call("drain deadline_ms=10").await;
    assert_eq!(
        *seen.lock().unwrap(),
        ["hello role=driver", "nope", "drain deadline_ms=10"]
    );
}

/// A handler that never finishes and sets `flag` when its future is dropped.
fn hang_until_dropped(
    flag: Arc<AtomicBool>,
) -> impl Fn(StepCtx) -> std::pin::Pin<Box<dyn Future<Output = Result<Report, HandlerError>> + Send>>
+ Send
+ Sync
+ 'static {
    move |_ctx: StepCtx| {
        let guard = DropFlag(Arc::clone(&flag));
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok(Report::new())
        })
    }
}

fn millis(value: &Value) -> u64 {
    value.as_u64().expect("a duration in ms")
}

#[tokio::test]
async fn with_budgets_a_hung_substep_is_cut_at_its_own_budget_and_the_next_gets_its_own_time() {
    let dir = SocketDir::new();
    let dropped = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(None));
    let record = Arc::clone(&seen);
    let agent = Agent::builder("budgets")
        .on(
            SubStep::StopAccepting,
            hang_until_dropped(Arc::clone(&dropped)),
        )
        .on(SubStep::DrainInFlight, move |ctx: StepCtx| {
            let record = Arc::clone(&record);
            async move {
                *record.lock().unwrap() = Some(ctx.deadline() - ctx.started());
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, HandlerError>(Report::new().count("requests_drained", 4))
            }
        })
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let started = Instant::now();
    let reply = c.call("drain deadline_ms=8000 budgets_ms=200,2000").await;
    let took = started.elapsed();
    assert_ok(&reply);
    assert_eq!(reply["outcome"], "timeout");

    let stop_accepting = &reply["substeps"][0];
    assert_eq!(stop_accepting["outcome"], "timeout");
    let cut = millis(&stop_accepting["duration_ms"]);
    assert!(
        (200..500).contains(&cut),
        "cut at {cut} ms, not at its 200 ms budget"
    );
    let message = stop_accepting["message"].as_str().unwrap();
    assert!(message.contains("own budget (200 ms)") && message.contains("budgets_ms"));
    assert!(
        dropped.load(Ordering::SeqCst),
        "the hung future was dropped"
    );

    // drain-in-flight ran to completion, with its own 2 s rather than what the hang left.
    let drain_in_flight = &reply["substeps"][1];
    assert_eq!(drain_in_flight["outcome"], "ok");
    assert_eq!(drain_in_flight["counts"]["requests_drained"], 4);
    assert!(millis(&drain_in_flight["duration_ms"]) >= 300);
    let given = seen.lock().unwrap().take().expect("drain-in-flight ran");
    assert!(
        given <= Duration::from_millis(2000) && given > Duration::from_millis(1950),
        "its own 2 s budget from its start, not what was left of the 8 s deadline: {given:?}"
    );
    assert_eq!(reply["counts"]["requests_drained"], 4);
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .starts_with("stop-accepting: ")
    );
    assert!(took >= Duration::from_millis(500), "too fast: {took:?}");
    assert!(
        took < Duration::from_millis(2000),
        "the budget did not cut: {took:?}"
    );
    // The step finished, so the next verb is accepted.
    assert_eq!(c.call("stop-cron deadline_ms=500").await["outcome"], "ok");
}

#[tokio::test]
async fn budgets_never_extend_a_step_past_its_deadline() {
    let dir = SocketDir::new();
    let first = Arc::new(AtomicBool::new(false));
    let second = Arc::new(AtomicBool::new(false));
    let agent = Agent::builder("capped")
        .on(
            SubStep::StopAccepting,
            hang_until_dropped(Arc::clone(&first)),
        )
        .on(
            SubStep::DrainInFlight,
            hang_until_dropped(Arc::clone(&second)),
        )
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let started = Instant::now();
    let reply = c.call("drain deadline_ms=500 budgets_ms=100,5000").await;
    let took = started.elapsed();
    assert_eq!(reply["substeps"][0]["outcome"], "timeout");
    assert!(millis(&reply["substeps"][0]["duration_ms"]) < 400);
    assert_eq!(reply["substeps"][1]["outcome"], "timeout");
    assert!(
        reply["substeps"][1]["message"]
            .as_str()
            .unwrap()
            .contains("step's deadline"),
        "cut by the verb's deadline, not its own budget: {reply}"
    );
    assert!(took >= Duration::from_millis(500), "cut early: {took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "ran past the deadline: {took:?}"
    );
    assert!(first.load(Ordering::SeqCst) && second.load(Ordering::SeqCst));
}

#[tokio::test]
async fn close_budgets_cut_only_the_hung_substep() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let dropped = Arc::new(AtomicBool::new(false));
    let agent = recording_agent(&journal)
        .on(
            SubStep::CloseRedis,
            hang_until_dropped(Arc::clone(&dropped)),
        )
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    for verb in &StepVerb::ALL[..4] {
        assert_eq!(
            c.call(&format!("{verb} deadline_ms=2000")).await["outcome"],
            "ok"
        );
    }
    let reply = c
        .call("close deadline_ms=5000 budgets_ms=1000,150,1000")
        .await;
    let outcomes: Vec<&str> = reply["substeps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["ok", "timeout", "ok"], "{reply}");
    assert!(millis(&reply["substeps"][1]["duration_ms"]) < 450);
    assert!(millis(&reply["duration_ms"]) < 1000, "{reply}");
    assert_eq!(journal.count(SubStep::CloseMq), 1);
    assert_eq!(journal.count(SubStep::CloseDb), 1);
    assert!(dropped.load(Ordering::SeqCst));
    assert!(agent.is_closed());
}

#[tokio::test]
async fn bad_budgets_are_refused_and_change_nothing() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal).build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let before = c.call("status").await;
    let drain = "budgets_ms needs 2 values for drain (stop-accepting, drain-in-flight)";
    for (line, says) in [
        ("drain deadline_ms=1000 budgets_ms=500", drain),
        ("drain deadline_ms=1000 budgets_ms=500,500,500", drain),
        ("drain deadline_ms=1000 budgets_ms=0,500", drain),
        ("drain deadline_ms=1000 budgets_ms=500,x", drain),
        ("drain deadline_ms=1000 budgets_ms=500,", drain),
        ("drain deadline_ms=1000 budgets_ms=500,-1", drain),
        ("drain deadline_ms=1000 budgets_ms=0.5,500", drain),
        (
            "stop-cron deadline_ms=1000 budgets_ms=1,1",
            "budgets_ms needs 1 value for stop-cron (stop-cron)",
        ),
        (
            "close deadline_ms=1000 budgets_ms=1,1",
            "budgets_ms needs 3 values for close (close-mq, close-redis, close-db)",
        ),
        (
            "status budgets_ms=1",
            "unknown argument `budgets_ms` for `status`",
        ),
        (
            "health budgets_ms=1",
            "unknown argument `budgets_ms` for `health`",
        ),
        (
            "hello budgets_ms=1",
            "unknown argument `budgets_ms` for `hello`",
        ),
    ] {
        let reply = c.call(line).await;
        assert_eq!(error_code(&reply), "bad_argument", "{line}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(message.contains(says), "{line}: {message}");
    }
    assert_eq!(c.call("status").await, before);
    assert!(journal.calls().is_empty(), "no handler ran");
    // Still the driver, and a valid request with budgets runs.
    let reply = c.call("drain deadline_ms=1000 budgets_ms=500,500").await;
    assert_eq!(reply["outcome"], "ok", "{reply}");
    assert_eq!(
        journal.calls(),
        [SubStep::StopAccepting, SubStep::DrainInFlight]
    );
}

#[tokio::test]
async fn a_handler_that_reached_its_deadline_reports_timeout_with_its_counts() {
    let dir = SocketDir::new();
    let agent = Agent::builder("test-app")
        .on(SubStep::DrainInFlight, |_ctx: StepCtx| async {
            Ok(Report::new()
                .count("requests_cancelled", 2)
                .note("2 requests still running at the deadline were cancelled")
                .timed_out())
        })
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    assert_ok(&c.call("hello role=driver").await);
    let reply = c.call("drain deadline_ms=2000").await;
    assert_ok(&reply);
    assert_eq!(reply["outcome"], "timeout", "{reply}");
    let sub = &reply["substeps"][1];
    assert_eq!(sub["name"], "drain-in-flight");
    assert_eq!(sub["outcome"], "timeout");
    assert_eq!(sub["counts"]["requests_cancelled"], 2);
    assert_eq!(
        sub["message"],
        "2 requests still running at the deadline were cancelled"
    );
    assert_eq!(reply["substeps"][0]["outcome"], "ok");
}

#[tokio::test]
async fn closed_waits_for_the_close_reply_not_for_an_observers_reply() {
    let dir = SocketDir::new();
    let gate = Arc::new(Notify::new());
    let started = Arc::new(AtomicBool::new(false));
    let agent = {
        let gate = Arc::clone(&gate);
        let started = Arc::clone(&started);
        Agent::builder("closing")
            .on(SubStep::CloseDb, move |_ctx: StepCtx| {
                let gate = Arc::clone(&gate);
                let started = Arc::clone(&started);
                async move {
                    started.store(true, Ordering::SeqCst);
                    gate.notified().await;
                    Ok::<_, HandlerError>(Report::new())
                }
            })
            .build()
    };
    let _handle = serve(&agent, &dir).await;
    let mut driver = Conn::open(&dir.path()).await;
    assert_ok(&driver.call("hello role=driver").await);
    for verb in &StepVerb::ALL[..4] {
        assert_ok(&driver.call(&format!("{verb} deadline_ms=2000")).await);
    }
    // The driver sends `close` and vanishes while close-db runs: nobody has its reply yet.
    driver.send(b"close deadline_ms=10000\n").await;
    wait_until("close-db to start", PATIENCE, || {
        let started = Arc::clone(&started);
        async move { started.load(Ordering::SeqCst) }
    })
    .await;
    drop(driver);
    let exited = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let agent = agent.clone();
        let exited = Arc::clone(&exited);
        async move {
            agent.closed().await;
            exited.store(true, Ordering::SeqCst);
        }
    });
    gate.notify_one();

    // An observer's replies written after `close` finished are not the close reply.
    let mut observer = Conn::open(&dir.path()).await;
    wait_until("close to finish", PATIENCE, || {
        let path = dir.path();
        async move { Conn::open(&path).await.call("status").await["phase"] == "closed" }
    })
    .await;
    assert_eq!(observer.call("status").await["phase"], "closed");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !exited.load(Ordering::SeqCst),
        "closed() resolved on an observer's reply, before any driver had the close reply"
    );

    // A reconnecting driver repeats `close`: its reply is the one the app waits for.
    let mut next = Conn::open(&dir.path()).await;
    assert_ok(&next.call("hello role=driver").await);
    let again = next.call("close deadline_ms=1000").await;
    assert_eq!(again["repeated"], true, "{again}");
    wait_until("closed() to resolve", PATIENCE, || {
        let exited = Arc::clone(&exited);
        async move { exited.load(Ordering::SeqCst) }
    })
    .await;
}

#[tokio::test]
async fn traceparent_names_each_substeps_parent_and_bad_ones_are_refused() {
    let dir = SocketDir::new();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut builder = Agent::builder("traced");
    for substep in SubStep::ALL {
        let record = Arc::clone(&seen);
        builder = builder.on(substep, move |ctx: StepCtx| {
            let record = Arc::clone(&record);
            async move {
                let parent = ctx.traceparent().map(|t| t.to_string());
                record.lock().unwrap().push((ctx.substep(), parent));
                Ok::<_, HandlerError>(Report::new())
            }
        });
    }
    let agent = builder.build();
    let _handle = serve(&agent, &dir).await;
    let mut c = Conn::open(&dir.path()).await;
    let hello = c.call("hello role=driver").await;
    assert_eq!(hello["extensions"], serde_json::json!(["traceparent"]));

    let tp = |span: &str| format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01");
    let before = c.call("status").await;
    for line in [
        format!(
            "drain deadline_ms=1000 traceparent={}",
            tp("00f067aa0ba902b7")
        ),
        "drain deadline_ms=1000 traceparent=nope,nope".to_owned(),
        format!(
            "drain deadline_ms=1000 traceparent={},{}",
            tp("00f067aa0ba902b7"),
            tp("0000000000000000")
        ),
    ] {
        let reply = c.call(&line).await;
        assert_eq!(error_code(&reply), "bad_argument", "{line}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains("traceparent for drain needs 2 W3C traceparents"),
            "{message}"
        );
    }
    assert_eq!(c.call("status").await, before, "a refusal changes nothing");
    assert!(seen.lock().unwrap().is_empty(), "no handler ran");

    let (a, b) = (tp("00f067aa0ba902b7"), tp("00f067aa0ba902b8"));
    let reply = c
        .call(&format!("drain deadline_ms=1000 traceparent={a},{b}"))
        .await;
    assert_eq!(reply["outcome"], "ok", "{reply}");
    // Without the argument the handler gets no context.
    let reply = c.call("stop-cron deadline_ms=1000").await;
    assert_eq!(reply["outcome"], "ok", "{reply}");
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (SubStep::StopAccepting, Some(a)),
            (SubStep::DrainInFlight, Some(b)),
            (SubStep::StopCron, None),
        ]
    );
}
