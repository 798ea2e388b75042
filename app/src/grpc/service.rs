//! The `order.v1.OrderService` handlers: validate, call the repository, map results to gRPC
//! codes. CreateOrder's idempotency key is claimed in Redis (SET NX) and also stored on the
//! order row (unique), so a Redis outage degrades to the database's check instead of failing.
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

use crate::db::Db;
use crate::db::orders::{self, CancelResult, CreateError, Cursor};
use crate::domain::{self, NewOrder, Order, OrderStatus, ValidationError};
use crate::proto;
use crate::proto::order_service_server::OrderService;
use crate::redis_store::{KeyState, RedisStore};

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
}

impl OrderApi {
    /// Handlers over `db` and `redis`; `outbox_wake` is notified after each committed change so
    /// the outbox poller relays it without waiting for its next poll.
    pub fn new(db: Db, redis: RedisStore, outbox_wake: Arc<Notify>) -> Self {
        Self {
            db,
            redis,
            outbox_wake,
        }
    }

    async fn create(&self, new: NewOrder, key: Option<&str>) -> Result<(Order, bool), Status> {
        let Some(key) = key else {
            let order = orders::create(self.db.pool(), &new, None)
                .await
                .map_err(create_error)?;
            self.outbox_wake.notify_one();
            return Ok((order, false));
        };
        let fingerprint = new.fingerprint();
        let deadline = tokio::time::Instant::now() + IN_PROGRESS_WAIT;
        loop {
            let state = match self.redis.begin(key, &fingerprint).await {
                Ok(state) => state,
                Err(e) => {
                    // The order row's unique key still makes the call idempotent.
                    tracing::warn!(error = %e, "idempotency store unavailable; relying on the database key");
                    return self.create_keyed(&new, key, &fingerprint, false).await;
                }
            };
            match state {
                KeyState::Owned => return self.create_keyed(&new, key, &fingerprint, true).await,
                KeyState::Done {
                    fingerprint: theirs,
                    order_id,
                } => {
                    if theirs != fingerprint {
                        return Err(key_reused());
                    }
                    return match orders::get(self.db.pool(), order_id)
                        .await
                        .map_err(db_error)?
                    {
                        Some(order) => Ok((order, true)),
                        // The key outlived its order (database reset): start afresh.
                        None => {
                            let _ = self.redis.release(key).await;
                            continue;
                        }
                    };
                }
                KeyState::InProgress {
                    fingerprint: theirs,
                } => {
                    if theirs != fingerprint {
                        return Err(key_reused());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Status::aborted(
                            "another request with this idempotency_key is still being processed; retry shortly",
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn create_keyed(
        &self,
        new: &NewOrder,
        key: &str,
        fingerprint: &str,
        own_redis_key: bool,
    ) -> Result<(Order, bool), Status> {
        let result = match orders::create(self.db.pool(), new, Some((key, fingerprint))).await {
            Ok(order) => {
                self.outbox_wake.notify_one();
                Ok((order, false))
            }
            Err(CreateError::DuplicateKey) => {
                match orders::find_by_key(self.db.pool(), key)
                    .await
                    .map_err(db_error)?
                {
                    Some(found) if found.request_hash.as_deref() == Some(fingerprint) => {
                        Ok((found.order, true))
                    }
                    Some(_) => Err(key_reused()),
                    None => Err(Status::aborted(
                        "the idempotency_key was taken and released concurrently; retry",
                    )),
                }
            }
            Err(e) => Err(create_error(e)),
        };
        if own_redis_key {
            let recorded = match &result {
                Ok((order, _)) => self.redis.complete(key, fingerprint, order.id).await,
                Err(_) => self.redis.release(key).await,
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
        let req = request.into_inner();
        let new = NewOrder::validate(
            &req.customer_id,
            req.items
                .into_iter()
                .map(|i| (i.sku, i64::from(i.quantity), i.price_cents)),
        )
        .map_err(invalid)?;
        let key = domain::validate_idempotency_key(&req.idempotency_key).map_err(invalid)?;
        let (order, replayed) = self.create(new, key).await?;
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
        match orders::get(self.db.pool(), id).await.map_err(db_error)? {
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
        let (found, next) = orders::list(self.db.pool(), page_size, cursor, customer)
            .await
            .map_err(db_error)?;
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
        match orders::cancel(self.db.pool(), id).await.map_err(db_error)? {
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
