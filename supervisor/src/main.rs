//! The `quiesce` binary: parse the command line, hand over to the library, exit with its code.

use clap::Parser;
use quiesce::cli::{Cli, Sub};
use quiesce::exit::code;

fn main() {
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
    let exit = match cli.sub {
        None => match cli.run.resolve() {
            Ok(cfg) => {
                quiesce::logging::init(cfg.log_format, &cfg.log_level);
                quiesce::run(cfg)
            }
            Err(e) => {
                eprintln!("quiesce: config error: {e}");
                code::CONFIG
            }
        },
        Some(Sub::CheckConfig(args)) => match args.resolve() {
            Ok(cfg) => {
                print!("{}", quiesce::cli::describe(&cfg));
                0
            }
            Err(e) => {
                eprintln!("quiesce: config error: {e}");
                code::CONFIG
            }
        },
        Some(Sub::Prestop(_)) | Some(Sub::Ctl { .. }) => {
            eprintln!("quiesce: not available yet");
            code::INTERNAL
        }
    };
    std::process::exit(exit);
}
