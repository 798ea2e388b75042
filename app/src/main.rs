//! `order-service`: read the configuration, start logging and the runtime, serve until the
//! supervisor's `close` (under quiesce) or SIGTERM/SIGINT (standalone: the steps then run
//! in-process), exit. Exit codes: 0 every step finished, 1 a step failed, 69 a dependency is
//! unreachable, 71 cannot bind a listener or the control socket, 78 bad configuration.

use std::process::ExitCode;

use order_service::config::Config;
use order_service::traces::{self, TraceSettings};

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("order-service: {e}");
            return ExitCode::from(78);
        }
    };
    let trace_settings = match TraceSettings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("order-service: {e}");
            return ExitCode::from(78);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            order_service::telemetry::init(config.log_format);
            tracing::error!(code = 71, reason = %e, "exiting: cannot start the async runtime");
            return ExitCode::from(71);
        }
    };
    // The OTLP exporter's channel and the export task need the runtime.
    let traces = trace_settings.map(|s| {
        let _runtime = runtime.enter();
        traces::start(&s)
    });
    let traces = match traces.transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("order-service: {e}");
            return ExitCode::from(78);
        }
    };
    order_service::telemetry::init_with_traces(config.log_format, traces);
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
