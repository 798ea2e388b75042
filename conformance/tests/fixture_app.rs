//! The kit against the Rust fixture app (`testbin`'s `fixture-app`, which embeds the real agent):
//! it conforms, also with handlers that hang or fail (the agent cuts them at their deadline),
//! and the kit reports the no-supervisor path `n-a` when the app ignores SIGTERM. The reply slack
//! is raised from the protocol's 250 ms to 750 ms because the CI runs many process tests at once
//! on two cores (a late reply there is the machine, not the app).

mod common;

use std::time::Duration;

use common::{kit, workspace_bin};

fn fixture(extra: &[&str], kit_args: &[&str]) -> common::Run {
    let app = workspace_bin("fixture-app");
    let mut args = vec!["--json", "--slack-ms", "750"];
    args.extend_from_slice(kit_args);
    args.push("--");
    let app = app.to_str().expect("a UTF-8 path").to_owned();
    args.push(&app);
    args.extend_from_slice(extra);
    kit(&args, &[], Duration::from_secs(120))
}

#[test]
fn the_fixture_app_conforms() {
    // A slow drain-in-flight lets the kit see the driver leave while `drain` runs.
    let app = [
        "--behave",
        "stop-poller=none",
        "--behave",
        "drain-in-flight=finish:800",
        "--services",
        "demo.v1.Demo",
    ];
    let run = fixture(&app, &[]);
    assert_eq!(
        run.code,
        Some(0),
        "{:?}\n{}",
        run.with_status("fail"),
        run.stderr
    );
    let report = run.json();
    assert_eq!(report["conformant"], true);
    assert_eq!(report["summary"]["fail"], 0);
    assert_eq!(run.status("unregistered-note"), "pass");
    for id in [
        "sigterm-standalone",
        "empty-variable",
        "stale-socket",
        "pipelined-after-step",
        "slot-freed-mid-step",
        "repeat-while-running",
        // The agent takes the traceparent extension (PROTOCOL.md §5.5).
        "hello-extensions",
        "traceparent-count",
        "traceparent-malformed",
        "traceparent-accepted",
    ] {
        assert_eq!(run.status(id), "pass", "{id}");
    }
    // The fixture app exits without removing its socket file (a SHOULD): reported, not failed.
    assert_eq!(
        run.with_status("warn").len(),
        usize::from(run.status("socket-removed") == "warn")
    );
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    assert_eq!(
        run.status("peer-refused"),
        if root { "pass" } else { "n-a" }
    );
}

#[test]
fn hanging_and_failing_handlers_still_conform() {
    let run = fixture(
        &[
            "--behave",
            "stop-accepting=hang",
            "--behave",
            "stop-consumer=hang",
            "--behave",
            "close-mq=fail:boom",
        ],
        &[],
    );
    assert_eq!(
        run.code,
        Some(0),
        "{:?}\n{}",
        run.with_status("fail"),
        run.stderr
    );
    for id in [
        "step-replies",
        "step-deadline",
        "short-deadline",
        "short-budgets",
        "repeat",
        "exit-after-timeouts",
    ] {
        assert_eq!(run.status(id), "pass", "{id}: {}", run.stdout);
    }
}

#[test]
fn an_app_that_ignores_sigterm_has_no_standalone_path() {
    let run = fixture(&["--ignore-sigterm"], &["--timeout-ms", "2000"]);
    assert_eq!(
        run.code,
        Some(0),
        "{:?}\n{}",
        run.with_status("fail"),
        run.stderr
    );
    assert_eq!(run.status("sigterm-standalone"), "n-a");
    assert_eq!(run.status("runs-without-socket"), "pass");
    assert_eq!(run.status("empty-variable"), "n-a");
}

#[test]
fn the_text_report_has_one_line_per_rule_and_a_summary() {
    let app = workspace_bin("fixture-app");
    let run = kit(
        &["--slack-ms", "750", "--", app.to_str().expect("UTF-8")],
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let (summary, rules) = lines.split_last().expect("output");
    assert!(
        summary.starts_with("summary: ") && summary.ends_with(": conformant"),
        "{summary}"
    );
    assert!(rules.len() > 50, "{}", run.stdout);
    for line in rules {
        let status = line.split_whitespace().next().unwrap_or_default();
        assert!(["pass", "warn", "n-a"].contains(&status), "{line}");
        assert!(line.contains(" §"), "{line}");
    }
    assert!(
        run.stdout.contains("pass  §7      unknown-verb "),
        "{}",
        run.stdout
    );
}

#[test]
fn usage_errors_exit_2() {
    let run = kit(&["--json"], &[], Duration::from_secs(10));
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("after `--`"), "{}", run.stderr);
    let run = kit(
        &["--timeout-ms", "soon", "--", "true"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let run = kit(&["--help"], &[], Duration::from_secs(10));
    assert_eq!(run.code, Some(0));
    assert!(
        run.stdout.starts_with("usage: quiesce-conformance"),
        "{}",
        run.stdout
    );
}

#[test]
fn an_app_that_exits_before_its_close_reply_fails_close_reply() {
    // `crash:0` exits with code 0 in the middle of `close`, before the agent writes the reply.
    let run = fixture(&["--behave", "close-db=crash:0"], &["--timeout-ms", "3000"]);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.status("close-reply"), "fail");
    assert_eq!(run.status("short-budgets"), "fail");
    // The steps before `close` were checked all the same.
    for id in [
        "step-replies",
        "repeat",
        "status-progress",
        "reconnect-repeat",
    ] {
        assert_eq!(run.status(id), "pass", "{id}: {}", run.stdout);
    }
}
