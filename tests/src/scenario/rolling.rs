//! The rolling update: two pods behind the endpoints, replaced one at a time (maxSurge 1,
//! maxUnavailable 0) under load.

use std::time::Duration;

use super::PROPAGATION;
use super::setup::{
    Checks, Running, Terminated, Traffic, payment_rate, routing, start_pod, terminate,
};
use crate::endpoints::Endpoints;
use crate::load::{LoadResult, LoadSpec};
use crate::manifest::PodManifest;
use crate::payments::PublishResult;
use crate::pod::PodOptions;
use crate::sandbox::Sandbox;
use crate::verify::{EventCheck, OrderCheck, PaymentCheck};

/// A rolling update's measurements.
#[derive(Debug)]
pub struct RollingOutcome {
    pub load: LoadResult,
    pub publish: PublishResult,
    /// Each old and new pod's termination: (pod, termination, parsed message).
    pub terminations: Vec<Terminated>,
    pub payments: PaymentCheck,
    pub events: EventCheck,
    pub orders: OrderCheck,
    /// Routed requests per pod.
    pub per_pod: Vec<(String, usize)>,
    pub changes: Vec<String>,
}

/// The pods, the manifest and the endpoints of one rolling update.
struct Rollout {
    endpoints: Endpoints,
    manifest: PodManifest,
    sandbox: Sandbox,
}

impl Rollout {
    async fn start(&self, name: &str) -> Running {
        let opts = PodOptions::default();
        start_pod(
            name,
            &self.sandbox,
            &self.manifest,
            Some(&self.endpoints),
            &opts,
        )
        .await
    }

    /// Terminates `running` in the background.
    fn terminate(&self, running: Running) -> tokio::task::JoinHandle<Terminated> {
        tokio::spawn(terminate(
            running,
            self.manifest.clone(),
            self.endpoints.clone(),
        ))
    }
}

/// Two pods behind the endpoints, replaced one at a time (maxSurge 1, maxUnavailable 0) under
/// load: a new pod starts; once it is Ready and routed an old one is terminated and the next new
/// one starts; then the second old one goes.
pub async fn rolling_update(rate: u32, warmup: Duration, settle: Duration) -> RollingOutcome {
    let r = Rollout {
        manifest: PodManifest::load().expect("read deploy/k8s/deployment.yaml"),
        sandbox: Sandbox::new().await,
        endpoints: Endpoints::new(PROPAGATION),
    };
    let a1 = r.start("old-1").await;
    r.sandbox.bind_events_queue().await;
    let a2 = r.start("old-2").await;
    let pool = r.sandbox.pool().await;
    let spec = LoadSpec {
        rate,
        ..LoadSpec::default()
    };
    let traffic = Traffic::start(&r.endpoints, &r.sandbox, spec, payment_rate(rate));
    tokio::time::sleep(warmup).await;

    let b1 = r.start("new-1").await;
    let t1 = r.terminate(a1);
    let b2 = r.start("new-2").await;
    let t2 = r.terminate(a2);
    let mut terminations = vec![t1.await.expect("old-1"), t2.await.expect("old-2")];
    tokio::time::sleep(settle).await;
    let (load, publish) = traffic.stop().await;

    let checks = Checks::run(&pool, &r.sandbox, &publish.published, load.records.iter()).await;
    let t3 = r.terminate(b1);
    let t4 = r.terminate(b2);
    terminations.push(t3.await.expect("new-1"));
    terminations.push(t4.await.expect("new-2"));
    pool.close().await;

    RollingOutcome {
        per_pod: per_pod(&load),
        changes: changes(&r.endpoints, &load),
        load,
        publish,
        terminations,
        payments: checks.payments,
        events: checks.events,
        orders: checks.orders,
    }
}

/// Routed requests per pod, by pod name.
fn per_pod(load: &LoadResult) -> Vec<(String, usize)> {
    let mut per_pod = std::collections::BTreeMap::<String, usize>::new();
    for r in load.routed() {
        if let Some(p) = &r.pod {
            *per_pod.entry(p.clone()).or_default() += 1;
        }
    }
    per_pod.into_iter().collect()
}

/// The endpoint changes, relative to the load's first request.
fn changes(endpoints: &Endpoints, load: &LoadResult) -> Vec<String> {
    let start = load.records.first().map(|r| r.sent_at);
    endpoints
        .changes()
        .iter()
        .map(|c| {
            format!(
                "{} {} at +{:.1} s",
                c.pod,
                routing(c),
                start.map_or(0.0, |s| c.at.saturating_duration_since(s).as_secs_f64())
            )
        })
        .collect()
}
