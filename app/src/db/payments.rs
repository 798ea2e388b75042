//! Applying a payment message exactly once: the message id is recorded in
//! `processed_messages` in the same transaction as the order change, so a redelivered or
//! duplicated message finds its id already there and changes nothing.

use sqlx::PgPool;
use uuid::Uuid;

use super::orders;
use crate::domain::{OrderStatus, events};

/// Which payment message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentKind {
    /// `payment.succeeded` → paid.
    Succeeded,
    /// `payment.failed` → payment_failed.
    Failed,
}

impl PaymentKind {
    /// From the routing key.
    pub fn from_routing_key(key: &str) -> Option<Self> {
        match key {
            "payment.succeeded" => Some(Self::Succeeded),
            "payment.failed" => Some(Self::Failed),
            _ => None,
        }
    }

    /// The routing key.
    pub fn routing_key(self) -> &'static str {
        match self {
            Self::Succeeded => "payment.succeeded",
            Self::Failed => "payment.failed",
        }
    }
}

/// What a payment message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentEffect {
    /// The order moved to this status (and its event was written).
    Applied(OrderStatus),
    /// The message id was seen before: nothing changed.
    Duplicate,
    /// The order was no longer pending (e.g. cancelled, expired); recorded, nothing changed.
    Ignored(OrderStatus),
    /// No such order: the message is poison (dead-lettered), nothing recorded.
    UnknownOrder,
}

/// Applies one payment message in one transaction.
#[tracing::instrument(name = "db.apply_payment", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "UPDATE"))]
pub async fn apply(
    pool: &PgPool,
    message_id: &str,
    kind: PaymentKind,
    order_id: Uuid,
) -> Result<PaymentEffect, sqlx::Error> {
    let (to, event) = match kind {
        PaymentKind::Succeeded => (OrderStatus::Paid, events::ORDER_PAID),
        PaymentKind::Failed => (OrderStatus::PaymentFailed, events::ORDER_PAYMENT_FAILED),
    };
    let mut tx = pool.begin().await?;
    // Concurrent deliveries of one message serialise on the order row (the UPDATE in
    // `transition`) or, when the order is no longer pending, on the message id's unique index
    // entry; either way the later one then finds the first one's committed row below.
    let effect = match orders::transition(&mut tx, order_id, to, event).await? {
        None => return Ok(PaymentEffect::UnknownOrder),
        Some(Ok(_)) => PaymentEffect::Applied(to),
        Some(Err(current)) => PaymentEffect::Ignored(current),
    };
    let recorded = sqlx::query(
        "INSERT INTO processed_messages (message_id, message_type, order_id, effect) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(message_id)
    .bind(kind.routing_key())
    .bind(order_id)
    .bind(match &effect {
        PaymentEffect::Applied(s) => format!("applied:{s}"),
        PaymentEffect::Ignored(s) => format!("ignored:{s}"),
        _ => String::new(),
    })
    .execute(&mut *tx)
    .await?;
    if recorded.rows_affected() == 0 {
        // Rolling back undoes the transition made above.
        tx.rollback().await?;
        return Ok(PaymentEffect::Duplicate);
    }
    tx.commit().await?;
    Ok(effect)
}
