//! Results per rule and their two renderings: one text line per rule (status, section, id,
//! title, and the reason when it did not pass) plus a summary line, or one JSON document for
//! machines (`--json`). Statuses: `pass`; `fail` (a MUST rule broken); `warn` (a SHOULD rule
//! broken: reported, but the run still succeeds); `n-a` (the app does not offer what the rule is
//! about, e.g. the no-supervisor path, or the kit cannot check it here, e.g. not root).

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::rules::{Level, Rule, Scenario};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Warn,
    NotApplicable,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Warn => "warn",
            Status::NotApplicable => "n-a",
        }
    }
}

/// The results recorded so far, checked against the catalogue.
#[derive(Debug)]
pub struct Report {
    rules: Vec<Rule>,
    results: HashMap<&'static str, (Status, Option<String>)>,
}

impl Report {
    pub fn new(rules: Vec<Rule>) -> Report {
        Report {
            rules,
            results: HashMap::new(),
        }
    }

    fn rule(&self, id: &str) -> Rule {
        match self.rules.iter().find(|r| r.id == id) {
            Some(rule) => *rule,
            None => panic!("rule `{id}` is not in the catalogue"),
        }
    }

    /// Records `id` as passed (`Ok`) or broken (`Err(reason)`); the first result for a rule wins,
    /// so a scenario may record a failure early and a later `pass` does not overwrite it.
    pub fn check(&mut self, id: &'static str, result: Result<(), String>) {
        let rule = self.rule(id);
        let entry = match result {
            Ok(()) => (Status::Pass, None),
            Err(reason) if rule.level == Level::Should => (Status::Warn, Some(reason)),
            Err(reason) => (Status::Fail, Some(reason)),
        };
        self.results.entry(rule.id).or_insert(entry);
    }

    /// Records `id` as not applicable, with why.
    pub fn not_applicable(&mut self, id: &'static str, reason: String) {
        let rule = self.rule(id);
        self.results
            .entry(rule.id)
            .or_insert((Status::NotApplicable, Some(reason)));
    }

    /// Marks every rule of `scenario` without a result as failed (warned, for SHOULD rules):
    /// the scenario stopped before checking it, for `why`.
    pub fn abort(&mut self, scenario: Scenario, why: &str) {
        let open: Vec<&'static str> = self
            .rules
            .iter()
            .filter(|r| r.scenario == scenario && !self.results.contains_key(r.id))
            .map(|r| r.id)
            .collect();
        for id in open {
            self.check(id, Err(format!("not checked: {why}")));
        }
    }

    fn entries(&self) -> Vec<(Rule, Status, Option<String>)> {
        self.rules
            .iter()
            .map(|r| match self.results.get(r.id) {
                Some((status, reason)) => (*r, *status, reason.clone()),
                None => (
                    *r,
                    Status::Fail,
                    Some("not checked (a bug in the kit)".to_owned()),
                ),
            })
            .collect()
    }

    fn count(&self, status: Status) -> usize {
        self.entries()
            .iter()
            .filter(|(_, s, _)| *s == status)
            .count()
    }

    /// No rule failed.
    pub fn conformant(&self) -> bool {
        self.count(Status::Fail) == 0
    }

    fn summary(&self) -> String {
        format!(
            "{} rules: {} pass, {} fail, {} warn, {} n-a: {}",
            self.rules.len(),
            self.count(Status::Pass),
            self.count(Status::Fail),
            self.count(Status::Warn),
            self.count(Status::NotApplicable),
            if self.conformant() {
                "conformant"
            } else {
                "NOT conformant"
            }
        )
    }

    /// One line per rule, then the summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (rule, status, reason) in self.entries() {
            let section = format!("§{}", rule.section);
            out.push_str(&format!(
                "{:<4}  {section:<7} {:<26} {}",
                status.as_str(),
                rule.id,
                rule.title
            ));
            if let Some(reason) = reason {
                out.push_str(" — ");
                out.push_str(&reason);
            }
            out.push('\n');
        }
        out.push_str(&format!("summary: {}\n", self.summary()));
        out
    }

    /// The machine-readable report.
    pub fn json(&self, command: &[String]) -> Value {
        let rules: Vec<Value> = self
            .entries()
            .into_iter()
            .map(|(rule, status, reason)| {
                json!({
                    "id": rule.id,
                    "section": rule.section,
                    "level": if rule.level == Level::Must { "must" } else { "should" },
                    "title": rule.title,
                    "status": status.as_str(),
                    "reason": reason,
                })
            })
            .collect();
        json!({
            "protocol": 1,
            "command": command,
            "conformant": self.conformant(),
            "summary": {
                "total": self.rules.len(),
                "pass": self.count(Status::Pass),
                "fail": self.count(Status::Fail),
                "warn": self.count(Status::Warn),
                "n-a": self.count(Status::NotApplicable),
            },
            "rules": rules,
        })
    }
}
