//! The nine shutdown steps as one table of data, and the supervisor's own rows of the shutdown story.
//!
//! The table itself lives in the protocol crate ([`quiesce_protocol::wire::STEPS`]): the app's agent orders
//! its sub-steps by it, the supervisor walks it. Logs, metrics labels, `quiesce ctl status`, `check-config`,
//! the `[steps]` budgets and the termination message all name steps from it. Steps that share a control
//! verb (2–3 `drain`, 7–9 `close`) are sent to the app as one request; its reply reports each as a
//! sub-step.

use quiesce_protocol::wire::StepVerb;
pub use quiesce_protocol::wire::{STEPS, Step};

/// The supervisor's own rows of the shutdown story, besides the nine steps (numbered 0, shown `-`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extra {
    /// Signal mode (or control mode without a connection): the stop signal and the app's end.
    StopSignal,
    /// The overall deadline's SIGTERM and SIGKILL.
    Deadline,
    /// Control mode: the app did not exit after its last step.
    AppExit,
    /// Leftover processes: SIGTERM, then SIGKILL.
    Cleanup,
}

impl Extra {
    pub const fn name(self) -> &'static str {
        match self {
            Extra::StopSignal => "stop-signal",
            Extra::Deadline => "deadline",
            Extra::AppExit => "app-exit",
            Extra::Cleanup => "cleanup",
        }
    }
}

/// The control verbs in the order they are sent, each with the indexes of the table rows it covers.
pub fn verbs() -> Vec<(StepVerb, Vec<usize>)> {
    let mut out: Vec<(StepVerb, Vec<usize>)> = Vec::new();
    for (i, s) in STEPS.iter().enumerate() {
        let Some(v) = s.verb() else { continue };
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

    /// Who carries a step out, as README's table says it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Owner {
        Supervisor,
        App,
    }

    fn owner(step: &Step) -> Owner {
        match step.substep {
            Some(_) => Owner::App,
            None => Owner::Supervisor,
        }
    }
    use std::time::Duration;

    #[test]
    fn table_is_numbered_in_order() {
        for (i, s) in STEPS.iter().enumerate() {
            assert_eq!(s.number as usize, i + 1, "{}", s.name);
            assert_eq!(
                owner(s) == Owner::Supervisor,
                s.verb().is_none(),
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn verbs_group_adjacent_rows() {
        let v = verbs();
        let names: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
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
            let owner = match owner(step) {
                Owner::Supervisor => "supervisor",
                Owner::App => "app",
            };
            assert_eq!(row[2], owner, "{row:?}");
            assert_eq!(
                row[3],
                step.verb().map_or("—".to_string(), |v| format!("`{v}`")),
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
