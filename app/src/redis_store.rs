//! Redis: the connection (a reconnecting `ConnectionManager`) and the idempotency keys of
//! CreateOrder. Step 8 closes it: the handle drops its manager, so every later use fails fast
//! with "closed" instead of reconnecting.
//!
//! An idempotency key moves through two values, both with the TTL:
//! `pending|<fingerprint>` (SET NX by the request that owns it) → `done|<fingerprint>|<order id>`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::Config;
use crate::error::StartError;
use crate::report::StopReport;

const REDIS_START: &str = "redis-server --daemonize yes";

/// A Redis failure, or use after close.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Step 8 ran.
    #[error("the Redis client is closed (shutdown step close-redis ran)")]
    Closed,
    /// The command failed.
    #[error("Redis: {0}")]
    Command(#[from] redis::RedisError),
}

/// The shared Redis handle.
#[derive(Clone)]
pub struct RedisStore {
    manager: Arc<Mutex<Option<ConnectionManager>>>,
    prefix: Arc<str>,
    ttl: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The state of an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// This caller now owns the key and must create the order, then call `complete`.
    Owned,
    /// Another request holds the key and is still working.
    InProgress {
        /// Its request fingerprint.
        fingerprint: String,
    },
    /// A request with this key created this order.
    Done {
        /// Its request fingerprint.
        fingerprint: String,
        /// The order it created.
        order_id: Uuid,
    },
}

impl RedisStore {
    /// Connects, retrying for `dependency_wait`.
    pub async fn connect(config: &Config) -> Result<Self, StartError> {
        let url = config.redis_url.to_string();
        let fail = |detail: String| StartError::Dependency {
            dependency: "Redis",
            url: url.clone(),
            detail,
            start_command: REDIS_START,
            env_var: "REDIS_URL",
        };
        let client =
            redis::Client::open(config.redis_url.expose()).map_err(|e| fail(e.to_string()))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let give_up = Instant::now() + config.dependency_wait;
        let manager = loop {
            match ConnectionManager::new_with_config(client.clone(), manager_config.clone()).await {
                Ok(m) => break m,
                Err(e) if Instant::now() < give_up => {
                    tracing::info!(error = %e, url = %url, "Redis not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        };
        Ok(Self {
            manager: Arc::new(Mutex::new(Some(manager))),
            prefix: config.redis_prefix.as_str().into(),
            ttl: config.idempotency_ttl,
        })
    }

    fn conn(&self) -> Result<ConnectionManager, RedisError> {
        self.manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(RedisError::Closed)
    }

    /// Whether step 8 ran.
    pub fn is_closed(&self) -> bool {
        self.manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    fn key(&self, idempotency_key: &str) -> String {
        format!("{}idem:{}", self.prefix, idempotency_key)
    }

    /// PING — the `redis` health check.
    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn().map_err(|e| e.to_string())?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(format!("unexpected PING reply {pong:?}"))
        }
    }

    /// Claims `key` for a request with `fingerprint` (SET NX with the TTL), or reports who has it.
    pub async fn begin(&self, key: &str, fingerprint: &str) -> Result<KeyState, RedisError> {
        let mut conn = self.conn()?;
        let redis_key = self.key(key);
        let set: Option<String> = redis::cmd("SET")
            .arg(&redis_key)
            .arg(format!("pending|{fingerprint}"))
            .arg("NX")
            .arg("EX")
            .arg(self.ttl.as_secs())
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            return Ok(KeyState::Owned);
        }
        let value: Option<String> = redis::cmd("GET")
            .arg(&redis_key)
            .query_async(&mut conn)
            .await?;
        Ok(match value.as_deref().map(parse_value) {
            Some(Some(state)) => state,
            // Expired between SET and GET, or garbage: let the caller own it (the database's
            // unique key still prevents a second order).
            _ => KeyState::Owned,
        })
    }

    /// Records the order created under `key`.
    pub async fn complete(
        &self,
        key: &str,
        fingerprint: &str,
        order_id: Uuid,
    ) -> Result<(), RedisError> {
        let mut conn = self.conn()?;
        let () = redis::cmd("SET")
            .arg(self.key(key))
            .arg(format!("done|{fingerprint}|{order_id}"))
            .arg("EX")
            .arg(self.ttl.as_secs())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Releases a key whose request failed, so a retry can own it.
    pub async fn release(&self, key: &str) -> Result<(), RedisError> {
        let mut conn = self.conn()?;
        let _: i64 = redis::cmd("DEL")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Step 8: drops the connection. Counts: `closed` (1 if this call closed it).
    pub async fn close(&self, _deadline: Instant) -> StopReport {
        let taken = self
            .manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        StopReport::ok().count("closed", u64::from(taken.is_some()))
    }
}

fn parse_value(value: &str) -> Option<KeyState> {
    let mut parts = value.split('|');
    match parts.next()? {
        "pending" => Some(KeyState::InProgress {
            fingerprint: parts.next()?.to_owned(),
        }),
        "done" => Some(KeyState::Done {
            fingerprint: parts.next()?.to_owned(),
            order_id: Uuid::parse_str(parts.next()?).ok()?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_values() {
        let id = Uuid::new_v4();
        assert_eq!(
            parse_value(&format!("done|abc|{id}")),
            Some(KeyState::Done {
                fingerprint: "abc".into(),
                order_id: id
            })
        );
        assert_eq!(
            parse_value("pending|abc"),
            Some(KeyState::InProgress {
                fingerprint: "abc".into()
            })
        );
        assert_eq!(parse_value("done|abc|nope"), None);
        assert_eq!(parse_value("other"), None);
    }
}
