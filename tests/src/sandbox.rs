//! Isolation on the shared local services: each scenario owns a database `e2e_<random>`,
//! exchanges/queues `e2e-<random>.*` and Redis keys `e2e-<random>:*`, removed when the
//! [`Sandbox`] drops (also after a failed assertion). The sandbox itself is the app's
//! [`order_service::testing::Sandbox`] (the one the app's own tests use), labelled `e2e`; this
//! module adds what only the scenarios need. `TEST_PG_URL` (an admin URL, database
//! `postgres`), `TEST_REDIS_URL` and `TEST_AMQP_URL` point elsewhere.

use std::ops::Deref;

use order_service::testing;
pub use order_service::testing::{amqp, amqp_url, pg_admin, pg_admin_url, redis_url};

/// One scenario's names on the shared services (the shared sandbox's fields and methods
/// through `Deref`).
#[derive(Debug)]
pub struct Sandbox(testing::Sandbox);

impl Deref for Sandbox {
    type Target = testing::Sandbox;

    fn deref(&self) -> &testing::Sandbox {
        &self.0
    }
}

impl Sandbox {
    /// Creates the (empty) database; the service migrates it at start.
    pub async fn new() -> Self {
        Self(testing::Sandbox::new("e2e").await)
    }

    /// The app's environment for this sandbox (addresses are chosen per pod).
    pub fn app_env(&self) -> Vec<(String, String)> {
        let mut env = self.0.app_env();
        // The expiry job runs every 2 s, so step 4 has a real scheduler to stop.
        env.push(("APP_CRON_INTERVAL".to_owned(), "2s".to_owned()));
        env
    }

    pub fn payments_exchange(&self) -> String {
        self.topology().payments_exchange
    }

    pub fn events_exchange(&self) -> String {
        self.topology().events_exchange
    }

    pub fn payments_queue(&self) -> String {
        self.topology().payments_queue
    }

    pub fn dead_letter_queue(&self) -> String {
        self.topology().dead_letter_queue
    }

    /// The test's own durable queue bound to the app's events exchange with `#`.
    pub fn events_queue(&self) -> String {
        format!("{}.test.events", self.mq_prefix)
    }

    /// Declares [`Self::events_queue`] and binds it (the exchange exists once a pod started);
    /// it is deleted with the sandbox.
    pub async fn bind_events_queue(&self) {
        let conn = self.amqp().await;
        let channel = conn.create_channel().await.expect("channel");
        let queue = self.bind_event_queue(&channel, "events", "#").await;
        debug_assert_eq!(queue, self.events_queue());
        let _ = conn.close(200, "bound".into()).await;
    }
}
