//! The probe thread: `grpc.health.v1` for kubelet and `/metrics`, on a thread and runtime of their own.

use std::net::TcpListener;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::{READINESS, Statuses, limits};
use crate::metrics::Metrics;

/// The gRPC service kubelet calls.
#[derive(Clone, Debug)]
pub struct HealthSvc {
    statuses: watch::Receiver<Statuses>,
    /// Count of readiness Checks from kubelet (`kube-probe/` user agent) answered NOT_SERVING.
    probes_seen: watch::Sender<u32>,
    /// One permit per open Watch stream ([`limits::WATCH_STREAMS`]): each holds a task and a receiver.
    watch_slots: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
}

fn to_status(serving: bool) -> i32 {
    if serving {
        ServingStatus::Serving as i32
    } else {
        ServingStatus::NotServing as i32
    }
}

#[tonic::async_trait]
impl Health for HealthSvc {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let kube = req
            .metadata()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ua| ua.starts_with("kube-probe/"));
        let service = req.into_inner().service;
        let serving = self.statuses.borrow().get(&service).copied();
        match serving {
            None => Err(Status::not_found(format!(
                "unknown service '{service}': ask for liveness, readiness, startup or \"\""
            ))),
            Some(serving) => {
                if kube && !serving && (service == READINESS || service.is_empty()) {
                    self.probes_seen.send_modify(|n| *n += 1);
                }
                Ok(Response::new(HealthCheckResponse {
                    status: to_status(serving),
                }))
            }
        }
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let Ok(slot) = self.watch_slots.clone().try_acquire_owned() else {
            self.metrics.refused("health", "watch_streams");
            return Err(Status::resource_exhausted(format!(
                "{} Watch streams are open, the most this probe port keeps: use Check, as kubelet does",
                limits::WATCH_STREAMS
            )));
        };
        let service = req.into_inner().service;
        let rx = self.statuses.clone();
        // First the current status, then every change; an unknown service reports SERVICE_UNKNOWN and keeps
        // watching, as the gRPC health spec asks. The slot goes back when the stream is dropped.
        let stream = futures_util::stream::unfold(
            (rx, None::<i32>, true, slot),
            move |(mut rx, last, first, slot)| {
                let service = service.clone();
                async move {
                    loop {
                        if !first && rx.changed().await.is_err() {
                            return None;
                        }
                        let now = match rx.borrow_and_update().get(&service) {
                            Some(s) => to_status(*s),
                            None => ServingStatus::ServiceUnknown as i32,
                        };
                        if last != Some(now) {
                            return Some((
                                Ok(HealthCheckResponse { status: now }),
                                (rx, Some(now), false, slot),
                            ));
                        }
                        if first {
                            // unreachable: `last` is None on the first pass
                            return None;
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Starts the probe thread: its own current-thread runtime serving gRPC health and, if bound, `/metrics`.
/// Both servers are bounded as [`limits`] says, so no peer can grow PID 1's memory or descriptors.
pub fn spawn_server(
    health: Option<TcpListener>,
    metrics: Option<TcpListener>,
    statuses: watch::Receiver<Statuses>,
    probes_seen: watch::Sender<u32>,
    registry: Arc<Metrics>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("quiesce-probes".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Some(l) = metrics {
                    tokio::spawn(crate::metrics::serve(l, registry.clone()));
                }
                match health {
                    Some(l) => serve_health(l, statuses, probes_seen, registry).await,
                    None => std::future::pending::<()>().await,
                }
            });
        })?;
    Ok(())
}

/// gRPC health over HTTP/2 with every limit set: tonic's defaults leave streams, windows and messages
/// unbounded and keep a connection for as long as its peer likes.
async fn serve_health(
    l: TcpListener,
    statuses: watch::Receiver<Statuses>,
    probes_seen: watch::Sender<u32>,
    registry: Arc<Metrics>,
) {
    use limits::*;
    let listener = match listener(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "health listener unusable");
            return;
        }
    };
    let gate = Gate::new(HEALTH, registry.clone());
    let svc = HealthServer::new(HealthSvc {
        statuses,
        probes_seen,
        watch_slots: Arc::new(tokio::sync::Semaphore::new(WATCH_STREAMS)),
        metrics: registry,
    })
    .max_decoding_message_size(MAX_MESSAGE);
    let res = tonic::transport::Server::builder()
        .max_concurrent_streams(H2_STREAMS_PER_CONNECTION)
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .http2_max_header_list_size(H2_MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(H2_KEEPALIVE))
        .http2_keepalive_timeout(Some(H2_KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
        .timeout(REQUEST_TIMEOUT)
        .serve_with_incoming(svc, incoming(listener, gate))
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "health server stopped");
    }
}

/// A bound std listener, made usable by the probe thread's runtime.
pub fn listener(l: TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// The accepted connections `gate` admits, each wrapped in its idle timer; the others are closed at once.
fn incoming(
    listener: tokio::net::TcpListener,
    gate: Arc<limits::Gate>,
) -> impl Stream<Item = std::io::Result<limits::Conn>> {
    futures_util::stream::unfold((listener, gate), |(listener, gate)| async move {
        let conn = limits::accept(&listener, &gate).await;
        Some((Ok(conn), (listener, gate)))
    })
}

/// Binds a probe-side listener before the child starts (so the app cannot take the port first).
pub fn bind(what: &str, addr: std::net::SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| {
        format!("cannot bind the {what} address {addr}: {e}; free the port or set a different {what}.address")
    })
}
