//! `order-load`: a load generator for the order service, printing one JSON object of stats.
//!
//! ```text
//! order-load --addr http://127.0.0.1:8080 --mode create --concurrency 64 --duration 10s
//! order-load --mode get --rate 2000 --duration 30s          # open loop at a fixed rate
//! order-load --mode mixed --concurrency 32 --requests 50000  # 1 create : 4 gets
//! order-load --publish-payments 10000 --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f \
//!            --mq-prefix orders --metrics-addr 127.0.0.1:9091
//! ```
//!
//! Output (RPC modes): `{"mode","concurrency","rate","duration_s","sent","ok","failed":{code:n},
//! "throughput_rps","latency_ms":{"p50","p90","p99","max"}}`. With `--publish-payments N` it
//! creates N orders, publishes one `payment.succeeded` per order (publisher confirms) and, given
//! `--metrics-addr`, waits until the service reports them applied: `{"published","publish_rate",
//! "applied","consume_s","consume_rate"}`. `--bind-events-queue` / `--delete-queues` are setup and
//! cleanup helpers for benchmarks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{CreateOrderRequest, GetOrderRequest, LineItem};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// CreateOrder only.
    Create,
    /// GetOrder of orders created first (`--seed-orders`).
    Get,
    /// One CreateOrder for every four GetOrder.
    Mixed,
}

#[derive(Debug, Parser)]
#[command(
    name = "order-load",
    about = "Load generator for order-service; prints JSON stats"
)]
struct Args {
    /// The service's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    addr: String,
    /// Which RPCs to send.
    #[arg(long, value_enum, default_value = "create")]
    mode: Mode,
    /// Closed loop: this many concurrent callers (ignored with --rate).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Open loop: start this many calls per second regardless of latency.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many calls instead (closed loop).
    #[arg(long)]
    requests: Option<u64>,
    /// Send a unique idempotency key with every CreateOrder (exercises Redis).
    #[arg(long)]
    idempotency: bool,
    /// Orders created before a get/mixed run, to read back.
    #[arg(long, default_value_t = 200)]
    seed_orders: usize,
    /// gRPC connections to spread calls over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Per-call timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Instead of RPC load: create N orders and publish one payment.succeeded for each.
    #[arg(long)]
    publish_payments: Option<usize>,
    /// AMQP URL for --publish-payments.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// The service's exchange/queue prefix (APP_MQ_PREFIX).
    #[arg(long, env = "APP_MQ_PREFIX", default_value = "orders")]
    mq_prefix: String,
    /// The service's /metrics address: wait until the payments are applied and time it.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Setup helper: declare a durable queue NAME bound to `<prefix>.events` with `#` (so relayed
    /// events are routed and stored like in production), then exit.
    #[arg(long)]
    bind_events_queue: Option<String>,
    /// Cleanup helper: delete these queues (comma-separated) and the prefix's exchanges, then exit.
    #[arg(long, value_delimiter = ',')]
    delete_queues: Option<Vec<String>>,
}

#[derive(Debug, Default)]
struct Stats {
    latencies_us: Vec<u64>,
    failed: BTreeMap<String, u64>,
    ok: u64,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.failed {
            *self.failed.entry(k).or_default() += v;
        }
        self.ok += other.ok;
    }

    fn record(&mut self, started: Instant, result: Result<(), tonic::Status>) {
        self.push(started.elapsed(), result);
    }

    fn push(&mut self, latency: Duration, result: Result<(), tonic::Status>) {
        self.latencies_us
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        match result {
            Ok(()) => self.ok += 1,
            Err(status) => {
                *self
                    .failed
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1
            }
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn request(n: u64, idempotency: bool) -> CreateOrderRequest {
    CreateOrderRequest {
        customer_id: format!("load-{}", n % 1000),
        items: vec![
            LineItem {
                sku: format!("sku-{}", n % 97),
                quantity: 1 + (n % 3) as i32,
                price_cents: 1999,
            },
            LineItem {
                sku: "sku-shipping".to_owned(),
                quantity: 1,
                price_cents: 499,
            },
        ],
        idempotency_key: if idempotency {
            format!("load-{}-{n}", std::process::id())
        } else {
            String::new()
        },
    }
}

struct Target {
    clients: Vec<OrderServiceClient<Channel>>,
    seeded: Vec<String>,
    counter: AtomicU64,
    mode: Mode,
    idempotency: bool,
}

impl Target {
    async fn call(&self) -> Result<(), tonic::Status> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut client = self.clients[n as usize % self.clients.len()].clone();
        let get = match self.mode {
            Mode::Create => false,
            Mode::Get => true,
            Mode::Mixed => !n.is_multiple_of(5),
        };
        if get && !self.seeded.is_empty() {
            let id = self.seeded[(n as usize).wrapping_mul(7919) % self.seeded.len()].clone();
            client
                .get_order(GetOrderRequest { order_id: id })
                .await
                .map(|_| ())
        } else {
            client
                .create_order(request(n, self.idempotency))
                .await
                .map(|_| ())
        }
    }
}

async fn connect(args: &Args) -> Result<Vec<OrderServiceClient<Channel>>, String> {
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = Endpoint::from_shared(args.addr.clone())
            .map_err(|e| format!("--addr {}: {e}", args.addr))?
            .timeout(args.timeout)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to {}: {e} (is order-service running?)",
                    args.addr
                )
            })?;
        clients.push(OrderServiceClient::new(channel));
    }
    Ok(clients)
}

/// Creates `n` orders with `concurrency` callers; returns their ids.
async fn create_orders(
    clients: &[OrderServiceClient<Channel>],
    n: usize,
    concurrency: usize,
) -> Result<Vec<String>, String> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let mut client = clients[w % clients.len()].clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    return Ok::<_, String>(ids);
                }
                let reply = client
                    .create_order(request(i, false))
                    .await
                    .map_err(|s| format!("CreateOrder failed: {s}"))?;
                if let Some(order) = reply.into_inner().order {
                    ids.push(order.order_id);
                }
            }
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(ids)
}

async fn run_rpc(args: &Args) -> Result<serde_json::Value, String> {
    let clients = connect(args).await?;
    let seeded = if args.mode == Mode::Create {
        Vec::new()
    } else {
        create_orders(&clients, args.seed_orders, args.concurrency).await?
    };
    let target = Arc::new(Target {
        clients,
        seeded,
        counter: AtomicU64::new(0),
        mode: args.mode,
        idempotency: args.idempotency,
    });
    let started = Instant::now();
    let until = started + args.duration;
    let stats = match args.rate {
        Some(rate) if rate > 0.0 => open_loop(target.clone(), rate, until).await,
        _ => closed_loop(target.clone(), args.concurrency, until, args.requests).await,
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut sorted = stats.latencies_us.clone();
    sorted.sort_unstable();
    let sent = sorted.len() as u64;
    Ok(json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "addr": args.addr,
        "concurrency": if args.rate.is_some() { serde_json::Value::Null } else { json!(args.concurrency) },
        "rate": args.rate,
        "idempotency": args.idempotency,
        "duration_s": (elapsed * 1000.0).round() / 1000.0,
        "sent": sent,
        "ok": stats.ok,
        "failed": stats.failed,
        "throughput_rps": (stats.ok as f64 / elapsed).round(),
        "latency_ms": {
            "p50": percentile(&sorted, 50.0),
            "p90": percentile(&sorted, 90.0),
            "p99": percentile(&sorted, 99.0),
            "max": percentile(&sorted, 100.0),
        },
    }))
}

async fn closed_loop(
    target: Arc<Target>,
    concurrency: usize,
    until: Instant,
    limit: Option<u64>,
) -> Stats {
    let issued = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let target = target.clone();
        let issued = issued.clone();
        workers.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            while Instant::now() < until || limit.is_some() {
                if let Some(limit) = limit
                    && issued.fetch_add(1, Ordering::Relaxed) >= limit
                {
                    break;
                }
                let started = Instant::now();
                let result = target.call().await;
                stats.record(started, result);
            }
            stats
        }));
    }
    let mut total = Stats::default();
    for w in workers {
        if let Ok(s) = w.await {
            total.merge(s);
        }
    }
    total
}

async fn open_loop(target: Arc<Target>, rate: f64, until: Instant) -> Stats {
    const MAX_OUTSTANDING: usize = 20_000;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let outstanding = Arc::new(tokio::sync::Semaphore::new(MAX_OUTSTANDING));
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(Duration, Result<(), tonic::Status>)>();
    let mut skipped = 0u64;
    while Instant::now() < until {
        ticks.tick().await;
        let Ok(permit) = outstanding.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let target = target.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = target.call().await;
            let _ = tx.send((started.elapsed(), result));
            drop(permit);
        });
    }
    drop(tx);
    let mut stats = Stats::default();
    while let Some((latency, result)) = rx.recv().await {
        stats.push(latency, result);
    }
    if skipped > 0 {
        stats.failed.insert("ClientSaturated".to_owned(), skipped);
    }
    stats
}

async fn applied_total(addr: SocketAddr) -> Result<f64, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot reach /metrics at {addr}: {e}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: load\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("mq_consumer_messages_total{"))
        .filter(|l| {
            l.contains("outcome=\"applied\"")
                || l.contains("outcome=\"duplicate\"")
                || l.contains("outcome=\"ignored\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

async fn run_publish(args: &Args, n: usize) -> Result<serde_json::Value, String> {
    let clients = connect(args).await?;
    let create_started = Instant::now();
    let ids = create_orders(&clients, n, args.concurrency).await?;
    let create_s = create_started.elapsed().as_secs_f64();
    let before = match args.metrics_addr {
        Some(addr) => Some(applied_total(addr).await?),
        None => None,
    };
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("cannot connect to RabbitMQ: {e}"))?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let exchange = format!("{}.payments", args.mq_prefix);
    let publish_started = Instant::now();
    for chunk in ids.chunks(1000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for id in chunk {
            let body = format!("{{\"order_id\":\"{id}\",\"amount_cents\":4497}}");
            let props = BasicProperties::default()
                .with_message_id(format!("pay-{id}").into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            confirms.push(
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "payment.succeeded".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        props,
                    )
                    .await
                    .map_err(|e| format!("publish: {e}"))?,
            );
        }
        for c in confirms {
            let confirmation = c.await.map_err(|e| format!("confirm: {e}"))?;
            if confirmation.is_nack() {
                return Err("the broker nacked a payment message".to_owned());
            }
        }
    }
    let publish_s = publish_started.elapsed().as_secs_f64();
    let mut out = json!({
        "mode": "publish-payments",
        "orders_created": ids.len(),
        "create_s": (create_s * 1000.0).round() / 1000.0,
        "published": ids.len(),
        "publish_s": (publish_s * 1000.0).round() / 1000.0,
        "publish_rate": (ids.len() as f64 / publish_s).round(),
    });
    if let (Some(addr), Some(before)) = (args.metrics_addr, before) {
        let target = before + ids.len() as f64;
        let deadline = Instant::now() + Duration::from_secs(600);
        let applied = loop {
            let now = applied_total(addr).await?;
            if now >= target || Instant::now() >= deadline {
                break now - before;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let consume_s = publish_started.elapsed().as_secs_f64();
        out["applied"] = json!(applied);
        out["consume_s"] = json!((consume_s * 1000.0).round() / 1000.0);
        out["consume_rate"] = json!((applied / consume_s).round());
    }
    let _ = conn.close(200, "order-load done".into()).await;
    Ok(out)
}

async fn amqp_setup(args: &Args) -> Result<serde_json::Value, String> {
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("cannot connect to RabbitMQ: {e}"))?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    let topology = order_service::mq::Topology::new(&args.mq_prefix);
    let mut out = json!({});
    if let Some(queue) = &args.bind_events_queue {
        let exchange = &topology.events_exchange;
        topology
            .bind_events_queue(&channel, queue, "#")
            .await
            .map_err(|e| {
                format!(
                    "declare {queue} and bind it to {exchange} (start order-service first): {e}"
                )
            })?;
        out["bound"] = json!({"queue": queue, "exchange": exchange});
    }
    if let Some(queues) = &args.delete_queues {
        let deleted = topology.delete(&channel, queues).await;
        out["deleted_queues"] = json!(deleted);
    }
    let _ = conn.close(200, "order-load setup done".into()).await;
    Ok(out)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = if args.bind_events_queue.is_some() || args.delete_queues.is_some() {
        amqp_setup(&args).await
    } else {
        match args.publish_payments {
            Some(n) => run_publish(&args, n).await,
            None => run_rpc(&args).await,
        }
    };
    match result {
        Ok(stats) => {
            println!("{stats}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("order-load: {e}");
            ExitCode::from(2)
        }
    }
}
