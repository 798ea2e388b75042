//! The set-up both scenarios share: a pod started and routed, the client traffic with its
//! payment publisher, a pod terminated in the background, and the zero-loss checks made once
//! the pods are gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{CATCH_UP_WITHIN, START_WITHIN};
use crate::endpoints::{Change, Endpoints};
use crate::kubelet::{self, Prober, Termination};
use crate::load::{self, LoadResult, LoadSpec, Orders, Record};
use crate::manifest::PodManifest;
use crate::payments::{self, PublishResult, Published};
use crate::pod::{Pod, PodOptions};
use crate::report::{self, Message, StepLogs};
use crate::sandbox::Sandbox;
use crate::verify::{self, EventCheck, OrderCheck, PaymentCheck};

/// A started pod with its prober, routed by the endpoints view once Ready.
pub(super) struct Running {
    pub pod: Pod,
    pub prober: Prober,
}

/// Starts pod `name`; with `endpoints`, waits until it is Ready and routed.
pub(super) async fn start_pod(
    name: &str,
    sandbox: &Sandbox,
    manifest: &PodManifest,
    endpoints: Option<&Endpoints>,
    opts: &PodOptions,
) -> Running {
    let mut pod = Pod::start(name, sandbox, opts);
    let prober = Prober::start(&pod, manifest);
    let addr = pod.app_grpc_addr(START_WITHIN).await;
    if let Some(ep) = endpoints {
        ep.track(name, addr, prober.conditions.clone());
        prober.wait_ready(&pod, START_WITHIN).await;
        ep.wait_routed(name, true, Duration::from_secs(10)).await;
    }
    Running { pod, prober }
}

/// Payment messages per second for a load of `rate` requests per second.
pub(super) fn payment_rate(rate: u32) -> u32 {
    (rate / 10).max(10)
}

/// The client load and the payment publisher (paying the orders the load creates), running
/// until [`Traffic::stop`].
pub(super) struct Traffic {
    stop: watch::Sender<bool>,
    load: JoinHandle<LoadResult>,
    publish: JoinHandle<PublishResult>,
}

impl Traffic {
    pub fn start(
        endpoints: &Endpoints,
        sandbox: &Sandbox,
        spec: LoadSpec,
        payment_rate: u32,
    ) -> Traffic {
        let (stop, stop_rx) = watch::channel(false);
        let (created_tx, created_rx) = mpsc::unbounded_channel();
        let load = tokio::spawn(load::run(
            endpoints.clone(),
            spec,
            Arc::new(Orders::default()),
            created_tx,
            stop_rx.clone(),
        ));
        let publish = tokio::spawn(payments::run(
            sandbox.payments_exchange(),
            payment_rate,
            created_rx,
            stop_rx,
        ));
        Traffic {
            stop,
            load,
            publish,
        }
    }

    /// Stops both and returns what they did.
    pub async fn stop(self) -> (LoadResult, PublishResult) {
        let _ = self.stop.send(true);
        let load = self.load.await.expect("the load task");
        let publish = self.publish.await.expect("the publisher task");
        (load, publish)
    }
}

/// One pod's termination as the rolling update records it.
pub(super) type Terminated = (String, Termination, Option<Message>, StepLogs);

/// Terminates `running` as kubelet does (marking it terminating in `endpoints`), then reads its
/// termination message and step logs.
pub(super) async fn terminate(
    mut running: Running,
    manifest: PodManifest,
    endpoints: Endpoints,
) -> Terminated {
    let name = running.pod.name.clone();
    let n = name.clone();
    let t = kubelet::terminate(&mut running.pod, &manifest, move || {
        endpoints.mark_terminating(&n)
    })
    .await;
    running.prober.stop();
    let message = running
        .pod
        .termination_message()
        .and_then(|m| report::parse_message(&m).ok());
    let logs = report::step_logs(&running.pod.lines());
    (name, t, message, logs)
}

/// The zero-loss checks, made once the pods are gone (or a successor caught up).
pub(super) struct Checks {
    pub payments: PaymentCheck,
    pub events: EventCheck,
    pub orders: OrderCheck,
}

impl Checks {
    /// Every confirmed payment in `published` applied once, every committed event received,
    /// every order acknowledged in `answered` stored.
    pub async fn run<'a>(
        pool: &sqlx::PgPool,
        sandbox: &Sandbox,
        published: &[Published],
        answered: impl Iterator<Item = &'a Record>,
    ) -> Checks {
        let payments = verify::payments(pool, sandbox, published, CATCH_UP_WITHIN).await;
        let events = verify::events(pool, sandbox, CATCH_UP_WITHIN).await;
        let acknowledged: Vec<String> = answered.filter_map(|r| r.order_id.clone()).collect();
        let orders = verify::acknowledged_orders(pool, &acknowledged).await;
        Checks {
            payments,
            events,
            orders,
        }
    }
}

/// "routed" or "unrouted".
pub(super) fn routing(c: &Change) -> &'static str {
    if c.routed { "routed" } else { "unrouted" }
}
