//! The expected outcome of each fault variant, shared by the short (CI) and full runs.

use std::time::Duration;

use crate::scenario::Outcome;
use crate::{assert_no_failed_request, assert_nothing_lost, assert_story};

/// The consumer step cannot finish: it is cut at its budget, the message names it with what it
/// abandoned, the steps after it still run, the exit is clean and nothing is lost.
pub fn consumer_hang(o: &Outcome) {
    let m = assert_story(o, 0);
    let budget = o.plan.budget("stop_consumer").expect("steps.stop_consumer");
    let row = m.step("stop-consumer").expect("a stop-consumer row");
    let took = Duration::from_millis(row.took_ms);
    assert!(
        took + Duration::from_millis(1000) >= budget && took <= budget + Duration::from_millis(500),
        "stop-consumer took {took:?}, expected to be cut near its {budget:?} budget\n{}",
        m.text
    );
    assert!(
        row.detail.contains("abandoned"),
        "the message does not say what stop-consumer abandoned\n{}",
        m.text
    );
    let counts = o.logs.counts("stop-consumer").unwrap_or("");
    assert!(
        counts.contains("abandoned") && counts.contains("1"),
        "the supervisor's step end log lacks the counts: {counts}"
    );
    for name in ["stop-poller", "close-mq", "close-redis", "close-db"] {
        let r = m.step(name).expect("row");
        assert_ne!(
            r.outcome, "skipped",
            "{name} skipped after the stuck step\n{}",
            m.text
        );
    }
    assert_no_failed_request(o);
    assert_nothing_lost(o);
}

/// The app dies of SIGKILL during step 5: the exit code says so (137, never hidden), the
/// message names the step it died in and skips the rest, quiesce exits at once (well before
/// the grace period), and the successor recovers everything.
pub fn app_crash(o: &Outcome) {
    let m = assert_story(o, 137);
    let died_in = m.step("stop-consumer").expect("a stop-consumer row");
    assert_ne!(died_in.outcome, "ok", "{}", m.text);
    for name in ["stop-poller", "close-mq", "close-redis", "close-db"] {
        let r = m.step(name).expect("row");
        assert_eq!(r.outcome, "skipped", "{name} after the crash\n{}", m.text);
    }
    assert!(
        m.text.contains("SIGKILL") || m.text.contains("signal 9"),
        "the message does not say the app was killed\n{}",
        m.text
    );
    let budget = o.plan.budget("stop_consumer").expect("steps.stop_consumer");
    let wall = o.termination.wall().expect("ended");
    assert!(
        wall < o.plan.prestop_delay + budget,
        "quiesce waited {wall:?} after the crash instead of exiting at once\n{}",
        m.text
    );
    assert_no_failed_request(o);
    assert_nothing_lost(o);
}

/// PostgreSQL stops when step 3 starts, with CreateOrder calls in flight: those answer
/// UNAVAILABLE (retryable) at once instead of hanging, every step still runs in order inside
/// the grace period, and after PostgreSQL is back nothing acknowledged or committed is lost.
pub fn postgres_stop(o: &Outcome) {
    let m = assert_story(o, 0);
    assert_eq!(o.held.len(), 4, "held calls: {:?}", o.held);
    for r in &o.held {
        match &r.result {
            Err((code, _)) => assert_eq!(
                *code,
                tonic::Code::Unavailable,
                "a held CreateOrder failed with a non-retryable code: {:?}",
                r.result
            ),
            Ok(()) => panic!(
                "a held CreateOrder succeeded while its key was held and the database stopped"
            ),
        }
    }
    let drain = m.step("drain-in-flight").expect("row");
    assert!(
        !drain.detail.contains("requests_cancelled=1")
            && !drain.detail.contains("requests_cancelled=2")
            && !drain.detail.contains("requests_cancelled=3")
            && !drain.detail.contains("requests_cancelled=4"),
        "in-flight requests had to be cancelled instead of failing fast\n{}",
        m.text
    );
    assert_no_failed_request(o);
    assert_nothing_lost(o);
}

/// RabbitMQ restarts shortly before the termination: a clean stop, no failed request, nothing
/// lost (what could not be relayed or consumed meanwhile is, by this pod or its successor).
pub fn rabbit_restart(o: &Outcome) {
    let m = assert_story(o, 0);
    for r in m.numbered() {
        assert_ne!(r.outcome, "skipped", "{}", m.text);
    }
    assert_no_failed_request(o);
    assert_nothing_lost(o);
}
