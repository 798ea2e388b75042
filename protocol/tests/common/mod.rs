//! Shared helpers for the agent tests: a raw line connection, an instrumented agent, and a
//! deadline-polling wait.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
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
        let mut line = String::new();
        let n = tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line))
            .await
            .expect("a reply within the test's patience")
            .expect("read a reply");
        assert!(n > 0, "the agent closed the connection instead of replying");
        assert!(line.ends_with('\n'), "a reply is one line: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line}"))
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
