//! The client traffic: an open loop at a fixed rate (a request starts every `1/rate` seconds
//! whatever the latency), one CreateOrder (with an idempotency key) for every four GetOrder of
//! an order created earlier, each sent to a pod the endpoints view routes at that instant. The
//! simulator sends every request itself, so each record knows where it went and whether that
//! pod was routed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use order_service::proto::GetOrderRequest;
use order_service::proto::order_service_client::OrderServiceClient;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::endpoints::Endpoints;
use crate::requests::load_order;

/// Which RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Create,
    Get,
}

/// One tick of the loop.
#[derive(Debug, Clone)]
pub struct Record {
    pub sent_at: Instant,
    /// The pod it went to; `None` when no pod was routed (not sent).
    pub pod: Option<String>,
    pub kind: Kind,
    pub latency: Duration,
    /// `Err((code, message))` for a failed RPC.
    pub result: Result<(), (tonic::Code, String)>,
    /// The order created (CreateOrder that succeeded).
    pub order_id: Option<String>,
}

/// The load's shape.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Requests per second.
    pub rate: u32,
    /// Every n-th request is a CreateOrder (the rest GetOrder).
    pub create_every: u64,
    /// Per-request deadline (a client's timeout).
    pub timeout: Duration,
    /// At most this many requests in flight; past it a tick is recorded as not sent.
    pub max_outstanding: usize,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            rate: 1000,
            create_every: 5,
            timeout: Duration::from_secs(10),
            max_outstanding: 5000,
        }
    }
}

/// Everything the loop did.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub records: Vec<Record>,
    /// Ticks skipped because `max_outstanding` requests were in flight (the client fell behind).
    pub saturated: u64,
    pub ticks: u64,
    pub elapsed: Duration,
}

impl LoadResult {
    /// Requests that were sent to a routed pod.
    pub fn routed(&self) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(|r| r.pod.is_some())
    }

    /// Routed requests that failed.
    pub fn failed(&self) -> Vec<&Record> {
        self.routed().filter(|r| r.result.is_err()).collect()
    }

    /// Ticks with no routed pod (not sent).
    pub fn unrouted(&self) -> usize {
        self.records.iter().filter(|r| r.pod.is_none()).count()
    }

    /// Latency percentile of routed requests, in milliseconds.
    pub fn latency_ms(&self, p: f64) -> f64 {
        let mut v: Vec<Duration> = self.routed().map(|r| r.latency).collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1].as_secs_f64() * 1000.0
    }
}

/// Orders created so far (GetOrder reads them back; the publisher pays them).
#[derive(Debug, Default)]
pub struct Orders {
    ids: std::sync::Mutex<Vec<String>>,
}

impl Orders {
    fn push(&self, id: String) {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).push(id);
    }

    fn pick(&self, n: u64) -> Option<String> {
        let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.is_empty() {
            return None;
        }
        // Mostly recent orders, as an order page would read them.
        let window = ids.len().min(2000);
        let i = ids.len() - 1 - (n.wrapping_mul(7919) as usize % window);
        Some(ids[i].clone())
    }
}

/// What one tick sends: its number, the RPC and, for a GetOrder, the order it reads.
struct Request {
    n: u64,
    kind: Kind,
    get_id: Option<String>,
}

impl Request {
    /// The `n`-th tick's request: every `create_every`-th a CreateOrder, the rest GetOrder of an
    /// order created earlier (a CreateOrder while there is none yet).
    fn nth(n: u64, spec: &LoadSpec, orders: &Orders) -> Request {
        let get_id = if n.is_multiple_of(spec.create_every) {
            None
        } else {
            orders.pick(n)
        };
        let kind = if get_id.is_none() {
            Kind::Create
        } else {
            Kind::Get
        };
        Request { n, kind, get_id }
    }
}

/// The state the loop's request tasks share.
#[derive(Clone)]
struct Shared {
    run_id: String,
    timeout: Duration,
    records: Arc<Mutex<Vec<Record>>>,
    orders: Arc<Orders>,
    created: mpsc::UnboundedSender<String>,
}

impl Shared {
    /// Sends `req` to `pod` within the client's timeout and records the answer; a created order
    /// is remembered and passed on to the publisher.
    async fn send(
        self,
        req: Request,
        pod: String,
        mut client: OrderServiceClient<Channel>,
        sent_at: Instant,
    ) {
        let timeout = self.timeout;
        let call = async {
            match req.kind {
                Kind::Create => client
                    .create_order(load_order(req.n, &self.run_id))
                    .await
                    .map(|r| r.into_inner().order.map(|o| o.order_id)),
                Kind::Get => client
                    .get_order(GetOrderRequest {
                        order_id: req.get_id.unwrap_or_default(),
                    })
                    .await
                    .map(|_| None),
            }
        };
        let outcome = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(status)) => Err((status.code(), status.message().to_owned())),
            Err(_) => Err((
                tonic::Code::DeadlineExceeded,
                format!("no answer within the client's {timeout:?}"),
            )),
        };
        let latency = sent_at.elapsed();
        let order_id = outcome.as_ref().ok().cloned().flatten();
        if let Some(id) = &order_id {
            self.orders.push(id.clone());
            let _ = self.created.send(id.clone());
        }
        self.records.lock().await.push(Record {
            sent_at,
            pod: Some(pod),
            kind: req.kind,
            latency,
            result: outcome.map(|_| ()),
            order_id,
        });
    }

    /// A tick with no routed pod: recorded, not sent.
    async fn unrouted(&self, kind: Kind, sent_at: Instant) {
        self.records.lock().await.push(Record {
            sent_at,
            pod: None,
            kind,
            latency: Duration::ZERO,
            result: Err((tonic::Code::Unavailable, "no routed endpoint".into())),
            order_id: None,
        });
    }
}

/// Runs the loop until `stop` turns true; created order ids go to `created` as well.
pub async fn run(
    endpoints: Endpoints,
    spec: LoadSpec,
    orders: Arc<Orders>,
    created: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<bool>,
) -> LoadResult {
    let shared = Shared {
        run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        timeout: spec.timeout,
        records: Arc::new(Mutex::new(Vec::with_capacity(spec.rate as usize * 60))),
        orders,
        created,
    };
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(spec.rate)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let outstanding = Arc::new(tokio::sync::Semaphore::new(spec.max_outstanding));
    let counter = AtomicU64::new(0);
    let tasks = tokio_util::task::TaskTracker::new();
    let mut result = LoadResult::default();
    loop {
        tokio::select! {
            biased;
            r = stop.wait_for(|s| *s) => { let _ = r; break; }
            _ = ticks.tick() => {}
        }
        result.ticks += 1;
        let req = Request::nth(
            counter.fetch_add(1, Ordering::Relaxed),
            &spec,
            &shared.orders,
        );
        let sent_at = Instant::now();
        let Some((pod, client)) = endpoints.pick() else {
            shared.unrouted(req.kind, sent_at).await;
            continue;
        };
        let Ok(permit) = outstanding.clone().try_acquire_owned() else {
            result.saturated += 1;
            continue;
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            shared.send(req, pod, client, sent_at).await;
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    result.elapsed = started.elapsed();
    result.records = std::mem::take(&mut *shared.records.lock().await);
    result.records.sort_by_key(|r| r.sent_at);
    result
}
