//! Section 2, the no-supervisor path: without `QUIESCE_CONTROL_SOCKET` the app runs on its own
//! and SHOULD run its shutdown steps itself on SIGTERM. The kit cannot see the steps, only the
//! exit, so the rule is:
//!
//! - the app is still running after its start-up time (the time it took to listen in the first
//!   scenario, plus 500 ms), else `runs-without-socket` warns;
//! - after SIGTERM it exits with code 0 within the timeout: pass; with another code: warn;
//! - it dies of the SIGTERM itself (the default action: no handler), or is still running after
//!   the timeout (it ignores SIGTERM): `n-a`, the app does not offer the no-supervisor path.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::process::{App, Socket, describe};
use crate::scenario::Ctx;

pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let dir = ctx.dir("standalone")?;
    let mut app = App::spawn(&ctx.opts.command, Socket::Unset, &dir)?;
    let settle = (ctx.ready_after + Duration::from_millis(500)).min(ctx.opts.timeout);
    if let Some(status) = app.wait_exit(settle) {
        let why = format!(
            "exited ({}) before SIGTERM{}",
            describe(status),
            app.stderr_tail()
        );
        ctx.report.check("runs-without-socket", Err(why.clone()));
        ctx.report.not_applicable("sigterm-standalone", why);
        return Ok(());
    }
    ctx.report.check("runs-without-socket", Ok(()));
    app.signal(Signal::SIGTERM);
    let ms = ctx.opts.timeout.as_millis();
    match app.wait_exit(ctx.opts.timeout) {
        None => ctx.report.not_applicable(
            "sigterm-standalone",
            format!(
                "still running {ms} ms after SIGTERM: the app does not offer the no-supervisor path"
            ),
        ),
        Some(status) if status.code() == Some(0) => ctx.report.check("sigterm-standalone", Ok(())),
        Some(status) if status.code().is_none() => ctx.report.not_applicable(
            "sigterm-standalone",
            format!(
                "died of {}: the app does not handle SIGTERM without a supervisor",
                describe(status)
            ),
        ),
        Some(status) => ctx.report.check(
            "sigterm-standalone",
            Err(format!("exited with {} after SIGTERM", describe(status))),
        ),
    }
    Ok(())
}
