//! The short variants, in the default `cargo nextest run --workspace`: 10 s of load through a
//! full termination, and the two faults that disturb nothing outside their own sandbox (a
//! stuck consumer step, the app killed mid-sequence). The e2e tests of a machine run one at a
//! time (see [`e2e::serial`]).
//!
//! The rate is 1,000/s when the binaries are release builds (`cargo test -p e2e --release`) and
//! [`DEBUG_RATE`] in the default debug build: a debug `order-service` serves about 500 mixed
//! requests/s on two busy cores, and an open loop past capacity measures overload, not
//! termination.

use std::time::Duration;

use e2e::scenario::{self, Fault, Scenario};
use e2e::{assert_no_failed_request, assert_nothing_lost, assert_story, hard_timeout, serial};

/// Requests per second for debug builds.
pub const DEBUG_RATE: u32 = 200;
const RATE: u32 = if cfg!(debug_assertions) {
    DEBUG_RATE
} else {
    1000
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_termination_under_load_fails_no_request_and_loses_nothing() {
    let _one_at_a_time = serial(Duration::from_secs(240));
    let sc = Scenario::new(
        &format!("short: 10 s at {RATE}/s"),
        Fault::None,
        RATE,
        Duration::from_secs(10),
    );
    let o = hard_timeout(Duration::from_secs(150), scenario::terminate_under_load(sc)).await;
    scenario::save_report("ci-short", &o.markdown());
    eprintln!("{}", o.markdown());
    let m = assert_story(&o, 0);
    e2e::checks::all_ok(m);
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
        RATE,
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
        RATE,
        Duration::from_secs(3),
    );
    let o = hard_timeout(Duration::from_secs(150), scenario::terminate_under_load(sc)).await;
    scenario::save_report("ci-app-crash", &o.markdown());
    eprintln!("{}", o.markdown());
    e2e::checks::app_crash(&o);
}
