//! SIGKILL in the middle of relaying: after a restart every committed outbox event has been
//! published at least once (duplicates allowed; consumers deduplicate by message_id).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    ServiceProcess, client, create_request, drain_queue, hard_timeout, queue_depth, sandbox,
    scalar, wait_until,
};
use nix::sys::signal::Signal;
use uuid::Uuid;

#[tokio::test]
async fn sigkill_mid_relay_then_restart_publishes_every_committed_event() {
    const BULK: i64 = 6_000;
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(180), async {
        // The topology and a queue catching every event exist before the first relay.
        let amqp = env.amqp().await;
        let channel = amqp.create_channel().await.unwrap();
        env.topology().declare(&channel).await.unwrap();
        let queue = env.bind_event_queue(&channel, "all", "#").await;

        let small_batches = [("APP_POLL_BATCH", "20")];
        let mut first = ServiceProcess::spawn(&env, &small_batches).await;
        let mut c = client(first.grpc).await;
        for i in 0..100 {
            c.create_order(create_request(&format!("c{i}"), ""))
                .await
                .unwrap();
        }
        // A burst of committed events the relay needs hundreds of batches for.
        let pool = env.pool().await;
        sqlx::query(
            "INSERT INTO outbox (event_id, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), gen_random_uuid(), 'order.created', '{}'::jsonb \
             FROM generate_series(1, $1)",
        )
        .bind(BULK)
        .execute(&pool)
        .await
        .unwrap();
        let total = scalar(&pool, "SELECT count(*) FROM outbox").await;
        assert_eq!(total, BULK + 100);
        wait_until("the relay under way", Duration::from_secs(30), || async {
            scalar(
                &pool,
                "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL",
            )
            .await
                >= 1_000
        })
        .await;
        first.signal(Signal::SIGKILL);
        let status = first.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.code(), None, "killed by a signal");
        let sent_at_kill = scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL",
        )
        .await;
        assert!(
            sent_at_kill < total,
            "killed mid-relay: {sent_at_kill} of {total} sent"
        );

        let _second = ServiceProcess::spawn(&env, &small_batches).await;
        wait_until(
            "every event marked sent",
            Duration::from_secs(90),
            || async {
                scalar(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await == 0
            },
        )
        .await;
        wait_until(
            "the queue holding at least every event",
            Duration::from_secs(30),
            || async { i64::from(queue_depth(&channel, &queue).await) >= total },
        )
        .await;
        let received = drain_queue(&channel, &queue).await;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (id, _) in &received {
            *seen.entry(id.clone()).or_default() += 1;
        }
        let committed: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox")
            .fetch_all(&pool)
            .await
            .unwrap();
        let missing: Vec<&Uuid> = committed
            .iter()
            .filter(|id| !seen.contains_key(&id.to_string()))
            .collect();
        assert!(
            missing.is_empty(),
            "{} committed events never published",
            missing.len()
        );
        assert_eq!(
            seen.len() as i64,
            total,
            "nothing published that was not committed"
        );
        let duplicates = received.len() as i64 - total;
        eprintln!(
            "killed with {sent_at_kill}/{total} sent; {duplicates} duplicate(s) after the restart"
        );
        // At most the batches in flight at the kill are published twice.
        assert!(duplicates <= 20 * 2, "{duplicates} duplicates");
    })
    .await;
}
