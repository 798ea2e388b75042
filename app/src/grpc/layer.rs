//! A tower layer around every RPC: Prometheus metrics (go-grpc-prometheus names, so the reference design's
//! alert rules work), the in-flight count that step 3 waits on, and the cancel switch that
//! step 3 pulls at its deadline (requests still running then answer UNAVAILABLE at once), and
//! the RPC's server span (continuing the caller's W3C `traceparent`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tracing::Instrument;

use crate::metrics::Metrics;

/// The service whose methods get their own metric labels; anything else is "unknown", so a
/// client sending random paths cannot grow the label set.
const SERVICE: &str = "order.v1.OrderService";
const METHODS: [&str; 4] = ["CreateOrder", "GetOrder", "ListOrders", "CancelOrder"];

/// Shared RPC accounting.
#[derive(Debug)]
pub struct RpcTracker {
    in_flight: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    idle: Notify,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
}

impl RpcTracker {
    /// A tracker exporting to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            idle: Notify::new(),
            cancel: CancellationToken::new(),
            metrics,
        })
    }

    /// RPCs being handled now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// RPCs that finished with a response (not cancelled).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// RPCs cut short by [`RpcTracker::cancel_all`].
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until no RPC is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Makes every running (and any later) RPC answer UNAVAILABLE immediately.
    pub fn cancel_all(&self) {
        self.cancel.cancel();
    }

    fn enter(self: &Arc<Self>, labels: [&'static str; 3]) -> InFlight {
        self.metrics.grpc_started.with_label_values(&labels).inc();
        self.metrics.grpc_in_flight.inc();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            tracker: self.clone(),
            labels,
            start: Instant::now(),
            code: None,
            cancelled: false,
        }
    }
}

/// One RPC in flight; recording happens on drop so that a request dropped by the transport
/// (client reset) is still counted, as `Canceled`.
struct InFlight {
    tracker: Arc<RpcTracker>,
    labels: [&'static str; 3],
    start: Instant,
    code: Option<&'static str>,
    cancelled: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let m = &self.tracker.metrics;
        let code = self.code.unwrap_or("Canceled");
        let [t, s, meth] = self.labels;
        m.grpc_handled.with_label_values(&[t, s, meth, code]).inc();
        m.grpc_handling_seconds
            .with_label_values(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
        m.grpc_in_flight.dec();
        if self.code.is_some() && !self.cancelled {
            self.tracker.completed.fetch_add(1, Ordering::SeqCst);
        }
        if self.tracker.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

/// The layer.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    tracker: Arc<RpcTracker>,
}

impl RpcLayer {
    /// A layer recording into `tracker`.
    pub fn new(tracker: Arc<RpcTracker>) -> Self {
        Self { tracker }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            tracker: self.tracker.clone(),
        }
    }
}

/// The service the layer wraps around the router.
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    tracker: Arc<RpcTracker>,
}

fn labels(path: &str) -> [&'static str; 3] {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match METHODS.iter().find(|m| **m == method) {
        Some(m) if service == SERVICE => ["unary", SERVICE, m],
        _ => ["unary", "unknown", "unknown"],
    }
}

/// The grpc-status of a response whose status travels in the headers (errors of unary
/// calls); a response without one succeeded (its status 0 comes in the trailers).
fn code_name(headers: &http::HeaderMap) -> &'static str {
    let Some(value) = headers.get("grpc-status") else {
        return "OK";
    };
    match tonic::Code::from_bytes(value.as_bytes()) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Canceled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone is not necessarily ready; call the one poll_ready readied.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let tracker = self.tracker.clone();
        let labels = labels(req.uri().path());
        let span = server_span(labels, req.headers());
        let guard = tracker.enter(labels);
        let cancel = tracker.cancel.clone();
        let record = span.clone();
        let call = async move {
            // Owned by the future: dropping the future (client reset) records the RPC.
            let mut guard = guard;
            let response = tokio::select! {
                biased;
                response = inner.call(req) => response,
                () = cancel.cancelled() => {
                    tracker.cancelled.fetch_add(1, Ordering::SeqCst);
                    guard.code = Some("Unavailable");
                    guard.cancelled = true;
                    record.record("rpc.grpc.status_code", "Unavailable");
                    record.record("otel.status_code", "ERROR");
                    return Ok(tonic::Status::unavailable(
                        "the server is shutting down and cancelled this request at its drain deadline; retry on another instance",
                    )
                    .into_http());
                }
            };
            let code = match &response {
                Ok(r) => code_name(r.headers()),
                Err(_) => "Unknown",
            };
            guard.code = Some(code);
            record.record("rpc.grpc.status_code", code);
            if code != "OK" {
                record.record("otel.status_code", "ERROR");
            }
            response
        };
        Box::pin(call.instrument(span))
    }
}

/// The span of one RPC: a server span named `service/method` (bounded like the metric labels),
/// the child of the caller's `traceparent` when the metadata carries one.
fn server_span(labels: [&'static str; 3], headers: &http::HeaderMap) -> tracing::Span {
    let [_, service, method] = labels;
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if crate::traces::installed().is_some() {
        crate::traces::set_parent(&span, crate::traces::extract_headers(headers));
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_bound_cardinality() {
        assert_eq!(
            labels("/order.v1.OrderService/GetOrder"),
            ["unary", SERVICE, "GetOrder"]
        );
        assert_eq!(labels("/x.Y/GetOrder"), ["unary", "unknown", "unknown"]);
        assert_eq!(
            labels("/order.v1.OrderService/Nope"),
            ["unary", "unknown", "unknown"]
        );
        assert_eq!(labels(""), ["unary", "unknown", "unknown"]);
    }

    #[test]
    fn code_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(code_name(&h), "OK");
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(code_name(&h), "NotFound");
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
        assert_eq!(code_name(&h), "InvalidArgument");
    }
}
