//! Shared helpers for the process tests: binaries, a supervised run with a hard timeout, deadline polls.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub fn quiesce_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quiesce"))
}

/// The fixture program, built into the same target directory by `cargo build`/`nextest` of the workspace.
pub fn testbin() -> PathBuf {
    let p = quiesce_bin().with_file_name("testbin");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p quiesce-testbin`",
        p.display()
    );
    p
}

pub fn tini() -> PathBuf {
    let p = PathBuf::from("/usr/bin/tini");
    assert!(
        p.exists(),
        "tini is missing: `apt-get install tini` (.ci/run does it)"
    );
    p
}

/// A scratch directory for one test (sockets, termination log, signal records).
pub struct Scratch(pub tempfile::TempDir);

impl Scratch {
    pub fn new() -> Scratch {
        Scratch(tempfile::tempdir().expect("tempdir"))
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// `quiesce` with a clean, isolated environment: no probe/metrics ports, admin socket and termination
/// log in the scratch dir, JSON logs.
pub fn quiesce(scratch: &Scratch) -> Command {
    let mut c = Command::new(quiesce_bin());
    isolate(&mut c, scratch);
    die_with_test(&mut c);
    c
}

/// Ties the process `c` starts to the test: it gets SIGKILL when the test's thread ends, passed or failed,
/// so a failing test leaves nothing running (a supervisor takes its app along by its own parent-death
/// signal). Only for commands spawned on the test's own thread.
#[allow(unsafe_code)]
pub fn die_with_test(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe and the closure allocates nothing.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn isolate(c: &mut Command, scratch: &Scratch) {
    c.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("QUIESCE_HEALTH_ENABLED", "false")
        .env("QUIESCE_METRICS_ENABLED", "false")
        .env("QUIESCE_ADMIN_SOCKET", scratch.path("admin.sock"))
        .env("QUIESCE_TERMINATION_LOG", scratch.path("termination-log"))
        .env("QUIESCE_LOG_FORMAT", "json");
}

/// Waits for `child` to exit, killing it and failing the test after `limit`.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs to completion with a hard timeout, capturing output.
pub fn output_timeout(mut c: Command, limit: Duration) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out_pipe = child.stdout.take().expect("stdout");
    let err_pipe = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || read_all(out_pipe));
    let t_err = std::thread::spawn(move || read_all(err_pipe));
    let status = wait_timeout(&mut child, limit);
    Output {
        status,
        stdout: t_out.join().expect("stdout"),
        stderr: t_err.join().expect("stderr"),
    }
}

fn read_all(mut r: impl std::io::Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v);
    v
}

/// Polls `cond` every few milliseconds until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads lines from a child's stdout until one matches, with a deadline.
pub fn wait_for_line(
    child: &mut Child,
    limit: Duration,
    pred: impl Fn(&str) -> bool + Send + 'static,
) -> String {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if pred(&line) {
                let _ = tx.send(line);
                return;
            }
        }
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no matching line within {limit:?}"))
}

/// Sends any signal number (realtime included) with kill(1).
pub fn send(pid: u32, sig: i32) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Whether a pid is still a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s.get(i + 2..i + 3))
            .is_some_and(|st| st != "Z"),
        Err(_) => false,
    }
}

/// Processes in state Z whose parent is `parent`.
pub fn zombies_of(parent: i32) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(i) = stat.rfind(')') else { continue };
        let mut f = stat[i + 2..].split(' ');
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(parent) {
            n += 1;
        }
    }
    n
}

/// Runs `argv` as PID 1 of a fresh PID namespace (with its own /proc).
pub fn in_pid_namespace(argv: &[&Path]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", "--kill-child"]);
    c.args(argv);
    die_with_test(&mut c);
    c
}

/// The host pid of the process `unshare --fork` started (PID 1 inside), once it exists.
pub fn ns_init_pid(unshare_pid: u32) -> u32 {
    let path = format!("/proc/{unshare_pid}/task/{unshare_pid}/children");
    let mut found = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            found = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
            found.is_some()
        }),
        "unshare {unshare_pid} started no child"
    );
    found.expect("checked")
}

pub fn json_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Live descendants of `root` (children first), from /proc.
pub fn descendants(root: u32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut frontier = vec![root as i32];
    while let Some(p) = frontier.pop() {
        let path = format!("/proc/{p}/task/{p}/children");
        for c in std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
        {
            out.push(c);
            frontier.push(c);
        }
    }
    out
}

/// The agent-based fixture app (testbin package).
pub fn fixture_app() -> PathBuf {
    let p = quiesce_bin().with_file_name("fixture-app");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p quiesce-testbin`",
        p.display()
    );
    p
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The Python interpreter of the venv `.ci/run` creates (grpcio-health-checking installed).
pub fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/.venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: python3 -m venv .ci/.venv && .ci/.venv/bin/pip install -r .ci/requirements.txt (.ci/run does it)",
        p.display()
    );
    p
}

pub fn probe_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/probe.py")
}

/// One health Check through the independent Python client.
pub fn check(addr: &str, service: &str) -> String {
    let mut c = Command::new(python());
    c.arg(probe_script()).args(["check", addr, service]);
    let out = output_timeout(c, Duration::from_secs(20));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// CLOCK_MONOTONIC in nanoseconds, comparable with the fixture's event log.
pub fn monotonic_ns() -> u128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128
}

/// Lines of the fixture's event log: (monotonic ns, event text).
pub fn events(path: &Path) -> Vec<(u128, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (ts, rest) = l.split_once(' ')?;
            Some((ts.parse().ok()?, rest.to_string()))
        })
        .collect()
}

/// The admin socket's status, or Null if it does not answer.
pub fn admin_status(s: &Scratch) -> serde_json::Value {
    let mut c = Command::new(quiesce_bin());
    c.env_clear()
        .args(["ctl", "status", "--json", "--admin-socket"])
        .arg(s.path("admin.sock"));
    let out = output_timeout(c, Duration::from_secs(20));
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Starts quiesce with `args` over `testbin record-signals FILE APP_ARGS`, waits until the app is ready, and
/// returns the supervisor and a reader of the signal names the app has recorded so far.
pub fn start_recorder(
    s: &Scratch,
    args: &[&str],
    app_args: &[&str],
) -> (Child, impl Fn() -> String + use<>) {
    let rec = s.path("rec");
    let mut c = quiesce(s);
    c.args(args)
        .arg("--")
        .arg(testbin())
        .arg("record-signals")
        .arg(&rec)
        .args(app_args);
    let child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let read = move || std::fs::read_to_string(&rec).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || read().starts_with("ready")),
        "recorder never ready"
    );
    (child, read)
}
