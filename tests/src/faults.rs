//! Real faults on the real services, each with a guard that undoes it on drop (also when the
//! test fails): PostgreSQL stopped with `pg_ctlcluster … stop -m fast`, the RabbitMQ
//! application stopped with `rabbitmqctl stop_app`, and locks held from a second connection to
//! keep the app's work in progress (a payment handler waiting on an order row, CreateOrder
//! calls waiting on an idempotency key another transaction holds).
//!
//! PostgreSQL and RabbitMQ are shared by every test on the machine: the variants that stop
//! them are `#[ignore]`d and run serialized, last, by `scripts/reliability.sh`.

use std::process::Command;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection as _, Executor, PgConnection};
use tokio::time::Instant;

use crate::sandbox::pg_admin;

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd} {}: {}: {text}", args.join(" "), out.status))
    }
}

/// The local cluster's version directory (`/etc/postgresql/<version>`), as `.ci/run` finds it.
fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| "15".to_owned())
}

fn pg_ready() -> bool {
    Command::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1", "-p", "5432"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Stops PostgreSQL (fast: every session is terminated, as in a crash of the primary).
pub fn pg_stop() -> Result<(), String> {
    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &pg_version(),
            "main",
            "stop",
            "-m",
            "fast",
        ],
    )
    .map(|_| ())
}

/// Starts PostgreSQL and waits (up to 60 s) until it accepts connections.
pub fn pg_start() -> Result<(), String> {
    if !pg_ready() {
        run(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", &pg_version(), "main", "start"],
        )?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !pg_ready() {
        if std::time::Instant::now() > deadline {
            return Err("PostgreSQL did not accept connections within 60s of its start".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Restarts PostgreSQL when dropped, whatever happened in between.
#[derive(Debug)]
pub struct PgGuard;

impl Drop for PgGuard {
    fn drop(&mut self) {
        if let Err(e) = pg_start() {
            eprintln!(
                "e2e: PostgreSQL is still down ({e}); start it: pg_ctlcluster --skip-systemctl-redirect {} main start",
                pg_version()
            );
        }
    }
}

fn amqp_port_open() -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], 5672)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// `rabbitmqctl stop_app`: the broker drops every connection and stops listening.
pub fn rabbit_stop() -> Result<(), String> {
    run("rabbitmqctl", &["stop_app"]).map(|_| ())
}

/// `rabbitmqctl start_app`, then waits (up to 60 s) for the AMQP port.
pub fn rabbit_start() -> Result<(), String> {
    run("rabbitmqctl", &["start_app"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !amqp_port_open() {
        if std::time::Instant::now() > deadline {
            return Err("RabbitMQ did not listen on 5672 within 60s of start_app".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Starts the RabbitMQ application again when dropped, if it is not listening.
#[derive(Debug)]
pub struct RabbitGuard;

impl Drop for RabbitGuard {
    fn drop(&mut self) {
        if !amqp_port_open()
            && let Err(e) = rabbit_start()
        {
            eprintln!("e2e: RabbitMQ is still stopped ({e}); start it: rabbitmqctl start_app");
        }
    }
}

/// An open transaction on its own connection, holding row locks until released or dropped.
#[derive(Debug)]
pub struct HeldLock {
    conn: Option<PgConnection>,
}

impl HeldLock {
    async fn begin(database_url: &str) -> PgConnection {
        let mut conn = PgConnection::connect(database_url)
            .await
            .expect("connect to hold a lock");
        conn.execute("BEGIN").await.expect("BEGIN");
        conn
    }

    /// `SELECT … FOR UPDATE` on an order: a payment handler for it waits on this row.
    pub async fn order_row(database_url: &str, order_id: &str) -> HeldLock {
        let mut conn = Self::begin(database_url).await;
        let id: uuid::Uuid = order_id.parse().expect("an order uuid");
        let n = sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut conn)
            .await
            .expect("lock the order row")
            .rows_affected();
        assert_eq!(n, 1, "order {order_id} to lock does not exist");
        HeldLock { conn: Some(conn) }
    }

    /// Inserts (uncommitted) orders carrying `keys` as idempotency keys: a CreateOrder with
    /// one of them waits on the unique index until this transaction ends.
    pub async fn idempotency_keys(database_url: &str, keys: &[String]) -> HeldLock {
        let mut conn = Self::begin(database_url).await;
        for key in keys {
            sqlx::query(
                "INSERT INTO orders (id, customer_id, status, total_cents, idempotency_key) \
                 VALUES ($1, 'e2e-holder', 'pending', 1, $2)",
            )
            .bind(uuid::Uuid::new_v4())
            .bind(key)
            .execute(&mut conn)
            .await
            .expect("insert a key holder");
        }
        HeldLock { conn: Some(conn) }
    }

    /// Rolls back (nothing the holder did remains).
    pub async fn release(mut self) {
        if let Some(mut c) = self.conn.take() {
            let _ = c.execute("ROLLBACK").await;
            let _ = c.close().await;
        }
    }
}

/// Backends of `database` waiting on a lock now (from `pg_stat_activity`).
pub async fn lock_waiters(database: &str) -> i64 {
    let Ok(mut admin) = pg_admin().await else {
        return -1;
    };
    let n = sqlx::query_scalar(AssertSqlSafe(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'"
            .to_owned(),
    ))
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .unwrap_or(-1);
    let _ = admin.close().await;
    n
}

/// Polls until at least `n` backends of `database` wait on a lock; false at `within`.
pub async fn wait_lock_waiters(database: &str, n: i64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if lock_waiters(database).await >= n {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
