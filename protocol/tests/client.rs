//! The client against a real agent, and against peers that misbehave.

mod common;

use std::time::Duration;

use common::*;
use quiesce_protocol::agent::{Agent, HandlerError, Report, StepCtx};
use quiesce_protocol::client::{Client, ClientError};
use quiesce_protocol::wire::{ErrorCode, Outcome, Phase, Role, StepVerb, SubStep};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

#[tokio::test]
async fn typed_helpers_drive_a_whole_shutdown() {
    let dir = SocketDir::new();
    let journal = Journal::default();
    let agent = recording_agent(&journal)
        .check("db", true, || async { Ok::<(), HandlerError>(()) })
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut client = Client::connect(dir.path()).await.unwrap();
    assert_eq!(client.path(), dir.path());

    let error = client
        .step(StepVerb::Drain, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NotDriver));
    assert!(
        error
            .to_string()
            .contains("`drain` refused with not_driver"),
        "{error}"
    );

    let hello = client.hello_driver().await.unwrap();
    assert_eq!(hello.role, Role::Driver);
    assert_eq!(hello.app, "test-app");
    assert!(client.health().await.unwrap().healthy);

    let error = client
        .step(StepVerb::Close, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::OutOfOrder));
    match error {
        ClientError::Refused { reply, .. } => assert_eq!(reply.expected, Some(StepVerb::Drain)),
        other => panic!("expected a refusal, got {other:?}"),
    }

    for verb in StepVerb::ALL {
        let reply = client.step(verb, Duration::from_secs(1)).await.unwrap();
        assert_eq!(reply.step, verb);
        assert_eq!(reply.outcome, Outcome::Ok);
    }
    let status = client.status().await.unwrap();
    assert_eq!(status.phase, Phase::Closed);
    assert_eq!(status.next_step, None);
    assert_eq!(journal.calls(), SubStep::ALL);

    let raw = client
        .call_raw("bogus", Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(raw["error"], "unknown_verb");
    let refused = client
        .call("bogus", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::UnknownVerb));
}

#[tokio::test]
async fn a_timed_out_call_poisons_the_connection() {
    let dir = SocketDir::new();
    let agent = Agent::builder("slow")
        .on(SubStep::StopAccepting, |ctx: StepCtx| async move {
            tokio::time::sleep_until(ctx.deadline()).await;
            Ok::<_, HandlerError>(Report::new())
        })
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut client = Client::connect(dir.path()).await.unwrap();
    client.hello_driver().await.unwrap();
    let error = client
        .call_raw("drain deadline_ms=500", Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    assert!(error.to_string().contains("reconnect"));
    let error = client.status().await.unwrap_err();
    assert!(
        matches!(error, ClientError::Desynchronized { .. }),
        "{error:?}"
    );
    // A fresh connection sees the step that went on regardless.
    let mut fresh = Client::connect(dir.path()).await.unwrap();
    fresh.hello(Role::Observer).await.unwrap();
    wait_until("drain to finish", PATIENCE, || {
        let path = dir.path();
        async move {
            let mut c = Client::connect(path).await.unwrap();
            c.status().await.unwrap().next_step == Some(StepVerb::StopCron)
        }
    })
    .await;
}

#[tokio::test]
async fn client_errors_name_the_socket_and_the_problem() {
    let dir = SocketDir::new();
    let error = Client::connect(dir.path()).await.unwrap_err();
    assert!(matches!(error, ClientError::Connect { .. }));
    assert!(error.to_string().contains("control.sock"), "{error}");

    // A peer that answers garbage, then one that hangs up.
    let listener = UnixListener::bind(dir.path()).unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        lines.next_line().await.unwrap();
        write.write_all(b"hello world\n").await.unwrap();
        lines.next_line().await.unwrap();
        write.write_all(b"{\"no_ok\":1}\n").await.unwrap();
        lines.next_line().await.unwrap();
        write
            .write_all(b"{\"ok\":false,\"error\":\"new_code\",\"message\":\"m\"}\n")
            .await
            .unwrap();
        lines.next_line().await.unwrap();
    });
    let mut client = Client::connect(dir.path()).await.unwrap();
    for expected in ["not JSON", "no boolean", "known error code"] {
        let error = client
            .call("status", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ClientError::InvalidReply { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains(expected), "{error}");
    }
    let error = client
        .call("status", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Closed { .. }), "{error:?}");
    server.await.unwrap();

    for bad in ["", "  ", "status\nstatus"] {
        let error = client
            .call_raw(bad, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ClientError::InvalidRequest { .. }),
            "{bad:?}: {error:?}"
        );
    }
}

#[tokio::test]
async fn step_with_budgets_sends_budgets_ms_and_surfaces_refusals() {
    let dir = SocketDir::new();
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = std::sync::Arc::clone(&requests);
    let agent = recording_agent(&Journal::default())
        .on(SubStep::StopAccepting, |_ctx: StepCtx| async move {
            std::future::pending::<()>().await;
            Ok::<_, HandlerError>(Report::new())
        })
        .on_request(move |r| record.lock().unwrap().push(r.render()))
        .build();
    let _handle = serve(&agent, &dir).await;
    let mut client = Client::connect(dir.path()).await.unwrap();
    client.hello_driver().await.unwrap();

    let ms = Duration::from_millis;
    let error = client
        .step_with_budgets(StepVerb::Drain, ms(3000), &[ms(100)])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::BadArgument));
    assert!(
        error
            .to_string()
            .contains("budgets_ms needs 2 values for drain (stop-accepting, drain-in-flight)"),
        "{error}"
    );
    // The refusal changed nothing: drain is still the next step, and the client is in step.
    assert_eq!(
        client.status().await.unwrap().next_step,
        Some(StepVerb::Drain)
    );

    let reply = client
        .step_with_budgets(StepVerb::Drain, ms(3000), &[ms(100), ms(2000)])
        .await
        .unwrap();
    assert_eq!(reply.outcome, Outcome::Timeout);
    assert_eq!(reply.substeps[0].outcome, Outcome::Timeout);
    assert_eq!(reply.substeps[1].outcome, Outcome::Ok);
    assert_eq!(reply.substeps[1].counts["calls"], 1);
    assert!(reply.duration_ms < 1000, "{reply:?}");
    assert_eq!(
        requests.lock().unwrap()[1..],
        [
            "drain deadline_ms=3000 budgets_ms=100",
            "status",
            "drain deadline_ms=3000 budgets_ms=100,2000",
        ]
    );
}
