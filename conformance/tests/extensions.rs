//! The rules of the optional `traceparent` extension (PROTOCOL.md §5.5) against apps that get it
//! wrong, or do not take it. Each app is the Rust fixture app behind a small Python proxy
//! (written into the test's own directory, run by /usr/bin/python3) that serves the socket the
//! kit names, passes every line on to the fixture app on a socket of its own, and changes one
//! thing: `plain` drops `extensions` from `hello` (an app written before the extension),
//! `badshape` makes it a string, `refuse` turns `traceparent=` into an argument the app does not
//! take (so a valid list is refused), `lenient` removes it (so a wrong one is accepted). Only
//! the extension's rules are pinned, and that the `plain` app, which takes no extension, is
//! conformant.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{kit, workspace_bin};

const PROXY: &str = r#"
import json, os, re, socket, struct, subprocess, sys, threading, time
mode, app = sys.argv[1], sys.argv[2:]
path = os.environ.get("QUIESCE_CONTROL_SOCKET")
if not path:
    os.execv(app[0], app)
inner = path + ".inner"
if os.path.lexists(path) and not os.path.isfile(path):
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
        sys.exit("the socket path is taken")
    except ConnectionRefusedError:
        os.remove(path)
    finally:
        probe.close()
child = subprocess.Popen(app, env=dict(os.environ, QUIESCE_CONTROL_SOCKET=inner))
def connect_inner():
    for _ in range(400):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(inner)
            return s
        except OSError:
            s.close()
            if child.poll() is not None:
                sys.exit(1)
            time.sleep(0.025)
    sys.exit("the app did not listen")
connect_inner().close()
server = socket.socket(socket.AF_UNIX)
try:
    server.bind(path)
except OSError:
    child.kill()
    sys.exit("cannot bind")
os.chmod(path, 0o600)
server.listen(64)
STEP = re.compile(rb"^\s*(drain|stop-cron|stop-consumer|stop-poller|close)\s")
def request(line):
    if STEP.match(line):
        if mode == "refuse":
            return line.replace(b" traceparent=", b" traceparent_x=")
        if mode == "lenient":
            return re.sub(rb" traceparent=\S*", b"", line)
    return line
def reply(line):
    if b'"protocol"' not in line:
        return line
    v = json.loads(line)
    if mode == "plain":
        v.pop("extensions", None)
    if mode == "badshape":
        v["extensions"] = "traceparent"
    return (json.dumps(v, separators=(",", ":")) + "\n").encode()
def pipe(src, dst, rewrite, last):
    try:
        for line in src.makefile("rb"):
            dst.sendall(rewrite(line))
    except OSError:
        pass
    last()
def serve(conn):
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid not in (0, os.getuid()):
        message = "peer uid %d may not use this socket" % uid
        conn.sendall((json.dumps({"ok": False, "error": "peer_refused", "message": message}) + "\n").encode())
        conn.close()
        return
    up = connect_inner()
    def up_done():
        try:
            up.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    def down_done():
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    threading.Thread(target=pipe, args=(conn, up, request, up_done), daemon=True).start()
    threading.Thread(target=pipe, args=(up, conn, reply, down_done), daemon=True).start()
def accept():
    while True:
        conn, _ = server.accept()
        serve(conn)
threading.Thread(target=accept, daemon=True).start()
code = child.wait()
time.sleep(0.3)
os.remove(path)
sys.exit(code)
"#;

/// A directory for one test, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The kit against the fixture app behind the proxy in `mode`.
fn proxied(mode: &str) -> common::Run {
    let dir = Dir(std::env::temp_dir().join(format!(
        "quiesce-conformance-ext-{mode}.{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).expect("create the test's directory");
    let script = dir.0.join("proxy.py");
    std::fs::write(&script, PROXY).expect("write the script");
    let app = workspace_bin("fixture-app");
    let args = [
        "--json",
        "--slack-ms",
        "750",
        "--timeout-ms",
        "3000",
        "--",
        "/usr/bin/python3",
        script.to_str().expect("a UTF-8 path"),
        mode,
        app.to_str().expect("a UTF-8 path"),
    ];
    kit(&args, &[], Duration::from_secs(120))
}

const EXTENSION_RULES: [&str; 3] = [
    "traceparent-count",
    "traceparent-malformed",
    "traceparent-accepted",
];

fn reason(run: &common::Run, id: &str) -> String {
    run.json()["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["id"] == id))
        .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

#[test]
fn an_app_without_extensions_is_not_asked_about_them() {
    let run = proxied("plain");
    assert_eq!(
        run.code,
        Some(0),
        "an app without extensions is conformant: {:?}\n{}",
        run.with_status("fail"),
        run.stderr
    );
    assert_eq!(run.status("hello-extensions"), "n-a", "{}", run.stdout);
    for id in EXTENSION_RULES {
        assert_eq!(run.status(id), "n-a", "{id}: {}", run.stdout);
    }
}

#[test]
fn extensions_that_are_not_an_array_of_strings_fail() {
    let run = proxied("badshape");
    assert_eq!(run.status("hello-extensions"), "fail", "{}", run.stdout);
    assert!(
        reason(&run, "hello-extensions").contains("`extensions` is not an array"),
        "{}",
        run.stdout
    );
    // A string is not a list: the app is not taken to announce the extension.
    for id in EXTENSION_RULES {
        assert_eq!(run.status(id), "n-a", "{id}: {}", run.stdout);
    }
}

#[test]
fn an_app_that_announces_traceparent_but_refuses_it_fails() {
    let run = proxied("refuse");
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.status("hello-extensions"), "pass", "{}", run.stdout);
    assert_eq!(run.status("traceparent-accepted"), "fail", "{}", run.stdout);
    let why = reason(&run, "traceparent-accepted");
    assert!(
        why.starts_with("`drain deadline_ms=") && why.contains("was refused"),
        "{why}"
    );
    // Refusing everything refuses the bad ones too; the steps, sent again without it, run.
    for id in [
        "traceparent-count",
        "traceparent-malformed",
        "step-replies",
        "status-progress",
        "pipelined-after-step",
        "repeat",
    ] {
        assert_eq!(run.status(id), "pass", "{id}: {}", run.stdout);
    }
}

#[test]
fn an_app_that_accepts_a_wrong_traceparent_fails() {
    let run = proxied("lenient");
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    for id in ["traceparent-count", "traceparent-malformed"] {
        assert_eq!(run.status(id), "fail", "{id}: {}", run.stdout);
        assert!(
            reason(&run, id).contains("should be refused with `bad_argument`"),
            "{id}: {}",
            run.stdout
        );
    }
    assert_eq!(run.status("traceparent-accepted"), "pass", "{}", run.stdout);
}
