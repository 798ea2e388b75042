//! Test support shared by the app's integration tests (`app/tests`) and the end-to-end crate
//! (`tests/`), behind the `testing` feature: the one copy of what both need to run the service
//! against the real local PostgreSQL, Redis and RabbitMQ.
//!
//! | what | where |
//! |---|---|
//! | the services' addresses (`TEST_PG_URL`, `TEST_REDIS_URL`, `TEST_AMQP_URL`) | this module |
//! | one test's own database, exchanges/queues and Redis keys, removed on drop | [`Sandbox`] |
//! | publishing test messages, reading and emptying queues | [`mq`] |
//! | CreateOrder requests | [`create_order`], [`create_request`] |
//! | a hard timeout around a test body | [`hard_timeout`] |
//! | an in-process OTLP/gRPC trace receiver | [`otlp::Collector`] |
//!
//! The app's tests enable the feature through a dev-dependency of the package on itself
//! (`app/Cargo.toml`); the e2e crate through its dependency on the app. Nothing here is built
//! into the service's binaries.

pub mod mq;
pub mod otlp;
mod sandbox;

use std::future::Future;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection};

pub use mq::{confirm_channel, drain_queue, publish, publish_payment, queue_depth};
pub use sandbox::Sandbox;

use crate::proto::{CreateOrderRequest, LineItem};

/// PostgreSQL admin URL (database `postgres`, allowed to `CREATE DATABASE`): `TEST_PG_URL`, else
/// the local server.
pub fn pg_admin_url() -> String {
    std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Redis: `TEST_REDIS_URL`, else the local server.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// RabbitMQ: `TEST_AMQP_URL`, else the local broker as `guest`.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A connection to RabbitMQ at [`amqp_url`].
pub async fn amqp() -> lapin::Result<Connection> {
    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
}

/// An admin connection to PostgreSQL at [`pg_admin_url`].
pub async fn pg_admin() -> sqlx::Result<PgConnection> {
    PgConnection::connect(&pg_admin_url()).await
}

/// Runs `f` and fails the test if it takes longer than `limit`: a hang fails instead of
/// stalling the run.
pub async fn hard_timeout<T>(limit: Duration, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!(
            "test exceeded its hard timeout of {} s",
            limit.as_secs_f64()
        ),
    }
}

/// A CreateOrder for `customer` with `items` as `(sku, quantity, price_cents)`, under
/// idempotency key `key` (empty: none).
pub fn create_order(customer: &str, items: &[(&str, i32, i64)], key: &str) -> CreateOrderRequest {
    CreateOrderRequest {
        customer_id: customer.to_owned(),
        items: items
            .iter()
            .map(|&(sku, quantity, price_cents)| LineItem {
                sku: sku.to_owned(),
                quantity,
                price_cents,
            })
            .collect(),
        idempotency_key: key.to_owned(),
    }
}

/// A valid CreateOrder: two of `sku-1` at 12.50 and one `sku-2` at 0.99 (total 25.99).
pub fn create_request(customer: &str, key: &str) -> CreateOrderRequest {
    create_order(customer, &[("sku-1", 2, 1250), ("sku-2", 1, 99)], key)
}
