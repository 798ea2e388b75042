//! RabbitMQ for tests: publishing with confirms, reading a queue's depth, emptying a queue.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

/// How long [`publish`] waits for the broker's confirm.
pub const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

/// A confirm-mode channel on `conn`, for publishing test messages.
pub async fn confirm_channel(conn: &Connection) -> Channel {
    let channel = conn
        .create_channel()
        .await
        .expect("open a RabbitMQ channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    channel
}

/// Publishes a persistent JSON message (with `message_id` when given) on a confirm-mode
/// `channel` and waits up to [`CONFIRM_WITHIN`] for the broker's ack; the error says what
/// failed (the caller decides whether to reconnect or fail the test).
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    message_id: Option<&str>,
    body: &[u8],
) -> Result<(), String> {
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(id) = message_id {
        props = props.with_message_id(id.into());
    }
    let confirm = tokio::time::timeout(CONFIRM_WITHIN, async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("no publisher confirm within {} s", CONFIRM_WITHIN.as_secs()))??;
    if confirm.is_ack() {
        Ok(())
    } else {
        Err("the broker nacked the message".into())
    }
}

/// [`publish`], failing the test when the message is not confirmed.
pub async fn publish_payment(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    message_id: Option<&str>,
    body: &[u8],
) {
    if let Err(e) = publish(channel, exchange, routing_key, message_id, body).await {
        panic!("cannot publish a test message to `{exchange}` ({routing_key}): {e}");
    }
}

/// Messages ready in `queue` (passive declare). Panics naming the queue when it does not exist
/// or the broker cannot answer: a depth of 0 always means an empty queue.
pub async fn queue_depth(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot read the depth of queue `{queue}`: the passive declare failed ({e}); the queue does not exist (was the sandbox's topology declared?) or the broker refused"
            )
        })
        .message_count()
}

/// Takes every ready message off `queue` (basic.get + ack), returning their message_ids and
/// bodies.
pub async fn drain_queue(channel: &Channel, queue: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(msg) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        let id = msg
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        out.push((id, msg.delivery.data.clone()));
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    out
}
