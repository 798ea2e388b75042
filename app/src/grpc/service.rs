//! The `order.v1.OrderService` handlers: validate, call the repository, map results to gRPC
//! codes. Each request runs its statements on its own [`RequestConn`], so a cancelled request
//! also cancels its database work.
//!
//! CreateOrder's idempotency key is claimed in Redis with a lease (see `redis_store`) and also
//! stored on the order row under a unique index. The row is the truth: a Redis outage, a lost
//! key, or a marker left by a process that died after its commit all end in a database lookup
//! that returns the committed order, never in a second order or a refusal that lasts.
//!
//! | condition | code |
//! |---|---|
//! | malformed field, bad page token | INVALID_ARGUMENT |
//! | no such order | NOT_FOUND |
//! | cancel of a paid/failed/expired order | FAILED_PRECONDITION |
//! | idempotency key reused for a different request | ALREADY_EXISTS |
//! | same key still being processed by another call | ABORTED (retry) |
//! | database unreachable, shutting down | UNAVAILABLE |

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::db::orders::{self, CancelResult, CreateError, Cursor};
use crate::db::{Db, RequestConn};
use crate::domain::{self, NewOrder, Order, OrderStatus, ValidationError};
use crate::proto;
use crate::proto::order_service_server::OrderService;
use crate::redis_store::{KeyState, PendingMarker, RedisStore};

/// Default and maximum ListOrders page sizes.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Larger requested sizes are lowered to this.
pub const MAX_PAGE_SIZE: u32 = 500;

/// How long a CreateOrder waits for another call holding the same idempotency key.
const IN_PROGRESS_WAIT: Duration = Duration::from_secs(2);

/// The handlers' dependencies.
#[derive(Debug, Clone)]
pub struct OrderApi {
    db: Db,
    redis: RedisStore,
    outbox_wake: Arc<Notify>,
    max_lease: Duration,
}

/// The lease of a request's pending marker: its `grpc-timeout` (the client gives up then and
/// tonic drops the handler), capped by `max`.
pub fn lease_for(metadata: &tonic::metadata::MetadataMap, max: Duration) -> Duration {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(max, |t| t.min(max))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl OrderApi {
    /// Handlers over `db` and `redis`; `outbox_wake` is notified after each committed change so
    /// the outbox poller relays it without waiting for its next poll. `max_lease` caps the
    /// lease of an idempotency key's pending marker.
    pub fn new(db: Db, redis: RedisStore, outbox_wake: Arc<Notify>, max_lease: Duration) -> Self {
        Self {
            db,
            redis,
            outbox_wake,
            max_lease,
        }
    }

    async fn create(
        &self,
        conn: &mut RequestConn,
        new: NewOrder,
        key: Option<&str>,
        lease: Duration,
    ) -> Result<(Order, bool), Status> {
        let Some(key) = key else {
            let db = conn.get().await.map_err(db_error)?;
            let order = orders::create(db, &new, None).await.map_err(create_error)?;
            self.outbox_wake.notify_one();
            return Ok((order, false));
        };
        let fingerprint = new.fingerprint();
        let deadline = tokio::time::Instant::now() + IN_PROGRESS_WAIT;
        loop {
            let state = match self.redis.begin(key, &fingerprint, lease).await {
                Ok(state) => state,
                Err(e) => {
                    // The order row's unique key still makes the call idempotent.
                    tracing::warn!(error = %e, "idempotency store unavailable; relying on the database key");
                    return self.create_keyed(conn, &new, key, &fingerprint, None).await;
                }
            };
            match state {
                KeyState::Owned(marker) => {
                    return self
                        .create_keyed(conn, &new, key, &fingerprint, Some(marker))
                        .await;
                }
                KeyState::Done {
                    fingerprint: theirs,
                    order_id,
                } => {
                    if theirs != fingerprint {
                        return Err(key_reused());
                    }
                    let db = conn.get().await.map_err(db_error)?;
                    match orders::get(db, order_id).await.map_err(db_error)? {
                        Some(order) => return Ok((order, true)),
                        // The key outlived its order (database reset): start afresh.
                        None => {
                            let _ = self.redis.forget_done(key, &theirs, order_id).await;
                        }
                    }
                }
                KeyState::InProgress {
                    fingerprint: theirs,
                    value,
                    legacy,
                } => {
                    if theirs != fingerprint {
                        return Err(key_reused());
                    }
                    if !legacy && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    if let Some(found) = self.replay_from_db(conn, key, &fingerprint).await? {
                        return Ok(found);
                    }
                    if !legacy {
                        return Err(Status::aborted(
                            "another request with this idempotency_key is still being processed; retry shortly",
                        ));
                    }
                    // A marker without a lease never ends on its own; the database said no
                    // order holds the key, so take the key over.
                    let _ = self.redis.delete_if(key, &value).await;
                }
            }
        }
    }

    /// The order the database holds under `key`, when the marker in Redis cannot say (its owner
    /// may have committed and then died before recording it): the same request gets the order
    /// (and Redis is repaired to `done`), a different one ALREADY_EXISTS, no order `None`.
    async fn replay_from_db(
        &self,
        conn: &mut RequestConn,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<(Order, bool)>, Status> {
        let db = conn.get().await.map_err(db_error)?;
        match orders::find_by_key(db, key).await.map_err(db_error)? {
            Some(found) if found.request_hash.as_deref() == Some(fingerprint) => {
                if let Err(e) = self.redis.complete(key, fingerprint, found.order.id).await {
                    tracing::warn!(error = %e, "cannot repair the idempotency key in Redis");
                }
                Ok(Some((found.order, true)))
            }
            Some(_) => Err(key_reused()),
            None => Ok(None),
        }
    }

    async fn create_keyed(
        &self,
        conn: &mut RequestConn,
        new: &NewOrder,
        key: &str,
        fingerprint: &str,
        marker: Option<PendingMarker>,
    ) -> Result<(Order, bool), Status> {
        let db = conn.get().await.map_err(db_error)?;
        let result = match orders::create(db, new, Some((key, fingerprint))).await {
            Ok(order) => {
                self.outbox_wake.notify_one();
                Ok((order, false))
            }
            Err(CreateError::DuplicateKey) => {
                match self.replay_from_db(conn, key, fingerprint).await {
                    Ok(Some(found)) => Ok(found),
                    Ok(None) => Err(Status::aborted(
                        "the idempotency_key was taken and released concurrently; retry",
                    )),
                    Err(status) => Err(status),
                }
            }
            Err(e) => Err(create_error(e)),
        };
        // The database work is over: a cancellation from here on must not cost the connection.
        conn.idle();
        if let Some(marker) = marker {
            let recorded = match &result {
                Ok((order, _)) => marker.complete(order.id).await,
                Err(_) => marker.release().await,
            };
            if let Err(e) = recorded {
                tracing::warn!(error = %e, "cannot record the idempotency key outcome in Redis");
            }
        }
        result
    }
}

fn key_reused() -> Status {
    Status::already_exists(
        "idempotency_key was already used for a different request (other customer or items); use a new key",
    )
}

fn invalid(e: ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn create_error(e: CreateError) -> Status {
    match e {
        CreateError::DuplicateKey => Status::aborted("idempotency key conflict; retry"),
        CreateError::Db(e) => db_error(e),
    }
}

/// Whether a server error is transient by its SQLSTATE: a connection exception (class 08), an
/// operator intervention such as a shutdown or a restart in progress (57: `57P01
/// terminating connection due to administrator command`, `57P03 cannot connect now`), or
/// insufficient resources (53: too many connections).
fn transient_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "57" | "53"))
}

/// Serialization failure or deadlock: the transaction can be retried as a whole.
fn conflict_sqlstate(code: &str) -> bool {
    matches!(code, "40001" | "40P01")
}

fn db_error(e: sqlx::Error) -> Status {
    let sqlstate = match &e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        e if sqlstate.as_deref().is_some_and(transient_sqlstate) => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        e if sqlstate.as_deref().is_some_and(conflict_sqlstate) => {
            tracing::warn!(error = %e, "transaction conflict");
            Status::aborted("the transaction conflicted with another; retry")
        }
        e => {
            tracing::error!(error = %e, "database error");
            Status::internal("internal database error")
        }
    }
}

fn parse_order_id(id: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(id)
        .map_err(|_| Status::invalid_argument(format!("order_id: {id:?} is not a UUID")))
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn status_to_proto(s: OrderStatus) -> proto::OrderStatus {
    match s {
        OrderStatus::Pending => proto::OrderStatus::Pending,
        OrderStatus::Paid => proto::OrderStatus::Paid,
        OrderStatus::PaymentFailed => proto::OrderStatus::PaymentFailed,
        OrderStatus::Cancelled => proto::OrderStatus::Cancelled,
        OrderStatus::Expired => proto::OrderStatus::Expired,
    }
}

/// Maps a stored order to its protobuf form.
pub fn order_to_proto(o: Order) -> proto::Order {
    proto::Order {
        order_id: o.id.to_string(),
        customer_id: o.customer_id,
        items: o
            .items
            .into_iter()
            .map(|i| proto::LineItem {
                sku: i.sku,
                quantity: i32::try_from(i.quantity).unwrap_or(i32::MAX),
                price_cents: i.price_cents,
            })
            .collect(),
        total_cents: o.total_cents,
        status: status_to_proto(o.status) as i32,
        create_time: Some(timestamp(o.created_at)),
        update_time: Some(timestamp(o.updated_at)),
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<proto::CreateOrderRequest>,
    ) -> Result<Response<proto::CreateOrderResponse>, Status> {
        let lease = lease_for(request.metadata(), self.max_lease);
        let req = request.into_inner();
        let new = NewOrder::validate(
            &req.customer_id,
            req.items
                .into_iter()
                .map(|i| (i.sku, i64::from(i.quantity), i.price_cents)),
        )
        .map_err(invalid)?;
        let key = domain::validate_idempotency_key(&req.idempotency_key).map_err(invalid)?;
        let mut conn = self.db.request_conn();
        let created = self.create(&mut conn, new, key, lease).await;
        conn.finish();
        let (order, replayed) = created?;
        Ok(Response::new(proto::CreateOrderResponse {
            order: Some(order_to_proto(order)),
            replayed,
        }))
    }

    async fn get_order(
        &self,
        request: Request<proto::GetOrderRequest>,
    ) -> Result<Response<proto::GetOrderResponse>, Status> {
        let id = parse_order_id(&request.get_ref().order_id)?;
        let mut conn = self.db.request_conn();
        let found = match conn.get().await {
            Ok(db) => orders::get(db, id).await,
            Err(e) => Err(e),
        };
        conn.finish();
        match found.map_err(db_error)? {
            Some(order) => Ok(Response::new(proto::GetOrderResponse {
                order: Some(order_to_proto(order)),
            })),
            None => Err(Status::not_found(format!("order {id} does not exist"))),
        }
    }

    async fn list_orders(
        &self,
        request: Request<proto::ListOrdersRequest>,
    ) -> Result<Response<proto::ListOrdersResponse>, Status> {
        let req = request.into_inner();
        let page_size = match u32::try_from(req.page_size) {
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "page_size: must not be negative, got {}",
                    req.page_size
                )));
            }
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
        };
        let cursor = if req.page_token.is_empty() {
            None
        } else {
            Some(Cursor::decode(&req.page_token).ok_or_else(|| {
                Status::invalid_argument(
                    "page_token: not a token returned by ListOrders; pass next_page_token unchanged, or empty for the first page",
                )
            })?)
        };
        let customer = (!req.customer_id.is_empty()).then_some(req.customer_id.as_str());
        let mut conn = self.db.request_conn();
        let page = match conn.get().await {
            Ok(db) => orders::list(db, page_size, cursor, customer).await,
            Err(e) => Err(e),
        };
        conn.finish();
        let (found, next) = page.map_err(db_error)?;
        Ok(Response::new(proto::ListOrdersResponse {
            orders: found.into_iter().map(order_to_proto).collect(),
            next_page_token: next.map(|c| c.encode()).unwrap_or_default(),
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<proto::CancelOrderRequest>,
    ) -> Result<Response<proto::CancelOrderResponse>, Status> {
        let id = parse_order_id(&request.get_ref().order_id)?;
        let mut conn = self.db.request_conn();
        let cancelled = match conn.get().await {
            Ok(db) => orders::cancel(db, id).await,
            Err(e) => Err(e),
        };
        conn.finish();
        match cancelled.map_err(db_error)? {
            CancelResult::Cancelled(order) => {
                self.outbox_wake.notify_one();
                Ok(Response::new(proto::CancelOrderResponse {
                    order: Some(order_to_proto(order)),
                }))
            }
            CancelResult::NotFound => Err(Status::not_found(format!("order {id} does not exist"))),
            CancelResult::NotPending(status) => Err(Status::failed_precondition(format!(
                "order {id} is {status}; only a pending order can be cancelled"
            ))),
        }
    }
}

#[cfg(test)]
mod sqlstate_tests {
    use super::*;

    #[test]
    fn grpc_timeout_bounds_the_lease() {
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
        let max = Duration::from_secs(10);
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(lease_for(&metadata, max), max);
        metadata.insert("grpc-timeout", "2500m".parse().unwrap());
        assert_eq!(lease_for(&metadata, max), Duration::from_millis(2500));
        metadata.insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(lease_for(&metadata, max), max);
    }

    #[test]
    fn shutdowns_and_connection_errors_are_retryable() {
        for code in ["57P01", "57P02", "57P03", "08006", "08001", "53300"] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02", "XX000"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
        assert!(conflict_sqlstate("40001") && conflict_sqlstate("40P01"));
        assert!(!conflict_sqlstate("40000"));
        assert_eq!(
            db_error(sqlx::Error::PoolTimedOut).code(),
            tonic::Code::Unavailable
        );
    }
}
