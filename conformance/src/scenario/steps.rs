//! Driving the five steps, twice on fresh processes. `run` sends what the supervisor sends with
//! the default budgets (each verb with `deadline_ms` and `budgets_ms`, section 6.5) and checks
//! every reply, the progress in `status`, repeats, a reconnect, and the exit after `close`.
//! `run_short` sends short deadlines and budgets: whatever the handlers do, each reply must
//! arrive by the deadline (or the sum of the budgets) plus the reply slack, which is all the
//! kit can see of deadlines from outside.

use std::time::{Duration, Instant};

use quiesce_protocol::wire::{STEPS, StepVerb, TRACEPARENT, TraceParent};
use serde_json::Value;

use crate::conn::{Conn, short};
use crate::process::{App, describe};
use crate::scenario::Ctx;
use crate::scenario::startup::claim_within;
use crate::shapes::{self, Progress};

/// The verb the kit pipelines a `status` behind: its reply must come after the step's, and
/// show the step done.
const PIPELINED: StepVerb = StepVerb::StopPoller;

/// The supervisor's default budgets for `verb`'s sub-steps (wire::STEPS).
pub fn default_budgets(verb: StepVerb) -> Vec<u128> {
    verb.substeps()
        .iter()
        .map(|s| {
            STEPS
                .iter()
                .find(|st| st.substep == Some(*s))
                .map_or(1000, |st| st.default_budget.as_millis())
        })
        .collect()
}

pub fn request_line(verb: StepVerb, deadline: u128, budgets: Option<&[u128]>) -> String {
    match budgets {
        Some(b) => {
            let list: Vec<String> = b.iter().map(u128::to_string).collect();
            format!(
                "{verb} deadline_ms={deadline} budgets_ms={}\n",
                list.join(",")
            )
        }
        None => format!("{verb} deadline_ms={deadline}\n"),
    }
}

/// One valid W3C traceparent per sub-step of `verb` (section 5.5), sampled, as a supervisor that
/// traces sends them: one trace id, a span id per shutdown step.
pub fn traceparents(verb: StepVerb) -> Vec<TraceParent> {
    const TRACE_ID: [u8; 16] = *b"quiesce-conform\x01";
    verb.substeps()
        .iter()
        .map(|s| TraceParent::sampled(TRACE_ID, [0x5c, 0, 0, 0, 0, 0, 0, s.step_number()]))
        .collect()
}

/// `line` (a step verb's request, ending in `\n`) with `traceparent=` for `verb` added.
fn traced(line: &str, verb: StepVerb) -> String {
    let list = TraceParent::join(&traceparents(verb));
    format!("{} {TRACEPARENT}={list}\n", line.trim_end())
}

/// One step verb's reply: the reply, its shape check (the outcome), and its timing check.
type Sent = (Value, Result<String, String>, Result<(), String>);

/// Sends one step verb; fails only when no reply comes.
fn send_step(
    ctx: &Ctx,
    driver: &mut Conn,
    verb: StepVerb,
    line: &str,
    bound: Duration,
    registered: &[String],
) -> Result<Sent, String> {
    let sent = Instant::now();
    driver.send(line.as_bytes())?;
    let v = driver
        .reply_within(bound.max(ctx.opts.timeout))
        .map_err(|e| format!("`{}`: {e}", line.trim()))?;
    let took = sent.elapsed();
    let outcome = shapes::step(&v, verb, registered).map_err(|e| format!("`{}`: {e}", line.trim()));
    let timing = if took <= bound {
        Ok(())
    } else {
        Err(format!(
            "`{}` was answered after {} ms, later than {} ms",
            line.trim(),
            took.as_millis(),
            bound.as_millis()
        ))
    };
    Ok((v, outcome, timing))
}

/// A repeat must return `recorded` plus `"repeated":true`.
fn repeat(driver: &mut Conn, verb: StepVerb, recorded: &Value) -> Result<(), String> {
    let mut v = driver.ok(&format!("{verb} deadline_ms=1\n"))?;
    let flag = v.as_object_mut().and_then(|o| o.remove("repeated"));
    if flag != Some(Value::Bool(true)) {
        return Err(format!(
            "the repeat of `{verb}` lacks \"repeated\":true: {}",
            short(&v)
        ));
    }
    let mut original = recorded.clone();
    if let Some(o) = original.as_object_mut() {
        o.remove("repeated");
    }
    if v == original {
        Ok(())
    } else {
        Err(format!(
            "the repeat of `{verb}` differs from the record: {} vs {}",
            short(&v),
            short(&original)
        ))
    }
}

/// Records the first error of several checks of one rule.
#[derive(Debug, Default)]
struct Tally(Option<String>);

impl Tally {
    fn add(&mut self, r: Result<(), String>) {
        if let (None, Err(e)) = (&self.0, r) {
            self.0 = Some(e);
        }
    }
    fn result(&self) -> Result<(), String> {
        self.0.clone().map_or(Ok(()), Err)
    }
}

pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let (mut app, mut observer) = ctx.start("steps")?;
    let hello = shapes::hello(&observer.request("hello\n")?, "observer")?;
    // An app that lists the extension gets `traceparent=` on every verb, as from a supervisor
    // that traces (section 5.5); the deadlines scenario sends none.
    let tracing = hello.takes(TRACEPARENT);
    if !tracing {
        ctx.report.not_applicable(
            "traceparent-accepted",
            "`hello` does not list `traceparent` in `extensions`".to_owned(),
        );
    }
    let mut driver = claim_within(ctx, &app, ctx.opts.timeout)?;
    let mut accepted = Tally::default();
    let mut tallies: [Tally; 4] = Default::default();
    let mut outcomes = Vec::new();
    for verb in StepVerb::ALL {
        let budgets = default_budgets(verb);
        let deadline: u128 = budgets.iter().sum();
        let bound =
            Duration::from_millis(u64::try_from(deadline).unwrap_or(u64::MAX)) + ctx.opts.slack;
        let plain = request_line(verb, deadline, Some(&budgets));
        let first = match tracing {
            true => traced(&plain, verb),
            false => plain.clone(),
        };
        let pipelined = |line: &str| match verb == PIPELINED {
            true => format!("{line}status\n"),
            false => line.to_owned(),
        };
        let mut sent = send_step(
            ctx,
            &mut driver,
            verb,
            &pipelined(&first),
            bound,
            &hello.registered,
        );
        if tracing
            && let Ok((v, _, _)) = &sent
            && v["ok"] != true
        {
            accepted.add(Err(format!(
                "`{}` was refused: {}",
                first.trim_end(),
                short(v)
            )));
            // The other rules are checked on the verb sent again without it.
            if verb == PIPELINED {
                driver.reply()?;
            }
            sent = send_step(
                ctx,
                &mut driver,
                verb,
                &pipelined(&plain),
                bound,
                &hello.registered,
            );
        }
        let (v, outcome, in_time) = match sent {
            Ok(sent) => sent,
            Err(e) if verb == StepVerb::Close => {
                ctx.report
                    .check("close-reply", Err(format!("no reply: {e}")));
                break;
            }
            Err(e) => return Err(e),
        };
        tallies[0].add(outcome.as_ref().map(|_| ()).map_err(Clone::clone));
        tallies[1].add(in_time);
        outcomes.push(v["outcome"].as_str().unwrap_or("?").to_owned());
        if verb == PIPELINED {
            let behind = driver.reply().and_then(|s| {
                shapes::status(&s, &hello.app, &Progress::after(&outcomes))
                    .map_err(|e| format!("the `status` sent right behind `{verb}`: {e}"))
            });
            ctx.report.check("pipelined-after-step", behind);
        }
        if verb == StepVerb::Close {
            ctx.report.check("close-reply", Ok(()));
            break;
        }
        tallies[2].add(
            observer
                .request("status\n")
                .and_then(|s| shapes::status(&s, &hello.app, &Progress::after(&outcomes))),
        );
        tallies[3].add(repeat(&mut driver, verb, &v));
        if verb == StepVerb::Drain {
            driver = after_drain(ctx, &app, driver, &v)?;
        }
    }
    for (id, tally) in ["step-replies", "step-deadline", "status-progress", "repeat"]
        .into_iter()
        .zip(&tallies)
    {
        ctx.report.check(id, tally.result());
    }
    if tracing {
        ctx.report.check("traceparent-accepted", accepted.result());
    }
    let unregistered = shapes::substeps()
        .iter()
        .any(|s| !hello.registered.iter().any(|r| r == s));
    match unregistered {
        true => ctx.report.check("unregistered-note", Ok(())),
        false => ctx.report.not_applicable(
            "unregistered-note",
            "every sub-step has a handler".to_owned(),
        ),
    }
    exit_after_close(ctx, &mut app);
    Ok(())
}

/// After `drain`: a later verb is out of order; then the driver's connection closes, and a
/// reconnecting driver claims the slot and gets the record. Returns the new driver connection.
fn after_drain(
    ctx: &mut Ctx,
    app: &App,
    mut driver: Conn,
    recorded: &Value,
) -> Result<Conn, String> {
    let order = driver
        .refused(b"close deadline_ms=5000\n", "out_of_order")
        .and_then(|v| match v["expected"] == "stop-cron" {
            true => Ok(()),
            false => Err(format!("`expected` should be `stop-cron`: {}", short(&v))),
        });
    ctx.report.check("order-after-drain", order);
    drop(driver);
    let mut driver = claim_within(ctx, app, Duration::from_secs(1))?;
    ctx.report.check(
        "reconnect-repeat",
        repeat(&mut driver, StepVerb::Drain, recorded),
    );
    Ok(driver)
}

/// After the `close` reply: the process exits on its own, with 0, removing its socket file.
fn exit_after_close(ctx: &mut Ctx, app: &mut App) {
    match app.wait_exit(ctx.opts.timeout) {
        None => {
            let why = format!(
                "still running {} ms after the `close` reply",
                ctx.opts.timeout.as_millis()
            );
            ctx.report.check("exit-after-close", Err(why.clone()));
            ctx.report
                .check("exit-code", Err(format!("not checked: {why}")));
        }
        Some(status) => {
            ctx.report.check("exit-after-close", Ok(()));
            let code = match status.code() {
                Some(0) => Ok(()),
                _ => Err(format!("exited with {}", describe(status))),
            };
            ctx.report.check("exit-code", code);
        }
    }
    let removed = match &app.socket {
        Some(path) if path.exists() => Err(format!("{} is still there", path.display())),
        _ => Ok(()),
    };
    ctx.report.check("socket-removed", removed);
}

/// The five verbs with short deadlines: alternately `deadline_ms` alone and with `budgets_ms`.
pub fn run_short(ctx: &mut Ctx) -> Result<(), String> {
    const SHORT: u128 = 50;
    let (mut app, mut observer) = ctx.start("deadlines")?;
    let hello = shapes::hello(&observer.request("hello\n")?, "observer")?;
    let mut driver = claim_within(ctx, &app, ctx.opts.timeout)?;
    let (mut deadlines, mut budgets) = (Tally::default(), Tally::default());
    for (i, verb) in StepVerb::ALL.into_iter().enumerate() {
        let with_budgets = i % 2 == 1 || verb == StepVerb::Close;
        let list = vec![SHORT; verb.substeps().len()];
        let (line, window) = match with_budgets {
            true => (
                request_line(verb, 60_000, Some(&list)),
                SHORT * list.len() as u128,
            ),
            false => (request_line(verb, SHORT, None), SHORT),
        };
        let bound =
            Duration::from_millis(u64::try_from(window).unwrap_or(u64::MAX)) + ctx.opts.slack;
        let sent = send_step(ctx, &mut driver, verb, &line, bound, &hello.registered);
        let tally = if with_budgets {
            &mut budgets
        } else {
            &mut deadlines
        };
        match sent {
            Ok((_, outcome, in_time)) => {
                tally.add(outcome.map(|_| ()));
                tally.add(in_time);
            }
            Err(e) if verb == StepVerb::Close => tally.add(Err(format!("no reply: {e}"))),
            Err(e) => return Err(e),
        }
    }
    ctx.report.check("short-deadline", deadlines.result());
    ctx.report.check("short-budgets", budgets.result());
    let exit = match app.wait_exit(ctx.opts.timeout) {
        None => Err(format!(
            "still running {} ms after the `close` reply",
            ctx.opts.timeout.as_millis()
        )),
        Some(status) if status.code() == Some(0) => Ok(()),
        Some(status) => Err(format!("exited with {}", describe(status))),
    };
    ctx.report.check("exit-after-timeouts", exit);
    Ok(())
}
