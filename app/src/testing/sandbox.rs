//! One test's names on the shared local services: a database `<label>_<random>`, exchanges and
//! queues `<label>-<random>.*` and Redis keys `<label>-<random>:*`, removed when the
//! [`Sandbox`] drops (also after a failed assertion).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use lapin::Channel;
use sqlx::{AssertSqlSafe, Connection as _, Executor, PgPool};

use super::{amqp, amqp_url, pg_admin, pg_admin_url, redis_url};
use crate::config::{Config, LogFormat, SecretUrl};
use crate::mq::Topology;

/// One test's database, broker names and Redis prefix.
#[derive(Debug)]
pub struct Sandbox {
    /// The random part shared by every name.
    pub suffix: String,
    pub database: String,
    pub mq_prefix: String,
    pub redis_prefix: String,
    /// Queues a test bound with [`Sandbox::bind_event_queue`], deleted with the rest.
    extra_queues: Mutex<Vec<String>>,
}

impl Sandbox {
    /// Creates the (empty) database `<label>_<random>`; the service migrates it at start.
    pub async fn new(label: &str) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("{label}_{suffix}");
        let mut admin = pg_admin().await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to PostgreSQL at {} ({e}); start it: pg_ctlcluster --skip-systemctl-redirect 15 main start",
                pg_admin_url()
            )
        });
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
            .await
            .expect("create the sandbox's database (the admin URL needs CREATEDB)");
        let _ = admin.close().await;
        Self {
            mq_prefix: format!("{label}-{suffix}"),
            redis_prefix: format!("{label}-{suffix}:"),
            suffix,
            database,
            extra_queues: Mutex::new(Vec::new()),
        }
    }

    pub fn database_url(&self) -> String {
        let admin = pg_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        format!("{base}/{}", self.database)
    }

    /// The service's exchanges and queues under this sandbox's prefix.
    pub fn topology(&self) -> Topology {
        Topology::new(&self.mq_prefix)
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.database_url())
            .await
            .expect("connect to the sandbox's database")
    }

    /// A connection to RabbitMQ (any sandbox: the names keep tests apart).
    pub async fn amqp(&self) -> lapin::Connection {
        amqp().await.expect("connect to RabbitMQ")
    }

    /// The service binary's environment for this sandbox, JSON logs (addresses, intervals and
    /// the like are the caller's).
    pub fn app_env(&self) -> Vec<(String, String)> {
        [
            ("DATABASE_URL", self.database_url()),
            ("REDIS_URL", redis_url()),
            ("AMQP_URL", amqp_url()),
            ("APP_MQ_PREFIX", self.mq_prefix.clone()),
            ("APP_REDIS_PREFIX", self.redis_prefix.clone()),
            ("APP_LOG_FORMAT", "json".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// An in-process configuration isolated to this sandbox, on any free ports, with short
    /// intervals.
    pub fn config(&self) -> Config {
        Config {
            database_url: SecretUrl::new(self.database_url()),
            redis_url: SecretUrl::new(redis_url()),
            amqp_url: SecretUrl::new(amqp_url()),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            mq_prefix: self.mq_prefix.clone(),
            redis_prefix: self.redis_prefix.clone(),
            poll_interval: Duration::from_millis(50),
            cron_interval: Duration::from_secs(3600),
            dependency_wait: Duration::from_secs(2),
            shutdown_budget: Duration::from_secs(10),
            log_format: LogFormat::Text,
            ..Config::default()
        }
    }

    /// Declares a durable queue `<prefix>.test.<name>` bound to the events exchange with
    /// `pattern` (the exchange must exist: start the service first). Deleted with the sandbox.
    pub async fn bind_event_queue(&self, channel: &Channel, name: &str, pattern: &str) -> String {
        let queue = format!("{}.test.{name}", self.mq_prefix);
        self.topology()
            .bind_events_queue(channel, &queue, pattern)
            .await
            .expect("declare and bind the test queue (start the service first: it declares the exchange)");
        self.extra_queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(queue.clone());
        queue
    }
}

/// What a [`Sandbox`] removes when dropped.
#[derive(Debug, Clone)]
struct Leftovers {
    database: String,
    redis_prefix: String,
    topology: Topology,
    queues: Vec<String>,
}

impl Leftovers {
    async fn remove(self) {
        if let Ok(mut admin) = pg_admin().await {
            let _ = admin
                .execute(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.database
                )))
                .await;
        }
        self.remove_broker_names().await;
        self.remove_redis_keys().await;
    }

    async fn remove_broker_names(&self) {
        let Ok(conn) = amqp().await else { return };
        if let Ok(channel) = conn.create_channel().await {
            self.topology.delete(&channel, &self.queues).await;
        }
        let _ = conn.close(200, "test cleanup".into()).await;
    }

    async fn remove_redis_keys(&self) {
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return;
        };
        let mut cursor: u64 = 0;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.redis_prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
            else {
                return;
            };
            if !keys.is_empty() {
                let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let leftovers = Leftovers {
            database: self.database.clone(),
            redis_prefix: self.redis_prefix.clone(),
            topology: self.topology(),
            queues: self
                .extra_queues
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        // Its own thread and runtime: Drop runs inside or outside a runtime, and while unwinding.
        let done = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(30), leftovers.remove()).await;
                });
            }
        });
        let _ = done.join();
    }
}
