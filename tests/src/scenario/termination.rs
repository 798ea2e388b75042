//! One pod under load terminated as kubelet does, with a [`Fault`] injected: the pod is started
//! and routed, loaded, the fault set up, the pod terminated while the fault acts, the fault
//! undone, and a successor pod catches up before the zero-loss checks.

use std::time::Duration;

use tokio::time::Instant;

use super::fault::{Armed, Fault, during_termination};
use super::observed::Observed;
use super::setup::{Checks, Running, Traffic, payment_rate, start_pod};
use super::{PROPAGATION, START_WITHIN};
use crate::endpoints::Endpoints;
use crate::kubelet::{self, Termination};
use crate::load::{LoadResult, LoadSpec, Record};
use crate::manifest::{PodManifest, SupervisorPlan};
use crate::payments::PublishResult;
use crate::pod::{Pod, PodOptions};
use crate::report::{Message, StepLogs};
use crate::requests::held_order;
use crate::sandbox::Sandbox;
use crate::verify::{self, EventCheck, OrderCheck, PaymentCheck};

/// One termination scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub fault: Fault,
    pub load: LoadSpec,
    /// Load before the termination starts.
    pub warmup: Duration,
    /// Payment messages per second.
    pub payment_rate: u32,
    pub propagation: Duration,
}

impl Scenario {
    pub fn new(name: &str, fault: Fault, rate: u32, warmup: Duration) -> Self {
        Self {
            name: name.to_owned(),
            fault,
            load: LoadSpec {
                rate,
                ..LoadSpec::default()
            },
            warmup,
            payment_rate: payment_rate(rate),
            propagation: PROPAGATION,
        }
    }
}

/// Everything one scenario measured.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub fault: Fault,
    pub manifest: PodManifest,
    pub plan: SupervisorPlan,
    pub load: LoadResult,
    pub publish: PublishResult,
    pub termination: Termination,
    pub message: Option<Message>,
    pub logs: StepLogs,
    pub log_tail: String,
    pub payments: PaymentCheck,
    pub events: EventCheck,
    pub orders: OrderCheck,
    pub successor_exit: Option<i32>,
    /// When the client stopped routing to the pod, from the termination's start.
    pub unrouted_after: Option<Duration>,
    /// The first readiness probe that failed after the termination started, from its start.
    pub readiness_failed_after: Option<Duration>,
    /// Outbox rows unsent and payment messages queued when the pod exited (left for the
    /// successor).
    pub unsent_at_exit: i64,
    pub queued_at_exit: u32,
    /// Requests the fault held in flight on purpose (not part of the load).
    pub held: Vec<Record>,
    /// The same requests retried (same idempotency keys) on the successor.
    pub retried: Vec<Result<(), (tonic::Code, String)>>,
    pub notes: Vec<String>,
    /// Kubelet's liveness probe reached its failure threshold at some point (it would have
    /// restarted the container).
    pub liveness_failed: bool,
    /// Routing changes and failed probes, relative to the load's start (diagnostics).
    pub timeline: Vec<String>,
}

impl Outcome {
    /// The supervisor's overhead on its own clock: its total minus step 1 (the preStop delay)
    /// and the app's time in its stop functions.
    pub fn supervisor_overhead(&self) -> Option<Duration> {
        let m = self.overhead_applies()?;
        let total = Duration::from_millis(m.total_ms?);
        let step1 = Duration::from_millis(m.step("health-not-serving")?.took_ms);
        Some(
            total
                .saturating_sub(step1)
                .saturating_sub(self.logs.app_work()),
        )
    }

    /// The same on kubelet's clock: preStop exec start to container exit, minus step 1 and the
    /// app's work (includes the hook's exec, SIGTERM delivery, exit and reaping).
    pub fn wall_overhead(&self) -> Option<Duration> {
        let m = self.overhead_applies()?;
        let step1 = Duration::from_millis(m.step("health-not-serving")?.took_ms);
        Some(
            self.termination
                .wall()?
                .saturating_sub(step1)
                .saturating_sub(self.logs.app_work()),
        )
    }

    /// Overhead is only defined when the app ran and logged all eight of its sub-steps (not
    /// when it was killed in the middle).
    pub(super) fn overhead_applies(&self) -> Option<&Message> {
        (self.logs.app_finished.len() == 8).then_some(())?;
        self.message.as_ref()
    }

    /// Routed requests that failed, grouped "Code: message" → count.
    pub fn failures(&self) -> Vec<(String, usize)> {
        let mut m = std::collections::BTreeMap::<String, usize>::new();
        for r in self.load.failed() {
            if let Err((code, msg)) = &r.result {
                *m.entry(format!("{code:?}: {msg}")).or_default() += 1;
            }
        }
        m.into_iter().collect()
    }
}

/// A pod under load, terminated as kubelet does, with `sc.fault` injected.
pub async fn terminate_under_load(sc: Scenario) -> Outcome {
    let manifest = PodManifest::load().expect("read deploy/k8s/deployment.yaml");
    let plan = SupervisorPlan::load().expect("read deploy/k8s/quiesce.toml");
    let sandbox = Sandbox::new().await;
    let endpoints = Endpoints::new(sc.propagation);
    let Running {
        mut pod,
        mut prober,
    } = start_pod(
        "a",
        &sandbox,
        &manifest,
        Some(&endpoints),
        &PodOptions::default(),
    )
    .await;
    sandbox.bind_events_queue().await;
    let pool = sandbox.pool().await;
    let traffic = Traffic::start(&endpoints, &sandbox, sc.load.clone(), sc.payment_rate);
    tokio::time::sleep(sc.warmup).await;

    // Set the fault up while the pod is still routed.
    let mut armed = Armed::set_up(sc.fault, &sandbox, &endpoints, &pod).await;

    // Kubelet terminates the pod; the fault acts meanwhile.
    let mid = tokio::spawn(during_termination(sc.fault, pod.watch(), Instant::now()));
    let ep = endpoints.clone();
    let termination = kubelet::terminate(&mut pod, &manifest, || ep.mark_terminating("a")).await;
    armed.notes.extend(mid.await.unwrap_or_default());
    let liveness_failed = prober.now().liveness_failed;
    prober.stop();

    // Undo the fault; what the pod left behind is the successor's.
    let held = armed.undo().await;
    let pool = if sc.fault == Fault::PostgresStop {
        sandbox.pool().await
    } else {
        pool
    };
    let unsent_at_exit = verify::unsent_outbox(&pool).await;
    let queued_at_exit = verify::queue_depth(&sandbox.payments_queue()).await;
    let (load, mut publish) = traffic.stop().await;
    publish.published.append(&mut armed.extra_published);
    let seen = Observed::read(&pod, &endpoints, &prober, &termination, &load);
    drop(pod);

    // The successor catches up; then nothing may be missing.
    let answered = load.records.iter().chain(held.iter());
    let (retried, checks, successor_exit) =
        catch_up(&sandbox, &manifest, &pool, &mut armed, &publish, answered).await;
    pool.close().await;

    Outcome {
        name: sc.name,
        fault: sc.fault,
        manifest,
        plan,
        load,
        publish,
        termination,
        message: seen.message,
        logs: seen.logs,
        log_tail: seen.log_tail,
        payments: checks.payments,
        events: checks.events,
        orders: checks.orders,
        successor_exit,
        unrouted_after: seen.unrouted_after,
        readiness_failed_after: seen.readiness_failed_after,
        unsent_at_exit,
        queued_at_exit,
        held,
        retried,
        notes: std::mem::take(&mut armed.notes),
        liveness_failed,
        timeline: seen.timeline,
    }
}

/// The pod the Deployment starts in place of `a` (not routed) retries the held calls and
/// catches up; then the zero-loss checks, and the successor is terminated in turn. Returns the
/// retries' results, the checks and the successor's exit code.
async fn catch_up<'a>(
    sandbox: &Sandbox,
    manifest: &PodManifest,
    pool: &sqlx::PgPool,
    armed: &mut Armed,
    publish: &PublishResult,
    answered: impl Iterator<Item = &'a Record>,
) -> (Vec<Result<(), (tonic::Code, String)>>, Checks, Option<i32>) {
    let opts = PodOptions {
        supervisor_flags: vec!["--prestop-delay".into(), "1s".into()],
        ..PodOptions::default()
    };
    let mut successor = start_pod("successor", sandbox, manifest, None, &opts).await;
    let retried = retry_held(&mut successor.pod, &armed.held_keys, &mut armed.notes).await;
    let checks = Checks::run(pool, sandbox, &publish.published, answered).await;
    let done = kubelet::terminate(&mut successor.pod, manifest, || {}).await;
    successor.prober.stop();
    (retried, checks, done.exit_code)
}

/// A client retries what failed with its idempotency key: after recovery it must succeed.
async fn retry_held(
    successor: &mut Pod,
    keys: &[String],
    notes: &mut Vec<String>,
) -> Vec<Result<(), (tonic::Code, String)>> {
    let mut retried = Vec::new();
    if keys.is_empty() {
        return retried;
    }
    let addr = successor.app_grpc_addr(START_WITHIN).await;
    let mut client = order_service::proto::order_service_client::OrderServiceClient::connect(
        format!("http://{addr}"),
    )
    .await
    .expect("connect to the successor");
    for key in keys {
        let r = client.create_order(held_order(key)).await;
        notes.push(format!(
            "retried {key} on the successor: {}",
            match &r {
                Ok(_) => "OK".to_owned(),
                Err(s) => format!("{:?} ({})", s.code(), s.message()),
            }
        ));
        retried.push(
            r.map(|_| ())
                .map_err(|s| (s.code(), s.message().to_owned())),
        );
    }
    retried
}
