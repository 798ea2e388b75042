//! The client side of the admin socket, built into the same binary so distroless images need no shell,
//! socat or curl: `quiesce prestop`, `quiesce ctl status`, `quiesce ctl shutdown`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use quiesce_protocol::client::{Client, ClientError};
use serde_json::Value;

use crate::exit::code;

/// Sends one verb and returns the JSON reply, or a one-line reason with the exit code to use:
/// [`code::UNREACHABLE`] when the supervisor could not be reached or did not answer, [`code::REFUSED`] when
/// it answered with a refusal.
pub fn call(socket: &Path, verb: &str, timeout: Duration) -> Result<Value, (i32, String)> {
    runtime()?.block_on(async {
        let mut client = connect(socket).await?;
        let v = client
            .call_raw(verb, timeout)
            .await
            .map_err(|e| exchange_error(socket, verb, timeout, e))?;
        accepted(socket, verb, v)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, (i32, String)> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            (
                code::INTERNAL,
                format!("cannot start the async runtime: {e}"),
            )
        })
}

async fn connect(socket: &Path) -> Result<Client, (i32, String)> {
    Client::connect(socket).await.map_err(|e| {
        let why = match &e {
            ClientError::Connect { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        (
            code::UNREACHABLE,
            format!(
                "cannot reach the supervisor at its admin socket {}: {why}; is quiesce running as this container's entrypoint with this admin_socket?",
                socket.display()
            ),
        )
    })
}

/// A reply that did not come: the supervisor is unreachable for this client ([`code::UNREACHABLE`]).
fn exchange_error(socket: &Path, verb: &str, timeout: Duration, e: ClientError) -> (i32, String) {
    let why = match e {
        ClientError::Timeout { .. } => format!(
            "no answer to `{verb}` within {}",
            humantime::format_duration(timeout)
        ),
        ClientError::Closed { .. } => {
            format!("the supervisor closed the connection before answering `{verb}`")
        }
        ClientError::InvalidReply { reason, .. } => {
            format!("the answer to `{verb}` is not a valid reply ({reason})")
        }
        ClientError::Send { source, .. } | ClientError::Receive { source, .. } => {
            format!("`{verb}` failed: {source}")
        }
        other => other.to_string(),
    };
    (
        code::UNREACHABLE,
        format!("admin socket {}: {why}", socket.display()),
    )
}

/// The reply itself, or its refusal as [`code::REFUSED`].
fn accepted(socket: &Path, verb: &str, v: Value) -> Result<Value, (i32, String)> {
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        return Ok(v);
    }
    let msg = v
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("refused");
    let err = v.get("error").and_then(Value::as_str).unwrap_or("refused");
    Err((
        code::REFUSED,
        format!(
            "the supervisor at {} refused `{verb}` ({err}): {msg}",
            socket.display()
        ),
    ))
}

/// The human form of `ctl status`.
pub fn render_status(v: &Value) -> String {
    let s = |k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_default()
    };
    let mut out = String::new();
    let _ = writeln!(out, "phase:      {}", s("phase"));
    let _ = writeln!(out, "mode:       {}", s("mode"));
    let _ = writeln!(out, "supervisor: pid {}", s("pid"));
    let child = match (
        v.get("child_pid").and_then(Value::as_i64),
        v.get("child_end").and_then(Value::as_str),
    ) {
        (Some(p), Some(end)) => format!("pid {p}, {end}"),
        (Some(p), None) => format!("pid {p}, running"),
        _ => "not started".into(),
    };
    let _ = writeln!(out, "child:      {child}");
    let _ = writeln!(out, "control:    {}", s("control"));
    if let Some(t) = v.get("trigger").filter(|t| !t.is_null()) {
        let what = t
            .get("detail")
            .and_then(Value::as_str)
            .or_else(|| t.get("kind").and_then(Value::as_str))
            .unwrap_or("?");
        let _ = writeln!(
            out,
            "stop:       requested by {what}, {} ms ago",
            s("stop_elapsed_ms")
        );
    }
    let _ = writeln!(out, "reaped:     {} processes", s("zombies_reaped"));
    render_health(&mut out, v);
    let mut steps = v
        .get("steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // Steps under way, as rows whose outcome is `running` and whose time is their budget.
    steps.extend(running(v).iter().map(|r| {
        serde_json::json!({"number": r.get("number"), "name": r.get("name"), "outcome": "running",
            "started_ms": r.get("started_ms"), "duration_ms": "-",
            "detail": format!("budget {} ms", text(r, "budget_ms"))})
    }));
    if steps.is_empty() {
        let _ = writeln!(out, "steps:      none run yet");
    } else {
        render_steps(&mut out, &steps);
    }
    out
}

/// The step rows of `ctl status`, as the status JSON has them.
fn render_steps(out: &mut String, steps: &[Value]) {
    let _ = writeln!(
        out,
        "\n{:>2}  {:<20} {:<8} {:>9} {:>9}  detail",
        "#", "step", "outcome", "start ms", "took ms"
    );
    for st in steps {
        let n = st.get("number").and_then(Value::as_u64).unwrap_or(0);
        let num = if n == 0 { "-".into() } else { n.to_string() };
        let g = |k: &str| {
            st.get(k)
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| x.to_string())
                })
                .unwrap_or_default()
        };
        let mut detail = g("detail");
        if let Some(c) = st.get("counts").and_then(Value::as_object) {
            for (k, val) in c {
                let _ = write!(detail, " {k}={val}");
            }
        }
        let _ = writeln!(
            out,
            "{num:>2}  {:<20} {:<8} {:>9} {:>9}  {}",
            g("name"),
            g("outcome"),
            g("started_ms"),
            g("duration_ms"),
            // The app's text is data: an escape sequence in it must not reach the operator's terminal.
            crate::report::escape_controls(detail.trim())
        );
    }
}

/// `health:` lines, one per service: `readiness  NOT_SERVING since 12:00:01 (db down)`.
fn render_health(out: &mut String, v: &Value) {
    let Some(services) = v.get("health").and_then(Value::as_object) else {
        return;
    };
    if services.is_empty() {
        return;
    }
    let _ = writeln!(out, "health:");
    for (name, h) in services {
        let g = |k: &str| h.get(k).and_then(Value::as_str).unwrap_or("");
        let name = if name.is_empty() { "\"\"" } else { name };
        // RFC 3339 → the time of day (UTC), which is what an operator compares with the logs.
        let since = g("since").get(11..19).unwrap_or(g("since"));
        let _ = writeln!(
            out,
            "  {name:<12} {:<11} since {since} ({})",
            g("status"),
            g("why")
        );
    }
}

/// `ctl status --watch`: follows the server's `watch` stream ([`super`]) until the supervisor says how it
/// ends. `tty`: redraw the whole status on each change; otherwise one line per change, for logs and pipes.
/// `Ok` once the exit code and reason were printed; otherwise the reason and code the client exits with:
/// [`code::UNREACHABLE`] when the supervisor is not there, or went away (SIGKILL, OOM) or stopped answering
/// without telling its outcome, [`code::REFUSED`] when it refused the watch.
pub fn watch(
    socket: &Path,
    timeout: Duration,
    tty: bool,
    out: &mut dyn FnMut(&str),
) -> Result<(), (i32, String)> {
    // The server sends a line at least every keepalive: a shorter `--timeout` would give up on a quiet stop.
    let patience = timeout.max(2 * super::WATCH_KEEPALIVE);
    runtime()?.block_on(async {
        let mut client = connect(socket).await?;
        let first = client
            .call_raw("watch", timeout)
            .await
            .map_err(|e| exchange_error(socket, "watch", timeout, e))?;
        let mut view = View { tty, last: None };
        view.show(accepted(socket, "watch", first)?, out);
        loop {
            let v = match client.read_reply(patience).await {
                Ok(v) => v,
                Err(e) => return Err(view.lost(socket, patience, &e)),
            };
            if v.get("event").and_then(Value::as_str) == Some("exit") {
                out(&final_line(&v));
                return Ok(());
            }
            view.show(v, out);
        }
    })
}

/// What the watch printed last, to print only what changed.
struct View {
    tty: bool,
    last: Option<Value>,
}

impl View {
    fn show(&mut self, now: Value, out: &mut dyn FnMut(&str)) {
        if self.tty {
            // Home, clear, the whole table: what `watch quiesce ctl status` would show, without the flicker
            // of a process per frame.
            out(&format!(
                "\x1b[H\x1b[2J{}\nwatching: redrawn as steps finish; ends when the supervisor exits\n",
                render_status(&now)
            ));
        } else {
            for line in changes(self.last.as_ref(), &now) {
                out(&format!("{line}\n"));
            }
        }
        self.last = Some(now);
    }

    /// The connection ended without the outcome: why, and the last state seen.
    fn lost(&self, socket: &Path, patience: Duration, e: &ClientError) -> (i32, String) {
        let why = match e {
            ClientError::Timeout { .. } => format!(
                "no word from the supervisor for {} (it writes at least every {}): it is hung or frozen",
                humantime::format_duration(patience),
                humantime::format_duration(super::WATCH_KEEPALIVE)
            ),
            ClientError::Closed { .. } => {
                "the supervisor went away without telling its outcome (killed, or it does not report it)"
                    .into()
            }
            other => format!("the watch broke: {other}"),
        };
        let last = self.last.as_ref().map_or_else(String::new, |v| {
            let steps = steps(v);
            let tail = steps
                .last()
                .map_or_else(String::new, |s| format!(", the last {}", step_line(s)));
            let rows = if steps.len() == 1 { "row" } else { "rows" };
            format!(
                "; last seen: phase {}{}, {} step {rows}{tail}",
                text(v, "phase"),
                v.get("child_end")
                    .and_then(Value::as_str)
                    .map_or_else(String::new, |e| format!(", child {e}")),
                steps.len()
            )
        });
        (
            code::UNREACHABLE,
            format!("admin socket {}: {why}{last}", socket.display()),
        )
    }
}

/// The lines a pipe gets for one new state: the start of the watch or a phase change, then each step row
/// recorded since the last state.
fn changes(prev: Option<&Value>, now: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    let phase = text(now, "phase");
    let why = match (phase.as_str(), trigger(now), now.get("child_end")) {
        ("exiting", _, Some(Value::String(end))) => format!(" (child {end})"),
        (_, Some(t), _) => format!(" (stop requested by {t})"),
        _ => String::new(),
    };
    let changed = match prev {
        None => {
            lines.push(format!(
                "watching supervisor pid {}: phase {phase}{why}",
                text(now, "pid")
            ));
            false
        }
        Some(p) => text(p, "phase") != phase,
    };
    // A stop begins before its first row; the child ends after the rows it lived through.
    let exiting = phase == "exiting";
    if changed && !exiting {
        lines.push(format!("phase {phase}{why}"));
    }
    let seen = prev.map_or(0, |p| steps(p).len());
    lines.extend(steps(now).iter().skip(seen).map(step_line));
    let was_running = |name: &str| {
        prev.is_some_and(|p| {
            running(p)
                .iter()
                .chain(steps(p))
                .any(|r| text(r, "name") == name)
        })
    };
    lines.extend(
        running(now)
            .iter()
            .filter(|r| !was_running(&text(r, "name")))
            .map(running_line),
    );
    if changed && exiting {
        lines.push(format!("phase {phase}{why}"));
    }
    lines
}

/// `step 3 drain-in-flight`, or the bare name of a supervisor's own row (numbered 0).
fn row_label(row: &Value) -> String {
    let name = text(row, "name");
    match row.get("number").and_then(Value::as_u64).unwrap_or(0) {
        0 => name,
        n => format!("step {n} {name}"),
    }
}

/// `step 3 drain-in-flight: ok, took 812 ms (started at 1203 ms) requests=3; detail`.
fn step_line(st: &Value) -> String {
    let what = row_label(st);
    let mut detail = String::new();
    if let Some(c) = st.get("counts").and_then(Value::as_object) {
        for (k, val) in c {
            let _ = write!(detail, " {k}={val}");
        }
    }
    if let Some(d) = st.get("detail").and_then(Value::as_str) {
        let _ = write!(detail, "; {d}");
    }
    // The app's text is data: it must not move the cursor of the operator's terminal.
    format!(
        "{what}: {}, took {} ms (started at {} ms){}",
        text(st, "outcome"),
        text(st, "duration_ms"),
        text(st, "started_ms"),
        crate::report::escape_controls(&detail)
    )
}

/// `step 3 drain-in-flight: running, budget 7000 ms (started at 5003 ms)`.
fn running_line(r: &Value) -> String {
    let what = row_label(r);
    format!(
        "{what}: running, budget {} ms (started at {} ms)",
        text(r, "budget_ms"),
        text(r, "started_ms")
    )
}

/// `exit code 0 - stop by SIGTERM: app exited with code 0`, as the termination message's first line says it.
fn final_line(v: &Value) -> String {
    format!(
        "supervisor exited: exit code {} - {}\n",
        text(v, "code"),
        crate::report::escape_controls(&text(v, "reason"))
    )
}

fn steps(v: &Value) -> &[Value] {
    v.get("steps")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn running(v: &Value) -> &[Value] {
    v.get("running")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn trigger(v: &Value) -> Option<String> {
    let t = v.get("trigger").filter(|t| !t.is_null())?;
    t.get("detail")
        .and_then(Value::as_str)
        .or_else(|| t.get("kind").and_then(Value::as_str))
        .map(|s| match s {
            "operator" => "quiesce ctl shutdown".into(),
            "prestop" => "the preStop hook".into(),
            other => other.into(),
        })
}

/// A field as text: strings bare, anything else as JSON.
fn text(v: &Value, k: &str) -> String {
    v.get(k)
        .map(|x| x.as_str().map_or_else(|| x.to_string(), String::from))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(phase: &str, rows: usize) -> Value {
        let names = ["health-not-serving", "stop-accepting", "drain-in-flight"];
        let steps: Vec<Value> = (0..rows)
            .map(|i| {
                json!({"number": i + 1, "name": names[i], "outcome": "ok", "started_ms": 10 * i,
                       "duration_ms": 5, "counts": {"requests": 3}, "detail": "x\u{1b}[2J"})
            })
            .collect();
        let mut v = json!({"ok": true, "pid": 7, "phase": phase, "steps": steps,
                           "trigger": {"kind": "signal", "detail": "SIGTERM"}});
        if phase == "exiting" {
            v["child_end"] = json!("exited with code 0");
        }
        v
    }

    #[test]
    fn a_pipe_gets_the_phase_and_each_new_row_once() {
        let running =
            json!({"ok": true, "pid": 7, "phase": "running", "steps": [], "trigger": null});
        assert_eq!(
            changes(None, &running),
            ["watching supervisor pid 7: phase running"]
        );
        assert!(changes(Some(&running), &running).is_empty());
        let one = state("stopping", 1);
        assert_eq!(
            changes(Some(&running), &one),
            [
                "phase stopping (stop requested by SIGTERM)",
                r"step 1 health-not-serving: ok, took 5 ms (started at 0 ms) requests=3; x\u{1b}[2J",
            ]
        );
        let mut draining = one.clone();
        draining["running"] = json!([
            {"number": 2, "name": "stop-accepting", "started_ms": 10, "budget_ms": 1000},
            {"number": 3, "name": "drain-in-flight", "started_ms": 10, "budget_ms": 7000},
        ]);
        assert_eq!(
            changes(Some(&one), &draining),
            [
                "step 2 stop-accepting: running, budget 1000 ms (started at 10 ms)",
                "step 3 drain-in-flight: running, budget 7000 ms (started at 10 ms)",
            ]
        );
        assert!(changes(Some(&draining), &draining).is_empty(), "shown once");
        let table = render_status(&draining);
        assert!(
            table.contains(" 3  drain-in-flight      running"),
            "{table}"
        );
        assert!(table.contains("budget 7000 ms"), "{table}");
        let end = changes(Some(&one), &state("exiting", 3));
        assert_eq!(end.len(), 3, "{end:?}");
        assert!(end[0].starts_with("step 2 stop-accepting: ok"), "{end:?}");
        assert_eq!(end[2], "phase exiting (child exited with code 0)");
    }

    #[test]
    fn a_terminal_gets_the_whole_table_redrawn() {
        let mut view = View {
            tty: true,
            last: None,
        };
        let mut frames = Vec::new();
        view.show(state("stopping", 2), &mut |t| frames.push(t.to_string()));
        assert_eq!(frames.len(), 1);
        assert!(
            frames[0].starts_with("\x1b[H\x1b[2Jphase:      stopping"),
            "{frames:?}"
        );
        assert!(frames[0].contains(" 2  stop-accepting "), "{frames:?}");
    }

    #[test]
    fn the_outcome_line_reads_like_the_termination_message() {
        let v =
            json!({"ok": true, "event": "exit", "code": 143, "reason": "stop by SIGTERM: late\n"});
        assert_eq!(
            final_line(&v),
            "supervisor exited: exit code 143 - stop by SIGTERM: late\\n\n"
        );
    }
}
