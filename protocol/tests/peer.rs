//! SO_PEERCRED: a client running as another uid is refused even when the file mode lets it in.
//!
//! The other-uid client is this test binary re-executed as uid 65534 (std's `CommandExt::uid`,
//! so no unsafe `fork`/`setuid` here), running the `peer_helper` test with the socket path in
//! its environment. Needs root: elsewhere the tests fail, or skip with a line on stderr when
//! `QUIESCE_ALLOW_SKIP=1`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use quiesce_protocol::agent::Agent;

/// Not a test on its own: the body of the re-executed client (see [`common::run_peer`]). Does
/// nothing (and passes) when run as part of the suite.
#[test]
fn peer_helper() {
    peer_helper_main();
}

#[tokio::test]
async fn a_peer_with_another_uid_is_refused_and_disconnected() {
    if !needs_root(&format!("running a client as uid {NOBODY}")) {
        return;
    }
    let dir = SocketDir::new();
    dir.open_up();
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
    if !needs_root(&format!("running a client as uid {NOBODY}")) {
        return;
    }
    let dir = SocketDir::new();
    dir.open_up();
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
