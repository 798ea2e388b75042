//! Shared helpers for the agent tests: a raw line connection, an instrumented agent, and a
//! deadline-polling wait.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiesce_protocol::agent::{Agent, AgentBuilder, AgentHandle, HandlerError, Report, StepCtx};
use quiesce_protocol::wire::SubStep;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Upper bound for any single wait in these tests: a hang fails instead of stalling.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A temporary directory holding the socket, removed at the end of the test.
pub struct SocketDir {
    pub dir: tempfile::TempDir,
}

impl SocketDir {
    pub fn new() -> SocketDir {
        SocketDir {
            dir: tempfile::tempdir().expect("create a temporary directory"),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Lets other users traverse the directory (for the other-uid peer tests).
    pub fn open_up(&self) {
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A connection that sends raw bytes and reads reply lines, as a non-Rust peer would.
pub struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Conn {
    pub async fn open(path: &Path) -> Conn {
        let stream = UnixStream::connect(path)
            .await
            .expect("connect to the agent");
        let (read, writer) = stream.into_split();
        Conn {
            reader: BufReader::new(read),
            writer,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write a request");
    }

    /// Reads one reply line and parses it.
    pub async fn reply(&mut self) -> Value {
        let line = self.reply_line().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line}"))
    }

    /// Reads one reply line as sent.
    pub async fn reply_line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line))
            .await
            .expect("a reply within the test's patience")
            .expect("read a reply");
        assert!(n > 0, "the agent closed the connection instead of replying");
        assert!(line.ends_with('\n'), "a reply is one line: {line:?}");
        line.pop();
        line
    }

    /// Sends raw bytes (include the `\n`) and returns the reply.
    pub async fn call_bytes(&mut self, bytes: &[u8]) -> Value {
        self.send(bytes).await;
        self.reply().await
    }

    /// Sends `line` plus `\n` and returns the reply.
    pub async fn call(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes()).await;
        self.reply().await
    }

    /// Asserts that the agent closed the connection (EOF) within the test's patience.
    pub async fn expect_eof(&mut self) {
        let mut line = String::new();
        let n = tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line))
            .await
            .expect("EOF within the test's patience")
            .unwrap_or(0);
        assert_eq!(n, 0, "expected EOF, got {line:?}");
    }

    pub fn into_parts(self) -> (BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        (self.reader, self.writer)
    }
}

pub fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["ok"], false, "expected a refusal, got {reply}");
    reply["error"].as_str().expect("an error code")
}

pub fn assert_ok(reply: &Value) {
    assert_eq!(reply["ok"], true, "expected ok, got {reply}");
}

/// Counts and orders handler invocations.
#[derive(Clone, Default)]
pub struct Journal {
    calls: Arc<Mutex<Vec<SubStep>>>,
}

impl Journal {
    pub fn record(&self, substep: SubStep) {
        self.calls.lock().unwrap().push(substep);
    }

    pub fn calls(&self) -> Vec<SubStep> {
        self.calls.lock().unwrap().clone()
    }

    pub fn count(&self, substep: SubStep) -> usize {
        self.calls().iter().filter(|s| **s == substep).count()
    }
}

/// An agent whose every sub-step records itself in `journal` and reports `calls=1`.
pub fn recording_agent(journal: &Journal) -> AgentBuilder {
    let mut builder = Agent::builder("test-app").service("test.v1.Test");
    for substep in SubStep::ALL {
        let journal = journal.clone();
        builder = builder.on(substep, move |ctx: StepCtx| {
            let journal = journal.clone();
            async move {
                journal.record(ctx.substep());
                Ok::<_, HandlerError>(Report::new().count("calls", 1))
            }
        });
    }
    builder
}

/// Serves `agent` in `dir`.
pub async fn serve(agent: &Agent, dir: &SocketDir) -> AgentHandle {
    agent.serve(dir.path()).await.expect("serve the agent")
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The step states from a status reply, by verb.
pub fn step_states(status: &Value) -> BTreeMap<String, String> {
    status["steps"]
        .as_array()
        .expect("steps array")
        .iter()
        .map(|s| {
            (
                s["verb"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

const PEER_SOCKET_ENV: &str = "QUIESCE_TEST_PEER_SOCKET";

/// The uid the other-user peer runs as.
pub const NOBODY: u32 = 65534;

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

/// Set to `1` to let tests that need root skip (with a line on stderr) instead of failing.
pub const ALLOW_SKIP_ENV: &str = "QUIESCE_ALLOW_SKIP";

/// Whether a test that needs root (`what` says for what) can run. As root: `true`. Otherwise it
/// prints `skipped: needs root: …` to stderr and fails, unless `QUIESCE_ALLOW_SKIP=1`, in which
/// case it returns `false` and the caller returns early. CI runs as root, so a skip never passes
/// silently there.
pub fn needs_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!("skipped: needs root: {what}");
    assert!(
        std::env::var(ALLOW_SKIP_ENV).is_ok_and(|v| v == "1"),
        "this test needs root ({what}); run it as root, or set {ALLOW_SKIP_ENV}=1 to skip it"
    );
    false
}

/// Body of the re-executed peer: connects, sends `status`, prints the first line it gets and
/// whether the connection then closed. Each test binary that uses [`run_peer`] wraps this in a
/// `#[test] fn peer_helper()`; without the environment variable it returns at once.
pub fn peer_helper_main() {
    let Some(path) = std::env::var_os(PEER_SOCKET_ENV) else {
        return;
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect as the peer");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The write may fail if the agent already closed the connection: that is what we test.
    let _ = stream.write_all(b"status\n");
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).expect("read the first line");
    println!("\nPEER_FIRST:{}", first.trim_end());
    if first.contains(r#""ok":true"#) {
        // Admitted: end our side so the agent closes too. A refused peer must be closed by the
        // agent without this.
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut second = String::new();
    let n = reader.read_line(&mut second).unwrap_or(0);
    println!("\nPEER_MORE:{n}");
}

/// Re-executes this test binary as `uid`/`gid` running `peer_helper` against `socket` (std's
/// `CommandExt::uid`, so no unsafe fork/setuid); returns its first line and whether the agent
/// closed the connection afterwards.
pub async fn run_peer(socket: &Path, uid: u32, gid: u32) -> (Value, bool) {
    let exe = std::env::current_exe().unwrap();
    let socket = socket.to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args(["--exact", "peer_helper", "--nocapture", "--test-threads=1"])
            .env(PEER_SOCKET_ENV, socket)
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run the test binary as another uid")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let first = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PEER_FIRST:"))
        .unwrap_or_else(|| {
            panic!(
                "helper printed no reply; stdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let closed = stdout.lines().any(|l| l == "PEER_MORE:0");
    (serde_json::from_str(first).unwrap(), closed)
}
