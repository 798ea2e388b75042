//! Sections 5.1, 6.3 and 6.4 while a step runs: the driver sends `drain` and closes its
//! connection at once, without reading the reply. The app must free the driver slot then (not
//! when the step ends), so a new connection claims it; the same verb sent again while the step
//! still runs is waited for and answered with the recorded reply and `"repeated":true`.
//!
//! The kit cannot make a handler slow, so it can only see this when the app's `drain` takes a
//! while by itself: the step's recorded `duration_ms` tells. A `drain` shorter than 200 ms makes
//! both rules `n-a`.

use std::time::{Duration, Instant};

use quiesce_protocol::wire::StepVerb;

use crate::conn::short;
use crate::scenario::Ctx;
use crate::scenario::steps::{default_budgets, request_line};
use crate::shapes;

/// Margin for comparing the kit's clock with the app's `duration_ms`.
const MARGIN: Duration = Duration::from_millis(50);

/// The shortest `drain` that tells a slot freed mid-step from one freed at the step's end.
const LONG_ENOUGH: Duration = Duration::from_millis(200);

pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let (app, mut observer) = ctx.start("disconnect")?;
    let hello = shapes::hello(&observer.request("hello\n")?, "observer")?;
    let mut first = crate::scenario::startup::claim_within(ctx, &app, ctx.opts.timeout)?;
    let budgets = default_budgets(StepVerb::Drain);
    let line = request_line(StepVerb::Drain, budgets.iter().sum(), Some(&budgets));
    let sent = Instant::now();
    first.send(line.as_bytes())?;
    drop(first);
    let mut driver = ctx.connect(&app)?;
    let claimed = loop {
        let v = driver.request("hello role=driver\n")?;
        if v["ok"] == true && v["role"] == "driver" {
            break sent.elapsed();
        }
        if v["error"] != "driver_taken" || sent.elapsed() >= ctx.opts.timeout {
            return Err(format!(
                "`hello role=driver` after the driver left mid-step: {}",
                short(&v)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let asked = sent.elapsed();
    let v = driver.request("drain deadline_ms=1\n")?;
    let outcome = shapes::step(&v, StepVerb::Drain, &hello.registered);
    let took = v["duration_ms"]
        .as_f64()
        .map_or(Duration::ZERO, |ms| Duration::from_secs_f64(ms / 1000.0));
    if took < LONG_ENOUGH {
        let why = format!(
            "`drain` took {} ms: too short to tell (it needs {} ms)",
            took.as_millis(),
            LONG_ENOUGH.as_millis()
        );
        ctx.report
            .not_applicable("slot-freed-mid-step", why.clone());
        ctx.report.not_applicable("repeat-while-running", why);
        return Ok(());
    }
    let freed = if claimed + MARGIN < took && claimed <= Duration::from_secs(1) {
        Ok(())
    } else {
        Err(format!(
            "the slot was claimed {} ms after the driver left, the step ran {} ms",
            claimed.as_millis(),
            took.as_millis()
        ))
    };
    ctx.report.check("slot-freed-mid-step", freed);
    let repeated = match (asked + MARGIN < took, v["repeated"] == true) {
        (false, _) => None,
        (true, true) => Some(outcome.map(|_| ())),
        (true, false) => Some(Err(format!(
            "the repeat of the running `drain` lacks \"repeated\":true: {}",
            short(&v)
        ))),
    };
    match repeated {
        Some(result) => ctx.report.check("repeat-while-running", result),
        None => ctx.report.not_applicable(
            "repeat-while-running",
            "the step had ended before the repeat was sent".to_owned(),
        ),
    }
    Ok(())
}
