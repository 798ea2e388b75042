//! The `order-service` binary as a process: SIGTERM runs every step in order and exits 0; the
//! control socket lets a driver run the steps and the process exits after `close`; start-up
//! failures exit with their documented codes and name the fix. Each test sends signals only to
//! its own child.

mod common;

use std::time::Duration;

use common::{
    Sandbox, ServiceProcess, client, create_request, hard_timeout, idempotency_marker,
    lock_waiters, orders_with_key, run_to_exit, sandbox, wait_until,
};
use nix::sys::signal::Signal;
use order_service::proto::order_service_client::OrderServiceClient;
use quiesce_protocol::client::Client;
use quiesce_protocol::wire::{Outcome, Phase, StepVerb, SubStep};
use sqlx::Connection;
use tonic::Code;

/// The `substep` of every JSON line whose message is `message` (the agent's "sub-step started"
/// and "sub-step finished"), in log order.
fn substep_lines(lines: &[String], message: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .map(|v| v["substep"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The eight sub-steps' names in order (the protocol's table).
fn order() -> [&'static str; 8] {
    SubStep::ALL.map(SubStep::as_str)
}

#[tokio::test]
async fn sigterm_runs_every_step_in_order_and_exits_0() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(90), async {
        let mut service = ServiceProcess::spawn(&env, &[("APP_SHUTDOWN_BUDGET", "10s")]).await;
        let mut c = client(service.grpc).await;
        for i in 0..3 {
            c.create_order(create_request(&format!("c{i}"), ""))
                .await
                .unwrap();
        }
        service.signal(Signal::SIGTERM);
        let status = service.wait_exit(Duration::from_secs(20)).await;
        let lines = service.lines();
        assert_eq!(status.code(), Some(0), "{}", lines.join("\n"));
        assert_eq!(substep_lines(&lines, "sub-step started"), order());
        assert_eq!(substep_lines(&lines, "sub-step finished"), order());
        let last = lines
            .iter()
            .rev()
            .find(|l| l.contains("exiting"))
            .expect("a final line");
        assert!(
            last.contains("shutdown complete") && last.contains("\"code\":0"),
            "{last}"
        );
        // Passwords never reach the logs.
        assert!(
            !lines.iter().any(|l| l.contains("guest:guest")),
            "a password was logged"
        );
        // The listener is gone.
        assert!(tokio::net::TcpStream::connect(service.grpc).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn a_driver_runs_the_steps_over_the_control_socket_and_the_process_exits_after_close() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(90), async {
        let dir = std::env::temp_dir().join(format!("order-control-{}", env.suffix));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("control.sock");
        let socket_str = socket.to_str().unwrap().to_owned();
        let mut service =
            ServiceProcess::spawn(&env, &[("QUIESCE_CONTROL_SOCKET", socket_str.as_str())]).await;
        let mut control = Client::connect(&socket)
            .await
            .expect("connect the control socket");
        let hello = control.hello_driver().await.unwrap();
        assert_eq!(hello.app, "order-service");
        assert_eq!(hello.services, ["order.v1.OrderService"]);
        assert_eq!(hello.registered.len(), 8, "every sub-step has a handler");

        let health = control.health().await.unwrap();
        assert!(health.healthy, "{health:?}");
        let names: Vec<_> = health.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["db", "redis", "mq"]);

        let mut c = client(service.grpc).await;
        c.create_order(create_request("c", "")).await.unwrap();
        let status = control.status().await.unwrap();
        assert_eq!(status.phase, Phase::Serving);
        assert_eq!(status.components["grpc"]["state"], "serving");
        assert_eq!(status.components["consumer"]["state"], "running");

        let mut substeps = Vec::new();
        for verb in StepVerb::ALL {
            let reply = control.step(verb, Duration::from_secs(5)).await.unwrap();
            assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
            substeps.extend(reply.substeps.iter().map(|s| s.name.to_string()));
            if verb == StepVerb::Drain {
                let accepting = &reply.substeps[0];
                assert_eq!(accepting.counts.get("listener_closed"), Some(&1));
                assert!(tokio::net::TcpStream::connect(service.grpc).await.is_err());
            }
            if verb == StepVerb::Close {
                assert_eq!(
                    reply.counts.get("closed"),
                    Some(&2),
                    "mq and redis: {reply:?}"
                );
            }
        }
        assert_eq!(substeps, order());
        let status = service.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0), "{}", service.lines().join("\n"));
        assert!(!socket.exists(), "the socket file is removed on exit");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_dependency_exits_69_naming_it_and_the_fix() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let (code, stderr) = run_to_exit(
            &env,
            &[
                ("AMQP_URL", "amqp://guest:s3cret@127.0.0.1:1/%2f"),
                ("APP_DEPENDENCY_WAIT", "0s"),
            ],
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(code, Some(69), "{stderr}");
        assert!(stderr.contains("cannot reach RabbitMQ"), "{stderr}");
        assert!(stderr.contains("rabbitmq-server -detached"), "{stderr}");
        assert!(stderr.contains("AMQP_URL"), "{stderr}");
        assert!(
            !stderr.contains("s3cret"),
            "the password was logged: {stderr}"
        );

        let (code, stderr) = run_to_exit(
            &env,
            &[
                ("REDIS_URL", "redis://127.0.0.1:1"),
                ("APP_DEPENDENCY_WAIT", "0s"),
            ],
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(code, Some(69), "{stderr}");
        assert!(
            stderr.contains("cannot reach Redis") && stderr.contains("redis-server"),
            "{stderr}"
        );
    })
    .await;
}

#[tokio::test]
async fn bad_configuration_exits_78_naming_the_key() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(30), async {
        let (code, stderr) =
            run_to_exit(&env, &[("APP_POLL_BATCH", "0")], Duration::from_secs(10)).await;
        assert_eq!(code, Some(78), "{stderr}");
        assert!(stderr.contains("poll_batch"), "{stderr}");
        let (code, stderr) = run_to_exit(
            &env,
            &[("APP_POLL_INTERVAL", "soon")],
            Duration::from_secs(10),
        )
        .await;
        assert_ne!(code, Some(0), "{stderr}");
        assert!(
            stderr.contains("APP_POLL_INTERVAL") || stderr.contains("poll-interval"),
            "{stderr}"
        );
    })
    .await;
}

/// An open transaction holding an uncommitted order with idempotency key `key`: the service's
/// insert of that key waits on the unique index until it ends.
async fn hold_key(env: &Sandbox, key: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(&env.database_url())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query(
        "INSERT INTO orders (id, customer_id, status, total_cents, idempotency_key, request_hash) \
         VALUES (gen_random_uuid(), 'holder', 'pending', 1, $1, 'holder')",
    )
    .bind(key)
    .execute(&mut conn)
    .await
    .unwrap();
    conn
}

async fn rollback(mut conn: sqlx::PgConnection) {
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
}

/// Issue 10 item 1: the process is SIGKILLed mid-request. Key `k-commit` was committed in
/// PostgreSQL but its marker never completed; key `k-lost` never committed. Made
/// deterministic by holding each key's row, freezing the process (SIGSTOP) while both inserts
/// wait, letting only `k-commit` through, then the kill. A fresh process must return the
/// committed order at once (not ABORTED for the marker's lifetime), and create `k-lost`
/// exactly once as soon as its lease (the request's 3 s `grpc-timeout`) is over.
#[tokio::test]
async fn keys_of_a_process_killed_mid_request_resolve_on_a_fresh_process() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(120), async {
        let pool = env.pool().await;
        let committed = kill_mid_request(&env, &pool).await;
        let second = ServiceProcess::spawn(&env, &[]).await;
        let mut c = client(second.grpc).await;
        committed_key_replays(&env, &mut c, committed).await;
        lost_key_is_created_once(&env, &mut c).await;
        assert_eq!(orders_with_key(&pool, "k-lost").await, 1);
        assert_eq!(orders_with_key(&pool, "k-commit").await, 1);
    })
    .await;
}

/// A process with two keyed CreateOrders in flight behind held keys, SIGKILLed after
/// `k-commit` committed and while `k-lost` still waits; returns the committed order's id.
async fn kill_mid_request(env: &Sandbox, pool: &sqlx::PgPool) -> uuid::Uuid {
    let mut first = ServiceProcess::spawn(env, &[("APP_IDEMPOTENCY_LEASE", "60s")]).await;
    let (commit_holder, lost_holder) = (
        hold_key(env, "k-commit").await,
        hold_key(env, "k-lost").await,
    );
    let c = client(first.grpc).await;
    let (mut c1, mut c2) = (c.clone(), c);
    let calls = [
        tokio::spawn(async move { c1.create_order(create_request("c", "k-commit")).await }),
        tokio::spawn(async move {
            let mut request = tonic::Request::new(create_request("c", "k-lost"));
            request.set_timeout(Duration::from_secs(3));
            c2.create_order(request).await
        }),
    ];
    wait_until("both inserts waiting", Duration::from_secs(10), || async {
        lock_waiters(pool, None).await == 2
    })
    .await;
    first.signal(Signal::SIGSTOP);
    rollback(commit_holder).await;
    wait_until("k-commit committed", Duration::from_secs(10), || async {
        orders_with_key(pool, "k-commit").await == 1
    })
    .await;
    first.signal(Signal::SIGKILL);
    assert_eq!(first.wait_exit(Duration::from_secs(10)).await.code(), None);
    // PostgreSQL noticed the dead client and aborted its other insert.
    wait_until(
        "the orphaned insert aborted",
        Duration::from_secs(5),
        || async { lock_waiters(pool, None).await == 0 },
    )
    .await;
    rollback(lost_holder).await;
    assert_eq!(orders_with_key(pool, "k-lost").await, 0);
    let committed: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM orders WHERE idempotency_key = 'k-commit'")
            .fetch_one(pool)
            .await
            .unwrap();
    for call in calls {
        call.abort();
    }
    committed
}

/// On the fresh process, `k-commit` (committed by the killed one) still has its pending lease,
/// and CreateOrder returns the committed order at once and repairs the marker to done.
async fn committed_key_replays(
    env: &Sandbox,
    c: &mut OrderServiceClient<tonic::transport::Channel>,
    committed: uuid::Uuid,
) {
    let (value, pttl) = idempotency_marker(env, "k-commit").await;
    assert!(
        value.as_deref().is_some_and(|v| v.starts_with("pending|")),
        "the dead request's marker is still there: {value:?}"
    );
    assert!(
        (1..=60_000).contains(&pttl),
        "the marker is a lease of at most idempotency_lease, not the key's TTL: {pttl} ms"
    );
    let replay = c
        .create_order(create_request("c", "k-commit"))
        .await
        .expect("the committed order, not a refusal")
        .into_inner();
    assert!(replay.replayed);
    assert_eq!(replay.order.unwrap().order_id, committed.to_string());
    let (value, _) = idempotency_marker(env, "k-commit").await;
    assert!(
        value
            .as_deref()
            .is_some_and(|v| v.starts_with("done|") && v.ends_with(&committed.to_string())),
        "Redis repaired to done: {value:?}"
    );
}

/// On the fresh process, `k-lost` (never committed) is created once its short lease ends, and
/// a repeat replays it.
async fn lost_key_is_created_once(
    env: &Sandbox,
    c: &mut OrderServiceClient<tonic::transport::Channel>,
) {
    let (_, pttl) = idempotency_marker(env, "k-lost").await;
    assert!(
        pttl <= 3_000,
        "k-lost's lease is its grpc-timeout: {pttl} ms"
    );
    let created = retry_until_ok(c, "k-lost", Duration::from_secs(10)).await;
    assert!(!created.replayed);
    let again = c
        .create_order(create_request("c", "k-lost"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.order, created.order);
}

/// CreateOrder for `key`, retried on ABORTED (the documented "retry shortly") until `within`.
async fn retry_until_ok(
    c: &mut OrderServiceClient<tonic::transport::Channel>,
    key: &str,
    within: Duration,
) -> order_service::proto::CreateOrderResponse {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match c.create_order(create_request("c", key)).await {
            Ok(response) => return response.into_inner(),
            Err(s) if s.code() == Code::Aborted && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{key}: {s:?}"),
        }
    }
}
