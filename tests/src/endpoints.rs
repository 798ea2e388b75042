//! The Service's endpoints as a client sees them.
//!
//! A pod is an endpoint while kubelet reports it Ready (its readiness probe, with thresholds)
//! and it is not terminating — the EndpointSlice controller drops a pod as soon as its
//! deletion starts, whatever its probe says. Every change reaches the client only after a
//! propagation delay (controller, API watch, kube-proxy or the client's resolver). Clients pick
//! a routed pod per request (round robin), as a client-side load balancer does; a request is
//! "routed while ready" when it was sent to a pod the view held at that moment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use order_service::proto::order_service_client::OrderServiceClient;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::kubelet::Conditions;

/// One routing change as the client saw it.
#[derive(Debug, Clone)]
pub struct Change {
    pub at: Instant,
    pub pod: String,
    pub routed: bool,
}

#[derive(Debug)]
struct Member {
    client: OrderServiceClient<Channel>,
    routed: bool,
    applied_seq: u64,
}

#[derive(Debug, Default)]
struct Inner {
    pods: BTreeMap<String, Member>,
    next: usize,
    changes: Vec<Change>,
}

/// The endpoints view; cheap to clone.
#[derive(Debug, Clone)]
pub struct Endpoints {
    inner: Arc<Mutex<Inner>>,
    pub delay: Duration,
    terminating: Arc<Mutex<BTreeMap<String, watch::Sender<bool>>>>,
}

impl Endpoints {
    pub fn new(delay: Duration) -> Self {
        Self {
            inner: Arc::default(),
            delay,
            terminating: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `pod` (serving its API at `addr`) and follows its conditions from now on.
    pub fn track(&self, pod: &str, addr: SocketAddr, mut conditions: watch::Receiver<Conditions>) {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a valid endpoint URI")
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        self.lock().pods.insert(
            pod.to_owned(),
            Member {
                client: OrderServiceClient::new(channel),
                routed: false,
                applied_seq: 0,
            },
        );
        let (term_tx, mut terminating) = watch::channel(false);
        self.terminating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.to_owned(), term_tx);
        let this = self.clone();
        let name = pod.to_owned();
        tokio::spawn(async move {
            let mut last = false;
            let mut seq = 0u64;
            loop {
                let desired =
                    conditions.borrow_and_update().ready && !*terminating.borrow_and_update();
                if desired != last {
                    last = desired;
                    seq += 1;
                    let (this, name, at_seq) = (this.clone(), name.clone(), seq);
                    tokio::spawn(async move {
                        tokio::time::sleep(this.delay).await;
                        this.apply(&name, desired, at_seq);
                    });
                }
                tokio::select! {
                    r = conditions.changed() => if r.is_err() { break },
                    r = terminating.changed() => if r.is_err() { break },
                }
            }
        });
    }

    fn apply(&self, pod: &str, routed: bool, seq: u64) {
        let mut inner = self.lock();
        let Some(m) = inner.pods.get_mut(pod) else {
            return;
        };
        if seq <= m.applied_seq {
            return;
        }
        m.applied_seq = seq;
        if m.routed != routed {
            m.routed = routed;
            inner.changes.push(Change {
                at: Instant::now(),
                pod: pod.to_owned(),
                routed,
            });
        }
    }

    /// The API server set the pod's deletion timestamp.
    pub fn mark_terminating(&self, pod: &str) {
        if let Some(tx) = self
            .terminating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
        {
            tx.send_replace(true);
        }
    }

    /// Round robin over the routed pods.
    pub fn pick(&self) -> Option<(String, OrderServiceClient<Channel>)> {
        let mut inner = self.lock();
        let routed: Vec<(&String, &Member)> = inner.pods.iter().filter(|(_, m)| m.routed).collect();
        if routed.is_empty() {
            return None;
        }
        let (name, m) = routed[inner.next % routed.len()];
        let out = (name.clone(), m.client.clone());
        inner.next = inner.next.wrapping_add(1);
        Some(out)
    }

    pub fn is_routed(&self, pod: &str) -> bool {
        self.lock().pods.get(pod).is_some_and(|m| m.routed)
    }

    /// A client for `pod` regardless of routing (fault setups that talk to one pod on purpose).
    pub fn client(&self, pod: &str) -> Option<OrderServiceClient<Channel>> {
        self.lock().pods.get(pod).map(|m| m.client.clone())
    }

    /// Every routing change so far.
    pub fn changes(&self) -> Vec<Change> {
        self.lock().changes.clone()
    }

    /// Waits until `pod` is routed (or not), polling; panics at `within`.
    pub async fn wait_routed(&self, pod: &str, routed: bool, within: Duration) {
        let deadline = Instant::now() + within;
        while self.is_routed(pod) != routed {
            assert!(
                Instant::now() < deadline,
                "pod {pod} not {} within {within:?}",
                if routed { "routed" } else { "unrouted" }
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
