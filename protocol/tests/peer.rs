//! SO_PEERCRED: a client running as another uid is refused even when the file mode lets it in.
//!
//! The other-uid client is this test binary re-executed as uid 65534 (std's `CommandExt::uid`,
//! so no unsafe `fork`/`setuid` here), running the `peer_helper` test with the socket path in
//! its environment. Needs root; elsewhere the tests say so and return.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use quiesce_protocol::agent::Agent;
use serde_json::Value;

const PEER_SOCKET_ENV: &str = "QUIESCE_TEST_PEER_SOCKET";
const NOBODY: u32 = 65534;

/// Not a test on its own: the body of the re-executed client. Connects, sends `status`, prints
/// the first line it gets and whether the connection then closed. Does nothing (and passes)
/// when run as part of the suite.
#[test]
fn peer_helper() {
    let Some(path) = std::env::var_os(PEER_SOCKET_ENV) else {
        return;
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect as the peer");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The write may fail if the agent already closed the connection: that is what we test.
    let _ = stream.write_all(b"status\n");
    let mut reader = BufReader::new(stream.try_clone().unwrap());
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

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

/// Runs the helper as `uid`/`gid` against `socket`; returns its first line and whether the
/// agent closed the connection afterwards.
async fn run_peer(socket: &Path, uid: u32, gid: u32) -> (Value, bool) {
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

fn open_up(dir: &SocketDir) {
    std::fs::set_permissions(dir.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn a_peer_with_another_uid_is_refused_and_disconnected() {
    if !is_root() {
        eprintln!("skipped: running a client as uid {NOBODY} needs root");
        return;
    }
    let dir = SocketDir::new();
    open_up(&dir);
    let agent = Agent::builder("peer-test").build();
    let _handle = serve(&agent, &dir).await;
    // Let the kernel admit the connection so the agent's own check is what refuses it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o666)).unwrap();

    let (reply, closed) = run_peer(&dir.path(), NOBODY, NOBODY).await;
    assert_eq!(error_code(&reply), "peer_refused");
    assert!(
        reply["message"].as_str().unwrap().contains("uid 65534"),
        "{reply}"
    );
    assert!(closed, "the refused connection is closed");
    // The agent is unharmed.
    let mut c = Conn::open(&dir.path()).await;
    assert_eq!(c.call("status").await["phase"], "serving");
}

#[tokio::test]
async fn group_mode_admits_the_socket_group_only() {
    if !is_root() {
        eprintln!("skipped: running a client as uid {NOBODY} needs root");
        return;
    }
    let dir = SocketDir::new();
    open_up(&dir);
    let agent = Agent::builder("peer-test").socket_mode(0o660).build();
    let _handle = serve(&agent, &dir).await;
    let group = std::fs::metadata(dir.path()).unwrap().gid();

    let (reply, _) = run_peer(&dir.path(), NOBODY, group).await;
    assert_eq!(reply["phase"], "serving", "group member admitted: {reply}");

    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let (reply, closed) = run_peer(&dir.path(), NOBODY, NOBODY).await;
    assert_eq!(error_code(&reply), "peer_refused");
    assert!(closed);
}
