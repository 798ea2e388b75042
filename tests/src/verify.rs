//! The zero-loss checks, read from the database and the broker after the pods are gone:
//!
//! - every confirmed payment message had exactly one effect: its id is in
//!   `processed_messages` as applied, its order has the status it asked for, and the order has
//!   exactly one payment event in the outbox (a duplicate or a redelivery would add a second);
//! - every committed outbox event was published: no row is left unsent, and every event id
//!   arrived (as `message_id`) on the test's own queue bound to the app's events exchange;
//! - every order a client was told was created exists.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::payments::Published;
use crate::sandbox::{Sandbox, amqp};

/// Payment effects.
#[derive(Debug, Default, Clone)]
pub struct PaymentCheck {
    /// Distinct message ids published (confirmed at least once).
    pub confirmed: usize,
    /// Confirmed copies in total (deliberate duplicates included).
    pub copies: u64,
    /// Sent but never confirmed (broker down): may have one effect, never two.
    pub unconfirmed: usize,
    /// Confirmed messages whose effect is in the database.
    pub applied: usize,
    /// Orders with more than one payment event.
    pub double_effects: usize,
    pub problems: Vec<String>,
    /// Messages left in the payments queue and its dead-letter queue.
    pub queue_left: u32,
    pub dead_lettered: u32,
}

/// Outbox events.
#[derive(Debug, Default, Clone)]
pub struct EventCheck {
    pub committed: usize,
    pub unsent: i64,
    /// Deliveries on the test queue (duplicates included).
    pub received: usize,
    pub received_unique: usize,
    /// Committed event ids never received.
    pub missing: Vec<String>,
}

/// Orders acknowledged to clients.
#[derive(Debug, Default, Clone)]
pub struct OrderCheck {
    pub acknowledged: usize,
    pub found: usize,
}

async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1)
}

/// Outbox rows not yet relayed (-1 when the database cannot answer).
pub async fn unsent_outbox(pool: &PgPool) -> i64 {
    scalar(pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await
}

/// Messages ready in `queue` (passive declare). Panics, naming the queue and the cause, when
/// RabbitMQ cannot be reached or the queue does not exist: a depth of 0 must mean an empty queue,
/// never a broker that is down. The connection is retried for up to 10 s (the RabbitMQ-restart
/// scenario reads the depth shortly after the broker came back).
pub async fn queue_depth(queue: &str) -> u32 {
    let conn = connect_for_depth(queue, Duration::from_secs(10)).await;
    let channel = conn.create_channel().await.unwrap_or_else(|e| {
        panic!("cannot read the depth of queue `{queue}`: opening a RabbitMQ channel failed: {e}")
    });
    let depth = order_service::testing::queue_depth(&channel, queue).await;
    let _ = conn.close(200, "depth".into()).await;
    depth
}

/// A connection to RabbitMQ, retried every 200 ms for up to `within`; panics naming `queue`.
async fn connect_for_depth(queue: &str, within: Duration) -> Connection {
    let deadline = Instant::now() + within;
    loop {
        match amqp().await {
            Ok(conn) => return conn,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "cannot read the depth of queue `{queue}`: RabbitMQ (TEST_AMQP_URL or the local default) is not reachable after 10 s ({e}); is it running?"
            ),
        }
    }
}

/// Waits (polling, up to `within`) until every confirmed message is processed, then checks
/// each one's effect.
pub async fn payments(
    pool: &PgPool,
    sandbox: &Sandbox,
    published: &[Published],
    within: Duration,
) -> PaymentCheck {
    let confirmed: Vec<&Published> = published.iter().filter(|p| p.copies > 0).collect();
    let ids: Vec<String> = confirmed.iter().map(|p| p.message_id.clone()).collect();
    wait_processed(pool, &ids, within).await;
    let mut out = PaymentCheck {
        confirmed: confirmed.len(),
        copies: confirmed.iter().map(|p| u64::from(p.copies)).sum(),
        unconfirmed: published.len() - confirmed.len(),
        ..PaymentCheck::default()
    };
    let by_id: BTreeMap<&str, &Published> = published
        .iter()
        .map(|p| (p.message_id.as_str(), p))
        .collect();
    for effect in read_effects(pool, published).await {
        if let Some(p) = by_id.get(effect.id.as_str()) {
            out.judge(p, effect);
        }
    }
    out.queue_left = queue_depth(&sandbox.payments_queue()).await;
    out.dead_lettered = queue_depth(&sandbox.dead_letter_queue()).await;
    out
}

/// Polls until every message of `ids` is in `processed_messages`, or `within` passed.
async fn wait_processed(pool: &PgPool, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM processed_messages WHERE message_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(pool)
        .await
        .unwrap_or(-1);
        if n == ids.len() as i64 || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one payment message left in the database.
struct Effect {
    id: String,
    /// `processed_messages.effect`.
    effect: Option<String>,
    /// Its order's status.
    status: Option<String>,
    /// Payment events of its order in the outbox.
    events: i64,
}

/// Each published message's effect, order status and its order's payment events.
async fn read_effects(pool: &PgPool, published: &[Published]) -> Vec<Effect> {
    let all_ids: Vec<String> = published.iter().map(|p| p.message_id.clone()).collect();
    let orders: Vec<uuid::Uuid> = published
        .iter()
        .map(|p| p.order_id.parse().unwrap_or_default())
        .collect();
    let rows: Vec<(String, Option<String>, Option<String>, i64)> = sqlx::query_as(
        "SELECT m.id, pm.effect, o.status, \
                (SELECT count(*) FROM outbox e WHERE e.aggregate_id = m.order_id \
                   AND e.event_type IN ('order.paid', 'order.payment_failed')) \
         FROM unnest($1::text[], $2::uuid[]) AS m(id, order_id) \
         LEFT JOIN processed_messages pm ON pm.message_id = m.id \
         LEFT JOIN orders o ON o.id = m.order_id",
    )
    .bind(&all_ids)
    .bind(&orders)
    .fetch_all(pool)
    .await
    .expect("read the payment effects");
    rows.into_iter()
        .map(|(id, effect, status, events)| Effect {
            id,
            effect,
            status,
            events,
        })
        .collect()
}

impl PaymentCheck {
    /// Counts `p`'s effect as applied exactly once, or records what is wrong with it.
    fn judge(&mut self, p: &Published, e: Effect) {
        let Effect {
            id,
            effect,
            status,
            events,
        } = e;
        if events > 1 {
            self.double_effects += 1;
            self.problems.push(format!(
                "{id}: order {} has {events} payment events",
                p.order_id
            ));
        }
        let want = format!("applied:{}", p.expected_status());
        if p.copies == 0 {
            // May or may not have arrived; if it did, exactly one effect.
            if effect.is_some() && effect.as_deref() != Some(want.as_str()) {
                self.problems
                    .push(format!("{id} (unconfirmed): effect {effect:?}"));
            }
            return;
        }
        if effect.as_deref() == Some(want.as_str())
            && status.as_deref() == Some(p.expected_status())
            && events == 1
        {
            self.applied += 1;
        } else {
            self.problems.push(format!(
                "{id}: effect {effect:?}, order {} status {status:?}, {events} payment events; expected {want}",
                p.order_id
            ));
        }
    }
}

/// Waits (up to `within`) until the outbox has no unsent row and every committed event id
/// arrived on the sandbox's events queue.
pub async fn events(pool: &PgPool, sandbox: &Sandbox, within: Duration) -> EventCheck {
    let deadline = Instant::now() + within;
    let mut unsent = unsent_outbox(pool).await;
    while unsent != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        unsent = unsent_outbox(pool).await;
    }
    let committed: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox")
        .fetch_all(pool)
        .await
        .expect("read the outbox");
    let committed: BTreeSet<String> = committed.iter().map(|u| u.to_string()).collect();
    let mut received = 0usize;
    let mut seen = BTreeSet::new();
    let conn = amqp()
        .await
        .expect("connect to RabbitMQ to read the events queue");
    let channel = conn.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            sandbox.events_queue().as_str().into(),
            "e2e-events".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume the events test queue");
    loop {
        let all = committed.iter().all(|id| seen.contains(id));
        // Once everything arrived, wait a little longer for late duplicates, then stop.
        let wait = if all {
            Duration::from_millis(300)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        if wait.is_zero() {
            break;
        }
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                received += 1;
                if let Some(id) = d.properties.message_id() {
                    seen.insert(id.as_str().to_owned());
                }
            }
            _ => break,
        }
    }
    let _ = conn.close(200, "events read".into()).await;
    EventCheck {
        committed: committed.len(),
        unsent,
        received,
        received_unique: seen.len(),
        missing: committed
            .iter()
            .filter(|id| !seen.contains(*id))
            .take(20)
            .cloned()
            .collect(),
    }
}

/// Every order id a client got back from CreateOrder exists.
pub async fn acknowledged_orders(pool: &PgPool, ids: &[String]) -> OrderCheck {
    let uuids: Vec<uuid::Uuid> = ids.iter().filter_map(|i| i.parse().ok()).collect();
    let found: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1)")
        .bind(&uuids)
        .fetch_one(pool)
        .await
        .expect("count acknowledged orders");
    OrderCheck {
        acknowledged: ids.len(),
        found: found as usize,
    }
}
