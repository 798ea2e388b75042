//! PostgreSQL: connecting (creating the database when it is missing), applying the embedded
//! migrations, and the pool handle that step 9 closes. Queries live in the submodules, one per
//! table family, all with runtime-checked `sqlx::query` so building needs no database.
//!
//! A gRPC request's statements run on a [`RequestConn`]. When the request is cancelled (client
//! reset, `grpc-timeout`, or step 3's deadline) its future is dropped mid-statement; the pool
//! would then keep that connection busy until the statement ends on its own (possibly much
//! later, behind a lock, and then committing). Instead the connection is detached and closed,
//! and every connection sets `client_connection_check_interval`, so PostgreSQL notices the
//! closed socket within that interval and aborts the statement, rolling back its work. Each
//! process connects with its own `application_name` (`order-service-<8 hex>`), so its backends
//! can be told apart in `pg_stat_activity`.

pub mod orders;
pub mod outbox;
pub mod payments;

use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, PgConnection, PgPool, Postgres};
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::{Config, ConfigError};
use crate::error::StartError;
use crate::report::{Report, deadline_reached};

/// The schema, embedded at build time from `migrations/` at the repository root.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

const PG_START: &str = "pg_ctlcluster --skip-systemctl-redirect 15 main start";

/// How often a backend running a statement checks that its client is still connected
/// (PostgreSQL 14+ on Linux); bounds how long the work of a cancelled request goes on.
const CLIENT_CHECK_INTERVAL: &str = "250ms";

/// The pool handle shared by every component; [`Db::close`] is step 9.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
    application_name: std::sync::Arc<str>,
}

impl Db {
    /// Connects (creating the database if needed), migrates, and opens the pool.
    pub async fn connect(config: &Config) -> Result<Self, StartError> {
        let url = config.database_url.to_string();
        let options = PgConnectOptions::from_str(config.database_url.expose()).map_err(|e| {
            ConfigError::Invalid {
                key: "database_url",
                message: format!("{url} is not a PostgreSQL URL: {e}"),
            }
        })?;
        let application_name = format!(
            "order-service-{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let options = options.application_name(&application_name);
        let give_up = Instant::now() + config.dependency_wait;
        let mut conn = loop {
            match options.connect().await {
                Ok(conn) => break conn,
                Err(e) if is_missing_database(&e) => {
                    create_database(&options)
                        .await
                        .map_err(|e| unreachable(&url, e))?;
                }
                Err(e) if Instant::now() < give_up => {
                    tracing::info!(error = %e, url = %url, "PostgreSQL not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(unreachable(&url, e)),
            }
        };
        migrate(&mut conn)
            .await
            .map_err(|detail| StartError::Migrate {
                url: url.clone(),
                detail,
            })?;
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(config.db_max_connections)
            .min_connections(2.min(config.db_max_connections))
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _| Box::pin(set_client_check(conn)))
            .connect_with(options)
            .await
            .map_err(|e| unreachable(&url, e))?;
        Ok(Self {
            pool,
            application_name: application_name.into(),
        })
    }

    /// Wraps an existing pool (tests).
    pub fn from_pool(pool: PgPool) -> Self {
        let options = pool.connect_options();
        let application_name = options
            .get_application_name()
            .unwrap_or("order-service")
            .into();
        Self {
            pool,
            application_name,
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// This process's `application_name` in `pg_stat_activity`.
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// A connection slot for one gRPC request (the connection is taken on first use).
    pub fn request_conn(&self) -> RequestConn {
        RequestConn {
            pool: self.pool.clone(),
            conn: None,
        }
    }

    /// `SELECT 1` — the `db` health check.
    pub async fn ping(&self) -> Result<(), String> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Whether [`Db::close`] has run.
    pub fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }

    /// Step 9: closes the pool, waiting (until `deadline`) for checked-out connections to be
    /// returned. Counts: connections open when asked, and whether it finished in time.
    pub async fn close(&self, deadline: Instant) -> Report {
        let open = u64::from(self.pool.size());
        let idle = self.pool.num_idle() as u64;
        let report = Report::new()
            .count("connections_open", open)
            .count("connections_busy", open.saturating_sub(idle));
        match tokio::time::timeout_at(deadline, self.pool.close()).await {
            Ok(()) => report,
            Err(_) => deadline_reached(report, "connections still checked out at the deadline"),
        }
    }
}

/// The connection a gRPC request runs its statements on. [`RequestConn::finish`] returns it to
/// the pool; dropped unfinished (the request was cancelled, perhaps mid-statement) it is
/// detached and closed instead, which makes PostgreSQL abort the statement (see the module
/// docs) and keeps step 9 from waiting for it.
#[derive(Debug)]
pub struct RequestConn {
    pool: PgPool,
    conn: Option<PoolConnection<Postgres>>,
}

impl RequestConn {
    /// The connection, acquired from the pool on first use.
    pub async fn get(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(&mut **self.conn.insert(conn))
    }

    /// No statement is running and the request needs the connection no more for now: it goes
    /// back to the pool (a later [`RequestConn::get`] takes one again).
    pub fn idle(&mut self) {
        drop(self.conn.take());
    }

    /// The request completed: the connection (if one was used) goes back to the pool.
    pub fn finish(mut self) {
        self.idle();
    }
}

impl Drop for RequestConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            tracing::debug!("request cancelled: closing its database connection");
            drop(conn.detach());
        }
    }
}

/// Asks the backend to check its client while running a statement; older servers without the
/// setting keep working, only without that check.
async fn set_client_check(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let sql = format!("SET client_connection_check_interval = '{CLIENT_CHECK_INTERVAL}'");
    if let Err(e) = conn.execute(AssertSqlSafe(sql)).await {
        tracing::debug!(error = %e, "client_connection_check_interval not supported");
    }
    Ok(())
}

fn unreachable(url: &str, e: sqlx::Error) -> StartError {
    StartError::Dependency {
        dependency: "PostgreSQL",
        url: url.to_owned(),
        detail: e.to_string(),
        start_command: PG_START,
        env_var: "DATABASE_URL",
    }
}

fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

/// Creates the target database through the `postgres` maintenance database.
async fn create_database(options: &PgConnectOptions) -> Result<(), sqlx::Error> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options.clone().database("postgres").connect().await?;
    let sql = format!("CREATE DATABASE {}", quote_ident(&name));
    // The name is quoted as an identifier above; CREATE DATABASE takes no bind parameters.
    match admin.execute(AssertSqlSafe(sql)).await {
        Ok(_) => tracing::info!(database = %name, "created the database"),
        // Another instance created it meanwhile.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
        Err(e) => return Err(e),
    }
    let _ = admin.close().await;
    Ok(())
}

/// Quotes a PostgreSQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Applies the migrations on one connection whose `lock_timeout` bounds every DDL lock wait
/// (the `CREATE INDEX CONCURRENTLY` files cannot set it themselves; see migrations/).
async fn migrate(conn: &mut PgConnection) -> Result<(), String> {
    conn.execute("SET lock_timeout = '5s'")
        .await
        .map_err(|e| e.to_string())?;
    MIGRATOR.run(&mut *conn).await.map_err(|e| e.to_string())?;
    conn.execute("RESET lock_timeout")
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_identifiers() {
        assert_eq!(super::quote_ident("orders"), "\"orders\"");
        assert_eq!(super::quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
