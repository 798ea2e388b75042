//! The order repository. Every state change writes its outbox event in the same transaction
//! as the change itself (the transactional-outbox pattern), so an event exists if and only if
//! the change committed.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::outbox;
use crate::domain::{LineItem, NewOrder, Order, OrderStatus, events};

/// Why an order could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Another order already holds this idempotency key.
    #[error("an order with this idempotency key already exists")]
    DuplicateKey,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The result of a cancel request.
#[derive(Debug)]
pub enum CancelResult {
    /// Cancelled now (or had been already).
    Cancelled(Order),
    /// No such order.
    NotFound,
    /// The order is in a final state other than cancelled.
    NotPending(OrderStatus),
}

/// An order with the idempotency fingerprint it was created under.
#[derive(Debug)]
pub struct KeyedOrder {
    /// The order.
    pub order: Order,
    /// The request fingerprint stored with the key.
    pub request_hash: Option<String>,
}

/// The order columns plus its lines as three arrays; `concat!`-ed with a WHERE clause so
/// every query stays a `&'static str`.
macro_rules! select_order {
    () => {
        "SELECT o.id, o.customer_id, o.status, o.total_cents, o.created_at, o.updated_at, \
            o.request_hash, i.skus, i.quantities, i.prices \
     FROM orders o \
     CROSS JOIN LATERAL ( \
         SELECT coalesce(array_agg(sku ORDER BY line_no), '{}') AS skus, \
                coalesce(array_agg(quantity ORDER BY line_no), '{}') AS quantities, \
                coalesce(array_agg(price_cents ORDER BY line_no), '{}') AS prices \
         FROM order_items WHERE order_id = o.id) i"
    };
}

fn order_from_row(row: &sqlx::postgres::PgRow) -> Result<Order, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let status = OrderStatus::parse(&status).ok_or_else(|| {
        sqlx::Error::Decode(format!("unknown order status `{status}` in the database").into())
    })?;
    let skus: Vec<String> = row.try_get("skus")?;
    let quantities: Vec<i64> = row.try_get("quantities")?;
    let prices: Vec<i64> = row.try_get("prices")?;
    let items = skus
        .into_iter()
        .zip(quantities)
        .zip(prices)
        .map(|((sku, quantity), price_cents)| LineItem {
            sku,
            quantity,
            price_cents,
        })
        .collect();
    Ok(Order {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        items,
        total_cents: row.try_get("total_cents")?,
        status,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// What an order event says about its order (everything but the lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderHead {
    /// Id.
    pub id: Uuid,
    /// Customer.
    pub customer_id: String,
    /// Status after the change.
    pub status: OrderStatus,
    /// Total.
    pub total_cents: i64,
    /// When the change happened.
    pub updated_at: DateTime<Utc>,
}

impl From<&Order> for OrderHead {
    fn from(o: &Order) -> Self {
        Self {
            id: o.id,
            customer_id: o.customer_id.clone(),
            status: o.status,
            total_cents: o.total_cents,
            updated_at: o.updated_at,
        }
    }
}

/// The JSON body of an order event.
pub fn event_payload(event_id: Uuid, event_type: &str, order: &OrderHead) -> serde_json::Value {
    json!({
        "event_id": event_id,
        "event_type": event_type,
        "order_id": order.id,
        "customer_id": order.customer_id,
        "status": order.status.as_str(),
        "total_cents": order.total_cents,
        "occurred_at": order.updated_at,
    })
}

/// Inserts a pending order, its lines and its `order.created` event in one transaction (one
/// statement).
/// `key` is the idempotency key and request fingerprint, if any. `db` is a request's
/// connection (as for the other API queries).
#[tracing::instrument(name = "db.create_order", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "INSERT"))]
pub async fn create(
    db: &mut PgConnection,
    new: &NewOrder,
    key: Option<(&str, &str)>,
) -> Result<Order, CreateError> {
    let now = Utc::now();
    let order = Order {
        id: Uuid::new_v4(),
        customer_id: new.customer_id.clone(),
        items: new.items.clone(),
        total_cents: new.total_cents,
        status: OrderStatus::Pending,
        // PostgreSQL keeps microseconds; truncate so the returned order equals a re-read.
        created_at: truncate_micros(now),
        updated_at: truncate_micros(now),
    };
    let skus: Vec<&str> = order.items.iter().map(|i| i.sku.as_str()).collect();
    let quantities: Vec<i64> = order.items.iter().map(|i| i.quantity).collect();
    let prices: Vec<i64> = order.items.iter().map(|i| i.price_cents).collect();
    let event_id = Uuid::new_v4();
    let payload = event_payload(event_id, events::ORDER_CREATED, &OrderHead::from(&order));
    // One statement is one transaction: the order, its lines and its event commit together or
    // not at all, in a single round trip (this is the hot path of the API).
    let inserted = sqlx::query(
        "WITH new_order AS ( \
             INSERT INTO orders (id, customer_id, status, total_cents, idempotency_key, request_hash, created_at, updated_at) \
             VALUES ($1, $2, 'pending', $3, $4, $5, $6, $6) RETURNING id), \
         lines AS ( \
             INSERT INTO order_items (order_id, line_no, sku, quantity, price_cents) \
             SELECT $1, t.ord - 1, t.sku, t.quantity, t.price \
             FROM unnest($7::text[], $8::bigint[], $9::bigint[]) WITH ORDINALITY AS t(sku, quantity, price, ord)) \
         INSERT INTO outbox (event_id, aggregate_id, event_type, payload, traceparent) \
         SELECT $10, id, $11, $12, $13 FROM new_order",
    )
    .bind(order.id)
    .bind(&order.customer_id)
    .bind(order.total_cents)
    .bind(key.map(|k| k.0))
    .bind(key.map(|k| k.1))
    .bind(order.created_at)
    .bind(&skus)
    .bind(&quantities)
    .bind(&prices)
    .bind(event_id)
    .bind(events::ORDER_CREATED)
    .bind(sqlx::types::Json(&payload))
    .bind(crate::traces::current_traceparent())
    .execute(&mut *db)
    .await;
    match inserted {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            Err(CreateError::DuplicateKey)
        }
        Err(e) => Err(CreateError::Db(e)),
        Ok(_) => Ok(order),
    }
}

fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// One order by id.
#[tracing::instrument(name = "db.get_order", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "SELECT"))]
pub async fn get(db: &mut PgConnection, id: Uuid) -> Result<Option<Order>, sqlx::Error> {
    sqlx::query(concat!(select_order!(), " WHERE o.id = $1"))
        .bind(id)
        .fetch_optional(&mut *db)
        .await?
        .map(|row| order_from_row(&row))
        .transpose()
}

/// The order holding an idempotency key, with the fingerprint stored alongside.
#[tracing::instrument(name = "db.find_order_by_key", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "SELECT"))]
pub async fn find_by_key(
    db: &mut PgConnection,
    key: &str,
) -> Result<Option<KeyedOrder>, sqlx::Error> {
    let Some(row) = sqlx::query(concat!(select_order!(), " WHERE o.idempotency_key = $1"))
        .bind(key)
        .fetch_optional(&mut *db)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(KeyedOrder {
        order: order_from_row(&row)?,
        request_hash: row.try_get("request_hash")?,
    }))
}

/// Where a page starts: strictly after this (created_at, id) in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// created_at of the last order of the previous page.
    pub created_at: DateTime<Utc>,
    /// id of that order.
    pub id: Uuid,
}

impl Cursor {
    /// The opaque page token.
    pub fn encode(&self) -> String {
        format!(
            "v1.{}.{}",
            self.created_at.timestamp_micros(),
            self.id.simple()
        )
    }

    /// Parses a page token made by [`Cursor::encode`].
    pub fn decode(token: &str) -> Option<Self> {
        let mut parts = token.split('.');
        if parts.next()? != "v1" {
            return None;
        }
        let micros: i64 = parts.next()?.parse().ok()?;
        let id = Uuid::parse_str(parts.next()?).ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            created_at: DateTime::from_timestamp_micros(micros)?,
            id,
        })
    }
}

/// One page of orders, newest first, optionally of one customer. Returns the orders and the
/// cursor of the next page (None on the last page).
#[tracing::instrument(name = "db.list_orders", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "SELECT"))]
pub async fn list(
    db: &mut PgConnection,
    page_size: u32,
    after: Option<Cursor>,
    customer_id: Option<&str>,
) -> Result<(Vec<Order>, Option<Cursor>), sqlx::Error> {
    let sql = if customer_id.is_some() {
        concat!(
            select_order!(),
            " WHERE (o.created_at, o.id) < (coalesce($1, 'infinity'::timestamptz), coalesce($2, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid)) \
          AND o.customer_id = $4 ORDER BY o.created_at DESC, o.id DESC LIMIT $3"
        )
    } else {
        concat!(
            select_order!(),
            " WHERE (o.created_at, o.id) < (coalesce($1, 'infinity'::timestamptz), coalesce($2, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid)) \
          AND $4::text IS NULL ORDER BY o.created_at DESC, o.id DESC LIMIT $3"
        )
    };
    let rows = sqlx::query(sql)
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id))
        .bind(i64::from(page_size) + 1)
        .bind(customer_id)
        .fetch_all(&mut *db)
        .await?;
    let mut orders = rows
        .iter()
        .map(order_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next = if orders.len() > page_size as usize {
        orders.truncate(page_size as usize);
        orders.last().map(|o| Cursor {
            created_at: o.created_at,
            id: o.id,
        })
    } else {
        None
    };
    Ok((orders, next))
}

/// Moves a pending order to `to` and writes `event_type`, inside `tx`; returns the changed
/// order's head, or the status that prevented the change. `Ok(None)` means no such order.
///
/// The `status = 'pending'` condition is the state machine (only a pending order moves, see
/// `OrderStatus::can_become`) and the row lock the UPDATE takes serialises concurrent changes:
/// a second one waits, re-reads the row, finds it no longer pending and changes nothing.
pub async fn transition(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    to: OrderStatus,
    event_type: &'static str,
) -> Result<Option<Result<OrderHead, OrderStatus>>, sqlx::Error> {
    debug_assert!(OrderStatus::Pending.can_become(to));
    let updated = sqlx::query(
        "UPDATE orders SET status = $2, updated_at = now() WHERE id = $1 AND status = 'pending' \
         RETURNING customer_id, total_cents, updated_at",
    )
    .bind(id)
    .bind(to.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = updated else {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        return match status {
            None => Ok(None),
            Some(s) => OrderStatus::parse(&s)
                .map(|current| Some(Err(current)))
                .ok_or_else(|| sqlx::Error::Decode(format!("unknown order status `{s}`").into())),
        };
    };
    let head = OrderHead {
        id,
        customer_id: row.try_get("customer_id")?,
        status: to,
        total_cents: row.try_get("total_cents")?,
        updated_at: row.try_get("updated_at")?,
    };
    outbox::insert_event(tx, id, event_type, |event_id| {
        event_payload(event_id, event_type, &head)
    })
    .await?;
    Ok(Some(Ok(head)))
}

/// Cancels a pending order (with its `order.cancelled` event). Cancelling a cancelled order
/// returns it unchanged.
#[tracing::instrument(name = "db.cancel_order", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "UPDATE"))]
pub async fn cancel(db: &mut PgConnection, id: Uuid) -> Result<CancelResult, sqlx::Error> {
    let mut tx = db.begin().await?;
    let result = transition(&mut tx, id, OrderStatus::Cancelled, events::ORDER_CANCELLED).await?;
    match result {
        None => Ok(CancelResult::NotFound),
        Some(Ok(_)) => {
            tx.commit().await?;
            match get(&mut *db, id).await? {
                Some(order) => Ok(CancelResult::Cancelled(order)),
                None => Ok(CancelResult::NotFound),
            }
        }
        Some(Err(OrderStatus::Cancelled)) => {
            drop(tx);
            match get(&mut *db, id).await? {
                Some(order) => Ok(CancelResult::Cancelled(order)),
                None => Ok(CancelResult::NotFound),
            }
        }
        Some(Err(status)) => Ok(CancelResult::NotPending(status)),
    }
}

/// Expires up to `limit` orders pending for longer than `older_than_secs`, each with an
/// `order.expired` event, in one statement (so one transaction). Returns how many.
#[tracing::instrument(name = "db.expire_orders", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "UPDATE"))]
pub async fn expire_stale(
    pool: &PgPool,
    older_than_secs: f64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "WITH expired AS ( \
             UPDATE orders SET status = 'expired', updated_at = now() \
             WHERE status = 'pending' AND id IN ( \
                 SELECT id FROM orders \
                 WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1) \
                 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING id, customer_id, total_cents, updated_at) \
         INSERT INTO outbox (event_id, aggregate_id, event_type, payload) \
         SELECT e.event_id, expired.id, 'order.expired', jsonb_build_object( \
                 'event_id', e.event_id, 'event_type', 'order.expired', 'order_id', expired.id, \
                 'customer_id', expired.customer_id, 'status', 'expired', \
                 'total_cents', expired.total_cents, 'occurred_at', expired.updated_at) \
         FROM expired CROSS JOIN LATERAL (SELECT gen_random_uuid() AS event_id) e",
    )
    .bind(older_than_secs)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Orders pending for longer than `older_than_secs` (the `saga_stuck_total` gauge).
#[tracing::instrument(name = "db.count_stuck_orders", skip_all, fields(otel.kind = "client", db.system = "postgresql", db.operation = "SELECT"))]
pub async fn count_stuck(pool: &PgPool, older_than_secs: f64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than_secs)
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in [
            "",
            "v2.1.x",
            "v1.abc.00000000000000000000000000000000",
            "v1.1",
            "v1.1.zz",
            "v1.1.00000000000000000000000000000000.x",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }
}
