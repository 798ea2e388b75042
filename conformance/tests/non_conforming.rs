//! The kit must fail an app side that breaks the protocol, naming the rules it breaks. The app
//! here is a small Python script (written into the test's own directory, run by
//! /usr/bin/python3) that gets three things wrong on purpose: it creates its socket with mode
//! 0644, it removes whatever file is at its socket path (even one that is not a socket), and it
//! answers blank lines. It also has no step state and never exits after `close`, so many more
//! rules fail; the test pins the three it was written to break, and that the run stays short
//! and leaves nothing running.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::kit;

const BAD_APP: &str = r#"
import json, os, socket, sys, threading, time
path = os.environ.get("QUIESCE_CONTROL_SOCKET")
if not path:
    time.sleep(3600)
    sys.exit(0)
if os.path.lexists(path):
    os.remove(path)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o644)
server.listen(16)
STEPS = ["drain", "stop-cron", "stop-consumer", "stop-poller", "close"]
def reply(line):
    verb = line.split(" ")[0] if line else ""
    if verb == "hello":
        return {"ok": True, "protocol": 1, "app": "bad-app", "pid": os.getpid(), "role": "observer",
                "steps": STEPS, "registered": [], "services": []}
    if verb == "status":
        return {"ok": True, "app": "bad-app", "phase": "serving", "next_step": "drain",
                "steps": [{"verb": v, "state": "pending"} for v in STEPS], "components": {}}
    return {"ok": False, "error": "unknown_verb", "message": "unknown verb"}
def serve(conn):
    for raw in conn.makefile("rb"):
        line = raw.decode("utf-8", "replace").strip()
        conn.sendall((json.dumps(reply(line)) + "\n").encode())
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// A directory for this test, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_non_conforming_app_fails_the_rules_it_breaks() {
    let dir = Dir(std::env::temp_dir().join(format!(
        "quiesce-conformance-bad-app.{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).expect("create the test's directory");
    let script = dir.0.join("bad_app.py");
    std::fs::write(&script, BAD_APP).expect("write the script");
    let script = script.to_str().expect("a UTF-8 path");
    let run = kit(
        &[
            "--json",
            "--timeout-ms",
            "1500",
            "--",
            "/usr/bin/python3",
            script,
        ],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["conformant"], false);
    for id in [
        "socket-mode",
        "non-socket-kept",
        "blank-lines",
        "driver-claim",
        "step-replies",
    ] {
        assert_eq!(run.status(id), "fail", "{id}: {}", run.stdout);
    }
    let failed = run.with_status("fail");
    let mode = failed
        .iter()
        .find(|r| r.starts_with("\"socket-mode\""))
        .expect("socket-mode failed");
    assert!(mode.contains("mode 0644"), "{mode}");
    // What it gets right still passes, and the no-supervisor path it lacks is not a failure.
    assert_eq!(run.status("stale-socket"), "pass");
    assert_eq!(run.status("sigterm-standalone"), "n-a");
    // It lists no extensions: the traceparent rules do not apply, even where its scenario broke
    // off early.
    for id in [
        "hello-extensions",
        "traceparent-count",
        "traceparent-malformed",
        "traceparent-accepted",
    ] {
        assert_eq!(run.status(id), "n-a", "{id}: {}", run.stdout);
    }
}
