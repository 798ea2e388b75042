//! `order-service`: read the configuration, start logging and the runtime, serve until the
//! supervisor's `close` (under quiesce) or SIGTERM/SIGINT (standalone: the steps then run
//! in-process), exit. Exit codes: 0 every step finished, 1 a step failed, 69 a dependency is
//! unreachable, 71 cannot bind a listener or the control socket, 78 bad configuration.

use std::process::ExitCode;

use order_service::config::Config;

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
            Ok(summary) => {
                let code = summary.exit_code();
                // JSON text, written as a nested array by the JSON log format (telemetry.rs).
                let steps = serde_json::to_string(&summary.steps).unwrap_or_default();
                tracing::info!(
                    code,
                    supervised = summary.supervised,
                    steps,
                    "exiting: shutdown complete"
                );
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
