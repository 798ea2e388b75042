//! Orders as the service understands them: statuses and their allowed transitions, the
//! validation of a new order, and the event names published through the outbox. No I/O here,
//! so the rules are unit-tested directly.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// Event routing keys published on the events exchange.
pub mod events {
    /// A new order (CreateOrder).
    pub const ORDER_CREATED: &str = "order.created";
    /// Payment succeeded (consumer).
    pub const ORDER_PAID: &str = "order.paid";
    /// Payment failed (consumer).
    pub const ORDER_PAYMENT_FAILED: &str = "order.payment_failed";
    /// Cancelled by the customer (CancelOrder).
    pub const ORDER_CANCELLED: &str = "order.cancelled";
    /// No payment in time (expiry job).
    pub const ORDER_EXPIRED: &str = "order.expired";
}

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Waiting for payment.
    Pending,
    /// Payment succeeded.
    Paid,
    /// Payment failed.
    PaymentFailed,
    /// Cancelled before payment.
    Cancelled,
    /// No payment arrived in time.
    Expired,
}

impl OrderStatus {
    /// The value stored in the `orders.status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Paid => "paid",
            Self::PaymentFailed => "payment_failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    /// Parses the column value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "paid" => Self::Paid,
            "payment_failed" => Self::PaymentFailed,
            "cancelled" => Self::Cancelled,
            "expired" => Self::Expired,
            _ => return None,
        })
    }

    /// Whether `self → to` is allowed. Only a pending order moves; every other state is final.
    pub fn can_become(self, to: OrderStatus) -> bool {
        self == Self::Pending && to != Self::Pending
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineItem {
    /// Stock keeping unit.
    pub sku: String,
    /// Quantity (> 0).
    pub quantity: i64,
    /// Unit price in cents (>= 0).
    pub price_cents: i64,
}

/// A stored order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Order {
    /// Id.
    pub id: Uuid,
    /// Customer.
    pub customer_id: String,
    /// Lines in creation order.
    pub items: Vec<LineItem>,
    /// Sum of the lines.
    pub total_cents: i64,
    /// Status.
    pub status: OrderStatus,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A validated request to create an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// Customer.
    pub customer_id: String,
    /// Lines (1-100).
    pub items: Vec<LineItem>,
    /// Sum of the lines.
    pub total_cents: i64,
}

/// Limits checked by [`NewOrder::validate`].
pub mod limits {
    /// Longest customer id.
    pub const MAX_CUSTOMER_ID: usize = 64;
    /// Longest SKU.
    pub const MAX_SKU: usize = 64;
    /// Most lines per order.
    pub const MAX_ITEMS: usize = 100;
    /// Largest quantity per line.
    pub const MAX_QUANTITY: i64 = 10_000;
    /// Largest unit price (one billion cents).
    pub const MAX_PRICE_CENTS: i64 = 100_000_000_000;
    /// Longest idempotency key.
    pub const MAX_IDEMPOTENCY_KEY: usize = 128;
}

/// A request field that is not acceptable; `field` uses the proto path (`items[2].quantity`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The offending field.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

impl NewOrder {
    /// Checks a create request against [`limits`] and computes the total.
    pub fn validate(
        customer_id: &str,
        items: impl IntoIterator<Item = (String, i64, i64)>,
    ) -> Result<Self, ValidationError> {
        use limits::*;
        let customer_id = customer_id.trim();
        if customer_id.is_empty() || customer_id.chars().count() > MAX_CUSTOMER_ID {
            return Err(invalid(
                "customer_id",
                format!("must be 1-{MAX_CUSTOMER_ID} characters"),
            ));
        }
        let mut lines = Vec::new();
        let mut total: i64 = 0;
        for (i, (sku, quantity, price_cents)) in items.into_iter().enumerate() {
            if i >= MAX_ITEMS {
                return Err(invalid(
                    "items",
                    format!("at most {MAX_ITEMS} lines per order"),
                ));
            }
            if sku.is_empty() || sku.chars().count() > MAX_SKU {
                return Err(invalid(
                    format!("items[{i}].sku"),
                    format!("must be 1-{MAX_SKU} characters"),
                ));
            }
            if !(1..=MAX_QUANTITY).contains(&quantity) {
                return Err(invalid(
                    format!("items[{i}].quantity"),
                    format!("must be between 1 and {MAX_QUANTITY}, got {quantity}"),
                ));
            }
            if !(0..=MAX_PRICE_CENTS).contains(&price_cents) {
                return Err(invalid(
                    format!("items[{i}].price_cents"),
                    format!("must be between 0 and {MAX_PRICE_CENTS}, got {price_cents}"),
                ));
            }
            // Bounded by the limits above: 100 × 10^4 × 10^11 < i64::MAX.
            total += quantity * price_cents;
            lines.push(LineItem {
                sku,
                quantity,
                price_cents,
            });
        }
        if lines.is_empty() {
            return Err(invalid("items", "an order needs at least one line"));
        }
        Ok(Self {
            customer_id: customer_id.to_owned(),
            items: lines,
            total_cents: total,
        })
    }

    /// A stable fingerprint of the request, stored with an idempotency key so that reusing the
    /// key for a different request is detected (FNV-1a over a canonical rendering).
    pub fn fingerprint(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        };
        feed(self.customer_id.as_bytes());
        for item in &self.items {
            feed(b"\x1f");
            feed(item.sku.as_bytes());
            feed(b"\x1e");
            feed(&item.quantity.to_le_bytes());
            feed(&item.price_cents.to_le_bytes());
        }
        format!("{hash:016x}")
    }
}

/// Validates an idempotency key (empty means none).
pub fn validate_idempotency_key(key: &str) -> Result<Option<&str>, ValidationError> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > limits::MAX_IDEMPOTENCY_KEY || key.chars().any(|c| c.is_control()) {
        return Err(invalid(
            "idempotency_key",
            format!(
                "must be at most {} bytes without control characters",
                limits::MAX_IDEMPOTENCY_KEY
            ),
        ));
    }
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, q: i64, p: i64) -> (String, i64, i64) {
        (sku.to_owned(), q, p)
    }

    #[test]
    fn only_pending_moves() {
        use OrderStatus::*;
        for to in [Paid, PaymentFailed, Cancelled, Expired] {
            assert!(Pending.can_become(to));
            for from in [Paid, PaymentFailed, Cancelled, Expired] {
                assert!(!from.can_become(to), "{from} -> {to}");
            }
        }
        assert!(!Pending.can_become(Pending));
        for s in [Pending, Paid, PaymentFailed, Cancelled, Expired] {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(OrderStatus::parse("shipped"), None);
    }

    #[test]
    fn validation_names_the_field() {
        let ok = NewOrder::validate("c1", [item("a", 2, 150), item("b", 1, 5)]).unwrap();
        assert_eq!(ok.total_cents, 305);
        let cases = [
            (NewOrder::validate("", [item("a", 1, 1)]), "customer_id"),
            (NewOrder::validate("c", Vec::new()), "items"),
            (NewOrder::validate("c", [item("", 1, 1)]), "items[0].sku"),
            (
                NewOrder::validate("c", [item("a", 1, 1), item("b", 0, 1)]),
                "items[1].quantity",
            ),
            (
                NewOrder::validate("c", [item("a", 1, -1)]),
                "items[0].price_cents",
            ),
            (
                NewOrder::validate("c", (0..101).map(|i| item(&format!("s{i}"), 1, 1))),
                "items",
            ),
        ];
        for (result, field) in cases {
            assert_eq!(result.unwrap_err().field, field);
        }
    }

    #[test]
    fn fingerprint_tracks_content() {
        let a = NewOrder::validate("c", [item("a", 1, 1)]).unwrap();
        let b = NewOrder::validate("c", [item("a", 2, 1)]).unwrap();
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert!(validate_idempotency_key("").unwrap().is_none());
        assert!(validate_idempotency_key(&"k".repeat(129)).is_err());
    }
}
