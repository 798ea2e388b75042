//! Health for kubelet: the `grpc.health.v1.Health` service (Check and Watch) on the probe port.
//!
//! | service | SERVING when |
//! |---|---|
//! | `liveness` | the app process is alive and (control mode) its socket answers `status` in time |
//! | `readiness`, `""` and the names the app announces | hello seen, required dependencies up, no stop begun |
//! | `startup` | hello seen once (signal mode: the process started), no stop begun |
//!
//! Four parts, a file each: [`compute`] (here) is the pure rule above; [`track`] (main runtime) recomputes it whenever an input
//! changes and publishes a map on a watch channel; [`spawn_server`] answers probes from that map on its own
//! thread and runtime, so a busy supervisor never delays a probe. The [`poll`] task keeps an *observer*
//! connection to the app for `status` (liveness) and `health` (dependencies). The probe port is open to
//! every pod unless a NetworkPolicy says otherwise, so both servers on that thread are bounded ([`limits`]).

pub mod limits;
mod poll;
mod server;
mod track;

pub use poll::poll;
pub use server::{HealthSvc, bind, listener, spawn_server};
pub use track::track;

use std::collections::BTreeMap;

use quiesce_protocol::wire::HealthReply;
use tokio::sync::watch;

/// Service name → SERVING?
pub type Statuses = BTreeMap<String, bool>;

pub const LIVENESS: &str = "liveness";
pub const READINESS: &str = "readiness";
pub const STARTUP: &str = "startup";

/// Everything the rule looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    pub control: bool,
    pub alive: bool,
    pub hello: bool,
    pub deps_ok: bool,
    pub live_ok: bool,
    pub stopping: bool,
    pub services: Vec<String>,
}

/// The table in the module docs, as code.
pub fn compute(i: &Inputs) -> Statuses {
    let started = (if i.control { i.hello } else { i.alive }) && !i.stopping;
    let live = i.alive && (!i.control || i.live_ok);
    let ready = i.alive && !i.stopping && (!i.control || (i.hello && i.deps_ok));
    let mut m = Statuses::new();
    m.insert(LIVENESS.into(), live);
    m.insert(STARTUP.into(), started);
    m.insert(READINESS.into(), ready);
    m.insert(String::new(), ready);
    for s in &i.services {
        if !m.contains_key(s) {
            m.insert(s.clone(), ready);
        }
    }
    m
}

/// Watches fed by the observer poll.
#[derive(Debug)]
pub struct AppHealth {
    pub deps_ok: watch::Receiver<bool>,
    pub live_ok: watch::Receiver<bool>,
}

/// Why `service` has the answer [`compute`] gives it, in the words `quiesce ctl status` shows.
pub fn reason(i: &Inputs, service: &str, deps_down: &[String], live_why: &str) -> String {
    if !i.alive {
        return "the app is not running".into();
    }
    if service == LIVENESS {
        return match (i.control, i.live_ok) {
            (false, _) => "the app process is running".into(),
            (true, true) => "the app answers status on its control socket".into(),
            (true, false) if live_why.is_empty() => "the app does not answer status".into(),
            (true, false) => format!("the app does not answer status: {live_why}"),
        };
    }
    if i.stopping {
        return "the shutdown has begun".into();
    }
    if !i.control {
        return "the app process is running".into();
    }
    if !i.hello {
        return "the app has not said hello on its control socket yet".into();
    }
    if service == STARTUP {
        return "the app said hello".into();
    }
    match (i.deps_ok, deps_down.is_empty()) {
        (true, _) => "the app's required dependencies are up".into(),
        (false, true) => "no health answer from the app yet".into(),
        (false, false) => format!("{} down", deps_down.join(", ")),
    }
}

/// Whether a health reply says every required dependency is up. `required` empty: the app's own flags.
pub fn deps_up(reply: &HealthReply, required: &[String]) -> bool {
    if required.is_empty() {
        return reply.checks.iter().filter(|c| c.required).all(|c| c.up);
    }
    required
        .iter()
        .all(|name| reply.checks.iter().any(|c| &c.name == name && c.up))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            control: true,
            alive: true,
            hello: true,
            deps_ok: true,
            live_ok: true,
            stopping: false,
            services: vec!["order.v1.OrderService".into()],
        }
    }

    #[test]
    fn all_serving_when_all_is_well() {
        let m = compute(&inputs());
        assert!(m.values().all(|s| *s), "{m:?}");
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn dependency_outage_makes_unready_never_dead() {
        let m = compute(&Inputs {
            deps_ok: false,
            ..inputs()
        });
        assert!(m[LIVENESS] && m[STARTUP]);
        assert!(!m[READINESS] && !m[""] && !m["order.v1.OrderService"]);
    }

    #[test]
    fn frozen_app_fails_liveness_only() {
        let m = compute(&Inputs {
            live_ok: false,
            ..inputs()
        });
        assert!(!m[LIVENESS]);
        assert!(m[READINESS]);
    }

    #[test]
    fn stopping_turns_everything_but_liveness_off() {
        let m = compute(&Inputs {
            stopping: true,
            ..inputs()
        });
        assert!(m[LIVENESS]);
        assert!(!m[STARTUP]);
        assert!(!m[READINESS] && !m[""] && !m["order.v1.OrderService"]);
    }

    #[test]
    fn before_hello_nothing_but_liveness() {
        let m = compute(&Inputs {
            hello: false,
            services: vec![],
            ..inputs()
        });
        assert!(m[LIVENESS]);
        assert!(!m[STARTUP] && !m[READINESS]);
    }

    #[test]
    fn signal_mode_follows_the_process() {
        let base = Inputs {
            control: false,
            hello: false,
            deps_ok: false,
            live_ok: false,
            services: vec![],
            ..inputs()
        };
        assert!(compute(&base).values().all(|s| *s));
        let dead = compute(&Inputs {
            alive: false,
            ..base
        });
        assert!(dead.values().all(|s| !*s));
    }

    #[test]
    fn required_list_overrides_app_flags() {
        use quiesce_protocol::wire::CheckReply;
        let c = |name: &str, required: bool, up: bool| CheckReply {
            name: name.into(),
            required,
            up,
            latency_ms: 1.0,
            error: None,
        };
        let reply = HealthReply {
            ok: true,
            healthy: false,
            checks: vec![
                c("db", true, true),
                c("cache", false, false),
                c("mq", true, false),
            ],
        };
        assert!(!deps_up(&reply, &[]));
        assert!(deps_up(&reply, &["db".into()]));
        assert!(!deps_up(&reply, &["db".into(), "missing".into()]));
    }
}
