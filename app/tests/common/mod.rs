//! Test isolation and helpers shared by the integration tests. Each [`TestEnv`] owns a fresh
//! PostgreSQL database `order_test_<random>`, exchange/queue names `test-<random>.*` and Redis
//! keys `test-<random>:*`, and removes all three when dropped (even when the test panics).
//! Every wait polls against a deadline; every test body runs under [`hard_timeout`].
//!
//! The services are the local ones by default; `TEST_PG_URL` (an admin URL, database
//! `postgres`), `TEST_REDIS_URL` and `TEST_AMQP_URL` point elsewhere.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use order_service::config::{Config, LogFormat, SecretUrl};
use order_service::mq::Topology;
use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{CreateOrderRequest, LineItem};
use sqlx::{AssertSqlSafe, Connection as _, Executor, PgConnection, PgPool};
use tonic::transport::Channel as GrpcChannel;
use uuid::Uuid;

pub fn pg_admin_url() -> String {
    std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Runs `f` and fails the test if it takes longer than `secs`.
pub async fn hard_timeout<T>(secs: u64, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("test exceeded its hard timeout of {secs}s"),
    }
}

/// Polls `cond` every 20 ms until it returns true or `within` passes; panics naming `what`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn init_logs() {
    // RUST_LOG=debug cargo nextest run ... shows the service's logs for a failing test.
    order_service::telemetry::init(LogFormat::Text);
}

/// One isolated environment.
#[derive(Debug)]
pub struct TestEnv {
    pub suffix: String,
    pub database: String,
    pub mq_prefix: String,
    pub redis_prefix: String,
    extra_queues: std::sync::Mutex<Vec<String>>,
}

impl TestEnv {
    /// Creates the database (empty; the service migrates it) and names.
    pub async fn new() -> Self {
        init_logs();
        let suffix = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("order_test_{suffix}");
        let mut admin = PgConnection::connect(&pg_admin_url())
            .await
            .expect("connect to PostgreSQL (is it running? see DEVELOPERS.md)");
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        Self {
            mq_prefix: format!("test-{suffix}"),
            redis_prefix: format!("test-{suffix}:"),
            suffix,
            database,
            extra_queues: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn database_url(&self) -> String {
        let admin = pg_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        format!("{base}/{}", self.database)
    }

    /// A configuration isolated to this environment, with short intervals.
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

    /// The environment variables that make the binary use this environment.
    pub fn envs(&self, grpc: SocketAddr, metrics: SocketAddr) -> Vec<(String, String)> {
        [
            ("DATABASE_URL", self.database_url()),
            ("REDIS_URL", redis_url()),
            ("AMQP_URL", amqp_url()),
            ("APP_GRPC_ADDR", grpc.to_string()),
            ("APP_METRICS_ADDR", metrics.to_string()),
            ("APP_MQ_PREFIX", self.mq_prefix.clone()),
            ("APP_REDIS_PREFIX", self.redis_prefix.clone()),
            ("APP_POLL_INTERVAL", "50ms".to_owned()),
            ("APP_CRON_INTERVAL", "1h".to_owned()),
            ("APP_DEPENDENCY_WAIT", "2s".to_owned()),
            ("APP_LOG_FORMAT", "json".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&self.mq_prefix)
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.database_url())
            .await
            .expect("connect to the test database")
    }

    pub async fn amqp(&self) -> Connection {
        Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ")
    }

    /// Declares a queue `<prefix>.test.<name>` bound to the events exchange with `pattern`
    /// (the exchange must exist: start the service first). Deleted with the environment.
    pub async fn bind_event_queue(&self, channel: &Channel, name: &str, pattern: &str) -> String {
        let queue = format!("{}.test.{name}", self.mq_prefix);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("declare the test queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                self.topology().events_exchange.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the test queue");
        self.extra_queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(queue.clone());
        queue
    }
}

/// What a [`TestEnv`] removes when dropped.
#[derive(Debug, Clone)]
struct Leftovers {
    database: String,
    redis_prefix: String,
    topology: Topology,
    queues: Vec<String>,
}

impl Leftovers {
    async fn remove(self) {
        if let Ok(mut admin) = PgConnection::connect(&pg_admin_url()).await {
            let _ = admin
                .execute(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.database
                )))
                .await;
        }
        if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await
            && let Ok(channel) = conn.create_channel().await
        {
            let t = &self.topology;
            let mut queues = vec![t.payments_queue.clone(), t.dead_letter_queue.clone()];
            queues.extend(self.queues.iter().cloned());
            for q in queues {
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for x in [
                &t.events_exchange,
                &t.payments_exchange,
                &t.dead_letter_exchange,
            ] {
                let _ = channel
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "test cleanup".into()).await;
        }
        if let Ok(client) = redis::Client::open(redis_url())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.redis_prefix))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
        }
    }
}

impl Drop for TestEnv {
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
        // A separate thread and runtime: Drop may run inside or outside the test's runtime,
        // and also while unwinding from a failed assertion.
        let done = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(20), leftovers.remove()).await;
                });
            }
        });
        let _ = done.join();
    }
}

/// A gRPC client to `addr`.
pub async fn client(addr: SocketAddr) -> OrderServiceClient<GrpcChannel> {
    OrderServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect the gRPC client")
}

/// A valid create request.
pub fn create_request(customer: &str, key: &str) -> CreateOrderRequest {
    CreateOrderRequest {
        customer_id: customer.to_owned(),
        items: vec![
            LineItem {
                sku: "sku-1".to_owned(),
                quantity: 2,
                price_cents: 1250,
            },
            LineItem {
                sku: "sku-2".to_owned(),
                quantity: 1,
                price_cents: 99,
            },
        ],
        idempotency_key: key.to_owned(),
    }
}

/// A confirm-mode channel for publishing test messages.
pub async fn confirm_channel(conn: &Connection) -> Channel {
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    channel
}

/// Publishes a payment message and waits for its confirm.
pub async fn publish_payment(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    message_id: Option<&str>,
    body: &[u8],
) {
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        props = props.with_message_id(id.into());
    }
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "broker nacked a test message");
}

/// Messages ready in `queue` (passive declare). Panics naming the queue when it does not exist
/// or the broker cannot answer: a depth of 0 always means an empty queue.
pub async fn queue_depth(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot read the depth of queue `{queue}`: the passive declare failed ({e}); the queue does not exist or RabbitMQ is not reachable"
            )
        })
        .message_count()
}

/// Takes every ready message off `queue` (basic.get + ack), returning their message_ids and
/// bodies.
pub async fn drain_queue(channel: &Channel, queue: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(msg) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        let id = msg
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        out.push((id, msg.delivery.data.clone()));
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    out
}

/// Inserts `n` pending orders directly (fast fixture for consumer tests); returns their ids.
pub async fn insert_pending_orders(pool: &PgPool, n: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    for chunk in ids.chunks(5000) {
        sqlx::query(
            "INSERT INTO orders (id, customer_id, status, total_cents) \
             SELECT id, 'fixture', 'pending', 100 FROM unnest($1::uuid[]) AS t(id)",
        )
        .bind(chunk)
        .execute(pool)
        .await
        .expect("insert fixture orders");
    }
    ids
}

/// Reads one integer from SQL.
pub async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("scalar query")
}

/// Fetches `/metrics` text from `addr` over a raw HTTP/1.0 request (no HTTP client needed).
pub async fn fetch_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

/// The value of one sample line (`name{labels} value`) in a metrics text, if present.
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The `order-service` binary running as a child process, its stderr (JSON log lines)
/// collected. Killed on drop.
#[derive(Debug)]
pub struct ServiceProcess {
    child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

impl ServiceProcess {
    /// Starts the binary with `env`'s configuration plus `extra` variables, and waits (up to
    /// 30 s) for its "order-service ready" line, reading the bound addresses from it.
    pub async fn spawn(env: &TestEnv, extra: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncBufReadExt;
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-service"));
        cmd.envs(env.envs(any, any))
            .envs(extra.iter().map(|(k, v)| (*k, *v)))
            .env_remove("QUIESCE_CONTROL_SOCKET")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some((_, v)) = extra.iter().find(|(k, _)| *k == "QUIESCE_CONTROL_SOCKET") {
            cmd.env("QUIESCE_CONTROL_SOCKET", v);
        }
        let mut child = cmd.spawn().expect("spawn order-service");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let mut process = Self {
            child,
            lines,
            grpc: any,
            metrics: any,
        };
        let ready = process
            .wait_for_line("order-service ready", Duration::from_secs(30))
            .await;
        let v: serde_json::Value = serde_json::from_str(&ready).expect("JSON log line");
        process.grpc = v["grpc"].as_str().unwrap().parse().unwrap();
        process.metrics = v["metrics"].as_str().unwrap().parse().unwrap();
        process
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for a stderr line containing `needle`; panics with the log on timeout or exit.
    pub async fn wait_for_line(&mut self, needle: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "order-service exited ({status}) before logging {needle:?}:\n{}",
                    self.lines().join("\n")
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "no {needle:?} within {within:?}:\n{}",
                    self.lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id().expect("running") as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("send the signal");
    }

    /// Waits for the exit (up to `within`), then for the stderr reader to catch up.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "order-service did not exit within {within:?}:\n{}",
                    self.lines().join("\n")
                )
            })
            .expect("wait");
        tokio::time::sleep(Duration::from_millis(100)).await;
        status
    }
}

/// Runs the binary to completion with `env`'s configuration plus `extra`; returns its exit
/// code and stderr.
pub async fn run_to_exit(
    env: &TestEnv,
    extra: &[(&str, &str)],
    within: Duration,
) -> (Option<i32>, String) {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let output = tokio::time::timeout(
        within,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
            .envs(env.envs(any, any))
            .envs(extra.iter().map(|(k, v)| (*k, *v)))
            .env_remove("QUIESCE_CONTROL_SOCKET")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the binary exits in time")
    .expect("run order-service");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The Redis value and remaining lease (PTTL, ms; -2 when absent) of idempotency key `key`.
pub async fn idempotency_marker(env: &TestEnv, key: &str) -> (Option<String>, i64) {
    let client = redis::Client::open(redis_url()).expect("Redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let redis_key = format!("{}idem:{key}", env.redis_prefix);
    let value: Option<String> = redis::cmd("GET")
        .arg(&redis_key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&redis_key)
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    (value, pttl)
}

/// Backends of this test's database waiting for a lock, optionally only those of one
/// `application_name`.
pub async fn lock_waiters(pool: &PgPool, application_name: Option<&str>) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND ($1::text IS NULL OR application_name = $1)",
    )
    .bind(application_name)
    .fetch_one(pool)
    .await
    .expect("query pg_stat_activity")
}

/// Orders holding idempotency key `key`.
pub async fn orders_with_key(pool: &PgPool, key: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(pool)
        .await
        .expect("count orders")
}
