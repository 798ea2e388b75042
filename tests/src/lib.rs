//! End-to-end reliability tests for quiesce: a kubelet simulator runs `quiesce` +
//! `order-service` as PID 1 of a fresh PID namespace against the local PostgreSQL, Redis and
//! RabbitMQ, sends client traffic and payment messages, terminates the pod the way kubelet
//! does, and checks that nothing was lost.
//!
//! # Layout
//!
//! | concern | module |
//! |---|---|
//! | probes, grace period, preStop command, budgets — read from `deploy/k8s` | [`manifest`] |
//! | the binaries under test | [`bins`] |
//! | per-scenario database, exchange/queue and key names; cleanup | [`sandbox`] |
//! | one pod: `unshare` + `quiesce` + the app, logs, pids, preStop exec | [`pod`] |
//! | kubelet: probes with thresholds, the termination sequence | [`kubelet`] |
//! | the Service's endpoints with a propagation delay | [`endpoints`] |
//! | open-loop client traffic at a fixed rate | [`load`] |
//! | payment messages with confirms, duplicates on purpose | [`payments`] |
//! | PostgreSQL/RabbitMQ stops and held locks, undone on drop | [`faults`] |
//! | zero-loss checks against the database and the broker | [`verify`] |
//! | termination message and step logs, parsed | [`report`] |
//! | the one CreateOrder request builder | [`requests`] |
//! | every log line typed JSON: the check and its offences | [`log_types`] |
//! | the scenarios (one concept per file: termination, faults, rolling update, set-up, figures) | [`scenario`] |
//!
//! # Why a simulator and not a cluster
//!
//! No cluster runs here, and the claim under test is about ordering and timing between
//! kubelet, the endpoints and the process: those are reproduced with their real parameters
//! (from the manifests), while the processes, the sockets, the signals and the services are real.

pub mod bins;
pub mod checks;
pub mod dashboards;
pub mod endpoints;
pub mod faults;
pub mod kubelet;
pub mod load;
pub mod log_types;
pub mod manifest;
pub mod payments;
pub mod pod;
pub mod report;
pub mod requests;
pub mod sandbox;
pub mod scenario;
pub mod verify;

use std::time::Duration;

use scenario::Outcome;

/// Runs `f` under a hard timeout: a hang fails the test instead of stalling the run.
pub use order_service::testing::hard_timeout;

/// Runs `sc` under the hard timeout `limit`, saves its figures as `report` (see
/// [`scenario::save_report`]) and prints them.
pub async fn run_scenario(sc: scenario::Scenario, report: &str, limit: Duration) -> Outcome {
    let o = hard_timeout(limit, scenario::terminate_under_load(sc)).await;
    scenario::save_report(report, &o.markdown());
    eprintln!("{}", o.markdown());
    o
}

/// Serialises the end-to-end tests of this machine (they each drive 1000 requests/s on two
/// cores): an exclusive `flock` on a file in the temp directory, held until dropped.
#[derive(Debug)]
pub struct Serial(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

/// Takes the machine-wide e2e lock (waits for it up to `within`).
pub fn serial(within: Duration) -> Serial {
    let path = std::env::temp_dir().join("quiesce-e2e.lock");
    let deadline = std::time::Instant::now() + within;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open the e2e lock file");
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Serial(lock),
            Err((f, _)) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "another end-to-end test held {} for {within:?}",
                    path.display()
                );
                file = f;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The checks every termination must pass whatever the fault: payment messages applied exactly
/// once, every committed event published, every acknowledged order stored, the successor
/// clean.
pub fn assert_nothing_lost(o: &Outcome) {
    let p = &o.payments;
    assert!(
        p.confirmed > 0,
        "{}: no payment message was published",
        o.name
    );
    assert!(
        p.problems.is_empty() && p.applied == p.confirmed && p.double_effects == 0,
        "{}: payment effects wrong ({} of {} applied, {} double): {:?}",
        o.name,
        p.applied,
        p.confirmed,
        p.double_effects,
        &p.problems[..p.problems.len().min(10)]
    );
    assert_eq!(
        p.queue_left, 0,
        "{}: payment messages left in the queue",
        o.name
    );
    assert_eq!(
        p.dead_lettered, 0,
        "{}: payment messages dead-lettered",
        o.name
    );
    let e = &o.events;
    assert!(e.committed > 0, "{}: no outbox event was committed", o.name);
    assert_eq!(e.unsent, 0, "{}: outbox rows never relayed", o.name);
    assert!(
        e.missing.is_empty(),
        "{}: {} of {} committed events never reached the events exchange, e.g. {:?}",
        o.name,
        e.committed - e.received_unique.min(e.committed),
        e.committed,
        e.missing
    );
    assert_eq!(
        o.orders.found, o.orders.acknowledged,
        "{}: orders acknowledged to clients are missing",
        o.name
    );
    assert_eq!(
        o.successor_exit,
        Some(0),
        "{}: the successor pod did not stop cleanly",
        o.name
    );
}

/// Zero failed requests among those sent to a routed pod, and the client kept its rate.
pub fn assert_no_failed_request(o: &Outcome) {
    assert!(
        o.load.routed().count() > 0,
        "{}: no request was routed",
        o.name
    );
    assert!(
        o.load.failed().is_empty(),
        "{}: {} of {} routed requests failed: {:?}",
        o.name,
        o.load.failed().len(),
        o.load.routed().count(),
        o.failures()
    );
    assert_eq!(
        o.load.saturated, 0,
        "{}: the client fell behind its rate",
        o.name
    );
}

/// The supervisor logged the start of the nine steps in order, and the app of its eight
/// sub-steps (steps 2 to 9) in order.
pub fn assert_steps_logged_in_order(o: &Outcome) {
    let wanted: Vec<&str> = report::steps().to_vec();
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

/// The termination message is there, complete (nine steps in order, a total) and its code is
/// `code`; the logs show the same steps started in order.
pub fn assert_story(o: &Outcome, code: i32) -> &report::Message {
    let m = o
        .message
        .as_ref()
        .unwrap_or_else(|| panic!("{}: no termination message\n{}", o.name, o.log_tail));
    assert_eq!(m.code, code, "{}: {}", o.name, m.text);
    assert_eq!(
        o.termination.exit_code,
        Some(code),
        "{}: {}",
        o.name,
        m.text
    );
    assert!(
        !o.termination.killed,
        "{}: kubelet had to SIGKILL\n{}",
        o.name, m.text
    );
    assert!(
        !o.liveness_failed,
        "{}: the liveness probe failed {} times in a row: kubelet would have restarted the pod",
        o.name, o.manifest.liveness.failure_threshold
    );
    if let Err(e) = m.is_complete() {
        panic!(
            "{}: incomplete termination message: {e}\n{}",
            o.name, m.text
        );
    }
    let wall = o.termination.wall().expect("the pod ended");
    assert!(
        wall < o.manifest.termination_grace,
        "{}: took {wall:?}, past the {:?} grace period",
        o.name,
        o.manifest.termination_grace
    );
    m
}
