//! Typed log fields: every line a pod prints (the supervisor's, the app's agent's and the
//! app's own) is one JSON object whose fields keep their types — numbers as JSON numbers, maps
//! and lists nested — and never carry a string of escaped JSON or Rust debug output
//! (`Some(…)`, `[StopAccepting, …]`, `"quoted"`). [`offences`] names every field that breaks
//! this, with its line, so one run shows all of them.

use std::fmt;

use serde_json::Value;

use crate::pod::LogLine;

/// Who printed a line, from its `target` (the supervisor logs without one; the app's lines
/// carry their module path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Supervisor,
    Agent,
    App,
    /// A library inside the app process (lapin, sqlx, tonic, …).
    AppLibrary,
    /// Not a JSON object at all.
    Unparsed,
}

impl Source {
    pub fn of(line: &Value) -> Source {
        match line.get("target").and_then(Value::as_str) {
            None => Source::Supervisor,
            Some(t) if t.starts_with("quiesce_protocol::agent") => Source::Agent,
            Some(t) if t == "order_service" || t.starts_with("order_service::") => Source::App,
            Some(_) => Source::AppLibrary,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Supervisor => "supervisor",
            Source::Agent => "agent",
            Source::App => "app",
            Source::AppLibrary => "app library",
            Source::Unparsed => "not JSON",
        })
    }
}

/// One field that is not typed as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offence {
    pub source: Source,
    /// The field's path (`counts.in_flight` for a nested one; empty for a line that is not JSON).
    pub field: String,
    pub why: &'static str,
    pub line: String,
}

impl fmt::Display for Offence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] `{}`: {} in {}",
            self.source, self.field, self.why, self.line
        )
    }
}

/// Every offence in `lines` (empty lines are skipped).
pub fn offences(lines: &[LogLine]) -> Vec<Offence> {
    let mut out = Vec::new();
    for l in lines.iter().filter(|l| !l.text.trim().is_empty()) {
        let Some(Value::Object(fields)) = l.json() else {
            out.push(Offence {
                source: Source::Unparsed,
                field: String::new(),
                why: "the line is not a JSON object",
                line: l.text.clone(),
            });
            continue;
        };
        let source = Source::of(&Value::Object(fields.clone()));
        for (name, value) in &fields {
            check(name, value, &mut |field, why| {
                out.push(Offence {
                    source,
                    field,
                    why,
                    line: l.text.clone(),
                });
            });
        }
    }
    out
}

/// Checks `value` (at `path`) and what it nests.
fn check(path: &str, value: &Value, report: &mut impl FnMut(String, &'static str)) {
    match value {
        Value::String(s) => {
            if let Some(why) = untyped_text(path, s) {
                report(path.to_owned(), why);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                check(&format!("{path}.{k}"), v, report);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                check(&format!("{path}[{i}]"), v, report);
            }
        }
        Value::Number(_) | Value::Bool(_) | Value::Null => {}
    }
}

/// Why a string field is not what it should be, if it is not.
fn untyped_text(path: &str, s: &str) -> Option<&'static str> {
    let t = s.trim();
    if t.starts_with('{') || t.starts_with('[') {
        return Some("a string that looks like JSON or a debug-printed list (nest it instead)");
    }
    if path != "message" && !t.is_empty() && t.parse::<f64>().is_ok() {
        return Some("a number written as a string");
    }
    if s.contains('"') {
        return Some("a string holding quotes (escaped JSON or `{:?}` output)");
    }
    if t == "None" || ["Some(", "Ok(", "Err("].iter().any(|d| s.contains(d)) {
        return Some("Rust debug output (`Some(…)`, `None`, `Ok(…)`)");
    }
    if debug_struct(s) {
        return Some("Rust debug output of a struct (`Name { field: … }`)");
    }
    None
}

/// `Name { …` with a capitalised name: how `{:?}` prints a struct.
fn debug_struct(s: &str) -> bool {
    s.match_indices(" { ").any(|(i, _)| {
        let word = s[..i]
            .rsplit(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or("");
        word.chars().next().is_some_and(char::is_uppercase)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(texts: &[&str]) -> Vec<LogLine> {
        let at = tokio::time::Instant::now();
        texts
            .iter()
            .map(|t| LogLine {
                at,
                text: (*t).to_owned(),
            })
            .collect()
    }

    #[test]
    fn typed_lines_pass() {
        let ok = lines(&[
            r#"{"timestamp":"2026-12-02T06:00:00.000001Z","level":"INFO","message":"sub-step finished","step":3,"verb":"drain","substep":"drain-in-flight","outcome":"ok","duration_ms":4,"counts":{"requests_drained":2},"local":false,"target":"quiesce_protocol::agent::sequence"}"#,
            r#"{"level":"INFO","message":"step start","step":"stop-cron","budgets_ms":[1000,7000]}"#,
            "",
        ]);
        assert_eq!(offences(&ok), vec![]);
    }

    #[test]
    fn every_untyped_field_is_named_with_its_source() {
        let bad = lines(&[
            r#"{"level":"INFO","message":"step end","counts":"{\"in_flight\":0}","substep_budgets_ms":"Some([1000, 7000])","registered":"[StopAccepting, DrainInFlight]"}"#,
            r#"{"level":"INFO","message":"x","duration_ms":"12","counts":{"a":"3"},"target":"order_service::control"}"#,
            r#"{"level":"WARN","message":"y","error":"Config { url: x }","target":"quiesce_protocol::agent::server"}"#,
            "not json",
        ]);
        let mut found: Vec<(Source, String)> = offences(&bad)
            .into_iter()
            .map(|o| (o.source, o.field))
            .collect();
        found.sort();
        let wanted = [
            (Source::Supervisor, "counts"),
            (Source::Supervisor, "registered"),
            (Source::Supervisor, "substep_budgets_ms"),
            (Source::Agent, "error"),
            (Source::App, "counts.a"),
            (Source::App, "duration_ms"),
            (Source::Unparsed, ""),
        ];
        let wanted: Vec<(Source, String)> =
            wanted.iter().map(|(s, f)| (*s, (*f).to_owned())).collect();
        assert_eq!(found, wanted);
    }
}
