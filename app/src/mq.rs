//! RabbitMQ: one connection shared by the outbox publisher and the payment consumer (each on
//! its own channel), the topology both rely on, and step 7 (closing the connection).
//!
//! Topology, every name prefixed with `mq_prefix` (tests use a random one):
//! - `<p>.events` (topic): the outbox publishes `order.*` events here.
//! - `<p>.payments` (topic) → queue `<p>.payments` bound with `payment.*`; the queue
//!   dead-letters to `<p>.dlx` (fanout) → queue `<p>.payments.dead`.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{Config, SecretUrl};
use crate::error::StartError;
use crate::report::{HandlerError, Report, deadline_reached};

const RABBIT_START: &str = "rabbitmq-server -detached";

/// Exchange and queue names derived from the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Where order events are published.
    pub events_exchange: String,
    /// Where payment messages are published.
    pub payments_exchange: String,
    /// The consumer's queue.
    pub payments_queue: String,
    /// The dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Poison messages end up here.
    pub dead_letter_queue: String,
}

impl Topology {
    /// Names for `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            events_exchange: format!("{prefix}.events"),
            payments_exchange: format!("{prefix}.payments"),
            payments_queue: format!("{prefix}.payments"),
            dead_letter_exchange: format!("{prefix}.dlx"),
            dead_letter_queue: format!("{prefix}.payments.dead"),
        }
    }

    /// Declares everything (idempotent; durable).
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for (name, kind) in [
            (&self.events_exchange, ExchangeKind::Topic),
            (&self.payments_exchange, ExchangeKind::Topic),
            (&self.dead_letter_exchange, ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
                .await?;
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
        );
        let (payments, dead) = (&self.payments_queue, &self.dead_letter_queue);
        declare_bound(
            channel,
            payments,
            args,
            &self.payments_exchange,
            "payment.*",
        )
        .await?;
        declare_bound(
            channel,
            dead,
            FieldTable::default(),
            &self.dead_letter_exchange,
            "",
        )
        .await?;
        Ok(())
    }

    /// Declares the durable queue `queue` and binds it to the events exchange with `pattern`
    /// (a test's or a load run's own view of the events; the exchange must exist).
    pub async fn bind_events_queue(
        &self,
        channel: &Channel,
        queue: &str,
        pattern: &str,
    ) -> Result<(), lapin::Error> {
        let none = FieldTable::default();
        declare_bound(channel, queue, none, &self.events_exchange, pattern).await
    }

    /// Deletes the two queues, the `extra` ones and the three exchanges (a test's or a load
    /// run's clean-up); returns the queues that were deleted.
    pub async fn delete(&self, channel: &Channel, extra: &[String]) -> Vec<String> {
        let mut deleted = Vec::new();
        let fixed = [&self.payments_queue, &self.dead_letter_queue];
        for queue in fixed.into_iter().chain(extra) {
            let options = QueueDeleteOptions::default();
            if channel
                .queue_delete(queue.as_str().into(), options)
                .await
                .is_ok()
            {
                deleted.push(queue.clone());
            }
        }
        for exchange in [
            &self.events_exchange,
            &self.payments_exchange,
            &self.dead_letter_exchange,
        ] {
            let options = ExchangeDeleteOptions::default();
            let _ = channel
                .exchange_delete(exchange.as_str().into(), options)
                .await;
        }
        deleted
    }
}

/// Declares the durable `queue` (with `args`) and binds it to `exchange` with `key`.
async fn declare_bound(
    channel: &Channel,
    queue: &str,
    args: FieldTable,
    exchange: &str,
    key: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// A channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MqError {
    /// Step 7 ran.
    #[error("the RabbitMQ connection is closed (shutdown step close-mq ran)")]
    Closed,
    /// The broker refused or is unreachable.
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
}

/// The shared connection; reconnects on demand until closed.
#[derive(Debug, Clone)]
pub struct Mq {
    inner: Arc<Mutex<State>>,
    url: SecretUrl,
    prefix: Arc<str>,
    /// The names in use.
    pub topology: Arc<Topology>,
}

#[derive(Debug)]
enum State {
    Open(Box<Connection>),
    Closed,
}

/// Named `order-service <prefix>` so an operator (or a test) can tell instances apart in
/// `rabbitmqctl list_connections name`.
fn properties(prefix: &str) -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name(format!("order-service {prefix}").into())
}

impl Mq {
    /// Connects (retrying for `dependency_wait`) and declares the topology.
    pub async fn connect(config: &Config) -> Result<Self, StartError> {
        let url = config.amqp_url.to_string();
        let give_up = Instant::now() + config.dependency_wait;
        let conn = loop {
            match Connection::connect(config.amqp_url.expose(), properties(&config.mq_prefix)).await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < give_up => {
                    tracing::info!(error = %e, url = %url, "RabbitMQ not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    return Err(StartError::Dependency {
                        dependency: "RabbitMQ",
                        url,
                        detail: e.to_string(),
                        start_command: RABBIT_START,
                        env_var: "AMQP_URL",
                    });
                }
            }
        };
        let topology = Topology::new(&config.mq_prefix);
        let declare = async {
            let channel = conn.create_channel().await?;
            topology.declare(&channel).await?;
            channel.close(200, "topology declared".into()).await
        };
        declare.await.map_err(|e| StartError::Topology {
            detail: e.to_string(),
        })?;
        Ok(Self {
            inner: Arc::new(Mutex::new(State::Open(Box::new(conn)))),
            url: config.amqp_url.clone(),
            prefix: config.mq_prefix.as_str().into(),
            topology: Arc::new(topology),
        })
    }

    /// Opens a channel, reconnecting first if the connection dropped.
    pub async fn channel(&self) -> Result<Channel, MqError> {
        let mut state = self.inner.lock().await;
        let conn = match &*state {
            State::Closed => return Err(MqError::Closed),
            State::Open(conn) if conn.status().connected() => conn,
            State::Open(_) => {
                tracing::warn!(url = %self.url, "RabbitMQ connection lost; reconnecting");
                let conn = Connection::connect(self.url.expose(), properties(&self.prefix)).await?;
                *state = State::Open(Box::new(conn));
                match &*state {
                    State::Open(conn) => conn,
                    State::Closed => return Err(MqError::Closed),
                }
            }
        };
        Ok(conn.create_channel().await?)
    }

    /// Whether the connection is up (no reconnect attempt).
    pub async fn is_connected(&self) -> bool {
        matches!(&*self.inner.lock().await, State::Open(c) if c.status().connected())
    }

    /// Whether step 7 ran.
    pub async fn is_closed(&self) -> bool {
        matches!(&*self.inner.lock().await, State::Closed)
    }

    /// Whether step 7 ran, without waiting (None when the connection is busy reconnecting).
    pub fn try_is_closed(&self) -> Option<bool> {
        self.inner
            .try_lock()
            .ok()
            .map(|state| matches!(&*state, State::Closed))
    }

    /// The `mq` health check: the connection is up and a channel opens.
    pub async fn check(&self) -> Result<(), String> {
        let state = self.inner.lock().await;
        let conn = match &*state {
            State::Closed => return Err(MqError::Closed.to_string()),
            State::Open(c) if c.status().connected() => c,
            State::Open(_) => return Err("the RabbitMQ connection is down".to_owned()),
        };
        let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
        channel
            .close(200, "health check".into())
            .await
            .map_err(|e| e.to_string())
    }

    /// Step 7: closes the connection (channels still open are closed with it; the broker
    /// requeues whatever they left unacknowledged). Counts: `closed`, `was_connected`. A close
    /// the broker refuses is the step's error.
    pub async fn close(&self, deadline: Instant) -> Result<Report, HandlerError> {
        let mut state = self.inner.lock().await;
        let State::Open(conn) = std::mem::replace(&mut *state, State::Closed) else {
            return Ok(Report::new().count("closed", 0));
        };
        if !conn.status().connected() {
            return Ok(Report::new().count("closed", 1).count("was_connected", 0));
        }
        let closing = conn.close(200, "order-service shutting down".into());
        match tokio::time::timeout_at(deadline, closing).await {
            Ok(Ok(())) => Ok(Report::new().count("closed", 1).count("was_connected", 1)),
            Ok(Err(e)) => Err(HandlerError::msg(format!(
                "closing the RabbitMQ connection failed: {e}"
            ))),
            Err(_) => Ok(deadline_reached(
                Report::new().count("closed", 0).count("was_connected", 1),
                "RabbitMQ did not acknowledge connection.close before the deadline",
            )),
        }
    }
}
