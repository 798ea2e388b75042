//! The `quiesce` binary: parse the command line, hand over to the library, exit with its code.

use clap::Parser;
use std::path::Path;
use std::time::Duration;

use quiesce::cli::{Cli, CtlCmd, Sub};
use quiesce::exit::code;

fn main() {
    // Before anything else: a SIGTERM in the first milliseconds must wait for the handlers, not be lost.
    let mask = quiesce::sys::block_all();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let is_help = matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            );
            let _ = e.print();
            std::process::exit(if is_help { 0 } else { code::USAGE });
        }
    };
    if cli.sub.is_some() {
        // Clients and checks run no child: Ctrl-C works as usual.
        quiesce::sys::set_mask(&mask);
    }
    let exit = match cli.sub {
        None => match cli.run.resolve() {
            Ok(cfg) => {
                quiesce::logging::init(cfg.log_format, cfg.log_level);
                quiesce::run(cfg, mask)
            }
            Err(e) => config_error(&e),
        },
        Some(Sub::CheckConfig(args)) => check_config(&args),
        Some(Sub::Prestop(c)) => client(&c.admin_socket, "prestop", c.timeout, |v| {
            format!("preStop delay over after {} ms", v["waited_ms"])
        }),
        Some(Sub::Ctl {
            cmd:
                CtlCmd::Status {
                    client: c,
                    watch: true,
                    ..
                },
        }) => watch(&c),
        Some(Sub::Ctl {
            cmd: CtlCmd::Status {
                client: c, json, ..
            },
        }) => client(&c.admin_socket, "status", c.timeout, |v| {
            if json {
                v.to_string()
            } else {
                quiesce::admin::client::render_status(v)
            }
        }),
        Some(Sub::Ctl {
            cmd: CtlCmd::Shutdown(c),
        }) => client(&c.admin_socket, "shutdown", c.timeout, |v| {
            if v["already_stopping"] == true {
                "shutdown already under way".into()
            } else {
                "shutdown started".into()
            }
        }),
    };
    std::process::exit(exit);
}

fn config_error(e: &quiesce::config::ConfigError) -> i32 {
    quiesce::logging::say(&format!("quiesce: config error: {e}"));
    code::CONFIG
}

/// `check-config`: refuses what the run would refuse (a user/group it cannot resolve or switch to: 123),
/// prints the plan, and warns (or with `--strict` fails) when the budgets overcommit the window or the
/// OpenTelemetry variables name an export quiesce cannot do.
fn check_config(args: &quiesce::cli::CheckArgs) -> i32 {
    let cfg = match args.run.resolve() {
        Ok(cfg) => cfg,
        Err(e) => return config_error(&e),
    };
    if let Err(e) = quiesce::child::resolve_ids(cfg.user.as_deref(), cfg.group.as_deref()) {
        quiesce::logging::say(&format!("quiesce: {e}"));
        return e.exit_code();
    }
    out(&quiesce::cli::describe(&cfg));
    let warnings: Vec<String> = [quiesce::cli::budget_warning(&cfg), cfg.traces.problem()]
        .into_iter()
        .flatten()
        .collect();
    for w in &warnings {
        if args.strict {
            quiesce::logging::say(&format!("quiesce: config error (--strict): {w}"));
        } else {
            quiesce::logging::say(&format!("quiesce: warning: {w}"));
        }
    }
    if args.strict && !warnings.is_empty() {
        code::CONFIG
    } else {
        0
    }
}

/// Runs one admin-socket verb and prints its result; errors go to stderr with a documented code.
fn client(
    socket: &Path,
    verb: &str,
    timeout: Duration,
    show: impl Fn(&serde_json::Value) -> String,
) -> i32 {
    match quiesce::admin::client::call(socket, verb, timeout) {
        Ok(v) => {
            out(&format!("{}\n", show(&v).trim_end()));
            0
        }
        Err((code, reason)) => {
            quiesce::logging::say(&format!("quiesce: {reason}"));
            code
        }
    }
}

/// `ctl status --watch`: the changes on stdout as they come, a lost supervisor on stderr with its code.
fn watch(c: &quiesce::cli::ClientArgs) -> i32 {
    use std::io::IsTerminal as _;
    let tty = std::io::stdout().is_terminal();
    match quiesce::admin::client::watch(&c.admin_socket, c.timeout, tty, &mut |t| out(t)) {
        Ok(()) => 0,
        Err((code, reason)) => {
            quiesce::logging::say(&format!("quiesce: {reason}"));
            code
        }
    }
}

/// Writes to stdout, ignoring a closed pipe (`quiesce ctl status | head -1` must not panic).
fn out(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(text.as_bytes());
}
