//! `order-service`: read the configuration, start logging and the runtime, serve until
//! SIGTERM/SIGINT, run the ordered stop, exit. Exit codes: 0 clean stop, 1 a step did not
//! finish cleanly, 69 a dependency is unreachable, 71 cannot bind, 78 bad configuration.

use std::process::ExitCode;

use order_service::config::Config;
use order_service::report::Outcome;

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("order-service: {e}");
            return ExitCode::from(78);
        }
    };
    order_service::telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(code = 71, reason = %e, "exiting: cannot start the async runtime");
            return ExitCode::from(71);
        }
    };
    runtime.block_on(async {
        match order_service::run(config, termination()).await {
            Ok(results) => {
                let clean = results.iter().all(|r| r.report.outcome == Outcome::Ok);
                let code = if clean { 0 } else { 1 };
                tracing::info!(code, steps = results.len(), "exiting: shutdown complete");
                ExitCode::from(code)
            }
            Err(e) => {
                tracing::error!(code = e.exit_code(), reason = %e, "exiting: cannot start");
                ExitCode::from(e.exit_code())
            }
        }
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install SIGTERM/SIGINT handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
}
