//! Every metric the Grafana dashboards (`deploy/grafana/dashboards`) name is exported by the
//! running binaries: one pod (quiesce + order-service, as the other e2e tests start it) serves a
//! CreateOrder, a GetOrder and a payment message, runs its expiry job, and is then stopped with
//! SIGTERM while one more CreateOrder is held in flight; both `/metrics` endpoints are scraped
//! throughout, and every name a panel or variable selects must have appeared in some scrape. That the queries parse is `.ci/checks.sh
//! dashboards`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::dashboards::{exported, scrape, wanted};
use e2e::faults::{HeldLock, wait_lock_waiters};
use e2e::pod::{Pod, PodOptions};
use e2e::sandbox::Sandbox;
use e2e::{hard_timeout, payments, requests, serial};
use order_service::proto::GetOrderRequest;
use order_service::proto::order_service_client::OrderServiceClient;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long the test may wait for the machine's e2e lock.
const WAIT_FOR_LOCK: Duration = Duration::from_secs(240);
/// The pod's start (migrations on a fresh database included).
const START_WITHIN: Duration = Duration::from_secs(90);
/// For the app's series that need an event (the relay's lag, the consumer, the expiry job).
const EVENTS_WITHIN: Duration = Duration::from_secs(30);
/// From SIGTERM until the shutdown's own series are scraped: the 5 s preStop delay of
/// deploy/k8s/quiesce.toml, then step 1 is recorded (drain-in-flight waits for the held request).
const SHUTDOWN_SERIES_WITHIN: Duration = Duration::from_secs(10);
/// The rest of the shutdown once the held request is let go: seven short steps.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// Series the shutdown itself creates (a step's duration and outcome, the signal's count): looked
/// for in the scrapes made while the pod stops, not before.
const AT_SHUTDOWN: &[&str] = &[
    "quiesce_shutdown_step_duration_seconds",
    "quiesce_shutdown_step_outcome_total",
    "quiesce_signals_received_total",
];

/// Names a dashboard may use that the binaries do not export yet, each with the reason. The test
/// fails when one of them is exported after all, so the list cannot go stale.
const NOT_YET_EXPORTED: &[(&str, &str)] = &[];

/// What the scrapes have seen so far.
#[derive(Default)]
struct Seen {
    names: BTreeSet<String>,
    /// Successful scrapes per endpoint: the supervisor's, the app's.
    scrapes: [usize; 2],
    last_error: Option<String>,
}

impl Seen {
    fn missing<'a>(&self, wanted: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
        wanted
            .into_iter()
            .filter(|n| !self.names.contains(*n))
            .collect()
    }
}

/// Scrapes `addr` every 50 ms into `seen[endpoint]` until aborted. One task per endpoint, so an
/// endpoint that stops answering (the app's, as it shuts down) never holds up the other's scrapes.
fn scraper(addr: SocketAddr, endpoint: usize, seen: Arc<Mutex<Seen>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let r = scrape(addr).await;
            {
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(text) => {
                        s.scrapes[endpoint] += 1;
                        s.names.extend(exported(&text));
                    }
                    Err(e) => s.last_error = Some(format!("{addr}: {e}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
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

    let seen = Arc::new(Mutex::new(Seen::default()));
    let lock = || seen.lock().unwrap_or_else(|e| e.into_inner());
    let scrapers = [
        scraper(pod.metrics, 0, seen.clone()),
        scraper(app, 1, seen.clone()),
    ];
    let deadline = Instant::now() + EVENTS_WITHIN;
    while !lock().missing(before_stop.iter().copied()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before: Vec<String> = lock()
        .missing(before_stop.iter().copied())
        .into_iter()
        .cloned()
        .collect();
    assert!(
        before.is_empty(),
        "the dashboards name metrics neither /metrics exports while the pod runs (after \
         {EVENTS_WITHIN:?}; series the shutdown creates belong in AT_SHUTDOWN): {before:?}\n\
         last scrape error: {:?}\n{}",
        lock().last_error,
        pod.tail(40)
    );

    // The shutdown. Without load the steps after the first take milliseconds and the supervisor
    // exits with them, too fast to scrape reliably; so one CreateOrder is held in flight (its
    // idempotency key locked by an open transaction) and drain-in-flight waits for it. Step 1 is
    // recorded when the preStop delay ends; the lock is released once the scrapes have seen the
    // series the shutdown creates, or at SHUTDOWN_SERIES_WITHIN.
    let key = "e2e-dashboards-held".to_owned();
    let held =
        HeldLock::idempotency_keys(&sandbox.database_url(), std::slice::from_ref(&key)).await;
    let mut client = OrderServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect to the app");
    let in_flight =
        tokio::spawn(async move { client.create_order(requests::held_order(&key)).await });
    assert!(
        wait_lock_waiters(&sandbox.database, 1, Duration::from_secs(10)).await,
        "the held CreateOrder never waited on its idempotency key"
    );
    let supervisor_before = lock().scrapes[0];
    assert!(
        pod.signal_init(nix::sys::signal::Signal::SIGTERM),
        "SIGTERM to the pod's PID 1"
    );
    let all: Vec<&String> = wanted
        .keys()
        .filter(|n| !allowed.contains_key(n.as_str()))
        .collect();
    let deadline = Instant::now() + SHUTDOWN_SERIES_WITHIN;
    while !lock().missing(all.iter().copied()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.release().await;
    let exit = pod.wait_exit(Instant::now() + STOP_WITHIN).await;
    for s in &scrapers {
        s.abort();
    }
    in_flight.abort();
    assert!(
        exit.is_some(),
        "the pod did not stop within {STOP_WITHIN:?}:\n{}",
        pod.tail(40)
    );
    let seen = lock();
    assert!(
        seen.scrapes[0] > supervisor_before,
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
        "the dashboards name metrics that neither /metrics exports:\n  {}\n({} supervisor and {} \
         app scrapes, {} of the supervisor's after SIGTERM)\n{}",
        missing.join("\n  "),
        seen.scrapes[0],
        seen.scrapes[1],
        seen.scrapes[0] - supervisor_before,
        pod.tail(60)
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
    hard_timeout(Duration::from_secs(150), run()).await;
}
