//! The shutdown as a trace: one pod (quiesce + order-service, as the other e2e tests start it)
//! exports to an in-process OTLP receiver and is terminated as kubelet does (preStop, then
//! SIGTERM). The supervisor's trace must hold one `shutdown` span with the nine step spans under
//! it, in table order, and the app's eight sub-step spans, each a child of the supervisor's span
//! for the same step: one trace for the whole termination, across both processes.

use std::time::Duration;

use e2e::kubelet;
use e2e::manifest::PodManifest;
use e2e::pod::{Pod, PodOptions};
use e2e::sandbox::Sandbox;
use e2e::{hard_timeout, serial};
use order_service::testing::otlp::{Collector, ReceivedSpan};
use quiesce_protocol::wire::{STEPS, SubStep};
use tokio::time::Instant;

/// How long the test may wait for the machine's e2e lock.
const WAIT_FOR_LOCK: Duration = Duration::from_secs(240);
/// The pod's start (migrations on a fresh database included).
const START_WITHIN: Duration = Duration::from_secs(90);

/// Polls the receiver until `done` holds for the spans of the supervisor's trace, or the deadline.
async fn supervisor_trace(
    collector: &Collector,
    within: Duration,
    done: impl Fn(&[ReceivedSpan]) -> bool,
) -> Vec<ReceivedSpan> {
    let until = Instant::now() + within;
    loop {
        let root = collector
            .spans()
            .into_iter()
            .find(|s| s.name == "shutdown" && s.service_name.as_deref() == Some("quiesce"));
        let spans = root
            .map(|r| collector.trace(&r.trace_id))
            .unwrap_or_default();
        if done(&spans) || Instant::now() >= until {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn show(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {:?} {} parent={:?} at={}",
                s.service_name.as_deref().unwrap_or("?"),
                s.name,
                s.span_id,
                s.parent_span_id,
                s.start_unix_nano
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_control_mode_stop_is_one_trace_with_nine_steps_and_the_apps_substeps_under_them() {
    let _one_at_a_time = serial(WAIT_FOR_LOCK);
    hard_timeout(Duration::from_secs(150), async {
        let manifest = PodManifest::load().expect("read deploy/k8s/deployment.yaml");
        let sandbox = Sandbox::new().await;
        let collector = Collector::start().await;
        let opts = PodOptions {
            app_env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.endpoint()),
                ("OTEL_SERVICE_NAME".into(), "order-service".into()),
            ],
            ..PodOptions::default()
        };
        let mut pod = Pod::start("shutdown-trace", &sandbox, &opts);
        pod.app_grpc_addr(START_WITHIN).await;
        let done = kubelet::terminate(&mut pod, &manifest, || {}).await;
        assert_eq!(done.exit_code, Some(0), "{}", pod.tail(80));

        let complete = |spans: &[ReceivedSpan]| spans.len() >= 1 + STEPS.len() + SubStep::ALL.len();
        let spans = supervisor_trace(&collector, Duration::from_secs(10), complete).await;
        assert!(
            complete(&spans),
            "trace incomplete:\n{}\n{}",
            show(&spans),
            pod.tail(60)
        );

        let root = spans.iter().find(|s| s.name == "shutdown").expect("root");
        assert_eq!(
            root.parent_span_id, None,
            "the shutdown span is the trace's root"
        );
        assert!(root.attribute("quiesce.trigger").is_some(), "{root:?}");
        assert_eq!(root.attribute("quiesce.exit_code"), Some("0"));

        // The supervisor's nine step spans: children of the root, in table order, one each.
        let mut steps: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.service_name.as_deref() == Some("quiesce") && s.name != "shutdown")
            .filter(|s| s.attribute("quiesce.step.number") != Some("0"))
            .collect();
        steps.sort_by_key(|s| s.start_unix_nano);
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        let table: Vec<&str> = STEPS.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            table,
            "the step spans in time order:\n{}",
            show(&spans)
        );
        for (span, step) in steps.iter().zip(STEPS.iter()) {
            assert_eq!(
                span.parent_span_id.as_deref(),
                Some(root.span_id.as_str()),
                "{}",
                step.name
            );
            assert_eq!(
                span.attribute("quiesce.step.number"),
                Some(step.number.to_string().as_str())
            );
            assert_eq!(
                span.attribute("quiesce.step.outcome"),
                Some("ok"),
                "{span:?}"
            );
            assert!(
                span.attribute("quiesce.step.budget_ms").is_some(),
                "{span:?}"
            );
            assert!(
                span.start_unix_nano >= root.start_unix_nano
                    && span.end_unix_nano <= root.end_unix_nano,
                "{} inside the shutdown span",
                step.name
            );
        }
        let drain = steps
            .iter()
            .find(|s| s.name == "drain-in-flight")
            .expect("step 3");
        assert!(
            drain
                .attribute("quiesce.step.counts.requests_drained")
                .is_some(),
            "{drain:?}"
        );

        // The app's eight sub-step spans: each a child of the supervisor's span for its step.
        for substep in SubStep::ALL {
            let theirs: Vec<&ReceivedSpan> = spans
                .iter()
                .filter(|s| s.service_name.as_deref() == Some("order-service"))
                .filter(|s| s.name == substep.as_str())
                .collect();
            assert_eq!(
                theirs.len(),
                1,
                "one app span for {substep}:\n{}",
                show(&spans)
            );
            let step = steps
                .iter()
                .find(|s| s.name == substep.as_str())
                .expect("its step");
            assert_eq!(
                theirs[0].parent_span_id.as_deref(),
                Some(step.span_id.as_str()),
                "{substep}: the app's span is a child of the supervisor's step span"
            );
            assert_eq!(theirs[0].attribute("quiesce.step.outcome"), Some("ok"));
        }
        // The supervisor says which trace the stop is.
        let started = pod
            .lines()
            .iter()
            .filter_map(|l| l.json())
            .find(|v| v["message"] == "shutdown started")
            .expect("a `shutdown started` line");
        assert_eq!(started["trace_id"], root.trace_id.as_str());
    })
    .await;
}

/// `quiesce -- sleep 60` in signal mode with `env`, stopped with SIGTERM once it runs: its exit
/// code, how long the stop took from the signal to the exit, and its stderr.
async fn signal_mode_stop(env: &[(&str, String)]) -> (Option<i32>, Duration, String) {
    signal_mode_stop_in(&[], env).await
}

/// [`signal_mode_stop`] with quiesce started by `wrapper` (a program and its arguments, which
/// execs quiesce's command line given after them), so the signal still reaches quiesce itself.
async fn signal_mode_stop_in(
    wrapper: &[String],
    env: &[(&str, String)],
) -> (Option<i32>, Duration, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let dir = tempfile::tempdir().expect("scratch dir");
    let mut cmd = match wrapper.split_first() {
        None => tokio::process::Command::new(e2e::bins::quiesce()),
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(e2e::bins::quiesce());
            c
        }
    };
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .args(["--", "sleep", "60"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start quiesce");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut stderr = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        stderr.push_str(&line);
        stderr.push('\n');
        if line.contains("child started") {
            break;
        }
    }
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    let signalled = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().await.expect("quiesce exits");
    let took = signalled.elapsed();
    while let Ok(Some(line)) = lines.next_line().await {
        stderr.push_str(&line);
        stderr.push('\n');
    }
    (status.code(), took, stderr)
}

/// The stop ended as without traces (exit 0), said that the collector did not answer in time,
/// and did not wait for `what` longer than `within`.
fn gave_up_in_time(stop: (Option<i32>, Duration, &str), within: Duration, what: &str) {
    let (code, took, stderr) = stop;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("the collector did not answer in time"),
        "{stderr}"
    );
    assert!(took < within, "the exit waited {took:?} for {what}");
}

#[tokio::test]
async fn signal_mode_exports_its_stop_too() {
    hard_timeout(Duration::from_secs(60), async {
        let collector = Collector::start().await;
        let (code, _, stderr) =
            signal_mode_stop(&[("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())]).await;
        assert_eq!(code, Some(0), "{stderr}");
        // The export is done before quiesce exits: no waiting needed.
        let spans = collector.spans();
        let root = spans
            .iter()
            .find(|s| s.name == "shutdown")
            .unwrap_or_else(|| panic!("no shutdown span: {}\n{stderr}", show(&spans)));
        assert_eq!(root.attribute("quiesce.mode"), Some("signal"));
        assert_eq!(root.attribute("quiesce.trigger"), Some("SIGTERM"));
        let names: Vec<&str> = spans
            .iter()
            .filter(|s| s.parent_span_id.as_deref() == Some(root.span_id.as_str()))
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["health-not-serving", "stop-signal"],
            "{}",
            show(&spans)
        );
    })
    .await;
}

#[tokio::test]
async fn a_collector_that_is_down_silent_or_not_otlp_costs_one_line_and_a_bounded_wait() {
    hard_timeout(Duration::from_secs(60), async {
        // Down: nothing listens.
        let closed = format!("http://127.0.0.1:{}", e2e::pod::free_port());
        let (code, _, stderr) = signal_mode_stop(&[("OTEL_EXPORTER_OTLP_ENDPOINT", closed)]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stderr.contains("shutdown trace not exported") && stderr.contains("cannot connect"),
            "{stderr}"
        );
        // Garbage: something that is not an HTTP/2 server answers with noise, and a lot of it.
        let noisy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", noisy.local_addr().expect("addr"));
        std::thread::spawn(move || {
            use std::io::Write as _;
            if let Ok((mut peer, _)) = noisy.accept() {
                let noise = vec![0xffu8; 64 * 1024];
                while peer.write_all(&noise).is_ok() {}
            }
        });
        let (code, _, stderr) =
            signal_mode_stop(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("shutdown trace not exported"), "{stderr}");
        // Silent: the connection is accepted by the kernel, and nobody ever answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
        let (code, took, stderr) = signal_mode_stop(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "300".into()),
        ])
        .await;
        // The stop itself (sleep exits at once) plus the 300 ms export bound, with slack for a
        // loaded machine: never the default 10 s of an SDK, never a hang.
        gave_up_in_time(
            (code, took, &stderr),
            Duration::from_secs(3),
            "a silent collector",
        );
    })
    .await;
}

#[tokio::test]
async fn a_collector_name_that_never_resolves_does_not_hold_the_exit() {
    hard_timeout(Duration::from_secs(60), async {
        // A mount namespace whose resolv.conf names a DNS server that takes every query and never
        // answers: the collector's name lookup (a blocking thread) outlives the export's 1 s.
        let dir = tempfile::tempdir().expect("scratch dir");
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 127.0.0.2\noptions timeout:5 attempts:2\n",
        )
        .expect("write resolv.conf");
        let _silent_dns = std::net::UdpSocket::bind("127.0.0.2:53")
            .expect("bind a silent DNS server on 127.0.0.2:53 (the e2e tests run as root)");
        let wrapper: Vec<String> = [
            "unshare",
            "--mount",
            "sh",
            "-c",
            r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([resolv.display().to_string()])
        .collect();
        let (code, took, stderr) = signal_mode_stop_in(
            &wrapper,
            &[(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://collector.quiesce-test.internal:4317".into(),
            )],
        )
        .await;
        // The export's 1 s bound, with slack for a loaded machine; the lookup alone would take 10 s.
        gave_up_in_time(
            (code, took, &stderr),
            Duration::from_secs(4),
            "a DNS lookup",
        );
    })
    .await;
}
