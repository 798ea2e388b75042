//! The scenarios: a pod under load terminated as kubelet does (with or without a fault), and a
//! rolling update of two pods. Each returns an [`Outcome`] with everything measured; the
//! tests assert on it and [`Outcome::markdown`] renders the figures for docs/RELIABILITY.md.
//!
//! After a terminated pod is gone, a successor pod (what the Deployment starts in its place)
//! consumes the payment messages still queued and relays the outbox rows still unsent; only
//! then are the zero-loss checks made, since "nothing lost" means "nothing lost for good".

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::endpoints::Endpoints;
use crate::faults::{self, HeldLock, PgGuard, RabbitGuard};
use crate::kubelet::{self, Prober, Termination};
use crate::load::{self, Kind, LoadResult, LoadSpec, Orders, Record};
use crate::manifest::{PodManifest, SupervisorPlan};
use crate::payments::{self, PublishResult};
use crate::pod::{LogLine, Pod, PodOptions, PodWatch};
use crate::report::{self, Message, StepLogs};
use crate::sandbox::Sandbox;
use crate::verify::{self, EventCheck, OrderCheck, PaymentCheck};

/// The endpoints' propagation delay (EndpointSlice controller → kube-proxy / resolver).
pub const PROPAGATION: Duration = Duration::from_secs(1);
/// How long a pod may take to start and become Ready.
pub const START_WITHIN: Duration = Duration::from_secs(90);
/// How long the successor may take to catch up (queue and outbox).
pub const CATCH_UP_WITHIN: Duration = Duration::from_secs(90);

/// What goes wrong during the termination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// A payment handler waits on an order row another transaction holds: step 5 cannot
    /// finish and must be cut at its budget.
    ConsumerHang,
    /// The same stuck handler, and the app is SIGKILLed 1 s into step 5.
    AppCrash,
    /// CreateOrder calls held on idempotency keys are in flight; PostgreSQL stops (fast) when
    /// step 3 starts and comes back after the pod exited.
    PostgresStop,
    /// `rabbitmqctl stop_app`, 3 s down, `start_app`, and the termination starts 1 s later.
    RabbitRestart,
}

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
            payment_rate: (rate / 10).max(10),
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
    fn overhead_applies(&self) -> Option<&Message> {
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

    /// The figures as a Markdown section.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let l = &self.load;
        let routed = l.routed().count();
        let creates = l.routed().filter(|r| r.kind == Kind::Create).count();
        let _ = writeln!(o, "### {}\n", self.name);
        let _ = writeln!(
            o,
            "| requests sent (routed) | of which CreateOrder | failed | ticks with no endpoint | client saturated | rate | p50 / p99 / max latency (ms) |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---|");
        let _ = writeln!(
            o,
            "| {routed} | {creates} | {} | {} | {} | {}/s over {:.1} s | {:.2} / {:.2} / {:.2} |\n",
            l.failed().len(),
            l.unrouted(),
            l.saturated,
            self_rate(l),
            l.elapsed.as_secs_f64(),
            l.latency_ms(50.0),
            l.latency_ms(99.0),
            l.latency_ms(100.0),
        );
        let p = &self.payments;
        let e = &self.events;
        let _ = writeln!(
            o,
            "| payment messages (distinct / copies) | exactly one effect | unconfirmed | queued at exit | outbox events committed | received (unique / deliveries) | unsent at exit | acknowledged orders found |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            o,
            "| {} / {} | {} | {} | {} | {} | {} / {} | {} | {} / {} |\n",
            p.confirmed,
            p.copies,
            p.applied,
            p.unconfirmed,
            self.queued_at_exit,
            e.committed,
            e.received_unique,
            e.received,
            self.unsent_at_exit,
            self.orders.found,
            self.orders.acknowledged,
        );
        let t = &self.termination;
        let fmt =
            |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.3} s", d.as_secs_f64()));
        let _ = writeln!(
            o,
            "Exit code {} (kubelet SIGKILL: {}); preStop hook {:.3} s; SIGTERM to exit {}; wall {}; \
             client stopped routing after {}, first failed readiness probe after {}; \
             supervisor overhead {} (own clock) / {} (kubelet's clock).\n",
            t.exit_code.map_or("-".into(), |c| c.to_string()),
            if t.killed { "yes" } else { "no" },
            t.prestop_took.as_secs_f64(),
            fmt(t
                .sigterm_at
                .zip(t.ended)
                .map(|(s, e)| e.saturating_duration_since(s))),
            fmt(t.wall()),
            fmt(self.unrouted_after),
            fmt(self.readiness_failed_after),
            fmt(self.supervisor_overhead()),
            fmt(self.wall_overhead()),
        );
        if let (Some(last), Some(child), Some(exiting), Some(ended)) = (
            self.logs.last_app_step_at,
            self.logs.child_ended_at,
            self.logs.exiting_at,
            self.termination.ended,
        ) && self.overhead_applies().is_some()
        {
            let d = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
            let _ = writeln!(
                o,
                "Where the overhead goes (log arrival times): the app's last step → the supervisor reaps it {:.1} ms (the app's own exit after `close`); → the supervisor's `exiting` line {:.1} ms (leftover sweep, termination message); → the container has exited {:.1} ms.\n",
                d(last, child),
                d(child, exiting),
                d(exiting, ended),
            );
        }
        for n in &self.notes {
            let _ = writeln!(o, "- {n}");
        }
        if let Some(m) = &self.message
            && m.rows
                .iter()
                .any(|r| r.detail.contains("app exited with code 0 during this step"))
        {
            let _ = writeln!(
                o,
                "- the supervisor recorded close rows as `error` (\"app exited with code 0 during this step\") although the app replied and exited 0: its close/exit race"
            );
        }
        if !self.notes.is_empty() {
            o.push('\n');
        }
        if !self.timeline.is_empty() {
            let _ = writeln!(
                o,
                "Timeline (from the load's start): {}.\n",
                self.timeline.join("; ")
            );
        }
        if let Some(m) = &self.message {
            let _ = writeln!(o, "Termination message:\n\n```text\n{}```\n", m.text);
        }
        if !self.logs.app_finished.is_empty() {
            let steps: Vec<String> = self
                .logs
                .app_finished
                .iter()
                .map(|(s, d)| format!("{s} {d} ms"))
                .collect();
            let _ = writeln!(o, "App step work (its logs): {}.\n", steps.join(", "));
        }
        o
    }
}

fn self_rate(l: &LoadResult) -> u64 {
    if l.elapsed.is_zero() {
        return 0;
    }
    (l.ticks as f64 / l.elapsed.as_secs_f64()).round() as u64
}

/// Writes `text` to `$E2E_REPORT_DIR/<name>.md` when the variable is set.
pub fn save_report(name: &str, text: &str) {
    if let Some(dir) = std::env::var_os("E2E_REPORT_DIR") {
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{}.md", name.replace([' ', '/'], "-")));
        if let Err(e) = std::fs::write(&file, text) {
            eprintln!("e2e: cannot write {}: {e}", file.display());
        }
    }
}

/// A started pod with its prober, routed by the endpoints view once Ready.
struct Running {
    pod: Pod,
    prober: Prober,
}

async fn start_pod(
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

fn is_supervisor_step_start(l: &LogLine, step: &str) -> bool {
    l.json().is_some_and(|v| {
        v.get("message").and_then(|m| m.as_str()) == Some("step start")
            && v.get("step").and_then(|s| s.as_str()) == Some(step)
    })
}

fn is_app_step_start(l: &LogLine, substep: &str) -> bool {
    l.json().is_some_and(|v| {
        v.get("message").and_then(|m| m.as_str()) == Some("shutdown step started")
            && v.get("substep").and_then(|s| s.as_str()) == Some(substep)
    })
}

/// The CreateOrder the PostgreSQL fault holds in flight (and retries after recovery).
fn held_request(key: &str) -> order_service::proto::CreateOrderRequest {
    order_service::proto::CreateOrderRequest {
        customer_id: "e2e-held".into(),
        items: vec![order_service::proto::LineItem {
            sku: "held".into(),
            quantity: 1,
            price_cents: 100,
        }],
        idempotency_key: key.to_owned(),
    }
}

/// What the fault does while kubelet terminates the pod.
async fn during_termination(fault: Fault, watch: PodWatch, t0: Instant) -> Vec<String> {
    let mut notes = Vec::new();
    let since = |at: Instant| at.saturating_duration_since(t0).as_secs_f64();
    match fault {
        Fault::AppCrash => {
            let Some(line) = watch
                .wait_for(Duration::from_secs(40), |l| {
                    is_supervisor_step_start(l, "stop-consumer")
                })
                .await
            else {
                notes.push("stop-consumer never started: no crash injected".into());
                return notes;
            };
            tokio::time::sleep_until(line.at + Duration::from_secs(1)).await;
            match watch.app_pid() {
                Some(pid) => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    notes.push(format!(
                        "SIGKILL to the app (host pid {pid}) at +{:.3} s, 1 s into stop-consumer",
                        since(Instant::now())
                    ));
                }
                None => notes.push("no app process to kill".into()),
            }
        }
        Fault::PostgresStop => {
            let Some(line) = watch
                .wait_for(Duration::from_secs(40), |l| {
                    is_app_step_start(l, "drain-in-flight")
                })
                .await
            else {
                notes.push("drain-in-flight never started: PostgreSQL not stopped".into());
                return notes;
            };
            let r = tokio::task::spawn_blocking(faults::pg_stop).await;
            notes.push(format!(
                "drain-in-flight started at +{:.3} s; PostgreSQL stopped (-m fast) by +{:.3} s ({})",
                since(line.at),
                since(Instant::now()),
                match r {
                    Ok(Ok(())) => "ok".to_owned(),
                    Ok(Err(e)) => e,
                    Err(e) => e.to_string(),
                }
            ));
        }
        _ => {}
    }
    notes
}

/// A pod under load, terminated as kubelet does, with `sc.fault` injected.
pub async fn terminate_under_load(sc: Scenario) -> Outcome {
    let manifest = PodManifest::load().expect("read deploy/k8s/deployment.yaml");
    let plan = SupervisorPlan::load().expect("read deploy/k8s/quiesce.toml");
    let sandbox = Sandbox::new().await;
    let endpoints = Endpoints::new(sc.propagation);
    let mut notes = Vec::new();

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

    let (stop_tx, stop_rx) = watch::channel(false);
    let orders = Arc::new(Orders::default());
    let (created_tx, created_rx) = mpsc::unbounded_channel();
    let load_task = tokio::spawn(load::run(
        endpoints.clone(),
        sc.load.clone(),
        orders.clone(),
        created_tx,
        stop_rx.clone(),
    ));
    let publish_task = tokio::spawn(payments::run(
        sandbox.payments_exchange(),
        sc.payment_rate,
        created_rx,
        stop_rx.clone(),
    ));
    tokio::time::sleep(sc.warmup).await;

    // Set the fault up while the pod is still routed.
    let mut extra_published = Vec::new();
    let mut lock: Option<HeldLock> = None;
    let mut held_calls = Vec::new();
    let mut held_keys: Vec<String> = Vec::new();
    let mut pg_guard: Option<PgGuard> = None;
    let mut rabbit_guard: Option<RabbitGuard> = None;
    match sc.fault {
        Fault::None => {}
        Fault::ConsumerHang | Fault::AppCrash => {
            let mut client = endpoints.client("a").expect("pod a tracked");
            let order = client
                .create_order(order_service::proto::CreateOrderRequest {
                    customer_id: "e2e-stuck".into(),
                    items: vec![order_service::proto::LineItem {
                        sku: "stuck".into(),
                        quantity: 1,
                        price_cents: 100,
                    }],
                    idempotency_key: String::new(),
                })
                .await
                .expect("create the order the stuck handler will wait on")
                .into_inner()
                .order
                .expect("an order")
                .order_id;
            lock = Some(HeldLock::order_row(&sandbox.database_url(), &order).await);
            let p = payments::publish_one(&sandbox.payments_exchange(), &order)
                .await
                .expect("publish the payment the handler will hang on");
            extra_published.push(p);
            assert!(
                faults::wait_lock_waiters(&sandbox.database, 1, Duration::from_secs(15)).await,
                "the payment handler never blocked on the held order row\n{}",
                pod.tail(40)
            );
            notes.push(format!(
                "a payment handler waits on order {order}, whose row another transaction holds FOR UPDATE"
            ));
        }
        Fault::PostgresStop => {
            let keys: Vec<String> = (0..4)
                .map(|i| format!("e2e-held-{}-{i}", sandbox.suffix))
                .collect();
            lock = Some(HeldLock::idempotency_keys(&sandbox.database_url(), &keys).await);
            held_keys = keys.clone();
            for key in keys {
                let mut client = endpoints.client("a").expect("pod a tracked");
                held_calls.push(tokio::spawn(async move {
                    let sent_at = Instant::now();
                    let r = client.create_order(held_request(&key)).await;
                    Record {
                        sent_at,
                        pod: Some("a".into()),
                        kind: Kind::Create,
                        latency: sent_at.elapsed(),
                        order_id: r
                            .as_ref()
                            .ok()
                            .and_then(|r| r.get_ref().order.as_ref().map(|o| o.order_id.clone())),
                        result: r
                            .map(|_| ())
                            .map_err(|s| (s.code(), s.message().to_owned())),
                    }
                }));
            }
            assert!(
                faults::wait_lock_waiters(&sandbox.database, 4, Duration::from_secs(15)).await,
                "the held CreateOrder calls never blocked on their idempotency keys\n{}",
                pod.tail(40)
            );
            pg_guard = Some(PgGuard);
            notes.push(
                "4 CreateOrder calls wait on idempotency keys another transaction inserted".into(),
            );
        }
        Fault::RabbitRestart => {
            rabbit_guard = Some(RabbitGuard);
            let t = Instant::now();
            tokio::task::spawn_blocking(faults::rabbit_stop)
                .await
                .expect("join")
                .expect("rabbitmqctl stop_app");
            let stopped = t.elapsed();
            tokio::time::sleep(Duration::from_secs(3)).await;
            tokio::task::spawn_blocking(faults::rabbit_start)
                .await
                .expect("join")
                .expect("rabbitmqctl start_app");
            notes.push(format!(
                "RabbitMQ: stop_app took {:.1} s, down 3 s, start_app and listening after {:.1} s more; termination 1 s later",
                stopped.as_secs_f64(),
                (t.elapsed() - stopped - Duration::from_secs(3)).as_secs_f64()
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    // Kubelet terminates the pod; the fault acts meanwhile.
    let t0 = Instant::now();
    let mid = tokio::spawn(during_termination(sc.fault, pod.watch(), t0));
    let ep = endpoints.clone();
    let termination = kubelet::terminate(&mut pod, &manifest, || ep.mark_terminating("a")).await;
    notes.extend(mid.await.unwrap_or_default());
    let liveness_failed = prober.now().liveness_failed;
    prober.stop();

    // Undo the fault.
    let mut held = Vec::new();
    for c in held_calls {
        if let Ok(r) = c.await {
            held.push(r.clone());
            notes.push(format!(
                "held CreateOrder answered after {:.3} s: {}",
                r.latency.as_secs_f64(),
                match &r.result {
                    Ok(()) => "OK".to_owned(),
                    Err((code, msg)) => format!("{code:?} ({msg})"),
                }
            ));
        }
    }
    if let Some(g) = pg_guard.take() {
        let t = Instant::now();
        drop(g); // starts PostgreSQL and waits for it
        notes.push(format!(
            "PostgreSQL started again after the pod exited ({:.1} s to accept connections)",
            t.elapsed().as_secs_f64()
        ));
    }
    drop(rabbit_guard);
    if let Some(l) = lock.take() {
        l.release().await;
    }
    let pool = if sc.fault == Fault::PostgresStop {
        sandbox.pool().await
    } else {
        pool
    };
    let unsent_at_exit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap_or(-1);
    let queued_at_exit = verify::queue_depth(&sandbox.payments_queue()).await;

    let _ = stop_tx.send(true);
    let load = load_task.await.expect("the load task");
    let mut publish = publish_task.await.expect("the publisher task");
    publish.published.extend(extra_published);

    let message_text = pod.termination_message();
    let message = message_text
        .as_deref()
        .map(report::parse_message)
        .transpose()
        .unwrap_or_else(|e| {
            panic!(
                "unreadable termination message: {e}\n{}",
                message_text.clone().unwrap_or_default()
            )
        });
    let lines = pod.lines();
    let logs = report::step_logs(&lines);
    let log_tail = pod.tail(80);
    let unrouted_after = endpoints
        .changes()
        .iter()
        .find(|c| c.pod == "a" && !c.routed && c.at >= termination.started)
        .map(|c| c.at.saturating_duration_since(termination.started));
    let readiness_failed_after = prober
        .results()
        .iter()
        .find(|r| r.probe == "readiness" && !r.serving && r.at >= termination.started)
        .map(|r| r.at.saturating_duration_since(termination.started));
    let load_start = load
        .records
        .first()
        .map_or(termination.started, |r| r.sent_at);
    let rel = |at: Instant| at.saturating_duration_since(load_start).as_secs_f64();
    let mut timeline: Vec<(f64, String)> = endpoints
        .changes()
        .iter()
        .map(|c| {
            (
                rel(c.at),
                format!("{} {}", c.pod, if c.routed { "routed" } else { "unrouted" }),
            )
        })
        .collect();
    timeline.extend(
        prober
            .results()
            .iter()
            .filter(|r| !r.serving)
            .map(|r| (rel(r.at), format!("{} probe failed: {}", r.probe, r.detail))),
    );
    timeline.push((rel(termination.started), "termination starts".into()));
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    let timeline = timeline
        .into_iter()
        .map(|(t, s)| format!("+{t:.3} s {s}"))
        .collect();
    drop(pod);

    // The successor catches up; then nothing may be missing.
    let successor_opts = PodOptions {
        supervisor_flags: vec!["--prestop-delay".into(), "1s".into()],
        ..PodOptions::default()
    };
    let Running {
        pod: mut successor,
        prober: mut successor_prober,
    } = start_pod("successor", &sandbox, &manifest, None, &successor_opts).await;
    // A client retries what failed with its idempotency key: after recovery it must succeed.
    let mut retried = Vec::new();
    if !held_keys.is_empty() {
        let addr = successor.app_grpc_addr(START_WITHIN).await;
        let mut client = order_service::proto::order_service_client::OrderServiceClient::connect(
            format!("http://{addr}"),
        )
        .await
        .expect("connect to the successor");
        for key in &held_keys {
            let r = client.create_order(held_request(key)).await;
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
    }
    let payments = verify::payments(&pool, &sandbox, &publish.published, CATCH_UP_WITHIN).await;
    let events = verify::events(&pool, &sandbox, CATCH_UP_WITHIN).await;
    let acknowledged: Vec<String> = load
        .records
        .iter()
        .chain(held.iter())
        .filter_map(|r| r.order_id.clone())
        .collect();
    let orders_check = verify::acknowledged_orders(&pool, &acknowledged).await;
    let done = kubelet::terminate(&mut successor, &manifest, || {}).await;
    successor_prober.stop();
    pool.close().await;

    Outcome {
        name: sc.name,
        fault: sc.fault,
        manifest,
        plan,
        load,
        publish,
        termination,
        message,
        logs,
        log_tail,
        payments,
        events,
        orders: orders_check,
        successor_exit: done.exit_code,
        unrouted_after,
        readiness_failed_after,
        unsent_at_exit,
        queued_at_exit,
        held,
        retried,
        notes,
        liveness_failed,
        timeline,
    }
}

/// A rolling update's measurements.
#[derive(Debug)]
pub struct RollingOutcome {
    pub load: LoadResult,
    pub publish: PublishResult,
    /// Each old and new pod's termination: (pod, termination, parsed message).
    pub terminations: Vec<(String, Termination, Option<Message>, StepLogs)>,
    pub payments: PaymentCheck,
    pub events: EventCheck,
    pub orders: OrderCheck,
    /// Routed requests per pod.
    pub per_pod: Vec<(String, usize)>,
    pub changes: Vec<String>,
}

impl RollingOutcome {
    pub fn markdown(&self, name: &str) -> String {
        let mut o = String::new();
        let l = &self.load;
        let _ = writeln!(o, "### {name}\n");
        let _ = writeln!(
            o,
            "| requests sent (routed) | failed | ticks with no endpoint | client saturated | rate | p50 / p99 / max latency (ms) | per pod |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---:|---:|---|---|");
        let per: Vec<String> = self
            .per_pod
            .iter()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect();
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {}/s over {:.1} s | {:.2} / {:.2} / {:.2} | {} |\n",
            l.routed().count(),
            l.failed().len(),
            l.unrouted(),
            l.saturated,
            self_rate(l),
            l.elapsed.as_secs_f64(),
            l.latency_ms(50.0),
            l.latency_ms(99.0),
            l.latency_ms(100.0),
            per.join(", ")
        );
        let _ = writeln!(
            o,
            "Payment messages {} distinct ({} copies), {} with exactly one effect; outbox events {} committed, {} received ({} deliveries); acknowledged orders found {} / {}.\n",
            self.payments.confirmed,
            self.payments.copies,
            self.payments.applied,
            self.events.committed,
            self.events.received_unique,
            self.events.received,
            self.orders.found,
            self.orders.acknowledged
        );
        let _ = writeln!(
            o,
            "| pod | exit code | preStop hook (s) | wall (s) | supervisor total (s) |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|");
        for (pod, t, m, _) in &self.terminations {
            let _ = writeln!(
                o,
                "| {pod} | {} | {:.3} | {} | {} |",
                t.exit_code.map_or("-".into(), |c| c.to_string()),
                t.prestop_took.as_secs_f64(),
                t.wall()
                    .map_or("-".into(), |w| format!("{:.3}", w.as_secs_f64())),
                m.as_ref()
                    .and_then(|m| m.total_ms)
                    .map_or("-".into(), |t| format!("{:.3}", t as f64 / 1000.0)),
            );
        }
        let _ = writeln!(o, "\nEndpoint changes: {}.\n", self.changes.join("; "));
        o
    }
}

async fn terminate_in_background(
    mut running: Running,
    manifest: PodManifest,
    endpoints: Endpoints,
) -> (String, Termination, Option<Message>, StepLogs) {
    let name = running.pod.name.clone();
    let ep = endpoints.clone();
    let n = name.clone();
    let t = kubelet::terminate(&mut running.pod, &manifest, move || ep.mark_terminating(&n)).await;
    running.prober.stop();
    let message = running
        .pod
        .termination_message()
        .and_then(|m| report::parse_message(&m).ok());
    let logs = report::step_logs(&running.pod.lines());
    (name, t, message, logs)
}

/// Two pods behind the endpoints, replaced one at a time (maxSurge 1, maxUnavailable 0) under
/// load: a new pod starts; once it is Ready and routed an old one is terminated and the next new
/// one starts; then the second old one goes.
pub async fn rolling_update(rate: u32, warmup: Duration, settle: Duration) -> RollingOutcome {
    let manifest = PodManifest::load().expect("read deploy/k8s/deployment.yaml");
    let sandbox = Sandbox::new().await;
    let endpoints = Endpoints::new(PROPAGATION);
    let opts = PodOptions::default();
    let a1 = start_pod("old-1", &sandbox, &manifest, Some(&endpoints), &opts).await;
    sandbox.bind_events_queue().await;
    let a2 = start_pod("old-2", &sandbox, &manifest, Some(&endpoints), &opts).await;
    let pool = sandbox.pool().await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let orders = Arc::new(Orders::default());
    let (created_tx, created_rx) = mpsc::unbounded_channel();
    let load_task = tokio::spawn(load::run(
        endpoints.clone(),
        LoadSpec {
            rate,
            ..LoadSpec::default()
        },
        orders.clone(),
        created_tx,
        stop_rx.clone(),
    ));
    let publish_task = tokio::spawn(payments::run(
        sandbox.payments_exchange(),
        (rate / 10).max(10),
        created_rx,
        stop_rx.clone(),
    ));
    tokio::time::sleep(warmup).await;

    let b1 = start_pod("new-1", &sandbox, &manifest, Some(&endpoints), &opts).await;
    let t1 = tokio::spawn(terminate_in_background(
        a1,
        manifest.clone(),
        endpoints.clone(),
    ));
    let b2 = start_pod("new-2", &sandbox, &manifest, Some(&endpoints), &opts).await;
    let t2 = tokio::spawn(terminate_in_background(
        a2,
        manifest.clone(),
        endpoints.clone(),
    ));
    let mut terminations = vec![t1.await.expect("old-1"), t2.await.expect("old-2")];
    tokio::time::sleep(settle).await;
    let _ = stop_tx.send(true);
    let load = load_task.await.expect("the load task");
    let publish = publish_task.await.expect("the publisher task");

    let payments = verify::payments(&pool, &sandbox, &publish.published, CATCH_UP_WITHIN).await;
    let events = verify::events(&pool, &sandbox, CATCH_UP_WITHIN).await;
    let acknowledged: Vec<String> = load
        .records
        .iter()
        .filter_map(|r| r.order_id.clone())
        .collect();
    let orders_check = verify::acknowledged_orders(&pool, &acknowledged).await;
    let t3 = tokio::spawn(terminate_in_background(
        b1,
        manifest.clone(),
        endpoints.clone(),
    ));
    let t4 = tokio::spawn(terminate_in_background(
        b2,
        manifest.clone(),
        endpoints.clone(),
    ));
    terminations.push(t3.await.expect("new-1"));
    terminations.push(t4.await.expect("new-2"));
    pool.close().await;

    let mut per_pod = std::collections::BTreeMap::<String, usize>::new();
    for r in load.routed() {
        if let Some(p) = &r.pod {
            *per_pod.entry(p.clone()).or_default() += 1;
        }
    }
    let start = load.records.first().map(|r| r.sent_at);
    let changes = endpoints
        .changes()
        .iter()
        .map(|c| {
            format!(
                "{} {} at +{:.1} s",
                c.pod,
                if c.routed { "routed" } else { "unrouted" },
                start.map_or(0.0, |s| c.at.saturating_duration_since(s).as_secs_f64())
            )
        })
        .collect();
    RollingOutcome {
        load,
        publish,
        terminations,
        payments,
        events,
        orders: orders_check,
        per_pod: per_pod.into_iter().collect(),
        changes,
    }
}
