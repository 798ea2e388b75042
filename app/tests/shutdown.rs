//! Each stop step on real services, made to have work in progress by holding a PostgreSQL
//! lock the component needs, and checked for the counts it reports.

mod common;

use std::time::Duration;

use common::{
    Sandbox, client, confirm_channel, create_request, hard_timeout, idempotency_marker,
    insert_pending_orders, lock_waiters, orders_with_key, publish_payment, queue_depth, sandbox,
    scalar, wait_until,
};
use order_service::App;
use order_service::control::{SubStep, stop_all};
use order_service::proto::CancelOrderRequest;
use order_service::report::{Outcome, ReportExt};
use quiesce_protocol::wire::{Outcome as ProtocolOutcome, SubStepReply};
use sqlx::Connection;
use tokio::time::Instant;
use tonic::Code;

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

async fn lock_order(env: &Sandbox, id: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(&env.database_url())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("SELECT 1 FROM orders WHERE id = $1::uuid FOR UPDATE")
        .bind(id)
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

async fn release(mut conn: sqlx::PgConnection) {
    sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
}

#[tokio::test]
async fn stop_accepting_refuses_connections_and_drain_waits_for_in_flight() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let addr = app.grpc_addr();
        let mut c = client(addr).await;
        let order = c
            .create_order(create_request("c", ""))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();

        // A CancelOrder that blocks on the row lock is in flight.
        let lock = lock_order(&env, &order.order_id).await;
        let mut c2 = c.clone();
        let id = order.order_id.clone();
        let call =
            tokio::spawn(async move { c2.cancel_order(CancelOrderRequest { order_id: id }).await });
        wait_until("one RPC in flight", Duration::from_secs(5), || async {
            app.status()["grpc"]["in_flight"] == 1
        })
        .await;

        let report = app.run_substep(SubStep::StopAccepting, secs(5)).await;
        assert_eq!(report.outcome(), Outcome::Ok);
        assert_eq!(
            (report.get("listener_closed"), report.get("in_flight")),
            (1, 1)
        );
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(
            refused.is_err(),
            "a new connection after stop-accepting must be refused"
        );
        assert_eq!(app.status()["grpc"]["state"], "not_accepting");

        let drain = tokio::spawn({
            let app = app.clone();
            async move { app.run_substep(SubStep::DrainInFlight, secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!drain.is_finished(), "drain waits for the in-flight RPC");
        release(lock).await;
        let report = drain.await.unwrap();
        assert_eq!(report.outcome(), Outcome::Ok, "{report:?}");
        assert_eq!(
            (
                report.get("requests_drained"),
                report.get("requests_cancelled")
            ),
            (1, 0)
        );
        let cancelled = call
            .await
            .unwrap()
            .expect("the in-flight RPC completed normally");
        assert_eq!(
            cancelled.into_inner().order.unwrap().order_id,
            order.order_id
        );
        assert_eq!(app.status()["grpc"]["state"], "drained");
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test]
async fn drain_deadline_cancels_what_is_still_running() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let mut c = client(app.grpc_addr()).await;
        let order = c
            .create_order(create_request("c", ""))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        let lock = lock_order(&env, &order.order_id).await;
        let mut calls = Vec::new();
        for _ in 0..2 {
            let mut c = c.clone();
            let id = order.order_id.clone();
            calls.push(tokio::spawn(async move {
                c.cancel_order(CancelOrderRequest { order_id: id }).await
            }));
        }
        wait_until("two RPCs in flight", Duration::from_secs(5), || async {
            app.status()["grpc"]["in_flight"] == 2
        })
        .await;
        let _ = app.run_substep(SubStep::StopAccepting, secs(5)).await;
        let started = Instant::now();
        let report = app
            .run_substep(
                SubStep::DrainInFlight,
                Instant::now() + Duration::from_millis(500),
            )
            .await;
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "the deadline is honoured: {:?}",
            started.elapsed()
        );
        assert_eq!(report.outcome(), Outcome::Timeout, "{report:?}");
        assert_eq!(
            (
                report.get("requests_drained"),
                report.get("requests_cancelled")
            ),
            (0, 2)
        );
        for call in calls {
            let status = call.await.unwrap().unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        release(lock).await;
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

/// Issue 10 item 1: a keyed CreateOrder stuck behind a table lock is cancelled at the drain
/// deadline. Its statement must die with it (so close-db does not wait out its budget), its
/// pending marker must go (so a retry is not refused for the marker's lifetime), and a retry
/// on a fresh instance creates the order exactly once.
#[tokio::test]
async fn a_create_cancelled_at_the_drain_deadline_takes_its_db_work_and_its_key_with_it() {
    const KEY: &str = "key-drain";
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(90), async {
        let app = App::start(env.config()).await.expect("start");
        let pool = env.pool().await;
        // The expiry job runs once at start and reads `orders`: let it finish before locking.
        wait_until("the first expiry run", Duration::from_secs(10), || async {
            app.cron().runs() >= 1
        })
        .await;
        let mut blocker = sqlx::PgConnection::connect(&env.database_url())
            .await
            .unwrap();
        sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
        sqlx::query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            .execute(&mut blocker)
            .await
            .unwrap();
        let mut c = client(app.grpc_addr()).await;
        let call = tokio::spawn(async move { c.create_order(create_request("c", KEY)).await });
        let name = app.db().application_name().to_owned();
        wait_until(
            "the insert waiting for the lock",
            Duration::from_secs(10),
            || async { lock_waiters(&pool, Some(&name)).await == 1 },
        )
        .await;

        let _ = app.run_substep(SubStep::StopAccepting, secs(5)).await;
        let drain = app
            .run_substep(
                SubStep::DrainInFlight,
                Instant::now() + Duration::from_millis(500),
            )
            .await;
        assert_eq!(drain.outcome(), Outcome::Timeout, "{drain:?}");
        assert_eq!(drain.get("requests_cancelled"), 1, "{drain:?}");
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        // PostgreSQL aborted the cancelled statement: nothing of this process waits any more.
        wait_until(
            "the cancelled insert aborted",
            Duration::from_secs(5),
            || async { lock_waiters(&pool, Some(&name)).await == 0 },
        )
        .await;

        close_db_at_once_and_marker_gone(&app, &env, KEY).await;
        sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
        assert_eq!(
            orders_with_key(&pool, KEY).await,
            0,
            "the cancelled insert rolled back"
        );
        let app = App::start(env.config()).await.expect("a fresh instance");
        retry_creates_once(&app, &pool, KEY).await;
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

/// The remaining sub-steps after a drain that cancelled a request: close-db finishes at once
/// with no busy connection, and the request's pending marker is gone.
async fn close_db_at_once_and_marker_gone(app: &App, env: &Sandbox, key: &str) {
    for substep in [
        SubStep::StopCron,
        SubStep::StopConsumer,
        SubStep::StopPoller,
        SubStep::CloseMq,
        SubStep::CloseRedis,
    ] {
        let _ = app.run_substep(substep, secs(5)).await;
    }
    let started = Instant::now();
    let close = app.run_substep(SubStep::CloseDb, secs(5)).await;
    assert_eq!(close.outcome(), Outcome::Ok, "{close:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "close-db waited {:?} for the cancelled request's connection",
        started.elapsed()
    );
    assert_eq!(close.get("connections_busy"), 0, "{close:?}");
    assert_eq!(
        idempotency_marker(env, key).await.0,
        None,
        "the cancelled request released its pending marker"
    );
}

/// A retry of `key` on a fresh instance creates the order (nothing had been committed), and a
/// repeat replays it: exactly one order.
async fn retry_creates_once(app: &App, pool: &sqlx::PgPool, key: &str) {
    let mut c = client(app.grpc_addr()).await;
    let first = c
        .create_order(create_request("c", key))
        .await
        .expect("the retry");
    let first = first.into_inner();
    assert!(
        !first.replayed,
        "nothing had been committed: the retry creates it"
    );
    let again = c
        .create_order(create_request("c", key))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.order, first.order);
    assert_eq!(orders_with_key(pool, key).await, 1, "exactly one order");
}

#[tokio::test]
async fn stop_cron_waits_for_the_running_job() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let mut config = env.config();
        config.cron_interval = Duration::from_millis(100);
        config.expire_after = Duration::from_secs(3600);
        let app = App::start(config).await.expect("start");
        let pool = env.pool().await;
        let ids = insert_pending_orders(&pool, 3).await;
        sqlx::query("UPDATE orders SET created_at = now() - interval '2 hours' WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&pool)
            .await
            .unwrap();
        // Block the job's UPDATE behind a table lock, so a run is in progress.
        let mut blocker = sqlx::PgConnection::connect(&env.database_url())
            .await
            .unwrap();
        sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
        sqlx::query("LOCK TABLE orders IN EXCLUSIVE MODE")
            .execute(&mut blocker)
            .await
            .unwrap();
        // A run that started before the lock may finish without needing it: wait until one is
        // really blocked on it (a backend of this database waiting for a lock).
        wait_until("a job run blocked on the lock", Duration::from_secs(10), || async {
            scalar(
                &pool,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await
                >= 1
        })
        .await;
        assert_eq!(app.cron().status()["job_running"], true);
        let stop = tokio::spawn({
            let app = app.clone();
            async move { app.run_substep(SubStep::StopCron, secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stop.is_finished(), "stop-cron waits for the running job");
        sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
        let report = stop.await.unwrap();
        assert_eq!(report.outcome(), Outcome::Ok, "{report:?}");
        assert_eq!(report.get("job_running"), 1);
        assert_eq!(
            report.get("expired_total"),
            3,
            "the job it waited for completed its work"
        );
        let runs = app.cron().runs();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(app.cron().runs(), runs, "no run after stop");
        assert_eq!(
            scalar(
                &pool,
                "SELECT count(*) FROM outbox WHERE event_type = 'order.expired'"
            )
            .await,
            3
        );
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test]
async fn stop_consumer_acks_running_handlers_and_requeues_the_prefetched() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let mut config = env.config();
        config.prefetch = 20;
        config.consumer_concurrency = 4;
        let app = App::start(config).await.expect("start");
        let _ = app.run_substep(SubStep::StopConsumer, secs(5)).await;
        let pool = env.pool().await;
        let ids = insert_pending_orders(&pool, 1).await;
        let amqp = env.amqp().await;
        let ch = confirm_channel(&amqp).await;
        let x = env.topology().payments_exchange;
        let body = format!("{{\"order_id\":\"{}\"}}", ids[0]);
        for i in 0..100 {
            publish_payment(
                &ch,
                &x,
                "payment.succeeded",
                Some(&format!("m-{i}")),
                body.as_bytes(),
            )
            .await;
        }
        stop_all(&app, Duration::from_secs(10)).await;

        // Every message targets one order whose row the test holds: the 4 handlers block.
        let lock = lock_order(&env, &ids[0].to_string()).await;
        let mut config = env.config();
        config.prefetch = 20;
        config.consumer_concurrency = 4;
        let app = App::start(config).await.expect("restart");
        wait_until("4 handlers in flight", Duration::from_secs(10), || async {
            app.consumer().status()["in_flight"] == 4
        })
        .await;
        let stop = tokio::spawn({
            let app = app.clone();
            async move { app.run_substep(SubStep::StopConsumer, secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        release(lock).await;
        let report = stop.await.unwrap();
        assert_eq!(report.outcome(), Outcome::Ok, "{report:?}");
        assert_eq!(report.get("in_flight"), 4);
        assert_eq!(
            report.get("acked"),
            4,
            "running handlers committed and acked"
        );
        assert_eq!(
            report.get("requeued"),
            16,
            "prefetched, never started, handed back"
        );
        assert_eq!(report.get("abandoned"), 0);
        let queue = env.topology().payments_queue;
        wait_until(
            "96 messages back in the queue",
            Duration::from_secs(5),
            || async { queue_depth(&ch, &queue).await == 96 },
        )
        .await;
        assert_eq!(
            scalar(&pool, "SELECT count(*) FROM processed_messages").await,
            4
        );
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

async fn start_idle_poller(env: &Sandbox) -> std::sync::Arc<App> {
    let mut config = env.config();
    config.poll_interval = Duration::from_secs(3600);
    config.poll_batch = 100;
    App::start(config).await.expect("start")
}

async fn insert_events(pool: &sqlx::PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_id, event_type, payload) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'order.created', '{}'::jsonb FROM generate_series(1, $1)",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// The test holds a SHARE lock on `outbox`: the poller can claim (ROW SHARE) and publish, but
/// its `UPDATE ... SET sent_at` waits — a batch stuck in progress.
async fn share_lock_outbox(env: &Sandbox) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(&env.database_url())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("LOCK TABLE outbox IN SHARE MODE")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

#[tokio::test]
async fn stop_poller_finishes_the_batch_in_progress() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = start_idle_poller(&env).await;
        let pool = env.pool().await;
        wait_until("the poller idle", Duration::from_secs(5), || async {
            app.poller().status()["state"] == "running"
                && app.poller().status()["batch_in_progress"] == 0
        })
        .await;
        insert_events(&pool, 20).await;
        let lock = share_lock_outbox(&env).await;
        app.poller().waker().notify_one();
        wait_until(
            "a batch of 20 in progress",
            Duration::from_secs(5),
            || async { app.poller().status()["batch_in_progress"] == 20 },
        )
        .await;
        let stop = tokio::spawn({
            let app = app.clone();
            async move { app.run_substep(SubStep::StopPoller, secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stop.is_finished(), "stop-poller lets the batch finish");
        release(lock).await;
        let report = stop.await.unwrap();
        assert_eq!(report.outcome(), Outcome::Ok, "{report:?}");
        assert_eq!(
            (report.get("batch_in_progress"), report.get("published")),
            (20, 20)
        );
        assert_eq!(
            scalar(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await,
            0
        );
        // Claims no new batch after stopping.
        insert_events(&pool, 5).await;
        app.poller().waker().notify_one();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            scalar(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await,
            5
        );
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test]
async fn stop_poller_at_its_deadline_leaves_the_batch_unsent() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = start_idle_poller(&env).await;
        let pool = env.pool().await;
        wait_until("the poller idle", Duration::from_secs(5), || async {
            app.poller().status()["batch_in_progress"] == 0
        })
        .await;
        insert_events(&pool, 10).await;
        let lock = share_lock_outbox(&env).await;
        app.poller().waker().notify_one();
        wait_until("a batch in progress", Duration::from_secs(5), || async {
            app.poller().status()["batch_in_progress"] == 10
        })
        .await;
        let report = app
            .run_substep(
                SubStep::StopPoller,
                Instant::now() + Duration::from_millis(500),
            )
            .await;
        assert_eq!(report.outcome(), Outcome::Timeout, "{report:?}");
        assert_eq!(
            (report.get("batch_in_progress"), report.get("published")),
            (10, 0)
        );
        release(lock).await;
        // The abandoned batch rolled back: its rows are unsent, to be relayed again.
        assert_eq!(
            scalar(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await,
            10
        );
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test]
async fn the_whole_sequence_runs_in_order_and_closes_everything() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let mut c = client(app.grpc_addr()).await;
        for i in 0..5 {
            c.create_order(create_request(&format!("c{i}"), ""))
                .await
                .unwrap();
        }
        wait_until("5 events relayed", Duration::from_secs(10), || async {
            app.poller().published_total() == 5
        })
        .await;
        let results = stop_all(&app, Duration::from_secs(10)).await;
        let verbs: Vec<String> = results.iter().map(|r| r.step.to_string()).collect();
        assert_eq!(
            verbs,
            [
                "drain",
                "stop-cron",
                "stop-consumer",
                "stop-poller",
                "close"
            ]
        );
        let substeps: Vec<&SubStepReply> = results.iter().flat_map(|r| &r.substeps).collect();
        let names: Vec<String> = substeps.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, SubStep::ALL.map(SubStep::as_str));
        assert!(
            results.iter().all(|r| r.outcome == ProtocolOutcome::Ok),
            "{results:#?}"
        );
        let count = |results: &[order_service::StepReply], substep: &str, name: &str| {
            results
                .iter()
                .flat_map(|r| &r.substeps)
                .find(|s| s.name.to_string() == substep)
                .and_then(|s| s.counts.get(name).copied())
                .unwrap_or(0)
        };
        assert_eq!(count(&results, "stop-accepting", "listener_closed"), 1);
        assert_eq!(count(&results, "close-mq", "closed"), 1);
        assert_eq!(count(&results, "close-redis", "closed"), 1);
        assert!(count(&results, "close-db", "connections_open") >= 1);
        assert!(app.db().is_closed());
        // Running the handlers again (a fresh agent) is harmless: nothing is left to do.
        let again = stop_all(&app, Duration::from_secs(5)).await;
        assert_eq!(again.len(), 5);
        assert_eq!(count(&again, "close-mq", "closed"), 0);
        assert_eq!(count(&again, "close-redis", "closed"), 0);
    })
    .await;
}
