//! An app never outlives a killed supervisor: when quiesce is not PID 1 its child gets a parent-death
//! SIGKILL (tini's `-p SIGKILL`). As PID 1 the kernel kills the namespace anyway.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn the_app_dies_with_a_sigkilled_supervisor() {
    let s = Scratch::new();
    // /bin/sleep sets no parent-death signal of its own (the fixture programs do), so only quiesce's
    // keeps it from running on.
    let mut c = quiesce(&s);
    c.args(["--", "/bin/sleep", "1000"]);
    let mut sup = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut pid = None;
    assert!(wait_until(T, || {
        pid = admin_status(&s)["child_pid"].as_i64().map(|p| p as i32);
        pid.is_some()
    }));
    let pid = pid.expect("child pid");
    assert!(alive(pid));
    send(sup.id(), libc::SIGKILL);
    let _ = wait_timeout(&mut sup, T);
    let gone = wait_until(T, || !alive(pid));
    if !gone {
        send(pid as u32, libc::SIGKILL);
    }
    assert!(gone, "the app (pid {pid}) outlived its supervisor");
}
