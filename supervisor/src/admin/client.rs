//! The client side of the admin socket, built into the same binary so distroless images need no shell,
//! socat or curl: `quiesce prestop`, `quiesce ctl status`, `quiesce ctl shutdown`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use quiesce_protocol::client::Client;
use serde_json::Value;

use crate::exit::code;

/// Sends one verb and returns the JSON reply, or a one-line reason with the exit code to use:
/// [`code::UNREACHABLE`] when the supervisor could not be reached or did not answer, [`code::REFUSED`] when
/// it answered with a refusal.
pub fn call(socket: &Path, verb: &str, timeout: Duration) -> Result<Value, (i32, String)> {
    use quiesce_protocol::client::ClientError;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            (
                code::INTERNAL,
                format!("cannot start the async runtime: {e}"),
            )
        })?;
    let at = socket.display();
    rt.block_on(async {
        let mut client = Client::connect(socket).await.map_err(|e| {
            let why = match &e {
                ClientError::Connect { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            (
                code::UNREACHABLE,
                format!(
                    "cannot reach the supervisor at its admin socket {at}: {why}; is quiesce running as this container's entrypoint with this admin_socket?"
                ),
            )
        })?;
        let v = client.call_raw(verb, timeout).await.map_err(|e| {
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
            (code::UNREACHABLE, format!("admin socket {at}: {why}"))
        })?;
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            return Ok(v);
        }
        let msg = v.get("message").and_then(Value::as_str).unwrap_or("refused");
        let err = v.get("error").and_then(Value::as_str).unwrap_or("refused");
        Err((
            code::REFUSED,
            format!("the supervisor at {at} refused `{verb}` ({err}): {msg}"),
        ))
    })
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
    let steps = v
        .get("steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
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
            detail.trim()
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
