//! The payment provider: publishes one payment message per order the load created, at a fixed
//! rate, with publisher confirms, through broker restarts (it reconnects and re-sends the same
//! message id, so a message whose confirm was lost is at worst a duplicate). One in ten is
//! `payment.failed`; one in ten is published twice on purpose (same `message_id`): a duplicate
//! must have no second effect.

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::sandbox::amqp;

/// One payment message as published (confirmed by the broker).
#[derive(Debug, Clone)]
pub struct Published {
    pub message_id: String,
    pub order_id: String,
    pub succeeded: bool,
    /// Confirmed copies (2 for a deliberate duplicate). 0 means sent but never confirmed (the
    /// broker went away): it may or may not have arrived, so it may have one effect, never two.
    pub copies: u32,
    /// Publish attempts (more than `copies` after a failure).
    pub attempts: u32,
    pub at: Instant,
}

impl Published {
    /// A new message (its own id) for `order_id`, not yet sent.
    fn new(order_id: String, succeeded: bool) -> Published {
        Published {
            message_id: format!("e2e-pay-{}", uuid::Uuid::new_v4().simple()),
            order_id,
            succeeded,
            copies: 0,
            attempts: 0,
            at: Instant::now(),
        }
    }

    pub fn routing_key(&self) -> &'static str {
        if self.succeeded {
            "payment.succeeded"
        } else {
            "payment.failed"
        }
    }

    /// The order status the message must leave.
    pub fn expected_status(&self) -> &'static str {
        if self.succeeded {
            "paid"
        } else {
            "payment_failed"
        }
    }
}

/// What the publisher did.
#[derive(Debug, Default)]
pub struct PublishResult {
    pub published: Vec<Published>,
    /// Publish attempts that failed (broker down); each was retried.
    pub errors: u64,
    pub reconnects: u64,
}

impl PublishResult {
    pub fn copies(&self) -> u64 {
        self.published.iter().map(|p| u64::from(p.copies)).sum()
    }
}

async fn connect() -> Result<(Connection, Channel), String> {
    let conn = amqp().await.map_err(|e| e.to_string())?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, channel))
}

async fn publish(channel: &Channel, exchange: &str, p: &Published) -> Result<(), String> {
    let body = format!("{{\"order_id\":\"{}\",\"amount_cents\":4497}}", p.order_id);
    let id = Some(p.message_id.as_str());
    order_service::testing::publish(channel, exchange, p.routing_key(), id, body.as_bytes()).await
}

/// Publishes `p` until `wanted` copies are confirmed, (re)connecting `conn` as needed; gives
/// up when `stop` turns true while the broker is away. Returns whether it gave up.
async fn deliver(
    exchange: &str,
    conn: &mut Option<(Connection, Channel)>,
    out: &mut PublishResult,
    p: &mut Published,
    wanted: u32,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut stopping = false;
    while p.copies < wanted && !stopping {
        if conn.is_none() {
            match connect().await {
                Ok(c) => {
                    *conn = Some(c);
                    out.reconnects += 1;
                }
                Err(_) => {
                    out.errors += 1;
                    tokio::select! {
                        biased;
                        r = stop.wait_for(|s| *s) => { let _ = r; stopping = true; }
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                }
            }
        }
        let Some((_, channel)) = conn.as_ref() else {
            continue;
        };
        p.attempts += 1;
        match publish(channel, exchange, p).await {
            Ok(()) => {
                p.copies += 1;
                p.at = Instant::now();
            }
            Err(_) => {
                // Unknown whether the broker has it: reconnect and send the same id again.
                out.errors += 1;
                if let Some((c, _)) = conn.take() {
                    let _ = c.close(200, "republishing".into()).await;
                }
                stopping = *stop.borrow();
            }
        }
    }
    stopping
}

/// Publishes at `rate` per second until `stop`; takes order ids from `orders`.
pub async fn run(
    exchange: String,
    rate: u32,
    mut orders: mpsc::UnboundedReceiver<String>,
    mut stop: watch::Receiver<bool>,
) -> PublishResult {
    let mut out = PublishResult::default();
    let mut conn: Option<(Connection, Channel)> = None;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            biased;
            r = stop.wait_for(|s| *s) => { let _ = r; break; }
            _ = ticks.tick() => {}
        }
        let Ok(order_id) = orders.try_recv() else {
            continue;
        };
        n += 1;
        let mut p = Published::new(order_id, n % 10 != 3);
        let wanted = if n % 10 == 7 { 2 } else { 1 };
        let stopping = deliver(&exchange, &mut conn, &mut out, &mut p, wanted, &mut stop).await;
        if p.attempts > 0 {
            out.published.push(p);
        }
        if stopping {
            break;
        }
    }
    if let Some((c, _)) = conn {
        let _ = c.close(200, "publisher done".into()).await;
    }
    out
}

/// Publishes one `payment.succeeded` for `order_id` outside the rate loop (fault setups).
pub async fn publish_one(exchange: &str, order_id: &str) -> Result<Published, String> {
    let (conn, channel) = connect().await?;
    let mut p = Published::new(order_id.to_owned(), true);
    p.attempts = 1;
    let r = publish(&channel, exchange, &p).await;
    let _ = conn.close(200, "published one".into()).await;
    r?;
    p.copies = 1;
    Ok(p)
}
