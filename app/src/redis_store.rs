//! Redis: the connection (a reconnecting `ConnectionManager`) and the idempotency keys of
//! CreateOrder. Step 8 closes it: the handle drops its manager, so every later use fails fast
//! with "closed" instead of reconnecting.
//!
//! An idempotency key moves through two values:
//! `pending|<fingerprint>|<owner token>` (SET NX PX <lease>, by the request that owns it) →
//! `done|<fingerprint>|<order id>` (EX <ttl>). The pending marker is a lease, not a record: it
//! lives at most as long as its request's deadline (capped by `idempotency_lease`), and a
//! request that is cancelled (its future dropped) deletes it, by owner token, from a background
//! task ([`PendingMarker`]'s drop), so a retry never waits for a request that no longer exists
//! and a later owner's marker is never deleted. A process killed mid-request leaves the marker
//! to its lease. Redis is only a fast path: the order row's unique key decides.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::Config;
use crate::error::StartError;
use crate::report::{Report, soft_deadline};

const REDIS_START: &str = "redis-server --daemonize yes";

/// Deletes `KEYS[1]` only while it still holds `ARGV[1]` (compare-and-delete), so releasing a
/// marker can never delete another owner's marker or a `done` record.
const DELETE_IF_EQUAL: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

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
    /// Marker releases started by dropped requests; step 8 waits for them before closing.
    releases: TaskTracker,
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
#[derive(Debug, PartialEq, Eq)]
pub enum KeyState {
    /// This caller now owns the key: it creates the order, then completes or releases the marker.
    Owned(PendingMarker),
    /// Another request holds the key's lease and may still be working.
    InProgress {
        /// Its request fingerprint.
        fingerprint: String,
        /// The marker as stored (for a compare-and-delete).
        value: String,
        /// A marker without owner token, from a version that set it for the whole TTL: no
        /// running request can be trusted to finish it.
        legacy: bool,
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
            releases: TaskTracker::new(),
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
            Err(format!("unexpected PING reply `{pong}`"))
        }
    }

    /// Claims `key` for a request with `fingerprint` under a lease of `lease` (SET NX PX with
    /// a fresh owner token), or reports who has it.
    #[tracing::instrument(name = "redis.claim_key", skip_all, fields(otel.kind = "client", db.system = "redis", db.operation = "SET NX"))]
    pub async fn begin(
        &self,
        key: &str,
        fingerprint: &str,
        lease: Duration,
    ) -> Result<KeyState, RedisError> {
        let mut conn = self.conn()?;
        let redis_key = self.key(key);
        let value = format!("pending|{fingerprint}|{}", Uuid::new_v4().simple());
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
        let set: Option<String> = redis::cmd("SET")
            .arg(&redis_key)
            .arg(&value)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms)
            .query_async(&mut conn)
            .await?;
        let owned = || {
            KeyState::Owned(PendingMarker {
                store: self.clone(),
                key: key.to_owned(),
                value: value.clone(),
                armed: true,
            })
        };
        if set.is_some() {
            return Ok(owned());
        }
        let current: Option<String> = redis::cmd("GET")
            .arg(&redis_key)
            .query_async(&mut conn)
            .await?;
        Ok(match current.as_deref().and_then(parse_value) {
            Some(state) => state,
            // Expired between SET and GET, or garbage: act as the owner (the database's unique
            // key still prevents a second order).
            None => owned(),
        })
    }

    /// Records the order created under `key`, for the whole TTL.
    #[tracing::instrument(name = "redis.complete_key", skip_all, fields(otel.kind = "client", db.system = "redis", db.operation = "SET"))]
    pub async fn complete(
        &self,
        key: &str,
        fingerprint: &str,
        order_id: Uuid,
    ) -> Result<(), RedisError> {
        let mut conn = self.conn()?;
        let () = redis::cmd("SET")
            .arg(self.key(key))
            .arg(done_value(fingerprint, order_id))
            .arg("EX")
            .arg(self.ttl.as_secs())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Deletes `key` if it still holds `value`; returns whether it did.
    #[tracing::instrument(name = "redis.delete_key", skip_all, fields(otel.kind = "client", db.system = "redis", db.operation = "EVAL"))]
    pub async fn delete_if(&self, key: &str, value: &str) -> Result<bool, RedisError> {
        let mut conn = self.conn()?;
        let deleted: i64 = redis::cmd("EVAL")
            .arg(DELETE_IF_EQUAL)
            .arg(1)
            .arg(self.key(key))
            .arg(value)
            .query_async(&mut conn)
            .await?;
        Ok(deleted == 1)
    }

    /// Forgets a `done` record whose order no longer exists (database reset).
    pub async fn forget_done(
        &self,
        key: &str,
        fingerprint: &str,
        order_id: Uuid,
    ) -> Result<bool, RedisError> {
        self.delete_if(key, &done_value(fingerprint, order_id))
            .await
    }

    /// Step 8: waits (until the soft deadline) for marker releases of cancelled requests, then
    /// drops the connection. Counts: `closed` (1 if this call closed it).
    pub async fn close(&self, deadline: Instant) -> Report {
        self.releases.close();
        let _ = tokio::time::timeout_at(soft_deadline(deadline), self.releases.wait()).await;
        let taken = self
            .manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Report::new().count("closed", u64::from(taken.is_some()))
    }
}

/// The lease a request holds on its idempotency key. Complete it with the order or release it
/// on failure; dropping it armed (the request was cancelled) deletes the marker by its owner
/// token from a background task.
#[derive(Debug)]
pub struct PendingMarker {
    store: RedisStore,
    key: String,
    value: String,
    armed: bool,
}

impl PendingMarker {
    /// Replaces the marker with the `done` record of `order_id`.
    pub async fn complete(mut self, order_id: Uuid) -> Result<(), RedisError> {
        let fingerprint = parse_fingerprint(&self.value);
        let result = self.store.complete(&self.key, fingerprint, order_id).await;
        // A failed write leaves the marker: drop then removes it, so a retry need not wait.
        self.armed = result.is_err();
        result
    }

    /// Deletes the marker (if it is still this request's), so a retry can own the key.
    pub async fn release(mut self) -> Result<(), RedisError> {
        let result = self.store.delete_if(&self.key, &self.value).await;
        self.armed = result.is_err();
        result.map(|_| ())
    }
}

impl PartialEq for PendingMarker {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.value == other.value
    }
}

impl Eq for PendingMarker {}

impl Drop for PendingMarker {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, key, value) = (self.store.clone(), self.key.clone(), self.value.clone());
        let releases = self.store.releases.clone();
        releases.spawn_on(
            async move {
                match store.delete_if(&key, &value).await {
                    Ok(_) => tracing::debug!(key, "released the idempotency marker of a cancelled request"),
                    Err(e) => tracing::warn!(error = %e, key, "cannot release an idempotency marker; its lease will expire"),
                }
            },
            &runtime,
        );
    }
}

fn done_value(fingerprint: &str, order_id: Uuid) -> String {
    format!("done|{fingerprint}|{order_id}")
}

fn parse_fingerprint(value: &str) -> &str {
    value.split('|').nth(1).unwrap_or_default()
}

fn parse_value(value: &str) -> Option<KeyState> {
    let mut parts = value.split('|');
    match parts.next()? {
        "pending" => Some(KeyState::InProgress {
            fingerprint: parts.next()?.to_owned(),
            value: value.to_owned(),
            legacy: parts.next().is_none(),
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
            parse_value("pending|abc|t0"),
            Some(KeyState::InProgress {
                fingerprint: "abc".into(),
                value: "pending|abc|t0".into(),
                legacy: false,
            })
        );
        assert_eq!(
            parse_value("pending|abc"),
            Some(KeyState::InProgress {
                fingerprint: "abc".into(),
                value: "pending|abc".into(),
                legacy: true,
            })
        );
        assert_eq!(parse_fingerprint("pending|abc|t0"), "abc");
        assert_eq!(parse_value("done|abc|nope"), None);
        assert_eq!(parse_value("other"), None);
    }
}
