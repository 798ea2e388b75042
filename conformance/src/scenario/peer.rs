//! Section 9: a peer running as another uid gets one `peer_refused` line and is disconnected,
//! whatever the file modes allow. The kit can only check it as root: it makes the socket file
//! connectable for everyone for the moment of the check (the app must not rely on file modes)
//! and runs itself as uid/gid 65534 with the hidden `__peer-probe PATH MS` arguments, which
//! connect, read what comes, and print it as one JSON line.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::conn::{Conn, ReadError, Session, short};
use crate::scenario::Ctx;

const NOBODY: u32 = 65534;

/// The probe's side: connect to `path`, read one reply and then the end of the connection.
pub fn probe_main(args: &[String]) -> i32 {
    let (Some(path), Some(ms)) = (args.first(), args.get(1).and_then(|m| m.parse().ok())) else {
        eprintln!("usage: quiesce-conformance __peer-probe PATH MS");
        return 2;
    };
    let shared = std::sync::Arc::new(Session {
        timeout: Duration::from_millis(ms),
        violations: Default::default(),
    });
    let outcome = match Conn::connect(Path::new(path), &shared) {
        Err(e) => json!({ "connect": e.to_string() }),
        Ok(mut conn) => {
            let first = conn.reply().map_err(|e| e.to_string());
            let _ = conn.send(b"status\n");
            let end = match conn.read_line(Duration::from_millis(ms)) {
                Err(ReadError::Eof) => "eof".to_owned(),
                Err(e) => e.to_string(),
                Ok(line) => format!("another line: {}", String::from_utf8_lossy(&line)),
            };
            json!({ "first": first.unwrap_or_else(Value::from), "end": end })
        }
    };
    println!("{outcome}");
    0
}

fn judge(outcome: &Value) -> Result<(), String> {
    if let Some(e) = outcome.get("connect") {
        return Err(format!("the probe could not connect as uid {NOBODY}: {e}"));
    }
    let first = &outcome["first"];
    if first["ok"] != false || first["error"] != "peer_refused" {
        return Err(format!(
            "uid {NOBODY} should get `peer_refused` first, got {}",
            short(first)
        ));
    }
    if outcome["end"] != "eof" {
        return Err(format!(
            "after `peer_refused` the connection should close: {}",
            outcome["end"]
        ));
    }
    Ok(())
}

/// Runs the probe against the app's socket at `path`, recording `peer-refused`.
pub fn check(ctx: &mut Ctx, path: &Path) {
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if euid != 0 {
        ctx.report.not_applicable(
            "peer-refused",
            "needs root to connect as another uid".to_owned(),
        );
        return;
    }
    let Ok(meta) = std::fs::metadata(path) else {
        ctx.report
            .check("peer-refused", Err("the socket file is gone".to_owned()));
        return;
    };
    if meta.uid() == NOBODY {
        ctx.report.not_applicable(
            "peer-refused",
            format!("the app runs as uid {NOBODY} itself"),
        );
        return;
    }
    let mode = meta.permissions().mode() & 0o7777;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    let result = run_probe(ctx, path);
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    match result {
        Ok(outcome) => ctx.report.check("peer-refused", judge(&outcome)),
        Err(why) => ctx.report.not_applicable("peer-refused", why),
    }
}

fn run_probe(ctx: &Ctx, path: &Path) -> Result<Value, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the kit's own binary: {e}"))?;
    let ms = ctx.opts.timeout.as_millis().min(5000).to_string();
    let mut cmd = Command::new(&exe);
    cmd.arg("__peer-probe")
        .arg(path)
        .arg(&ms)
        .uid(NOBODY)
        .gid(NOBODY);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    crate::sys::die_with_kit(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run the probe as uid {NOBODY}: {e}"))?;
    let stdout = child.stdout.take();
    let waited = wait_child(&mut child, ctx.opts.timeout * 2);
    let mut text = String::new();
    if let Some(mut out) = stdout {
        let _ = out.read_to_string(&mut text);
    }
    match waited {
        Some(status) if status.success() => {}
        Some(status) => {
            return Err(format!(
                "the probe as uid {NOBODY} failed ({status}): is the kit's binary readable by that uid?"
            ));
        }
        None => return Err("the probe did not finish in time".to_owned()),
    }
    serde_json::from_str(text.trim()).map_err(|e| format!("the probe printed no result ({e})"))
}

fn wait_child(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let end = std::time::Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
