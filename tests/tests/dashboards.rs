//! Every metric the Grafana dashboards (`deploy/grafana/dashboards`) name is exported by the
//! running binaries: one pod (quiesce + order-service, as the other e2e tests start it) serves a
//! CreateOrder, a GetOrder and a payment message, runs its expiry job, and is then stopped with
//! SIGTERM; both `/metrics` endpoints are scraped throughout, and every name a panel or variable
//! selects must have appeared in some scrape. That the queries parse is `.ci/checks.sh
//! dashboards`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use e2e::dashboards::{exported, scrape, wanted};
use e2e::pod::{Pod, PodOptions};
use e2e::sandbox::Sandbox;
use e2e::{hard_timeout, payments, requests, serial};
use order_service::proto::GetOrderRequest;
use order_service::proto::order_service_client::OrderServiceClient;
use tokio::time::Instant;

/// How long the test may wait for the machine's e2e lock.
const WAIT_FOR_LOCK: Duration = Duration::from_secs(240);
/// The pod's start (migrations on a fresh database included).
const START_WITHIN: Duration = Duration::from_secs(90);
/// For the app's series that need an event (the relay's lag, the consumer, the expiry job).
const EVENTS_WITHIN: Duration = Duration::from_secs(30);
/// A shutdown without load: the 5 s preStop delay of deploy/k8s/quiesce.toml and nine short steps.
const STOP_WITHIN: Duration = Duration::from_secs(40);

/// Series the shutdown itself creates (a step's duration and outcome, the signal's count): looked
/// for in the scrapes made while the pod stops, not before.
const AT_SHUTDOWN: &[&str] = &[
    "quiesce_shutdown_step_duration_seconds",
    "quiesce_shutdown_step_outcome_total",
    "quiesce_signals_received_total",
];

/// Names a dashboard may use that the binaries do not export yet, each with the reason. The test
/// fails when one of them is exported after all, so the list cannot go stale.
const NOT_YET_EXPORTED: &[(&str, &str)] = &[(
    "quiesce_step_budget_seconds",
    "Metrics::budgets (supervisor/src/metrics.rs) is not called at start-up yet: it needs \
     `shared.metrics.budgets(cfg);` in lib.rs's start_probe_thread",
)];

/// What the scrapes have seen so far.
#[derive(Default)]
struct Seen {
    names: BTreeSet<String>,
    quiesce_scrapes: usize,
    app_scrapes: usize,
    last_error: Option<String>,
}

impl Seen {
    async fn scrape(&mut self, quiesce: SocketAddr, app: SocketAddr) {
        for (addr, count) in [
            (quiesce, &mut self.quiesce_scrapes),
            (app, &mut self.app_scrapes),
        ] {
            match scrape(addr).await {
                Ok(text) => {
                    *count += 1;
                    self.names.extend(exported(&text));
                }
                Err(e) => self.last_error = Some(format!("{addr}: {e}")),
            }
        }
    }

    fn missing<'a>(&self, wanted: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
        wanted
            .into_iter()
            .filter(|n| !self.names.contains(*n))
            .collect()
    }
}

/// The app's `/metrics` address, from its "order-service ready" line.
async fn app_metrics_addr(pod: &mut Pod) -> SocketAddr {
    let line = pod
        .wait_for_line("\"order-service ready\"", START_WITHIN, |l| {
            l.message().as_deref() == Some("order-service ready")
        })
        .await;
    line.json()
        .and_then(|v| v.get("metrics").and_then(|m| m.as_str()).map(str::to_owned))
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {:?}", line.text))
}

/// Traffic that creates the app's event-driven series: a CreateOrder (its outbox event is
/// relayed), a GetOrder of an order that does not exist (an error code), and a payment message
/// for the order (the consumer).
async fn drive(grpc: SocketAddr, sandbox: &Sandbox) {
    let mut client = OrderServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect to the app");
    let created = client
        .create_order(requests::create_order(
            "e2e-dashboards",
            &[("sku-1", 1, 1999)],
            "e2e-dashboards-1",
        ))
        .await
        .expect("CreateOrder")
        .into_inner();
    let order_id = created.order.expect("the created order").order_id;
    let missing = client
        .get_order(GetOrderRequest {
            order_id: uuid::Uuid::new_v4().to_string(),
        })
        .await;
    assert!(missing.is_err(), "GetOrder of a random id found an order");
    payments::publish_one(&sandbox.payments_exchange(), &order_id)
        .await
        .expect("publish a payment message");
}

async fn run() {
    let wanted: BTreeMap<String, Vec<String>> = wanted();
    assert!(
        wanted.contains_key("grpc_server_handled_total")
            && wanted.contains_key("quiesce_health_status"),
        "the dashboards' queries were not read: {wanted:?}"
    );
    let allowed: BTreeMap<&str, &str> = NOT_YET_EXPORTED.iter().copied().collect();
    let before_stop: Vec<&String> = wanted
        .keys()
        .filter(|n| !AT_SHUTDOWN.contains(&n.as_str()) && !allowed.contains_key(n.as_str()))
        .collect();

    let sandbox = Sandbox::new().await;
    let mut pod = Pod::start("dashboards", &sandbox, &PodOptions::default());
    let grpc = pod.app_grpc_addr(START_WITHIN).await;
    let app = app_metrics_addr(&mut pod).await;
    drive(grpc, &sandbox).await;

    let mut seen = Seen::default();
    let deadline = Instant::now() + EVENTS_WITHIN;
    loop {
        seen.scrape(pod.metrics, app).await;
        if seen.missing(before_stop.iter().copied()).is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = seen.missing(before_stop.iter().copied());
    assert!(
        before.is_empty(),
        "not exported while the pod runs (after {EVENTS_WITHIN:?}): {before:?}\nlast scrape error: {:?}\n{}",
        seen.last_error,
        pod.tail(40)
    );

    // The shutdown: the supervisor keeps serving /metrics until it exits.
    let quiesce_before = seen.quiesce_scrapes;
    assert!(
        pod.signal_init(nix::sys::signal::Signal::SIGTERM),
        "SIGTERM to the pod's PID 1"
    );
    let until = Instant::now() + STOP_WITHIN;
    while Instant::now() < until && pod.wait_exit(Instant::now()).await.is_none() {
        seen.scrape(pod.metrics, app).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exit = pod.wait_exit(until).await;
    assert!(
        exit.is_some(),
        "the pod did not stop within {STOP_WITHIN:?}:\n{}",
        pod.tail(40)
    );
    assert!(
        seen.quiesce_scrapes > quiesce_before,
        "no scrape of the supervisor succeeded during the shutdown: {:?}",
        seen.last_error
    );

    let missing: Vec<String> = seen
        .missing(wanted.keys())
        .into_iter()
        .filter(|n| !allowed.contains_key(n.as_str()))
        .map(|n| format!("{n} (used by {})", wanted[n].join("; ")))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboards name metrics that neither /metrics exports:\n  {}\n({} supervisor and {} app scrapes)",
        missing.join("\n  "),
        seen.quiesce_scrapes,
        seen.app_scrapes
    );
    let stale: Vec<&str> = allowed
        .keys()
        .copied()
        .filter(|n| seen.names.contains(*n))
        .collect();
    assert!(
        stale.is_empty(),
        "exported now, remove from NOT_YET_EXPORTED: {stale:?}"
    );
    for (name, why) in &allowed {
        if wanted.contains_key(*name) {
            eprintln!("not checked (NOT_YET_EXPORTED): {name}: {why}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboards_name_is_exported() {
    let _one_at_a_time = serial(WAIT_FOR_LOCK);
    hard_timeout(Duration::from_secs(200), run()).await;
}
