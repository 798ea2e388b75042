//! The outbox relay against real PostgreSQL and RabbitMQ: committed events reach a bound queue
//! with their event id as message_id; a broker-side failure opens the circuit breaker, nothing
//! is marked sent meanwhile, and everything is relayed after recovery.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    client, create_request, drain_queue, fetch_metrics, hard_timeout, metric_value, queue_depth,
    sandbox, scalar, wait_until,
};
use lapin::options::ExchangeDeleteOptions;
use order_service::App;
use order_service::control::stop_all;
use order_service::proto::CancelOrderRequest;
use uuid::Uuid;

async fn event_ids(pool: &sqlx::PgPool) -> HashSet<String> {
    sqlx::query_scalar::<_, Uuid>("SELECT event_id FROM outbox")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.to_string())
        .collect()
}

#[tokio::test]
async fn committed_events_arrive_on_a_bound_queue() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(90), async {
        let app = App::start(env.config()).await.expect("start");
        let amqp = env.amqp().await;
        let channel = amqp.create_channel().await.unwrap();
        let queue = env.bind_event_queue(&channel, "all", "order.#").await;
        let mut c = client(app.grpc_addr()).await;
        let mut first = None;
        for i in 0..50 {
            let o = c
                .create_order(create_request(&format!("c{i}"), ""))
                .await
                .unwrap();
            first.get_or_insert(o.into_inner().order.unwrap().order_id);
        }
        c.cancel_order(CancelOrderRequest {
            order_id: first.unwrap(),
        })
        .await
        .unwrap();

        wait_until(
            "51 events on the test queue",
            Duration::from_secs(20),
            || async { queue_depth(&channel, &queue).await >= 51 },
        )
        .await;
        let pool = env.pool().await;
        wait_until(
            "every outbox row marked sent",
            Duration::from_secs(10),
            || async {
                scalar(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await == 0
            },
        )
        .await;
        let messages = drain_queue(&channel, &queue).await;
        assert_eq!(messages.len(), 51);
        let received: HashSet<String> = messages.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(
            received,
            event_ids(&pool).await,
            "message_id = outbox event_id, each once"
        );
        let types: Vec<String> = messages
            .iter()
            .map(|(_, body)| {
                let v: serde_json::Value = serde_json::from_slice(body).unwrap();
                v["event_type"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(types.iter().filter(|t| *t == "order.created").count(), 50);
        assert_eq!(types.iter().filter(|t| *t == "order.cancelled").count(), 1);
        let metrics_addr = app.metrics_addr().unwrap();
        wait_until(
            "outbox_unsent_events_total 0",
            Duration::from_secs(10),
            || async {
                metric_value(
                    &fetch_metrics(metrics_addr).await,
                    "outbox_unsent_events_total",
                ) == Some(0.0)
            },
        )
        .await;
        let text = fetch_metrics(metrics_addr).await;
        assert_eq!(metric_value(&text, "outbox_published_total"), Some(51.0));
        assert!(text.contains("outbox_relay_lag_seconds_bucket{event_type=\"order.created\""));
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test]
async fn broker_failure_opens_the_breaker_and_nothing_is_lost() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(90), async {
        let mut config = env.config();
        config.breaker_failures = 2;
        config.breaker_open_for = Duration::from_millis(500);
        let app = App::start(config).await.expect("start");
        let amqp = env.amqp().await;
        let channel = amqp.create_channel().await.unwrap();
        let queue = env.bind_event_queue(&channel, "all", "#").await;
        // Publishing to a missing exchange is a channel error: every batch fails.
        channel
            .exchange_delete(
                env.topology().events_exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
        let mut c = client(app.grpc_addr()).await;
        for i in 0..20 {
            c.create_order(create_request(&format!("c{i}"), ""))
                .await
                .unwrap();
        }
        let metrics_addr = app.metrics_addr().unwrap();
        let open = "circuit_breaker_state{breaker=\"outbox_publisher\",state=\"open\"}";
        wait_until("the breaker to open", Duration::from_secs(20), || async {
            metric_value(&fetch_metrics(metrics_addr).await, open) == Some(1.0)
        })
        .await;
        let pool = env.pool().await;
        assert_eq!(
            scalar(
                &pool,
                "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL"
            )
            .await,
            0,
            "nothing is marked sent without a confirm"
        );
        assert_eq!(app.poller().status()["breaker"], "open");
        let failures = metric_value(
            &fetch_metrics(metrics_addr).await,
            "outbox_publish_failures_total",
        );
        assert!(failures.is_some_and(|f| f >= 2.0), "{failures:?}");

        // The broker recovers: the exchange is back (and the test queue bound again).
        env.topology().declare(&channel).await.unwrap();
        let rebound = env.bind_event_queue(&channel, "all", "#").await;
        assert_eq!(rebound, queue);
        let closed = "circuit_breaker_state{breaker=\"outbox_publisher\",state=\"closed\"}";
        wait_until("every event relayed", Duration::from_secs(20), || async {
            scalar(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await == 0
        })
        .await;
        assert_eq!(
            metric_value(&fetch_metrics(metrics_addr).await, closed),
            Some(1.0)
        );
        let messages = drain_queue(&channel, &queue).await;
        let received: HashSet<String> = messages.into_iter().map(|(id, _)| id).collect();
        assert_eq!(received, event_ids(&pool).await);
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}
