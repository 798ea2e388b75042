//! Helpers of the app's integration tests. What the e2e crate needs too — the services'
//! addresses, the per-test [`Sandbox`] (a fresh PostgreSQL database `test_<random>`,
//! exchange/queue names `test-<random>.*` and Redis keys `test-<random>:*`, all removed when it
//! drops, even when the test panics), CreateOrder requests, publishing and reading queues, the
//! hard timeout — is the app's `order_service::testing` (feature `testing`), re-exported here.
//! Every wait polls against a deadline; every test body runs under [`hard_timeout`].
//!
//! The services are the local ones by default; `TEST_PG_URL` (an admin URL, database
//! `postgres`), `TEST_REDIS_URL` and `TEST_AMQP_URL` point elsewhere.
#![allow(dead_code, unused_imports)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use order_service::config::LogFormat;
use order_service::proto::order_service_client::OrderServiceClient;
pub use order_service::testing::{
    Sandbox, confirm_channel, create_request, drain_queue, hard_timeout, pg_admin_url,
    publish_payment, queue_depth, redis_url,
};
use sqlx::PgPool;
use tonic::transport::Channel as GrpcChannel;
use uuid::Uuid;

/// A fresh [`Sandbox`] labelled `test`, with the service's logs on (`RUST_LOG=debug cargo
/// nextest run ...` shows them for a failing test).
pub async fn sandbox() -> Sandbox {
    order_service::telemetry::init(LogFormat::Text);
    Sandbox::new("test").await
}

/// The environment that makes the binary use `env`, with short intervals, on `grpc` and
/// `metrics`.
pub fn service_env(env: &Sandbox, grpc: SocketAddr, metrics: SocketAddr) -> Vec<(String, String)> {
    let mut vars = env.app_env();
    vars.extend(
        [
            ("APP_GRPC_ADDR", grpc.to_string()),
            ("APP_METRICS_ADDR", metrics.to_string()),
            ("APP_POLL_INTERVAL", "50ms".to_owned()),
            ("APP_CRON_INTERVAL", "1h".to_owned()),
            ("APP_DEPENDENCY_WAIT", "2s".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v)),
    );
    vars
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

/// A gRPC client to `addr`.
pub async fn client(addr: SocketAddr) -> OrderServiceClient<GrpcChannel> {
    OrderServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect the gRPC client")
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
    pub async fn spawn(env: &Sandbox, extra: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncBufReadExt;
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-service"));
        cmd.envs(service_env(env, any, any))
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
    env: &Sandbox,
    extra: &[(&str, &str)],
    within: Duration,
) -> (Option<i32>, String) {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let output = tokio::time::timeout(
        within,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
            .envs(service_env(env, any, any))
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
pub async fn idempotency_marker(env: &Sandbox, key: &str) -> (Option<String>, i64) {
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
