//! The payment consumer against real RabbitMQ and PostgreSQL: duplicates have no second
//! effect, poison is dead-lettered, and a consumer stopped mid-stream with 10,000 messages
//! queued loses none and applies each exactly once after a restart.

mod common;

use std::time::Duration;

use common::{
    confirm_channel, hard_timeout, insert_pending_orders, publish_payment, queue_depth, sandbox,
    scalar, wait_until,
};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use order_service::App;
use order_service::control::{SubStep, stop_all};
use order_service::report::ReportExt;
use tokio::time::Instant;

#[tokio::test]
async fn duplicates_change_nothing_and_poison_is_dead_lettered() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let pool = env.pool().await;
        let ids = insert_pending_orders(&pool, 3).await;
        let amqp = env.amqp().await;
        let ch = confirm_channel(&amqp).await;
        let x = env.topology().payments_exchange;
        let body = |id: &uuid::Uuid| {
            format!("{{\"order_id\":\"{id}\",\"amount_cents\":100}}").into_bytes()
        };

        publish_payment(&ch, &x, "payment.succeeded", Some("pay-a"), &body(&ids[0])).await;
        publish_payment(&ch, &x, "payment.succeeded", Some("pay-a"), &body(&ids[0])).await;
        publish_payment(&ch, &x, "payment.failed", Some("pay-b"), &body(&ids[1])).await;
        // A later, different message for an order already paid: recorded, no change.
        publish_payment(&ch, &x, "payment.failed", Some("pay-c"), &body(&ids[0])).await;
        // Poison: no message_id, unparseable body, unknown order, unknown routing key.
        publish_payment(&ch, &x, "payment.succeeded", None, &body(&ids[2])).await;
        publish_payment(&ch, &x, "payment.succeeded", Some("pay-d"), b"{not json").await;
        publish_payment(
            &ch,
            &x,
            "payment.succeeded",
            Some("pay-e"),
            &body(&uuid::Uuid::new_v4()),
        )
        .await;
        publish_payment(&ch, &x, "payment.refunded", Some("pay-f"), &body(&ids[2])).await;

        let dlq = env.topology().dead_letter_queue;
        wait_until(
            "4 dead-lettered messages",
            Duration::from_secs(15),
            || async { queue_depth(&ch, &dlq).await == 4 },
        )
        .await;
        wait_until("4 messages acked", Duration::from_secs(15), || async {
            app.consumer().acked_total() == 4
        })
        .await;
        let status = |id: uuid::Uuid| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, String>("SELECT status FROM orders WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(status(ids[0]).await, "paid");
        assert_eq!(status(ids[1]).await, "payment_failed");
        assert_eq!(status(ids[2]).await, "pending", "poison changed nothing");
        assert_eq!(
            scalar(&pool, "SELECT count(*) FROM processed_messages").await,
            3
        );
        assert_eq!(
            scalar(
                &pool,
                "SELECT count(*) FROM outbox WHERE event_type = 'order.paid'"
            )
            .await,
            1,
            "the duplicate wrote no second event"
        );
        let c = app.consumer().status();
        assert_eq!(c["duplicates_total"], 1);
        assert_eq!(c["dead_lettered_total"], 4);
        assert_eq!(queue_depth(&ch, &env.topology().payments_queue).await, 0);
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

/// ≥ 10,000 messages queued; the consumer is stopped while working through them, then a new
/// instance finishes. Every message has exactly one effect, none is lost.
#[tokio::test]
async fn stop_mid_stream_then_restart_applies_every_message_exactly_once() {
    const N: usize = 10_000;
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(240), async {
        let mut config = env.config();
        config.prefetch = 200;
        config.consumer_concurrency = 16;
        // Declare the topology and stop the consumer at once, so all N are queued first.
        let app = App::start(config.clone()).await.expect("start");
        let _ = app
            .run_substep(
                SubStep::StopConsumer,
                Instant::now() + Duration::from_secs(5),
            )
            .await;
        let pool = env.pool().await;
        let ids = insert_pending_orders(&pool, N).await;
        let amqp = env.amqp().await;
        let ch = confirm_channel(&amqp).await;
        let x = env.topology().payments_exchange;
        let mut pending = Vec::with_capacity(N);
        for (i, id) in ids.iter().enumerate() {
            let body = format!("{{\"order_id\":\"{id}\"}}");
            let props = BasicProperties::default()
                .with_message_id(format!("pay-{i}").into())
                .with_delivery_mode(2);
            pending.push(
                ch.basic_publish(
                    x.as_str().into(),
                    "payment.succeeded".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .unwrap(),
            );
        }
        for confirm in pending {
            assert!(confirm.await.unwrap().is_ack());
        }
        let queue = env.topology().payments_queue;
        assert_eq!(queue_depth(&ch, &queue).await as usize, N);
        stop_all(&app, Duration::from_secs(10)).await;

        // First instance: stop its consumer part-way.
        let first = App::start(config.clone())
            .await
            .expect("start the first consumer");
        wait_until(
            "a few thousand messages applied",
            Duration::from_secs(120),
            || async { first.consumer().acked_total() >= 2_000 },
        )
        .await;
        let report = first
            .run_substep(
                SubStep::StopConsumer,
                Instant::now() + Duration::from_secs(10),
            )
            .await;
        assert_eq!(
            report.outcome(),
            order_service::report::Outcome::Ok,
            "{report:?}"
        );
        let applied_first = scalar(&pool, "SELECT count(*) FROM processed_messages").await;
        assert_eq!(
            applied_first as u64,
            first.consumer().acked_total(),
            "every commit was acked, nothing acked without a commit"
        );
        assert!(
            (applied_first as usize) < N,
            "stopped mid-stream ({applied_first} of {N})"
        );
        // Nothing in flight on the stopped channel: what is left is back in the queue.
        wait_until(
            "unprocessed messages back in the queue",
            Duration::from_secs(10),
            || async { queue_depth(&ch, &queue).await as i64 == N as i64 - applied_first },
        )
        .await;
        stop_all(&first, Duration::from_secs(10)).await;

        // Second instance finishes.
        let second = App::start(config).await.expect("start the second consumer");
        wait_until(
            "every message applied",
            Duration::from_secs(180),
            || async { scalar(&pool, "SELECT count(*) FROM processed_messages").await == N as i64 },
        )
        .await;
        wait_until("the queue empty", Duration::from_secs(10), || async {
            queue_depth(&ch, &queue).await == 0
        })
        .await;
        assert_eq!(
            scalar(&pool, "SELECT count(*) FROM orders WHERE status = 'paid'").await,
            N as i64
        );
        assert_eq!(
            scalar(
                &pool,
                "SELECT count(*) FROM outbox WHERE event_type = 'order.paid'"
            )
            .await,
            N as i64,
            "one order.paid event per order: no message had a second effect"
        );
        assert_eq!(
            scalar(
                &pool,
                "SELECT count(DISTINCT aggregate_id) FROM outbox WHERE event_type = 'order.paid'"
            )
            .await,
            N as i64
        );
        assert_eq!(queue_depth(&ch, &env.topology().dead_letter_queue).await, 0);
        stop_all(&second, Duration::from_secs(10)).await;
    })
    .await;
}
