//! The broker drops the service's connection (`rabbitmqctl close_connection`, as in a broker
//! restart or a network cut): the outbox relay and the payment consumer reconnect by
//! themselves and nothing committed meanwhile is lost.

mod common;

use std::time::Duration;

use common::{
    client, confirm_channel, create_request, hard_timeout, insert_pending_orders, publish_payment,
    queue_depth, sandbox, scalar, wait_until,
};
use order_service::App;
use order_service::control::stop_all;

/// The broker-side ids of the connections named `order-service <prefix>`.
async fn connection_pids(prefix: &str) -> Vec<String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "--quiet",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .expect("run rabbitmqctl (installed with rabbitmq-server)");
    assert!(
        out.status.success(),
        "rabbitmqctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "{{\"connection_name\",\"order-service {prefix}\"}}"
            ))
        })
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn relay_and_consumer_recover_from_a_dropped_connection() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(120), async {
        let app = App::start(env.config()).await.expect("start");
        let amqp = env.amqp().await;
        let channel = amqp.create_channel().await.unwrap();
        let queue = env.bind_event_queue(&channel, "all", "order.created").await;

        let before = connection_pids(&env.mq_prefix).await;
        assert_eq!(before.len(), 1, "one connection per instance: {before:?}");
        let closed = tokio::process::Command::new("rabbitmqctl")
            .args([
                "close_connection",
                &before[0],
                "test: simulated broker failure",
            ])
            .output()
            .await
            .unwrap();
        assert!(
            closed.status.success(),
            "{}",
            String::from_utf8_lossy(&closed.stderr)
        );
        wait_until(
            "the old connection gone",
            Duration::from_secs(10),
            || async { !connection_pids(&env.mq_prefix).await.contains(&before[0]) },
        )
        .await;

        // Committed while the connection is down or being re-established.
        let mut c = client(app.grpc_addr()).await;
        for i in 0..10 {
            c.create_order(create_request(&format!("c{i}"), ""))
                .await
                .unwrap();
        }
        let pool = env.pool().await;
        wait_until(
            "every event relayed after reconnecting",
            Duration::from_secs(30),
            || async {
                scalar(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await == 0
            },
        )
        .await;
        assert_eq!(queue_depth(&channel, &queue).await, 10);

        let ids = insert_pending_orders(&pool, 1).await;
        let ch = confirm_channel(&amqp).await;
        let body = format!("{{\"order_id\":\"{}\"}}", ids[0]);
        publish_payment(
            &ch,
            &env.topology().payments_exchange,
            "payment.succeeded",
            Some("after-reconnect"),
            body.as_bytes(),
        )
        .await;
        wait_until(
            "the consumer resubscribed and applied the payment",
            Duration::from_secs(30),
            || async { scalar(&pool, "SELECT count(*) FROM processed_messages").await == 1 },
        )
        .await;
        let after = connection_pids(&env.mq_prefix).await;
        assert_eq!(after.len(), 1, "reconnected once: {after:?}");
        assert_ne!(after[0], before[0]);
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}
