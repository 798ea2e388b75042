//! The static binary as PID 1 of a fresh PID namespace, chrooted into a root that holds nothing but it, a
//! static fixture and (for the by-name case) a minimal /etc/passwd and /etc/group: no libc, no loader, no
//! /proc, no /dev. Exit codes, a forwarded signal, reaping, and user switching by id and by name.
//!
//! The static binaries come from `scripts/build-static.sh -p quiesce-testbin` (run here, incremental; CI
//! runs it before the tests so this one does not pay for the build).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// The static `quiesce` and `testbin`, built once per test binary.
fn static_bins() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut build = Command::new(root.join("scripts/build-static.sh"));
        build.args(["-p", "quiesce-testbin"]).stdout(Stdio::null());
        let out = output_timeout(build, Duration::from_secs(900));
        assert!(
            out.status.success(),
            "scripts/build-static.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = quiesce_bin()
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("x86_64-unknown-linux-gnu/release");
        (dir.join("quiesce"), dir.join("testbin"))
    })
}

/// A root directory with only `/quiesce` and `/testbin` (plus `etc`'s files when given).
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new(etc: Option<(&str, &str)>) -> Root {
        let dir = tempfile::tempdir().expect("root dir");
        let (q, t) = static_bins();
        std::fs::copy(q, dir.path().join("quiesce")).expect("copy quiesce");
        std::fs::copy(t, dir.path().join("testbin")).expect("copy testbin");
        if let Some((passwd, group)) = etc {
            std::fs::create_dir(dir.path().join("etc")).expect("etc");
            std::fs::write(dir.path().join("etc/passwd"), passwd).expect("passwd");
            std::fs::write(dir.path().join("etc/group"), group).expect("group");
        }
        Root { dir }
    }

    /// `unshare --pid --fork chroot ROOT /quiesce ARGS...`: quiesce is PID 1 and sees only the root.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--pid", "--fork", "--kill-child", "/usr/sbin/chroot"])
            .arg(self.dir.path())
            .arg("/quiesce")
            .args(args)
            .env_clear()
            .env("QUIESCE_LOG_FORMAT", "json");
        die_with_test(&mut c);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        output_timeout(self.command(args), T)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn the_binary_is_static() {
    let (q, _) = static_bins();
    let out = Command::new("ldd").arg(q).output().expect("ldd");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("statically linked") || text.contains("not a dynamic executable"),
        "{text}"
    );
}

#[test]
fn exit_codes_pass_through_in_an_empty_root() {
    let root = Root::new(None);
    assert_eq!(
        root.run(&["--", "/testbin", "exit", "3"]).status.code(),
        Some(3)
    );
    assert_eq!(
        root.run(&["--", "/testbin", "exit", "0"]).status.code(),
        Some(0)
    );
    let killed = root.run(&["--", "/testbin", "die-by", "SIGKILL"]);
    assert_eq!(
        killed.status.code(),
        Some(128 + 9),
        "as tini reports a signal death"
    );
    let missing = root.run(&["--", "/no-such-program"]);
    assert_eq!(missing.status.code(), Some(127));
}

#[test]
fn a_signal_is_forwarded_and_orphans_are_reaped_in_an_empty_root() {
    let root = Root::new(None);
    let mut c = root.command(&["--", "/testbin", "record-signals", "/signals"]);
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let init = ns_init_pid(child.id());
    assert!(
        wait_until(T, || !descendants(init).is_empty()),
        "app never started"
    );
    // The app installs its handlers as it starts: repeat until one SIGUSR1 is recorded.
    assert!(
        wait_until(T, || {
            send(init, libc::SIGUSR1);
            std::fs::read_to_string(root.path("signals")).is_ok_and(|s| s.contains("SIGUSR1"))
        }),
        "SIGUSR1 never reached the app"
    );
    send(init, libc::SIGTERM);
    assert_eq!(wait_timeout(&mut child, T).code(), Some(0));

    let mut c = root.command(&["--", "/testbin", "spawn-orphans", "20", "sleep"]);
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let init = ns_init_pid(child.id());
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("spawned line");
    assert_eq!(line.trim(), "spawned 20");
    assert!(
        wait_until(T, || zombies_of(init as i32) == 0),
        "orphans left unreaped"
    );
    send(init, libc::SIGTERM);
    wait_timeout(&mut child, T);
}

#[test]
fn user_by_id_needs_no_files_and_by_name_reads_the_images_own() {
    let bare = Root::new(None);
    let out = bare.run(&["--user", "65534:65534", "--", "/testbin", "print-ids"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "uid=65534 gid=65534 groups=[]"
    );

    let unknown = bare.run(&["--user", "nobody", "--", "/testbin", "print-ids"]);
    assert_eq!(unknown.status.code(), Some(123));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("cannot read /etc/passwd"),
        "names the file: {err}"
    );

    let with_etc = Root::new(Some((
        "root:x:0:0::/:/sbin/nologin\nnobody:x:65534:65533::/nonexistent:/sbin/nologin\n",
        "root:x:0:\nnogroup:x:65533:\n",
    )));
    let out = with_etc.run(&["--user", "nobody", "--", "/testbin", "print-ids"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "uid=65534 gid=65533 groups=[]",
        "the primary group from /etc/passwd"
    );
    let out = with_etc.run(&[
        "--user",
        "nobody",
        "--group",
        "nogroup",
        "--",
        "/testbin",
        "print-ids",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "uid=65534 gid=65533 groups=[]"
    );
    let ghost = with_etc.run(&["--user", "ghost", "--", "/testbin", "print-ids"]);
    assert_eq!(ghost.status.code(), Some(123));
    let err = String::from_utf8_lossy(&ghost.stderr);
    assert!(
        err.contains("user 'ghost' does not exist in /etc/passwd"),
        "{err}"
    );
}
