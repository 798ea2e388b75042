//! `quiesce-conformance`: certifies an app-side implementation of the quiesce control protocol
//! (docs/PROTOCOL.md) from outside, the way the supervisor sees it.
//!
//! ```text
//! quiesce-conformance [--json] [--timeout-ms N] [--slack-ms N] [--keep-dir] -- CMD ARGS...
//! ```
//!
//! It starts `CMD ARGS...` several times, each with `QUIESCE_CONTROL_SOCKET` set to a fresh path
//! in its own temporary directory (once without it), talks to the socket in the wire format
//! written out by hand (not through the Rust client, so the bytes themselves are checked), and
//! prints one line per rule of PROTOCOL.md with its section and `pass`, `fail`, `warn` or `n-a`.
//! Exit code: 0 when no rule failed, 1 when one did, 2 for a usage error or when the kit could not
//! run at all, 3 when the whole run outlived its hard timeout.
//!
//! Every process it starts runs in its own process group, is killed with that group when its
//! scenario ends, and dies with the kit if the kit is killed; every wait has a timeout, and the
//! whole run has one too (a watchdog thread).

mod conn;
mod process;
mod report;
mod rules;
mod scenario;
mod shapes;
mod sys;

use std::path::PathBuf;
use std::time::Duration;

use scenario::{Ctx, Options};

const USAGE: &str = "usage: quiesce-conformance [--json] [--timeout-ms N] [--slack-ms N] [--keep-dir] -- CMD ARGS...
  --json          print a JSON report instead of text lines
  --timeout-ms N  hard timeout of each wait: a reply, a start, an exit (default 10000)
  --slack-ms N    time allowed past a step's deadline for its reply (default 250, PROTOCOL.md 6.5)
  --keep-dir      keep the temporary directory (the app's stdout/stderr per scenario)";

#[derive(Debug)]
struct Cli {
    json: bool,
    keep_dir: bool,
    opts: Options,
}

fn millis(flag: &str, value: Option<String>) -> Result<Duration, String> {
    let value = value.ok_or_else(|| format!("`{flag}` needs a number of milliseconds"))?;
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "`{flag} {value}`: expected a positive whole number of milliseconds"
        )),
    }
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Cli, String> {
    let mut cli = Cli {
        json: false,
        keep_dir: false,
        opts: Options {
            command: Vec::new(),
            timeout: Duration::from_secs(10),
            slack: Duration::from_millis(250),
        },
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => cli.json = true,
            "--keep-dir" => cli.keep_dir = true,
            "--timeout-ms" => cli.opts.timeout = millis(&arg, args.next())?,
            "--slack-ms" => cli.opts.slack = millis(&arg, args.next())?,
            "--" => {
                cli.opts.command = args.by_ref().collect();
                break;
            }
            "-h" | "--help" => return Err(String::new()),
            other => {
                return Err(format!(
                    "unknown option `{other}` (the app's command goes after `--`)"
                ));
            }
        }
    }
    if cli.opts.command.is_empty() {
        return Err("no command: give the app's command after `--`".to_owned());
    }
    Ok(cli)
}

/// A fresh directory for the run (0711 so the section 9 probe, running as another uid, can
/// reach the socket; the names in it are not secret).
fn temp_root() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let root = std::env::temp_dir().join(format!(
        "quiesce-conformance.{}.{nanos}",
        std::process::id()
    ));
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&root)
        .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    Ok(root)
}

/// Kills every app and exits 3 if the run takes longer than `limit`.
fn watchdog(limit: Duration, root: PathBuf, keep: bool) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        process::kill_all();
        if !keep {
            let _ = std::fs::remove_dir_all(&root);
        }
        eprintln!(
            "quiesce-conformance: the run exceeded its hard timeout of {limit:?}; every app was killed"
        );
        std::process::exit(3);
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__peer-probe") {
        std::process::exit(scenario::probe_main(&args[1..]));
    }
    let cli = match parse(args) {
        Ok(cli) => cli,
        Err(message) => {
            if message.is_empty() {
                println!("{USAGE}");
                std::process::exit(0);
            }
            eprintln!("quiesce-conformance: {message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let root = match temp_root() {
        Ok(root) => root,
        Err(message) => {
            eprintln!("quiesce-conformance: {message}");
            std::process::exit(2);
        }
    };
    watchdog(cli.opts.timeout * 30, root.clone(), cli.keep_dir);
    let command = cli.opts.command.clone();
    let mut ctx = Ctx::new(
        cli.opts,
        report::Report::new(rules::catalogue()),
        root.clone(),
    );
    scenario::run_all(&mut ctx);
    process::kill_all();
    if cli.keep_dir {
        eprintln!(
            "quiesce-conformance: the apps' output is in {}",
            root.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    if cli.json {
        println!("{}", ctx.report.json(&command));
    } else {
        print!("{}", ctx.report.text());
    }
    std::process::exit(if ctx.report.conformant() { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Result<Cli, String> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn parses_the_command_line() {
        let cli = args("--json --timeout-ms 2000 -- app --flag -- x").unwrap();
        assert!(cli.json);
        assert_eq!(cli.opts.timeout, Duration::from_secs(2));
        assert_eq!(cli.opts.command, ["app", "--flag", "--", "x"]);
        assert!(args("--json").is_err());
        assert!(args("--timeout-ms 0 -- app").is_err());
        assert!(args("app").is_err());
        assert!(matches!(args("--help"), Err(m) if m.is_empty()));
    }
}
