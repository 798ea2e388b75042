//! The first process: started over a stale socket file (a socket nobody listens on, as a crashed
//! predecessor leaves it), then observed (`hello`, `status`, `health`), fed every bad input, and
//! used to check the driver slot and the step order without running a step. It never gets
//! `close`, so the kit kills it at the end.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce_protocol::wire::{StepVerb, TRACEPARENT};

use crate::conn::{Conn, short};
use crate::process::App;
use crate::scenario::steps::traceparents;
use crate::scenario::{Ctx, input, peer};
use crate::shapes::{self, Hello, Progress};

/// Leaves a stale socket file at `path`: bound, then closed without removing the file.
fn stale_socket(path: &Path) -> Result<(), String> {
    drop(
        UnixListener::bind(path)
            .map_err(|e| format!("cannot make a stale socket at {}: {e}", path.display()))?,
    );
    Ok(())
}

fn socket_mode(path: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !meta.file_type().is_socket() {
        return Err("the file at the path is not a socket".to_owned());
    }
    match meta.permissions().mode() & 0o7777 {
        0o600 | 0o660 => Ok(()),
        mode => Err(format!(
            "mode {mode:04o}, expected 0600 (0660 as an option)"
        )),
    }
}

/// The pgrp of `pid`, from /proc.
fn pgrp_of(pid: u64) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(2)?.parse().ok()
}

fn observe(
    ctx: &mut Ctx,
    app: &App,
    conn: &mut Conn,
) -> Result<(Hello, serde_json::Value), String> {
    let reply = conn.request("hello\n")?;
    match shapes::extensions(&reply) {
        Ok(Some(_)) => ctx.report.check("hello-extensions", Ok(())),
        Ok(None) => ctx.report.not_applicable(
            "hello-extensions",
            "`hello` has no `extensions`: the app takes no optional extension".to_owned(),
        ),
        Err(e) => ctx.report.check("hello-extensions", Err(e)),
    }
    let hello = shapes::hello(&reply, "observer");
    ctx.report.check(
        "hello-observer",
        hello.as_ref().map(|_| ()).map_err(Clone::clone),
    );
    let hello = hello?;
    let pid = match pgrp_of(hello.pid) {
        Some(pgrp) if pgrp == app.pgid() => Ok(()),
        Some(pgrp) => Err(format!(
            "pid {} is in process group {pgrp}, not the app's {}",
            hello.pid,
            app.pgid()
        )),
        None => Err(format!("pid {} is not a running process", hello.pid)),
    };
    ctx.report.check("hello-pid", pid);
    let status = conn.request("status\n")?;
    ctx.report.check(
        "status-initial",
        shapes::status(&status, &hello.app, &Progress::after(&[])),
    );
    let started = Instant::now();
    let health = conn.request("health\n").and_then(|v| shapes::health(&v));
    ctx.report.check(
        "health-shape",
        health.map_err(|e| format!("{e} (after {} ms)", started.elapsed().as_millis())),
    );
    Ok((hello, shapes::state_of(&status)))
}

/// Starts the app over a stale socket file; when that fails, records it and starts it once
/// more on a fresh path, so one broken rule does not hide the others.
fn start_over_stale(ctx: &mut Ctx) -> Result<(App, Conn, PathBuf), String> {
    let dir = ctx.dir("startup")?;
    let path = dir.join("control.sock");
    stale_socket(&path)?;
    let mut app = ctx.spawn(&dir)?;
    let listening = app.wait_listening(ctx.opts.timeout, &ctx.shared);
    ctx.report.check(
        "stale-socket",
        listening.as_ref().map(|_| ()).map_err(Clone::clone),
    );
    let (app, conn, ready_after, path) = match listening {
        Ok((conn, ready_after)) => (app, conn, ready_after, path),
        Err(_) => {
            drop(app);
            let dir = ctx.dir("startup-fresh")?;
            let mut app = ctx.spawn(&dir)?;
            let (conn, ready_after) = app.wait_listening(ctx.opts.timeout, &ctx.shared)?;
            (app, conn, ready_after, dir.join("control.sock"))
        }
    };
    ctx.ready_after = ready_after;
    Ok((app, conn, path))
}

pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let (app, mut conn, path) = start_over_stale(ctx)?;
    ctx.report.check("socket-mode", socket_mode(&path));
    let (hello, before) = observe(ctx, &app, &mut conn)?;
    let tracing = hello.takes(TRACEPARENT);
    if !tracing {
        for id in ["traceparent-count", "traceparent-malformed"] {
            ctx.report.not_applicable(
                id,
                "`hello` does not list `traceparent` in `extensions`".to_owned(),
            );
        }
    }
    peer::check(ctx, &path);
    input::run_framing(ctx, &app)?;
    let survived = input::run_cases(ctx, &app);
    ctx.report.check("connection-survives", survived);
    let after = shapes::state_of(&conn.request("status\n")?);
    ctx.report
        .check("refusals-change-nothing", unchanged(&before, &after));
    driver_slot(ctx, &app, &mut conn)?;
    let mut driver = claim_within(ctx, &app, Duration::from_secs(1))?;
    ctx.report.check(
        "out-of-order",
        out_of_order(&mut driver, &mut conn, &before),
    );
    ctx.report
        .check("bad-budgets", bad_budgets(&mut driver, &mut conn, &before));
    if tracing {
        let (count, malformed) = bad_traceparents();
        ctx.report.check(
            "traceparent-count",
            refused_all(&mut driver, &mut conn, &before, &count),
        );
        ctx.report.check(
            "traceparent-malformed",
            refused_all(&mut driver, &mut conn, &before, &malformed),
        );
    }
    drop(driver);
    Ok(())
}

fn unchanged(before: &serde_json::Value, after: &serde_json::Value) -> Result<(), String> {
    if before == after {
        Ok(())
    } else {
        Err(format!("status was {before}, now {after}"))
    }
}

fn role_of(conn: &mut Conn, line: &str) -> Result<String, String> {
    let v = conn.request(line)?;
    v["role"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("`{}`: no role in {}", line.trim(), short(&v)))
}

/// `hello role=driver` on a new connection, retried every 50 ms for up to `within` while the
/// slot is taken (what a reconnecting supervisor does, section 6.5).
pub fn claim_within(ctx: &Ctx, app: &App, within: Duration) -> Result<Conn, String> {
    let end = Instant::now() + within;
    let mut conn = ctx.connect(app)?;
    loop {
        let v = conn.request("hello role=driver\n")?;
        if v["ok"] == true && v["role"] == "driver" {
            return Ok(conn);
        }
        if v["error"] != "driver_taken" || Instant::now() >= end {
            return Err(format!(
                "`hello role=driver` within {within:?}: {}",
                short(&v)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn driver_slot(ctx: &mut Ctx, app: &App, observer: &mut Conn) -> Result<(), String> {
    let mut first = ctx.connect(app)?;
    let claim = (|| {
        let v = first.request("hello role=driver\n")?;
        shapes::hello(&v, "driver")?;
        shapes::hello(&first.request("hello role=driver\n")?, "driver").map(|_| ())
    })();
    ctx.report.check("driver-claim", claim.clone());
    claim?;
    let mut second = ctx.connect(app)?;
    let taken = (|| {
        second.refused(b"hello role=driver\n", "driver_taken")?;
        second.refused(b"drain deadline_ms=5000\n", "not_driver")?;
        observer
            .refused(b"hello role=driver\n", "driver_taken")
            .map(|_| ())
    })();
    ctx.report.check("driver-taken", taken);
    let release = (|| {
        let role = role_of(&mut first, "hello role=observer\n")?;
        if role != "observer" {
            return Err(format!(
                "`hello role=observer` from the driver answered role `{role}`"
            ));
        }
        shapes::hello(&second.request("hello role=driver\n")?, "driver").map(|_| ())
    })();
    ctx.report.check("driver-release", release);
    drop(second);
    let freed = claim_within(ctx, app, Duration::from_secs(1)).map(drop);
    ctx.report.check("driver-freed-on-close", freed);
    Ok(())
}

fn out_of_order(
    driver: &mut Conn,
    observer: &mut Conn,
    before: &serde_json::Value,
) -> Result<(), String> {
    for line in [
        "close deadline_ms=5000\n",
        "stop-cron deadline_ms=5000 budgets_ms=1000\n",
        "stop-poller deadline_ms=1\n",
    ] {
        let v = driver.refused(line.as_bytes(), "out_of_order")?;
        if v["expected"] != "drain" {
            return Err(format!(
                "`{}`: `expected` should be `drain`: {}",
                line.trim(),
                short(&v)
            ));
        }
    }
    unchanged(before, &shapes::state_of(&observer.request("status\n")?))
}

fn bad_budgets(
    driver: &mut Conn,
    observer: &mut Conn,
    before: &serde_json::Value,
) -> Result<(), String> {
    let lines = [
        "drain deadline_ms=5000 budgets_ms=1000\n",
        "drain deadline_ms=5000 budgets_ms=1000,2000,3000\n",
        "drain deadline_ms=5000 budgets_ms=1s,4s\n",
        "close deadline_ms=5000 budgets_ms=1000,0,1000\n",
        "drain deadline_ms=5000 budgets_ms=1000,\n",
    ]
    .map(str::to_owned);
    refused_all(driver, observer, before, &lines)
}

/// Step verbs whose `traceparent=` is wrong (section 5.5): the wrong count of valid ones, then
/// the right count with one malformed. `close` and `stop-cron` are not their turn, but the
/// arguments are checked before the order (section 3.1), so they too are `bad_argument`.
fn bad_traceparents() -> (Vec<String>, Vec<String>) {
    let valid = |verb: StepVerb| {
        traceparents(verb)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };
    let drain = valid(StepVerb::Drain);
    let one = drain[0].clone();
    let line = |verb: &str, list: &[String]| {
        format!("{verb} deadline_ms=5000 {TRACEPARENT}={}\n", list.join(","))
    };
    let count = vec![
        line("drain", std::slice::from_ref(&one)),
        line("drain", &[drain.clone(), vec![one.clone()]].concat()),
        line("close", &drain),
        line("stop-cron", &drain),
    ];
    let parts: Vec<&str> = one.split('-').collect();
    let (trace, span, flags) = (parts[1], parts[2], parts[3]);
    let malformed = [
        one.to_uppercase(),
        format!("01-{trace}-{span}-{flags}"),
        format!("00-{}-{span}-{flags}", "0".repeat(32)),
        format!("00-{trace}-{}-{flags}", "0".repeat(16)),
        format!("00-{trace}-{span}-1"),
        format!("{one}-01"),
        "nope".to_owned(),
        String::new(),
    ]
    .map(|bad| line("drain", &[drain[0].clone(), bad]));
    (count, malformed.to_vec())
}

/// Each of `lines` from the driver is `bad_argument`, and `status` is still `before`.
fn refused_all(
    driver: &mut Conn,
    observer: &mut Conn,
    before: &serde_json::Value,
    lines: &[String],
) -> Result<(), String> {
    for line in lines {
        driver.refused(line.as_bytes(), "bad_argument")?;
    }
    unchanged(before, &shapes::state_of(&observer.request("status\n")?))
}
