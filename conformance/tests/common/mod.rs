//! Running the kit as the CI does: as a process, under a hard timeout, with a marker in its
//! environment that every process it starts inherits, so a test can prove afterwards that none
//! of them is left running. The apps under test are the workspace's own binaries, found in the
//! target directory this test was built into (`target/<profile>/`, the parent of `deps/`):
//! `cargo nextest run --workspace` builds them there. `QUIESCE_CONFORMANCE_APP_DIR` overrides.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A workspace binary, e.g. `fixture-app`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("QUIESCE_CONFORMANCE_APP_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("the test's own path");
            let deps = exe.parent().expect("the test's directory").to_path_buf();
            if deps.file_name().is_some_and(|n| n == "deps") {
                deps.parent().expect("target/<profile>").to_path_buf()
            } else {
                deps
            }
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it into the same target directory first (`cargo build -p quiesce-testbin -p order-service --bins`), or point QUIESCE_CONFORMANCE_APP_DIR at it",
        path.display()
    );
    path
}

/// What one run of the kit produced.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The `--json` report.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "the report is not JSON ({e}):\n{}\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// The status of rule `id` in the JSON report.
    pub fn status(&self, id: &str) -> String {
        let report = self.json();
        let rule = report["rules"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["id"] == id))
            .unwrap_or_else(|| panic!("no rule `{id}` in {report}"));
        rule["status"].as_str().unwrap_or_default().to_owned()
    }

    /// Every rule with `status`, as `id: reason` lines.
    pub fn with_status(&self, status: &str) -> Vec<String> {
        let report = self.json();
        report["rules"]
            .as_array()
            .map(|rules| {
                rules
                    .iter()
                    .filter(|r| r["status"] == status)
                    .map(|r| format!("{}: {}", r["id"], r["reason"]))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn reader(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Pids of processes whose environment holds `mark`, other than this test.
fn marked(mark: &str) -> Vec<u32> {
    let needle = format!("QUIESCE_CONFORMANCE_TEST_MARK={mark}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect()
}

/// Runs the kit with `args` and extra environment `envs`; kills it and fails after `limit`.
/// Fails too if any process the run started is still there 2 s after the kit exited.
pub fn kit(args: &[&str], envs: &[(String, String)], limit: Duration) -> Run {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mark = format!("{}-{nanos}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiesce-conformance"))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .env("QUIESCE_CONFORMANCE_TEST_MARK", &mark)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the kit");
    let (out, err) = (
        reader(child.stdout.take().expect("stdout")),
        reader(child.stderr.take().expect("stderr")),
    );
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the kit") {
            break Some(status);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let run = Run {
        code: status.and_then(|s| s.code()),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    let left = wait_gone(&mark);
    assert!(
        status.is_some(),
        "the kit ran longer than {limit:?}:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        left.is_empty(),
        "processes of the run are still running: {left:?}\n{}",
        run.stdout
    );
    run
}

fn wait_gone(mark: &str) -> Vec<u32> {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let left = marked(mark);
        if left.is_empty() || Instant::now() >= end {
            for pid in &left {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
