//! The nine shutdown steps as one table of data.
//!
//! The sequencer walks it; logs, metrics, `quiesce ctl status`, `check-config` and the termination message
//! all name steps from it. Steps that share a control verb (2–3 `drain`, 7–9 `close`) are sent to the app as
//! one request whose budget is the sum of theirs; the app's reply reports each as a sub-step.

use std::time::Duration;

/// Stable identity of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepId {
    HealthNotServing,
    StopAccepting,
    DrainInFlight,
    StopCron,
    StopConsumer,
    StopPoller,
    CloseMq,
    CloseRedis,
    CloseDb,
}

/// Who carries a step out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Supervisor,
    App,
}

/// One row of the table.
#[derive(Debug)]
pub struct Step {
    pub id: StepId,
    /// 1-based position, as the docs number them.
    pub number: u8,
    /// Name used in logs, metrics labels, the termination message and the app's sub-step replies.
    pub name: &'static str,
    /// The `[steps]` config key holding its budget.
    pub config_key: &'static str,
    pub owner: Owner,
    /// Control verb that carries it out (app steps only).
    pub verb: Option<&'static str>,
    pub default_budget: Duration,
    pub done_when: &'static str,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The documented order. Step 1's budget is always `prestop_delay` (default 0s, 5s in the shipped
/// manifests); steps 2-9 default to 23s, so with the manifests' 5s delay they fill the default 28s window
/// (30s grace period minus the 2s safety margin) exactly.
pub const STEPS: [Step; 9] = [
    Step {
        id: StepId::HealthNotServing,
        number: 1,
        name: "health-not-serving",
        config_key: "prestop_delay",
        owner: Owner::Supervisor,
        verb: None,
        default_budget: ms(0),
        done_when: "readiness NOT_SERVING and the preStop delay passed",
    },
    Step {
        id: StepId::StopAccepting,
        number: 2,
        name: "stop-accepting",
        config_key: "steps.stop_accepting",
        owner: Owner::App,
        verb: Some("drain"),
        default_budget: ms(1000),
        done_when: "listeners closed",
    },
    Step {
        id: StepId::DrainInFlight,
        number: 3,
        name: "drain-in-flight",
        config_key: "steps.drain_in_flight",
        owner: Owner::App,
        verb: Some("drain"),
        default_budget: ms(7000),
        done_when: "in-flight requests finished",
    },
    Step {
        id: StepId::StopCron,
        number: 4,
        name: "stop-cron",
        config_key: "steps.stop_cron",
        owner: Owner::App,
        verb: Some("stop-cron"),
        default_budget: ms(3000),
        done_when: "the running job finished",
    },
    Step {
        id: StepId::StopConsumer,
        number: 5,
        name: "stop-consumer",
        config_key: "steps.stop_consumer",
        owner: Owner::App,
        verb: Some("stop-consumer"),
        default_budget: ms(5000),
        done_when: "every delivered message acked or requeued",
    },
    Step {
        id: StepId::StopPoller,
        number: 6,
        name: "stop-poller",
        config_key: "steps.stop_poller",
        owner: Owner::App,
        verb: Some("stop-poller"),
        default_budget: ms(3000),
        done_when: "the current outbox batch finished",
    },
    Step {
        id: StepId::CloseMq,
        number: 7,
        name: "close-mq",
        config_key: "steps.close_mq",
        owner: Owner::App,
        verb: Some("close"),
        default_budget: ms(1000),
        done_when: "MQ connection closed",
    },
    Step {
        id: StepId::CloseRedis,
        number: 8,
        name: "close-redis",
        config_key: "steps.close_redis",
        owner: Owner::App,
        verb: Some("close"),
        default_budget: ms(1000),
        done_when: "Redis client closed",
    },
    Step {
        id: StepId::CloseDb,
        number: 9,
        name: "close-db",
        config_key: "steps.close_db",
        owner: Owner::App,
        verb: Some("close"),
        default_budget: ms(2000),
        done_when: "DB pool closed",
    },
];

/// The control verbs in the order they are sent, each with the indexes of the table rows it covers.
pub fn verbs() -> Vec<(&'static str, Vec<usize>)> {
    let mut out: Vec<(&'static str, Vec<usize>)> = Vec::new();
    for (i, s) in STEPS.iter().enumerate() {
        let Some(v) = s.verb else { continue };
        match out.last_mut() {
            Some((last, rows)) if *last == v => rows.push(i),
            _ => out.push((v, vec![i])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_numbered_in_order() {
        for (i, s) in STEPS.iter().enumerate() {
            assert_eq!(s.number as usize, i + 1, "{}", s.name);
            assert_eq!(s.owner == Owner::Supervisor, s.verb.is_none(), "{}", s.name);
        }
    }

    #[test]
    fn verbs_group_adjacent_rows() {
        let v = verbs();
        let names: Vec<&str> = v.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "drain",
                "stop-cron",
                "stop-consumer",
                "stop-poller",
                "close"
            ]
        );
        assert_eq!(v[0].1, [1, 2]);
        assert_eq!(v[4].1, [6, 7, 8]);
    }

    #[test]
    fn the_readme_step_table_is_this_table() {
        // `| # | step | owner | control verb | budget key | default |`, one row per step, in order.
        let readme = include_str!("../../README.md");
        let rows: Vec<Vec<&str>> = readme
            .lines()
            .filter(|l| l.starts_with("| ") && l[2..].starts_with(|c: char| c.is_ascii_digit()))
            .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
            .filter(|r: &Vec<&str>| r.len() == 6)
            .collect();
        assert_eq!(rows.len(), STEPS.len(), "README step table: {rows:?}");
        let cfg =
            crate::config::Config::resolve(crate::config::Layer::default()).expect("defaults");
        for ((row, step), budget) in rows.iter().zip(&STEPS).zip(cfg.budgets) {
            assert_eq!(row[0], step.number.to_string(), "{row:?}");
            let owner = match step.owner {
                Owner::Supervisor => "supervisor",
                Owner::App => "app",
            };
            assert_eq!(row[2], owner, "{row:?}");
            assert_eq!(
                row[3],
                step.verb.map_or("—".to_string(), |v| format!("`{v}`")),
                "{row:?}"
            );
            assert_eq!(row[4], format!("`{}`", step.config_key), "{row:?}");
            let default = humantime::format_duration(budget).to_string();
            assert!(row[5].starts_with(&default), "{row:?}: default {default}");
        }
    }

    #[test]
    fn default_budgets_fit_the_default_window() {
        // The resolved defaults, not the table alone: step 1's row and the config default must agree.
        let cfg =
            crate::config::Config::resolve(crate::config::Layer::default()).expect("defaults");
        assert_eq!(cfg.prestop_delay, STEPS[0].default_budget);
        let total: Duration = cfg.budgets.iter().sum();
        assert_eq!(total, Duration::from_secs(23));
        assert!(total <= cfg.stop_window());
        // With the shipped manifests' 5s preStop delay they fill the 28s window exactly.
        assert_eq!(total + Duration::from_secs(5), cfg.stop_window());
        assert!(crate::cli::budget_warning(&cfg).is_none());
    }
}
