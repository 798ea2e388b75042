//! Section 2, the no-supervisor path: with `QUIESCE_CONTROL_SOCKET` unset or empty the app runs
//! on its own and SHOULD run its shutdown steps itself on SIGTERM. The kit cannot see the steps,
//! only the exit, so the rule is, once with the variable unset and once empty:
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

/// How one standalone run ended.
#[derive(Debug)]
enum Ending {
    /// Exited before the SIGTERM.
    Early(String),
    /// Exited with code 0 after it.
    Clean,
    /// Exited with another code after it.
    Code(String),
    /// Died of the signal or kept running: no standalone path.
    Absent(String),
}

fn once(ctx: &Ctx, socket: Socket, name: &str) -> Result<Ending, String> {
    let dir = ctx.dir(name)?;
    let mut app = App::spawn(&ctx.opts.command, socket, &dir)?;
    let settle = (ctx.ready_after + Duration::from_millis(500)).min(ctx.opts.timeout);
    if let Some(status) = app.wait_exit(settle) {
        return Ok(Ending::Early(format!(
            "exited ({}) before SIGTERM{}",
            describe(status),
            app.stderr_tail()
        )));
    }
    app.signal(Signal::SIGTERM);
    let ms = ctx.opts.timeout.as_millis();
    Ok(match app.wait_exit(ctx.opts.timeout) {
        None => Ending::Absent(format!(
            "still running {ms} ms after SIGTERM: the app does not offer the no-supervisor path"
        )),
        Some(status) if status.code() == Some(0) => Ending::Clean,
        Some(status) if status.code().is_none() => Ending::Absent(format!(
            "died of {}: the app does not handle SIGTERM without a supervisor",
            describe(status)
        )),
        Some(status) => Ending::Code(format!("exited with {} after SIGTERM", describe(status))),
    })
}

pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    match once(ctx, Socket::Unset, "standalone")? {
        Ending::Early(why) => {
            ctx.report.check("runs-without-socket", Err(why.clone()));
            ctx.report.not_applicable("sigterm-standalone", why);
        }
        ending => {
            ctx.report.check("runs-without-socket", Ok(()));
            match ending {
                Ending::Clean => ctx.report.check("sigterm-standalone", Ok(())),
                Ending::Code(why) => ctx.report.check("sigterm-standalone", Err(why)),
                Ending::Absent(why) | Ending::Early(why) => {
                    ctx.report.not_applicable("sigterm-standalone", why)
                }
            }
        }
    }
    match once(ctx, Socket::Empty, "standalone-empty")? {
        Ending::Clean => ctx.report.check("empty-variable", Ok(())),
        Ending::Early(why) | Ending::Code(why) => ctx.report.check("empty-variable", Err(why)),
        Ending::Absent(why) => ctx.report.not_applicable("empty-variable", why),
    }
    Ok(())
}
