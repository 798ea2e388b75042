//! The one place the e2e package builds a CreateOrder request: the load's requests, the order a
//! stuck payment handler waits on and the calls the PostgreSQL fault holds in flight are all
//! [`create_order`] (the app's `order_service::testing`, which its own tests use too) with
//! different items.

use order_service::proto::CreateOrderRequest;
pub use order_service::testing::create_order;

/// The load's `n`-th CreateOrder of run `run`: one of 500 customers, one of 97 SKUs (1–3 of
/// it at 19.99) plus shipping, its own idempotency key.
pub fn load_order(n: u64, run: &str) -> CreateOrderRequest {
    create_order(
        &format!("e2e-{}", n % 500),
        &[
            (&format!("sku-{}", n % 97), 1 + (n % 3) as i32, 1999),
            ("shipping", 1, 499),
        ],
        &format!("e2e-{run}-{n}"),
    )
}

/// The order a stuck payment handler waits on (no idempotency key).
pub fn stuck_order() -> CreateOrderRequest {
    create_order("e2e-stuck", &[("stuck", 1, 100)], "")
}

/// The CreateOrder the PostgreSQL fault holds in flight (and retries after recovery).
pub fn held_order(key: &str) -> CreateOrderRequest {
    create_order("e2e-held", &[("held", 1, 100)], key)
}
