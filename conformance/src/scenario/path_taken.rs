//! Section 2: the app removes only a *stale* socket file. Started with a regular file at its
//! socket path, or with a socket another process (the kit) listens on, it must leave the file
//! alone and fail to start. The kit waits for the exit up to its timeout.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::scenario::Ctx;

const CONTENT: &str = "not a socket: the conformance kit's file\n";

/// Starts the app in `dir`; returns how it ended (an error when it kept running).
fn start_and_wait(ctx: &Ctx, dir: &Path) -> Result<Result<(), String>, String> {
    let mut app = ctx.spawn(dir)?;
    Ok(match app.wait_exit(ctx.opts.timeout) {
        None => Err(format!(
            "{}: still running after {} ms",
            dir.display(),
            ctx.opts.timeout.as_millis()
        )),
        Some(status) if status.success() => Err(format!("{}: exited with code 0", dir.display())),
        Some(_) => Ok(()),
    })
}

fn regular_file(ctx: &mut Ctx) -> Result<Result<(), String>, String> {
    let dir = ctx.dir("path-taken-file")?;
    let path = dir.join("control.sock");
    std::fs::write(&path, CONTENT).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let exited = start_and_wait(ctx, &dir)?;
    let kept = match std::fs::read_to_string(&path) {
        Ok(text) if text == CONTENT => Ok(()),
        Ok(_) => Err("the regular file's content changed".to_owned()),
        Err(e) => Err(format!("the regular file is gone or replaced ({e})")),
    };
    ctx.report.check("non-socket-kept", kept);
    Ok(exited)
}

fn live_socket(ctx: &mut Ctx) -> Result<Result<(), String>, String> {
    let dir = ctx.dir("path-taken-socket")?;
    let path = dir.join("control.sock");
    let listener = UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen at {}: {e}", path.display()))?;
    let inode = std::fs::metadata(&path)
        .map(|m| m.ino())
        .map_err(|e| e.to_string())?;
    let exited = start_and_wait(ctx, &dir)?;
    let kept = match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() && m.ino() == inode => Ok(()),
        Ok(_) => Err("the kit's socket file was replaced".to_owned()),
        Err(e) => Err(format!("the kit's socket file was removed ({e})")),
    };
    ctx.report.check("live-socket-kept", kept);
    drop(listener);
    Ok(exited)
}

pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let file = regular_file(ctx)?;
    let socket = live_socket(ctx)?;
    let both = match (file, socket) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), _) => Err(format!("with a regular file at the path: {e}")),
        (_, Err(e)) => Err(format!("with a live socket at the path: {e}")),
    };
    ctx.report.check("path-taken-exits", both);
    Ok(())
}
