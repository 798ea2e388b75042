//! The gRPC server and its two shutdown steps.
//!
//! - Step 2, [`GrpcServer::stop_accepting`]: tonic's graceful shutdown drops the listener
//!   (new connections are refused by the kernel) and sends HTTP/2 GOAWAY on open connections
//!   (no new streams on them). It returns once the listening socket is really closed.
//! - Step 3, [`GrpcServer::drain`]: waits for the in-flight count to reach 0; at the deadline
//!   the RPCs still running are cancelled (they answer UNAVAILABLE) and counted.

pub mod layer;
pub mod service;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::proto::order_service_server::OrderServiceServer;
use crate::report::{Report, ReportExt, deadline_reached, soft_deadline};
use layer::{RpcLayer, RpcTracker};
use service::OrderApi;

/// The listener as tonic's connection stream. Dropping it (tonic does when its shutdown
/// signal fires) closes the socket and tells [`GrpcServer::stop_accepting`] via `_closed`.
struct Incoming {
    listener: TcpListener,
    _closed: oneshot::Sender<()>,
}

impl futures_util::Stream for Incoming {
    type Item = std::io::Result<TcpStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.listener.poll_accept(cx).map(|accepted| {
            Some(accepted.map(|(stream, _)| {
                // Small unary messages: do not wait for Nagle.
                let _ = stream.set_nodelay(true);
                stream
            }))
        })
    }
}

const SERVING: u8 = 0;
const NOT_ACCEPTING: u8 = 1;
const DRAINED: u8 = 2;

/// The running server.
#[derive(Debug)]
pub struct GrpcServer {
    addr: SocketAddr,
    tracker: Arc<RpcTracker>,
    state: AtomicU8,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    listener_closed: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl GrpcServer {
    /// Serves `api` on `listener`.
    pub fn start(
        listener: TcpListener,
        api: OrderApi,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let tracker = RpcTracker::new(metrics);
        let (closed_tx, closed_rx) = oneshot::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let incoming = Incoming {
            listener,
            _closed: closed_tx,
        };
        let router = tonic::transport::Server::builder()
            .layer(RpcLayer::new(tracker.clone()))
            .add_service(OrderServiceServer::new(api));
        let task = tokio::spawn(async move {
            let signal = async {
                let _ = shutdown_rx.await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        Ok(Self {
            addr,
            tracker,
            state: AtomicU8::new(SERVING),
            shutdown: Mutex::new(Some(shutdown_tx)),
            listener_closed: tokio::sync::Mutex::new(Some(closed_rx)),
            task: tokio::sync::Mutex::new(Some(task)),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// RPCs in flight now.
    pub fn in_flight(&self) -> u64 {
        self.tracker.in_flight()
    }

    /// "serving", "not_accepting" or "drained".
    pub fn state(&self) -> &'static str {
        match self.state.load(Ordering::SeqCst) {
            SERVING => "serving",
            NOT_ACCEPTING => "not_accepting",
            _ => "drained",
        }
    }

    /// Step 2. Counts: `listener_closed` (1 when this call closed it), `in_flight` (RPCs
    /// running at that moment, which step 3 drains).
    pub async fn stop_accepting(&self, deadline: Instant) -> Report {
        let trigger = self
            .shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(trigger) = trigger else {
            return Report::new()
                .count("listener_closed", 0)
                .count("in_flight", self.in_flight());
        };
        let _ = trigger.send(());
        self.state.store(NOT_ACCEPTING, Ordering::SeqCst);
        let closed = self.listener_closed.lock().await.take();
        let report = |closed| {
            Report::new()
                .count("listener_closed", closed)
                .count("in_flight", self.in_flight())
        };
        match closed {
            Some(rx) => match tokio::time::timeout_at(deadline, rx).await {
                // Err(RecvError) is the expected outcome: the sender was dropped with the listener.
                Ok(_) => report(1),
                Err(_) => {
                    deadline_reached(report(0), "the listener was still open at the deadline")
                }
            },
            None => report(0),
        }
    }

    /// Step 3. Counts: `requests_drained` (finished normally during the step),
    /// `requests_cancelled` (still running at the deadline, answered UNAVAILABLE).
    pub async fn drain(&self, deadline: Instant) -> Report {
        let completed_before = self.tracker.completed();
        let cancelled_before = self.tracker.cancelled();
        let soft = soft_deadline(deadline);
        let idle = tokio::time::timeout_at(soft, self.tracker.wait_idle())
            .await
            .is_ok();
        if !idle {
            self.tracker.cancel_all();
            // Cancelled RPCs answer at their next poll; give them the rest of the budget.
            let _ = tokio::time::timeout_at(deadline, self.tracker.wait_idle()).await;
        }
        // With no RPC left, connections close promptly after GOAWAY; do not wait past the deadline.
        if let Some(task) = self.task.lock().await.take() {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            if tokio::time::timeout(wait, task).await.is_err() {
                tracing::debug!("gRPC connections still closing after the drain");
            }
        }
        self.state.store(DRAINED, Ordering::SeqCst);
        let report = Report::new()
            .count(
                "requests_drained",
                self.tracker.completed().saturating_sub(completed_before),
            )
            .count(
                "requests_cancelled",
                self.tracker.cancelled().saturating_sub(cancelled_before),
            );
        if idle {
            report
        } else {
            let n = report.get("requests_cancelled");
            deadline_reached(
                report,
                format!("{n} request(s) still running at the drain deadline were cancelled"),
            )
        }
    }
}
