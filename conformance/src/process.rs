//! The app processes the kit starts. Each runs in its own process group (so the kit can kill it
//! together with anything it forked), with stdin closed and its output in files of the
//! scenario's directory, and dies with the kit (see [`crate::sys`]). Dropping an [`App`] kills
//! its group and reaps it; a registry of live groups lets the kit's watchdog kill them all when
//! the whole run exceeds its hard timeout.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::conn::{Conn, Shared};

/// Process groups the kit started and has not killed yet.
static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Kills every live group (the watchdog's last act).
pub fn kill_all() {
    let groups = GROUPS.lock().map(|g| g.clone()).unwrap_or_default();
    for pgid in groups {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// How the app finds its control socket.
#[derive(Debug, Clone)]
pub enum Socket {
    /// `QUIESCE_CONTROL_SOCKET` set to this path.
    At(PathBuf),
    /// `QUIESCE_CONTROL_SOCKET` unset: the no-supervisor path.
    Unset,
    /// `QUIESCE_CONTROL_SOCKET` set but empty: the no-supervisor path too.
    Empty,
}

/// One started app.
#[derive(Debug)]
pub struct App {
    child: Child,
    pgid: i32,
    status: Option<ExitStatus>,
    stderr: PathBuf,
    pub socket: Option<PathBuf>,
}

impl App {
    /// Starts `command` with its socket in `dir` (which holds its output files).
    pub fn spawn(command: &[String], socket: Socket, dir: &Path) -> Result<App, String> {
        let (program, args) = command.split_first().ok_or("no command to run")?;
        let stdout = File::create(dir.join("app.stdout"))
            .map_err(|e| format!("cannot create the app's stdout file: {e}"))?;
        let stderr_path = dir.join("app.stderr");
        let stderr = File::create(&stderr_path)
            .map_err(|e| format!("cannot create the app's stderr file: {e}"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let path = match socket {
            Socket::At(path) => {
                cmd.env("QUIESCE_CONTROL_SOCKET", &path);
                Some(path)
            }
            Socket::Unset => {
                cmd.env_remove("QUIESCE_CONTROL_SOCKET");
                None
            }
            Socket::Empty => {
                cmd.env("QUIESCE_CONTROL_SOCKET", "");
                None
            }
        };
        crate::sys::die_with_kit(&mut cmd);
        let mut groups = GROUPS
            .lock()
            .map_err(|_| "the process registry is poisoned")?;
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start `{program}`: {e}"))?;
        let pgid = i32::try_from(child.id()).map_err(|_| "pid out of range")?;
        groups.push(pgid);
        Ok(App {
            child,
            pgid,
            status: None,
            stderr: stderr_path,
            socket: path,
        })
    }

    /// The process group (the pid of the process the kit started).
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the process the kit started (not its group).
    pub fn signal(&self, signal: Signal) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.pgid), signal);
    }

    /// Connects to the socket, retrying every 50 ms for up to `within` while the app starts.
    /// Fails early when the process exits. Returns the connection and how long it took.
    pub fn wait_listening(
        &mut self,
        within: Duration,
        shared: &Shared,
    ) -> Result<(Conn, Duration), String> {
        let path = self.socket.clone().ok_or("the app has no socket")?;
        let start = Instant::now();
        loop {
            match Conn::connect(&path, shared) {
                Ok(conn) => return Ok((conn, start.elapsed())),
                Err(e) => {
                    if let Some(status) = self.exited() {
                        return Err(format!(
                            "the app exited ({}) before listening{}",
                            describe(status),
                            self.stderr_tail()
                        ));
                    }
                    if start.elapsed() >= within {
                        return Err(format!(
                            "nothing accepted connections at {} within {within:?} ({e})",
                            path.display()
                        ));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last line of the app's stderr, as `: <line>`, or nothing.
    pub fn stderr_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.stderr) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(600)));
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        match text.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(line) => format!("; its stderr ends: {}", line.trim()),
            None => String::new(),
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(mut groups) = GROUPS.lock() {
            groups.retain(|g| *g != self.pgid);
        }
    }
}

/// `code 3` or `signal 15 (SIGTERM)`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({})", s.as_str()),
            Err(_) => format!("signal {sig}"),
        },
        _ => "an unknown status".to_owned(),
    }
}
