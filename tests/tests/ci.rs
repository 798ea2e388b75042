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

use e2e::scenario::{Fault, Outcome, Scenario};
use e2e::{
    assert_no_failed_request, assert_nothing_lost, assert_steps_logged_in_order, assert_story,
    run_scenario, serial,
};

/// Requests per second for debug builds.
pub const DEBUG_RATE: u32 = 200;
const RATE: u32 = if cfg!(debug_assertions) {
    DEBUG_RATE
} else {
    1000
};

/// How long one short variant may wait for the machine's e2e lock.
const WAIT_FOR_LOCK: Duration = Duration::from_secs(240);

/// Runs the short variant `name` with `fault` after `warmup` of load; figures saved as `report`.
async fn run(name: &str, report: &str, fault: Fault, warmup: Duration) -> Outcome {
    let sc = Scenario::new(name, fault, RATE, warmup);
    run_scenario(sc, report, Duration::from_secs(150)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_termination_under_load_fails_no_request_and_loses_nothing() {
    let _one_at_a_time = serial(WAIT_FOR_LOCK);
    let name = format!("short: 10 s at {RATE}/s");
    let o = run(&name, "ci-short", Fault::None, Duration::from_secs(10)).await;
    let m = assert_story(&o, 0);
    e2e::checks::all_ok(m);
    assert_no_failed_request(&o);
    assert_nothing_lost(&o);
    assert_steps_logged_in_order(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_consumer_step_is_cut_at_its_budget_and_named() {
    let _one_at_a_time = serial(WAIT_FOR_LOCK);
    let o = run(
        "short: stuck consumer",
        "ci-consumer-hang",
        Fault::ConsumerHang,
        Duration::from_secs(3),
    )
    .await;
    e2e::checks::consumer_hang(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_killed_mid_sequence_is_reported_and_nothing_is_lost() {
    let _one_at_a_time = serial(WAIT_FOR_LOCK);
    let o = run(
        "short: app SIGKILLed in step 5",
        "ci-app-crash",
        Fault::AppCrash,
        Duration::from_secs(3),
    )
    .await;
    e2e::checks::app_crash(&o);
}
