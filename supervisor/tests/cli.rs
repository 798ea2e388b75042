//! Bad input on the command line, in the environment and in the config file: each gets its documented
//! exit code and a one-line reason naming the problem and the fix, and no child is started.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

struct Run {
    code: i32,
    stderr: String,
    stdout: String,
}

fn run(s: &Scratch, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = quiesce(s);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = output_timeout(c, T);
    Run {
        code: out.status.code().expect("exited"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

fn file(s: &Scratch, text: &str) -> String {
    let p = s.path("quiesce.toml");
    std::fs::write(&p, text).expect("write config");
    p.display().to_string()
}

#[test]
fn usage_errors_exit_120() {
    let s = Scratch::new();
    let marker = s.path("ran");
    let touch = ["--", "/usr/bin/touch", marker.to_str().expect("utf8")];
    for (args, needle) in [
        (
            vec!["--no-such-flag"],
            "unexpected argument '--no-such-flag'",
        ),
        (vec!["--grace-period", "soon"], "invalid duration 'soon'"),
        (vec!["--stop-signal", "SIGNOPE"], "unknown signal 'SIGNOPE'"),
        (vec!["--forward-to", "everyone"], "invalid value 'everyone'"),
        (
            vec!["--health-address", "localhost"],
            "invalid value 'localhost'",
        ),
        (vec!["--signals-rewrite", "SIGHUP"], "FROM=TO"),
    ] {
        let mut a = args.clone();
        a.extend(touch);
        let r = run(&s, &a, &[]);
        assert_eq!(r.code, 120, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
        assert!(!marker.exists(), "{args:?} started the child");
    }
    let r = run(&s, &[], &[]);
    assert_eq!(r.code, 120);
    assert!(
        r.stderr.contains("no command to run: pass it after `--`"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_environment_values_name_the_variable() {
    let s = Scratch::new();
    let r = run(
        &s,
        &["--", "/bin/true"],
        &[("QUIESCE_GRACE_PERIOD", "forever")],
    );
    assert_eq!(r.code, 120, "{}", r.stderr);
    assert!(
        r.stderr.contains("invalid duration 'forever'"),
        "{}",
        r.stderr
    );
}

#[test]
fn config_file_errors_exit_121_with_file_line_and_key() {
    let s = Scratch::new();
    for (text, needle) in [
        (
            "grace_period = \"30s\"\ngrase_period = \"5s\"\n",
            "line 2: unknown field `grase_period`",
        ),
        (
            "[health]\naddress = \"0.0.0.0:50051\"\npoll_interval = \"often\"\n",
            "line 3: poll_interval: invalid duration 'often'",
        ),
        (
            "stop_signal = \"SIGNOPE\"\n",
            "line 1: stop_signal: unknown signal 'SIGNOPE'",
        ),
        (
            "[steps]\nclose_dbb = \"1s\"\n",
            "line 2: unknown field `close_dbb`",
        ),
        ("grace_period = 30\n", "line 1: grace_period:"),
        (
            "grace_period = \"10s\"\nsafety_margin = \"10s\"\n",
            "safety_margin: 10s leaves no time",
        ),
        (
            "prestop_delay = \"29s\"\n",
            "prestop_delay: 29s uses the whole stop window",
        ),
        (
            "[metrics]\naddress = \"0.0.0.0:50051\"\n",
            "metrics.address: 0.0.0.0:50051 is also health.address",
        ),
        ("not toml at all", "line 1:"),
    ] {
        let path = file(&s, text);
        // Health and metrics on, so their address clash is checked (nothing is bound: the config is refused first).
        let on = [
            ("QUIESCE_METRICS_ENABLED", "true"),
            ("QUIESCE_HEALTH_ENABLED", "true"),
        ];
        let r = run(&s, &["--config", &path, "--", "/bin/true"], &on);
        assert_eq!(r.code, 121, "{text}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{text}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
        let check = run(&s, &["check-config", "--config", &path], &on);
        assert_eq!(check.code, 121, "check-config {text}");
    }
    let r = run(
        &s,
        &["--config", "/nonexistent/q.toml", "--", "/bin/true"],
        &[],
    );
    assert_eq!(r.code, 121);
    assert!(
        r.stderr
            .contains("cannot read config file /nonexistent/q.toml"),
        "{}",
        r.stderr
    );
}

#[test]
fn precedence_is_flags_then_env_then_file() {
    let s = Scratch::new();
    let path = file(
        &s,
        "grace_period = \"40s\"\nsafety_margin = \"3s\"\nstop_signal = \"SIGQUIT\"\n",
    );
    let r = run(
        &s,
        &["check-config", "--config", &path, "--grace-period", "20s"],
        &[
            ("QUIESCE_GRACE_PERIOD", "50s"),
            ("QUIESCE_STOP_SIGNAL", "SIGUSR2"),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("grace_period: 20s  safety_margin: 3s"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("stop_signal: SIGUSR2"), "{}", r.stdout);
    assert!(r.stdout.contains("9 close-db"), "{}", r.stdout);
}

#[test]
fn spawn_failures_use_126_and_127() {
    let s = Scratch::new();
    let r = run(&s, &["--", "/definitely/not/here"], &[]);
    assert_eq!(r.code, 127);
    assert!(
        r.stderr
            .contains("cannot run '/definitely/not/here': command not found"),
        "{}",
        r.stderr
    );
    let r = run(&s, &["--", "/etc/passwd"], &[]);
    assert_eq!(r.code, 126);
    assert!(r.stderr.contains("not executable"), "{}", r.stderr);
    let r = run(&s, &["--workdir", "/no/such/dir", "--", "/bin/true"], &[]);
    assert_eq!(r.code, 122, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("working directory /no/such/dir does not exist"),
        "{}",
        r.stderr
    );
}

#[test]
fn privilege_drop_failures_exit_123_and_start_nothing() {
    let s = Scratch::new();
    let r = run(&s, &["--user", "no-such-user-here", "--", "/bin/true"], &[]);
    assert_eq!(r.code, 123, "{}", r.stderr);
    assert!(
        r.stderr.contains("user 'no-such-user-here' does not exist"),
        "{}",
        r.stderr
    );
    let r = run(
        &s,
        &["--group", "no-such-group-here", "--", "/bin/true"],
        &[],
    );
    assert_eq!(r.code, 123, "{}", r.stderr);
    // Not root: cannot switch to another user.
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(quiesce_bin())
        .args(["--user", "root", "--", "/bin/true"]);
    isolate(&mut c, &s);
    let out = output_timeout(c, T);
    assert_eq!(
        out.status.code(),
        Some(123),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
}

#[test]
fn check_config_warns_when_budgets_overcommit_the_window_and_strict_fails() {
    let s = Scratch::new();
    let over = [
        "check-config",
        "--grace-period",
        "11s",
        "--steps-stop-cron",
        "23s",
    ];
    let r = run(&s, &over, &[]);
    assert_eq!(r.code, 0, "a warning, not an error: {}", r.stderr);
    assert!(
        r.stderr.contains("warning: the step budgets (43s, the preStop delay included) exceed the 9s stop window by 34s"),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout.contains("budget x time left / remaining budgets"),
        "{}",
        r.stdout
    );
    let mut strict = over.to_vec();
    strict.push("--strict");
    let r = run(&s, &strict, &[]);
    assert_eq!(r.code, 121, "{}", r.stderr);
    assert!(r.stderr.contains("(--strict)"), "{}", r.stderr);
    // Budgets that fit: no warning, and --strict passes.
    let r = run(
        &s,
        &["check-config", "--strict", "--prestop-delay", "5s"],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

/// `a.b` = `v` as a TOML file: numbers bare, anything else quoted.
fn toml_line(key: &str, value: &str) -> String {
    let literal = if value.parse::<u64>().is_ok() {
        value.to_string()
    } else {
        format!("\"{value}\"")
    };
    match key.split_once('.') {
        Some((table, name)) => format!("[{table}]\n{name} = {literal}\n"),
        None => format!("{key} = {literal}\n"),
    }
}

#[test]
fn out_of_range_values_exit_121_naming_key_value_and_range_from_every_layer() {
    // Each of these once passed check-config, then aborted PID 1 on an Instant overflow, failed liveness
    // forever, or polled the app in a busy loop.
    let s = Scratch::new();
    let marker = s.path("ran");
    let touch = ["--", "/usr/bin/touch", marker.to_str().expect("utf8")];
    let huge = "300000000000y";
    for (key, value, range) in [
        ("grace_period", huge, "(allowed 1s to 24h)"),
        ("cleanup_timeout", huge, "(allowed 0s to 1h)"),
        ("control.connect_timeout", huge, "(allowed 100ms to 1h)"),
        ("steps.close_db", huge, "(allowed 0s to 1h)"),
        ("health.liveness_timeout", "0s", "(allowed 100ms to 1h)"),
        ("health.poll_interval", "1ns", "(allowed 50ms to 1h)"),
        ("health.observed_probes", "4294967295", "(allowed 0 to 100)"),
    ] {
        let flag = format!("--{}", key.replace(['.', '_'], "-"));
        let env = format!("QUIESCE_{}", key.replace('.', "_").to_uppercase());
        let path = file(&s, &toml_line(key, value));
        let layers = [
            ("flag", vec![flag.as_str(), value], vec![]),
            ("env", vec![], vec![(env.as_str(), value)]),
            ("file", vec!["--config", path.as_str()], vec![]),
        ];
        for (layer, args, env) in layers {
            let mut a = args.clone();
            a.extend(touch);
            let r = run(&s, &a, &env);
            let what = format!("{key} = {value} by {layer}");
            assert_eq!(r.code, 121, "{what}: {}", r.stderr);
            let line = r.stderr.trim();
            assert_eq!(line.lines().count(), 1, "{what}: one line: {line}");
            assert!(
                line.starts_with(&format!("quiesce: config error: {key}: ")),
                "{what}: {line}"
            );
            assert!(line.contains(value.trim_end_matches('y')), "{what}: {line}");
            assert!(line.contains(range), "{what}: {line}");
            assert!(!marker.exists(), "{what} started the child");
            let mut check = vec!["check-config"];
            check.extend(args);
            let c = run(&s, &check, &env);
            assert_eq!(c.code, 121, "check-config {what}: {}", c.stderr);
            assert_eq!(c.stderr.trim(), line, "check-config {what}");
            assert!(
                !c.stdout.contains("valid"),
                "check-config {what}: {}",
                c.stdout
            );
        }
    }
}

#[test]
fn config_file_over_1_mib_is_refused_quickly() {
    let s = Scratch::new();
    // /dev/zero never ends: it must be refused after 1 MiB, not read into memory until the OOM killer comes.
    for args in [
        vec!["--config", "/dev/zero", "--", "/bin/true"],
        vec!["check-config", "--config", "/dev/zero"],
    ] {
        let mut c = quiesce(&s);
        c.args(&args);
        let out = output_timeout(c, Duration::from_secs(5));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(121), "{args:?}: {stderr}");
        assert!(
            stderr.contains("config file /dev/zero is larger than 1 MiB"),
            "{args:?}: {stderr}"
        );
    }
    // The limit is exact: 1 MiB of comment is read, one byte more is refused.
    let mut text = "#".repeat(1024 * 1024 - 1);
    text.push('\n');
    let path = file(&s, &text);
    let r = run(&s, &["check-config", "--config", &path], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    text.push('\n');
    let path = file(&s, &text);
    let r = run(&s, &["check-config", "--config", &path], &[]);
    assert_eq!(r.code, 121, "{}", r.stderr);
    assert!(r.stderr.contains("is larger than 1 MiB"), "{}", r.stderr);
}

#[test]
fn check_config_refuses_a_user_or_group_as_the_run_does() {
    let s = Scratch::new();
    for (args, needle) in [
        (["--user", "nosuchuser"], "user 'nosuchuser' does not exist"),
        (
            ["--group", "nosuchgroup"],
            "group 'nosuchgroup' does not exist",
        ),
    ] {
        let mut a = args.to_vec();
        a.extend(["--", "/bin/true"]);
        let r = run(&s, &a, &[]);
        assert_eq!(r.code, 123, "{args:?}: {}", r.stderr);
        let mut check = vec!["check-config"];
        check.extend(args);
        let c = run(&s, &check, &[]);
        assert_eq!(c.code, 123, "check-config {args:?}: {}", c.stderr);
        let line = c.stderr.trim();
        assert!(line.contains(needle), "check-config {args:?}: {line}");
        assert!(
            r.stderr.lines().any(|l| l == line),
            "same message as the run: {line} / {}",
            r.stderr
        );
        assert!(!c.stdout.contains("valid"), "{}", c.stdout);
    }
}

#[test]
fn uid_or_gid_4294967295_exits_123_before_the_child_starts() {
    // (uid_t)-1 tells setuid/setgid "leave it unchanged": the kernel says EINVAL, which used to be exit 122.
    let s = Scratch::new();
    let marker = s.path("ran");
    for (args, needle) in [
        (["--user", "4294967295"], "uid 4294967295 is -1"),
        (["--group", "4294967295"], "gid 4294967295 is -1"),
    ] {
        let mut a = args.to_vec();
        a.extend(["--", "/usr/bin/touch", marker.to_str().expect("utf8")]);
        let r = run(&s, &a, &[]);
        assert_eq!(r.code, 123, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
        assert!(!marker.exists(), "{args:?} started the child");
        let mut check = vec!["check-config"];
        check.extend(args);
        let c = run(&s, &check, &[]);
        assert_eq!(c.code, 123, "check-config {args:?}: {}", c.stderr);
        assert!(
            c.stderr.contains(needle),
            "check-config {args:?}: {}",
            c.stderr
        );
    }
}

#[test]
fn client_timeout_is_bounded() {
    let s = Scratch::new();
    for verb in [vec!["prestop"], vec!["ctl", "status"]] {
        let mut a = verb.clone();
        a.extend(["--timeout", "300000000000y"]);
        let r = run(&s, &a, &[]);
        assert_eq!(r.code, 120, "{verb:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("(allowed 100ms to 24h)"),
            "{verb:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    // `quiesce check-config | head -0`: the reader is gone before anything is written.
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let mut c = std::process::Command::new(quiesce_bin());
    c.env_clear()
        .arg("check-config")
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().expect("spawn");
    let status = wait_timeout(&mut child, std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn check_config_says_where_the_shutdown_trace_goes_and_names_an_unusable_variable() {
    let s = Scratch::new();
    let check = ["check-config", "--prestop-delay", "5s"];
    let r = run(&s, &check, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("traces: off (no OTEL_EXPORTER_OTLP_ENDPOINT"),
        "{}",
        r.stdout
    );
    let r = run(
        &s,
        &check,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")],
    );
    assert!(
        r.stdout.contains(
            "traces: the shutdown, over OTLP/gRPC to collector:4317 (OTEL_EXPORTER_OTLP_ENDPOINT)"
        ),
        "{}",
        r.stdout
    );
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    // Turned off by the standard switch, whatever the endpoint.
    let r = run(
        &s,
        &check,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ],
    );
    assert!(r.stdout.contains("traces: off"), "{}", r.stdout);
    // A value quiesce cannot use: a warning naming it and the fix; --strict fails; a run goes on.
    let https = [("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")];
    let r = run(&s, &check, &https);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("warning: the shutdown will not be exported as a trace: OTEL_EXPORTER_OTLP_ENDPOINT=https://collector:4317: quiesce links no TLS"),
        "{}",
        r.stderr
    );
    let mut strict = check.to_vec();
    strict.push("--strict");
    assert_eq!(run(&s, &strict, &https).code, 121);
    let r = run(&s, &["--", "true"], &https);
    assert_eq!(r.code, 0, "the app still runs: {}", r.stderr);
    assert!(
        r.stderr
            .contains("the shutdown will not be exported as a trace"),
        "{}",
        r.stderr
    );
}
