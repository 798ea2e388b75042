//! The outbox table: events written in the same transaction as the change they describe, then
//! claimed in batches by the poller (`FOR UPDATE SKIP LOCKED`, so several pollers never claim
//! the same row) and marked sent only after the broker confirmed them.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

/// One claimed, not yet sent event.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// Row id (claim order).
    pub id: i64,
    /// The event's id, published as the AMQP message_id so consumers can deduplicate.
    pub event_id: Uuid,
    /// The order it is about.
    pub aggregate_id: Uuid,
    /// Routing key (`order.created`, ...).
    pub event_type: String,
    /// JSON body, as stored.
    pub payload: String,
    /// When the event committed.
    pub created_at: DateTime<Utc>,
    /// The W3C trace context of the change that wrote it (traces on), continued by the relay.
    pub traceparent: Option<String>,
}

/// Inserts one event inside the caller's transaction; `payload` receives the new event id.
pub async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    aggregate_id: Uuid,
    event_type: &str,
    payload: impl FnOnce(Uuid) -> serde_json::Value,
) -> Result<Uuid, sqlx::Error> {
    let event_id = Uuid::new_v4();
    let conn: &mut PgConnection = tx;
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_id, event_type, payload, traceparent) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(event_id)
    .bind(aggregate_id)
    .bind(event_type)
    .bind(sqlx::types::Json(payload(event_id)))
    .bind(crate::traces::current_traceparent())
    .execute(conn)
    .await?;
    Ok(event_id)
}

/// Claims up to `limit` unsent events, oldest first, locking them until `tx` ends. Rows
/// another transaction holds are skipped, not waited for.
pub async fn claim_batch(
    tx: &mut Transaction<'static, Postgres>,
    limit: i64,
) -> Result<Vec<OutboxEvent>, sqlx::Error> {
    let conn: &mut PgConnection = tx;
    let rows = sqlx::query(
        "SELECT id, event_id, aggregate_id, event_type, payload::text AS payload, created_at, traceparent \
         FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(OutboxEvent {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                aggregate_id: r.try_get("aggregate_id")?,
                event_type: r.try_get("event_type")?,
                payload: r.try_get("payload")?,
                created_at: r.try_get("created_at")?,
                traceparent: r.try_get("traceparent")?,
            })
        })
        .collect()
}

/// Marks claimed events sent (call only after every one was confirmed).
pub async fn mark_sent(
    tx: &mut Transaction<'static, Postgres>,
    ids: &[i64],
) -> Result<u64, sqlx::Error> {
    let conn: &mut PgConnection = tx;
    let done = sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Events not yet sent (the `outbox_unsent_events_total` gauge).
pub async fn count_unsent(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(pool)
        .await
}
