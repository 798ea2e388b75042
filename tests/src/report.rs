//! Reading the story of a termination back: the termination message (`N  step  outcome  start
//! took  detail` rows, a `total:` line) and the JSON logs (the supervisor's "step start" /
//! "step end", the app process's "sub-step started" / "sub-step finished" with `duration_ms`,
//! logged by its agent), and the supervisor's overhead computed from them.

use std::time::Duration;

use crate::pod::LogLine;

/// The nine steps' names in order, as the supervisor names them (the protocol's step table).
pub fn steps() -> [&'static str; 9] {
    order_service::control::STEPS.map(|s| s.name)
}

/// One row of the termination message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// 1–9, or `None` for bookkeeping rows (`-`).
    pub number: Option<u8>,
    pub name: String,
    pub outcome: String,
    pub start_ms: u64,
    pub took_ms: u64,
    pub detail: String,
}

/// The parsed termination message.
#[derive(Debug, Clone)]
pub struct Message {
    pub code: i32,
    pub reason: String,
    pub rows: Vec<Row>,
    pub total_ms: Option<u64>,
    pub text: String,
}

impl Message {
    /// The row of step `name`.
    pub fn step(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// The numbered rows in message order.
    pub fn numbered(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.number.is_some()).collect()
    }

    /// Complete: a header, all nine steps numbered 1..9 in order, a total.
    pub fn is_complete(&self) -> Result<(), String> {
        let names: Vec<&str> = self.numbered().iter().map(|r| r.name.as_str()).collect();
        if names != steps() {
            return Err(format!("steps {names:?}, expected {:?}", steps()));
        }
        for (i, r) in self.numbered().iter().enumerate() {
            if r.number != Some(i as u8 + 1) {
                return Err(format!("row {} numbered {:?}", r.name, r.number));
            }
        }
        if self.total_ms.is_none() {
            return Err("no total line".into());
        }
        Ok(())
    }
}

fn secs_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('s')?;
    let (whole, frac) = s.split_once('.')?;
    Some(whole.parse::<u64>().ok()? * 1000 + frac.parse::<u64>().ok()?)
}

/// Parses the supervisor's termination message.
pub fn parse_message(text: &str) -> Result<Message, String> {
    let mut lines = text.lines();
    let head = lines.next().ok_or("empty termination message")?;
    let rest = head
        .strip_prefix("quiesce: exit code ")
        .ok_or_else(|| format!("first line {head:?} is not `quiesce: exit code N - reason`"))?;
    let (code, reason) = rest
        .split_once(" - ")
        .ok_or_else(|| format!("first line {head:?} has no ` - reason`"))?;
    let code = code
        .trim()
        .parse()
        .map_err(|_| format!("exit code {code:?} is not a number"))?;
    let mut rows = Vec::new();
    let mut total_ms = None;
    for line in lines {
        if let Some(t) = line.strip_prefix("total: ") {
            total_ms = secs_ms(t.trim());
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(n), Some(name), Some(outcome), Some(start), Some(took)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        let number = if n == "-" {
            None
        } else if let Ok(n) = n.parse::<u8>() {
            Some(n)
        } else {
            continue;
        };
        let (Some(start_ms), Some(took_ms)) = (secs_ms(start), secs_ms(took)) else {
            continue;
        };
        // The detail is what follows the fifth column, as written.
        let detail = line
            .split_once(took)
            .map(|(_, d)| d.trim().to_owned())
            .unwrap_or_default();
        rows.push(Row {
            number,
            name: name.to_owned(),
            outcome: outcome.to_owned(),
            start_ms,
            took_ms,
            detail,
        });
    }
    Ok(Message {
        code,
        reason: reason.to_owned(),
        rows,
        total_ms,
        text: text.to_owned(),
    })
}

/// What the logs say about the steps.
#[derive(Debug, Clone, Default)]
pub struct StepLogs {
    /// Supervisor "step start" lines: step names in log order.
    pub supervisor_started: Vec<String>,
    /// Supervisor "step end" lines: (step, outcome, duration_ms, counts as logged).
    pub supervisor_ended: Vec<(String, String, u64, String)>,
    /// The app's agent's "sub-step started": sub-step names in log order.
    pub app_started: Vec<String>,
    /// The app's agent's "sub-step finished" (a warning when not clean): (sub-step, duration_ms).
    pub app_finished: Vec<(String, u64)>,
    /// The supervisor's last line: `exiting` with code and reason.
    pub exiting: Option<(i64, String)>,
    /// When the app's last sub-step line, the supervisor's "child ended" and its "exiting"
    /// lines arrived (for the overhead's breakdown).
    pub last_app_step_at: Option<tokio::time::Instant>,
    pub child_ended_at: Option<tokio::time::Instant>,
    pub exiting_at: Option<tokio::time::Instant>,
}

impl StepLogs {
    /// The counts the supervisor logged at the end of `step` (as text), if any.
    pub fn counts(&self, step: &str) -> Option<&str> {
        self.supervisor_ended
            .iter()
            .find(|(s, ..)| s == step)
            .map(|(.., c)| c.as_str())
    }

    /// The app's own time in its stop functions (the sum of its sub-step durations).
    pub fn app_work(&self) -> Duration {
        Duration::from_millis(self.app_finished.iter().map(|(_, d)| d).sum())
    }
}

fn field<'a>(v: &'a serde_json::Value, k: &str) -> Option<&'a serde_json::Value> {
    v.get(k).or_else(|| v.get("fields").and_then(|f| f.get(k)))
}

/// Extracts the step lines from a pod's output.
pub fn step_logs(lines: &[LogLine]) -> StepLogs {
    let mut out = StepLogs::default();
    for l in lines {
        let Some(v) = l.json() else { continue };
        let msg = field(&v, "message").and_then(|m| m.as_str()).unwrap_or("");
        let s = |k: &str| {
            field(&v, k)
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_owned()
        };
        let n = |k: &str| {
            field(&v, k)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        match msg {
            "step start" => out.supervisor_started.push(s("step")),
            "step end" => out.supervisor_ended.push((
                s("step"),
                s("outcome"),
                n("duration_ms"),
                field(&v, "counts")
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
            )),
            "sub-step started" => out.app_started.push(s("substep")),
            "sub-step finished" => {
                out.app_finished.push((s("substep"), n("duration_ms")));
                out.last_app_step_at = Some(l.at);
            }
            "child ended" => out.child_ended_at = Some(l.at),
            "exiting" if field(&v, "code").is_some() => {
                let code = field(&v, "code")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(-1);
                out.exiting = Some((code, s("reason")));
                out.exiting_at = Some(l.at);
            }
            _ => {}
        }
    }
    out
}

/// Milliseconds with one decimal, for tables.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "quiesce: exit code 0 - stop by preStop hook: app exited with code 0\n\
mode: control   stop requested by: preStop hook   window: 28.000s\n \
#  step                 outcome     start     took  detail\n \
1  health-not-serving   ok         0.000s   5.001s  readiness NOT_SERVING; preStop delay 5s\n \
2  stop-accepting       ok         5.002s   0.001s  in_flight=0 listener_closed=1\n \
5  stop-consumer        ok         5.010s   4.900s  1 handler(s) still running; abandoned=1 <-\n \
-  cleanup              ok         5.300s   0.010s  leftover processes exited after SIGTERM\n\
total: 5.321s\n";

    #[test]
    fn parses_rows_total_and_header() {
        let m = parse_message(SAMPLE).expect("parses");
        assert_eq!(m.code, 0);
        assert!(m.reason.starts_with("stop by preStop hook"));
        assert_eq!(m.rows.len(), 4);
        assert_eq!(m.rows[0].number, Some(1));
        assert_eq!(m.rows[0].took_ms, 5001);
        assert_eq!(m.rows[2].name, "stop-consumer");
        assert!(m.rows[2].detail.contains("abandoned=1"));
        assert_eq!(m.rows[3].number, None);
        assert_eq!(m.total_ms, Some(5321));
        assert!(m.is_complete().is_err(), "only 3 of 9 steps");
    }

    #[test]
    fn counts_each_app_step_once_from_its_agents_lines() {
        let at = tokio::time::Instant::now();
        let line = |text: &str| LogLine {
            at,
            text: text.to_owned(),
        };
        let lines = [
            line(
                r#"{"level":"INFO","message":"sub-step started","step":4,"substep":"stop-cron","budget_ms":3000}"#,
            ),
            line(
                r#"{"level":"INFO","message":"sub-step finished","step":4,"substep":"stop-cron","duration_ms":3}"#,
            ),
            line(
                r#"{"level":"INFO","message":"step finished","verb":"stop-cron","duration_ms":4}"#,
            ),
            line(
                r#"{"level":"WARN","message":"sub-step finished","step":5,"substep":"stop-consumer","outcome":"timeout","duration_ms":4900,"note":"1 handler(s) abandoned"}"#,
            ),
            line(
                r#"{"level":"INFO","message":"step finished","verb":"stop-consumer","duration_ms":4901}"#,
            ),
        ];
        let logs = step_logs(&lines);
        assert_eq!(logs.app_finished.len(), 2, "{:?}", logs.app_finished);
        assert_eq!(logs.app_work(), Duration::from_millis(4903));
    }

    #[test]
    fn refuses_a_message_without_its_header() {
        assert!(parse_message("total: 1.000s\n").is_err());
        assert!(parse_message("").is_err());
    }
}
