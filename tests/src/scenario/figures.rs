//! The figures for docs/RELIABILITY.md: each outcome as a Markdown section, and
//! [`save_report`] to write one where `scripts/reliability.sh` collects it.

use std::fmt::Write as _;
use std::time::Duration;

use tokio::time::Instant;

use super::rolling::RollingOutcome;
use super::termination::Outcome;
use crate::load::{Kind, LoadResult};

impl Outcome {
    /// The figures as a Markdown section.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "### {}\n", self.name);
        self.load_table(&mut o);
        self.effects_table(&mut o);
        self.termination_line(&mut o);
        self.overhead_breakdown(&mut o);
        self.notes_list(&mut o);
        self.diagnostics(&mut o);
        o
    }

    fn load_table(&self, o: &mut String) {
        let l = &self.load;
        let routed = l.routed().count();
        let creates = l.routed().filter(|r| r.kind == Kind::Create).count();
        let _ = writeln!(
            o,
            "| requests sent (routed) | of which CreateOrder | failed | ticks with no endpoint | client saturated | rate | p50 / p99 / max latency (ms) |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---|");
        let _ = writeln!(
            o,
            "| {routed} | {creates} | {} | {} | {} | {} | {} |\n",
            l.failed().len(),
            l.unrouted(),
            l.saturated,
            rate_cell(l),
            latency_cell(l),
        );
    }

    fn effects_table(&self, o: &mut String) {
        let p = &self.payments;
        let e = &self.events;
        let _ = writeln!(
            o,
            "| payment messages (distinct / copies) | exactly one effect | unconfirmed | queued at exit | outbox events committed | received (unique / deliveries) | unsent at exit | acknowledged orders found |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            o,
            "| {} / {} | {} | {} | {} | {} | {} / {} | {} | {} / {} |\n",
            p.confirmed,
            p.copies,
            p.applied,
            p.unconfirmed,
            self.queued_at_exit,
            e.committed,
            e.received_unique,
            e.received,
            self.unsent_at_exit,
            self.orders.found,
            self.orders.acknowledged,
        );
    }

    fn termination_line(&self, o: &mut String) {
        let t = &self.termination;
        let fmt =
            |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.3} s", d.as_secs_f64()));
        let _ = writeln!(
            o,
            "Exit code {} (kubelet SIGKILL: {}); preStop hook {:.3} s; SIGTERM to exit {}; wall {}; \
             client stopped routing after {}, first failed readiness probe after {}; \
             supervisor overhead {} (own clock) / {} (kubelet's clock).\n",
            t.exit_code.map_or("-".into(), |c| c.to_string()),
            if t.killed { "yes" } else { "no" },
            t.prestop_took.as_secs_f64(),
            fmt(t
                .sigterm_at
                .zip(t.ended)
                .map(|(s, e)| e.saturating_duration_since(s))),
            fmt(t.wall()),
            fmt(self.unrouted_after),
            fmt(self.readiness_failed_after),
            fmt(self.supervisor_overhead()),
            fmt(self.wall_overhead()),
        );
    }

    /// Where the supervisor's overhead goes, by log arrival times (when it applies).
    fn overhead_breakdown(&self, o: &mut String) {
        if let (Some(last), Some(child), Some(exiting), Some(ended)) = (
            self.logs.last_app_step_at,
            self.logs.child_ended_at,
            self.logs.exiting_at,
            self.termination.ended,
        ) && self.overhead_applies().is_some()
        {
            let d = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
            let _ = writeln!(
                o,
                "Where the overhead goes (log arrival times): the app's last step → the supervisor reaps it {:.1} ms (the app's own exit after `close`); → the supervisor's `exiting` line {:.1} ms (leftover sweep, termination message); → the container has exited {:.1} ms.\n",
                d(last, child),
                d(child, exiting),
                d(exiting, ended),
            );
        }
    }

    /// The notes, and the supervisor's close/exit race when it happened.
    fn notes_list(&self, o: &mut String) {
        for n in &self.notes {
            let _ = writeln!(o, "- {n}");
        }
        if let Some(m) = &self.message
            && m.rows
                .iter()
                .any(|r| r.detail.contains("app exited with code 0 during this step"))
        {
            let _ = writeln!(
                o,
                "- the supervisor recorded close rows as `error` (\"app exited with code 0 during this step\") although the app replied and exited 0: its close/exit race"
            );
        }
        if !self.notes.is_empty() {
            o.push('\n');
        }
    }

    /// The timeline, the termination message and the app's step work.
    fn diagnostics(&self, o: &mut String) {
        if !self.timeline.is_empty() {
            let _ = writeln!(
                o,
                "Timeline (from the load's start): {}.\n",
                self.timeline.join("; ")
            );
        }
        if let Some(m) = &self.message {
            let _ = writeln!(o, "Termination message:\n\n```text\n{}```\n", m.text);
        }
        if !self.logs.app_finished.is_empty() {
            let steps: Vec<String> = self
                .logs
                .app_finished
                .iter()
                .map(|(s, d)| format!("{s} {d} ms"))
                .collect();
            let _ = writeln!(o, "App step work (its logs): {}.\n", steps.join(", "));
        }
    }
}

impl RollingOutcome {
    /// The figures as a Markdown section titled `name`.
    pub fn markdown(&self, name: &str) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "### {name}\n");
        self.load_table(&mut o);
        let _ = writeln!(
            o,
            "Payment messages {} distinct ({} copies), {} with exactly one effect; outbox events {} committed, {} received ({} deliveries); acknowledged orders found {} / {}.\n",
            self.payments.confirmed,
            self.payments.copies,
            self.payments.applied,
            self.events.committed,
            self.events.received_unique,
            self.events.received,
            self.orders.found,
            self.orders.acknowledged
        );
        self.terminations_table(&mut o);
        let _ = writeln!(o, "\nEndpoint changes: {}.\n", self.changes.join("; "));
        o
    }

    fn load_table(&self, o: &mut String) {
        let l = &self.load;
        let _ = writeln!(
            o,
            "| requests sent (routed) | failed | ticks with no endpoint | client saturated | rate | p50 / p99 / max latency (ms) | per pod |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---:|---:|---|---|");
        let per: Vec<String> = self
            .per_pod
            .iter()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect();
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            l.routed().count(),
            l.failed().len(),
            l.unrouted(),
            l.saturated,
            rate_cell(l),
            latency_cell(l),
            per.join(", ")
        );
    }

    fn terminations_table(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "| pod | exit code | preStop hook (s) | wall (s) | supervisor total (s) |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|");
        for (pod, t, m, _) in &self.terminations {
            let _ = writeln!(
                o,
                "| {pod} | {} | {:.3} | {} | {} |",
                t.exit_code.map_or("-".into(), |c| c.to_string()),
                t.prestop_took.as_secs_f64(),
                t.wall()
                    .map_or("-".into(), |w| format!("{:.3}", w.as_secs_f64())),
                m.as_ref()
                    .and_then(|m| m.total_ms)
                    .map_or("-".into(), |t| format!("{:.3}", t as f64 / 1000.0)),
            );
        }
    }
}

/// "<rate>/s over <elapsed> s": the rate the loop kept.
fn rate_cell(l: &LoadResult) -> String {
    format!("{}/s over {:.1} s", self_rate(l), l.elapsed.as_secs_f64())
}

/// "p50 / p99 / max" latency of routed requests, in milliseconds.
fn latency_cell(l: &LoadResult) -> String {
    format!(
        "{:.2} / {:.2} / {:.2}",
        l.latency_ms(50.0),
        l.latency_ms(99.0),
        l.latency_ms(100.0)
    )
}

fn self_rate(l: &LoadResult) -> u64 {
    if l.elapsed.is_zero() {
        return 0;
    }
    (l.ticks as f64 / l.elapsed.as_secs_f64()).round() as u64
}

/// Writes `text` to `$E2E_REPORT_DIR/<name>.md` when the variable is set.
pub fn save_report(name: &str, text: &str) {
    if let Some(dir) = std::env::var_os("E2E_REPORT_DIR") {
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{}.md", name.replace([' ', '/'], "-")));
        if let Err(e) = std::fs::write(&file, text) {
            eprintln!("e2e: cannot write {}: {e}", file.display());
        }
    }
}
