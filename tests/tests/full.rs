//! The full variants, `#[ignore]`d so the default test run stays short; run them with
//! `scripts/reliability.sh` (release build, one at a time, the shared-service faults last),
//! which also writes their figures into docs/RELIABILITY.md.
//!
//! Tests named `shared_services_*` stop PostgreSQL or RabbitMQ, which every test on the
//! machine shares: never run them alongside other tests.

use std::time::Duration;

use e2e::scenario::{self, Fault, Scenario};
use e2e::{
    assert_no_failed_request, assert_nothing_lost, assert_steps_logged_in_order, assert_story,
    hard_timeout, run_scenario, serial,
};

const RATE: u32 = 1000;
const LIMIT: Duration = Duration::from_secs(300);
/// How long one full variant may wait for the machine's e2e lock.
const WAIT_FOR_LOCK: Duration = Duration::from_secs(600);

async fn run(name: &str, file: &str, fault: Fault, warmup: Duration) -> scenario::Outcome {
    run_scenario(Scenario::new(name, fault, RATE, warmup), file, LIMIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full variant: scripts/reliability.sh"]
async fn full_termination_under_load() {
    let _serial = serial(WAIT_FOR_LOCK);
    let o = run(
        "Termination under load: 30 s at 1000/s, then preStop, SIGTERM",
        "1-full",
        Fault::None,
        Duration::from_secs(30),
    )
    .await;
    let m = assert_story(&o, 0);
    e2e::checks::all_ok(m);
    assert_no_failed_request(&o);
    assert_nothing_lost(&o);
    assert_steps_logged_in_order(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full variant: scripts/reliability.sh"]
async fn full_consumer_step_hangs() {
    let _serial = serial(WAIT_FOR_LOCK);
    let o = run(
        "Fault: the consumer step hangs (a handler waits on a locked row)",
        "2-consumer-hang",
        Fault::ConsumerHang,
        Duration::from_secs(10),
    )
    .await;
    e2e::checks::consumer_hang(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full variant: scripts/reliability.sh"]
async fn full_app_crashes_mid_sequence() {
    let _serial = serial(WAIT_FOR_LOCK);
    let o = run(
        "Fault: the app is SIGKILLed 1 s into step 5",
        "3-app-crash",
        Fault::AppCrash,
        Duration::from_secs(10),
    )
    .await;
    e2e::checks::app_crash(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full variant: scripts/reliability.sh"]
async fn full_rolling_update() {
    let _serial = serial(WAIT_FOR_LOCK);
    let o = hard_timeout(
        LIMIT,
        scenario::rolling_update(RATE, Duration::from_secs(10), Duration::from_secs(5)),
    )
    .await;
    let name = "Rolling update: two pods replaced one at a time at 1000/s";
    scenario::save_report("4-rolling-update", &o.markdown(name));
    eprintln!("{}", o.markdown(name));
    assert!(o.load.routed().count() > 0);
    assert!(
        o.load.failed().is_empty(),
        "{} routed requests failed during the rolling update",
        o.load.failed().len()
    );
    assert_eq!(
        o.load.unrouted(),
        0,
        "a moment with no endpoint (maxUnavailable is 0)"
    );
    assert_eq!(o.load.saturated, 0);
    for (pod, t, m, _) in &o.terminations {
        assert_eq!(t.exit_code, Some(0), "{pod}");
        assert!(!t.killed, "{pod}");
        let m = m
            .as_ref()
            .unwrap_or_else(|| panic!("{pod}: no termination message"));
        m.is_complete()
            .unwrap_or_else(|e| panic!("{pod}: {e}\n{}", m.text));
        e2e::checks::all_ok(m);
    }
    assert_eq!(
        o.per_pod.len(),
        4,
        "every pod served traffic: {:?}",
        o.per_pod
    );
    let p = &o.payments;
    assert!(
        p.problems.is_empty() && p.applied == p.confirmed,
        "{:?}",
        p.problems
    );
    assert!(o.events.missing.is_empty() && o.events.unsent == 0);
    assert_eq!(o.orders.found, o.orders.acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared PostgreSQL: scripts/reliability.sh runs it last, alone"]
async fn shared_services_postgres_stops_mid_drain() {
    let _serial = serial(WAIT_FOR_LOCK);
    let o = run(
        "Fault: PostgreSQL stops (fast) as step 3 starts, CreateOrder calls in flight",
        "5-postgres-stop",
        Fault::PostgresStop,
        Duration::from_secs(10),
    )
    .await;
    e2e::checks::postgres_stop(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared RabbitMQ: scripts/reliability.sh runs it last, alone"]
async fn shared_services_rabbitmq_restarts_before_termination() {
    let _serial = serial(WAIT_FOR_LOCK);
    let o = run(
        "Fault: RabbitMQ restarts (stop_app, 3 s, start_app) 1 s before the termination",
        "6-rabbitmq-restart",
        Fault::RabbitRestart,
        Duration::from_secs(10),
    )
    .await;
    e2e::checks::rabbit_restart(&o);
}
