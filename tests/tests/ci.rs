//! The short variants, in the default `cargo nextest run --workspace`: 10 s of load at
//! 1,000 requests/s through a full termination, and the two faults that disturb nothing
//! outside their own sandbox (a stuck consumer step, the app killed mid-sequence). The e2e
//! tests of a machine run one at a time (see [`e2e::serial`]).

use std::time::Duration;

use e2e::scenario::{self, Fault, Scenario};
use e2e::{assert_no_failed_request, assert_nothing_lost, assert_story, hard_timeout, serial};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_termination_under_load_fails_no_request_and_loses_nothing() {
    let _one_at_a_time = serial(Duration::from_secs(240));
    let sc = Scenario::new(
        "short: 10 s at 1000/s",
        Fault::None,
        1000,
        Duration::from_secs(10),
    );
    let o = hard_timeout(Duration::from_secs(150), scenario::terminate_under_load(sc)).await;
    scenario::save_report("ci-short", &o.markdown());
    eprintln!("{}", o.markdown());
    let m = assert_story(&o, 0);
    for r in m.numbered() {
        assert_eq!(r.outcome, "ok", "{}", m.text);
    }
    assert_no_failed_request(&o);
    assert_nothing_lost(&o);
    let wanted: Vec<&str> = e2e::report::STEPS.to_vec();
    let logged: Vec<&str> = o
        .logs
        .supervisor_started
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(logged, wanted, "supervisor step start lines in order");
    let app: Vec<&str> = o.logs.app_started.iter().map(String::as_str).collect();
    assert_eq!(app, wanted[1..], "app sub-step lines in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_consumer_step_is_cut_at_its_budget_and_named() {
    let _one_at_a_time = serial(Duration::from_secs(240));
    let sc = Scenario::new(
        "short: stuck consumer",
        Fault::ConsumerHang,
        200,
        Duration::from_secs(3),
    );
    let o = hard_timeout(Duration::from_secs(150), scenario::terminate_under_load(sc)).await;
    scenario::save_report("ci-consumer-hang", &o.markdown());
    eprintln!("{}", o.markdown());
    e2e::checks::consumer_hang(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_killed_mid_sequence_is_reported_and_nothing_is_lost() {
    let _one_at_a_time = serial(Duration::from_secs(240));
    let sc = Scenario::new(
        "short: app SIGKILLed in step 5",
        Fault::AppCrash,
        200,
        Duration::from_secs(3),
    );
    let o = hard_timeout(Duration::from_secs(150), scenario::terminate_under_load(sc)).await;
    scenario::save_report("ci-app-crash", &o.markdown());
    eprintln!("{}", o.markdown());
    e2e::checks::app_crash(&o);
}
