//! Isolation on the shared local services: each scenario owns a database `e2e_<random>`,
//! exchanges/queues `e2e-<random>.*` and Redis keys `e2e-<random>:*`, removed when the
//! [`Sandbox`] drops (also after a failed assertion). `E2E_PG_URL` (an admin URL, database
//! `postgres`), `E2E_REDIS_URL` and `E2E_AMQP_URL` point elsewhere.

use std::time::Duration;

use lapin::options::{
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use sqlx::{AssertSqlSafe, Connection as _, Executor, PgConnection, PgPool};

pub fn pg_admin_url() -> String {
    std::env::var("E2E_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("E2E_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("E2E_AMQP_URL")
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

/// One scenario's names on the shared services.
#[derive(Debug)]
pub struct Sandbox {
    pub suffix: String,
    pub database: String,
    pub mq_prefix: String,
    pub redis_prefix: String,
}

impl Sandbox {
    /// Creates the (empty) database; the service migrates it at start.
    pub async fn new() -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("e2e_{suffix}");
        let mut admin = pg_admin().await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to PostgreSQL at {} ({e}); start it: pg_ctlcluster --skip-systemctl-redirect 15 main start",
                pg_admin_url()
            )
        });
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
            .await
            .expect("create the scenario's database (the admin URL needs CREATEDB)");
        let _ = admin.close().await;
        Self {
            mq_prefix: format!("e2e-{suffix}"),
            redis_prefix: format!("e2e-{suffix}:"),
            suffix,
            database,
        }
    }

    pub fn database_url(&self) -> String {
        let admin = pg_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        format!("{base}/{}", self.database)
    }

    /// The app's environment for this sandbox (addresses are chosen per pod).
    pub fn app_env(&self) -> Vec<(String, String)> {
        [
            ("DATABASE_URL", self.database_url()),
            ("REDIS_URL", redis_url()),
            ("AMQP_URL", amqp_url()),
            ("APP_MQ_PREFIX", self.mq_prefix.clone()),
            ("APP_REDIS_PREFIX", self.redis_prefix.clone()),
            ("APP_LOG_FORMAT", "json".to_owned()),
            // The expiry job runs every 2 s, so step 4 has a real scheduler to stop.
            ("APP_CRON_INTERVAL", "2s".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    pub fn payments_exchange(&self) -> String {
        format!("{}.payments", self.mq_prefix)
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.mq_prefix)
    }

    pub fn payments_queue(&self) -> String {
        format!("{}.payments", self.mq_prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.payments.dead", self.mq_prefix)
    }

    /// The test's own durable queue bound to the app's events exchange with `#`.
    pub fn events_queue(&self) -> String {
        format!("{}.e2e.events", self.mq_prefix)
    }

    pub async fn pool(&self) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.database_url())
            .await
            .expect("connect to the scenario's database")
    }

    /// Declares [`Self::events_queue`] and binds it (the exchange exists once a pod started).
    pub async fn bind_events_queue(&self) {
        let conn = amqp().await.expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .queue_declare(
                self.events_queue().as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("declare the events test queue");
        channel
            .queue_bind(
                self.events_queue().as_str().into(),
                self.events_exchange().as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the events test queue (start a pod first: it declares the exchange)");
        let _ = conn.close(200, "bound".into()).await;
    }

    async fn remove(database: String, redis_prefix: String, prefix: String) {
        if let Ok(mut admin) = pg_admin().await {
            let _ = admin
                .execute(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                )))
                .await;
        }
        if let Ok(conn) = amqp().await
            && let Ok(channel) = conn.create_channel().await
        {
            for q in ["payments", "payments.dead", "e2e.events"] {
                let q = format!("{prefix}.{q}");
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for x in ["events", "payments", "dlx"] {
                let x = format!("{prefix}.{x}");
                let _ = channel
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "e2e cleanup".into()).await;
        }
        if let Ok(client) = redis::Client::open(redis_url())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = match redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{redis_prefix}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                {
                    Ok(v) => v,
                    Err(_) => break,
                };
                if !keys.is_empty() {
                    let _: Result<i64, _> =
                        redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let (db, redis, prefix) = (
            self.database.clone(),
            self.redis_prefix.clone(),
            self.mq_prefix.clone(),
        );
        // Its own thread and runtime: Drop runs inside or outside a runtime, and while unwinding.
        let done = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        Sandbox::remove(db, redis, prefix),
                    )
                    .await;
                });
            }
        });
        let _ = done.join();
    }
}
