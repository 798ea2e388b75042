//! One pod: `quiesce --config deploy/k8s/quiesce.toml -- order-service` as PID 1 of a fresh PID
//! namespace (`unshare --pid --fork --mount-proc --kill-child`), its sockets, ports and
//! termination log in a private directory, every stdout/stderr line kept with its arrival time.
//!
//! Dropping a [`Pod`] SIGKILLs `unshare`; `--kill-child` takes PID 1 and with it the whole
//! namespace, so no test leaves a process behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::bins;
use crate::manifest;
use crate::sandbox::Sandbox;

/// One line the pod printed, with when it arrived.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub at: Instant,
    pub text: String,
}

impl LogLine {
    /// The line as JSON, if it is a JSON log line.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.text).ok()
    }

    /// The `message` of a JSON line.
    pub fn message(&self) -> Option<String> {
        self.json()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
    }
}

/// Per-pod knobs on top of the manifests.
#[derive(Debug, Clone, Default)]
pub struct PodOptions {
    /// Extra `quiesce` flags (e.g. `--prestop-delay 1s`).
    pub supervisor_flags: Vec<String>,
    /// Extra environment for the app.
    pub app_env: Vec<(String, String)>,
}

/// A running (or finished) pod.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    child: Child,
    dir: tempfile::TempDir,
    /// The supervisor's probe address (the manifest's 50051, moved to a free port).
    pub health: SocketAddr,
    /// The supervisor's `/metrics` address.
    pub metrics: SocketAddr,
    log: Arc<Mutex<Vec<LogLine>>>,
    pub spawned: Instant,
    exit: Option<(ExitStatus, Instant)>,
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Host pids of `pid`'s children.
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static, sink: Arc<Mutex<Vec<LogLine>>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(text)) = lines.next_line().await {
            let line = LogLine {
                at: Instant::now(),
                text,
            };
            if std::env::var_os("E2E_ECHO_LOGS").is_some() {
                eprintln!("{}", line.text);
            }
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
}

impl Pod {
    /// Starts the pod. Returns at once; probes tell when it is up.
    pub fn start(name: &str, sandbox: &Sandbox, opts: &PodOptions) -> Pod {
        let dir = tempfile::Builder::new()
            .prefix(&format!("e2e-pod-{name}-"))
            .tempdir()
            .expect("a scratch directory for the pod");
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let p = |f: &str| dir.path().join(f);
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
            .arg(bins::quiesce())
            .arg("--config")
            .arg(manifest::quiesce_toml())
            .arg("--admin-socket")
            .arg(p("admin.sock"))
            .arg("--control-socket")
            .arg(p("control.sock"))
            .arg("--health-address")
            .arg(health.to_string())
            .arg("--metrics-address")
            .arg(metrics.to_string())
            .arg("--termination-log")
            .arg(p("termination-log"))
            .args(&opts.supervisor_flags)
            .arg("--")
            .arg(bins::order_service())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .envs(sandbox.app_env())
            .env("APP_GRPC_ADDR", "127.0.0.1:0")
            .env("APP_METRICS_ADDR", "127.0.0.1:0")
            .envs(opts.app_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .expect("spawn `unshare` (util-linux; needs root for a PID namespace)");
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            collect(out, log.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect(err, log.clone());
        }
        Pod {
            name: name.to_owned(),
            child,
            dir,
            health,
            metrics,
            log,
            spawned: Instant::now(),
            exit: None,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<LogLine> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        let from = lines.len().saturating_sub(n);
        lines[from..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for a line matching `pred`; panics (with the log) at `within` or if the pod exits.
    pub async fn wait_for_line(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> LogLine {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            if self.try_exit().is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "pod {} exited before logging {what}:\n{}",
                    self.name,
                    self.tail(60)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "pod {}: no {what} within {within:?}:\n{}",
                    self.name,
                    self.tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The app's gRPC address, from its "order-service ready" line.
    pub async fn app_grpc_addr(&mut self, within: Duration) -> SocketAddr {
        let line = self
            .wait_for_line("\"order-service ready\"", within, |l| {
                l.message().as_deref() == Some("order-service ready")
            })
            .await;
        line.json()
            .and_then(|v| v.get("grpc").and_then(|g| g.as_str()).map(str::to_owned))
            .and_then(|g| g.parse().ok())
            .unwrap_or_else(|| panic!("no grpc address in {:?}", line.text))
    }

    /// Host pid of the namespace's PID 1 (quiesce).
    pub fn init_pid(&self) -> Option<i32> {
        let unshare = self.child.id()? as i32;
        children(unshare).first().copied()
    }

    /// Host pid of the app (quiesce's child).
    pub fn app_pid(&self) -> Option<i32> {
        children(self.init_pid()?).first().copied()
    }

    /// Polls for the app's host pid.
    pub async fn wait_app_pid(&self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.app_pid() {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "pod {}: the app process did not appear within {within:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `sig` to PID 1 of the pod (what the container runtime does).
    pub fn signal_init(&self, sig: nix::sys::signal::Signal) -> bool {
        match self.init_pid() {
            Some(pid) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok(),
            None => false,
        }
    }

    /// The preStop exec hook: the manifest's command run inside the pod's PID and mount
    /// namespaces with an empty environment (`env -i`). Returns its exit code and output.
    pub async fn exec_prestop(
        &self,
        command: &[String],
        within: Duration,
    ) -> (Option<i32>, String) {
        let Some(init) = self.init_pid() else {
            return (None, "the pod is not running".into());
        };
        // The manifest's binary path is the image's; here the binary lives in the target dir.
        let args: Vec<String> = command.iter().skip(1).cloned().collect();
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &init.to_string(), "-p", "-m", "--", "env", "-i"])
            .arg(bins::quiesce())
            .args(&args)
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(within, cmd.output()).await {
            Ok(Ok(out)) => (
                out.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Ok(Err(e)) => (None, format!("cannot run nsenter: {e}")),
            Err(_) => (None, format!("preStop hook still running after {within:?}")),
        }
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if let Some((s, _)) = self.exit {
            return Some(s);
        }
        if let Ok(Some(s)) = self.child.try_wait() {
            self.exit = Some((s, Instant::now()));
            return Some(s);
        }
        None
    }

    /// Waits for the pod to end until `until`; returns its status and when it ended.
    pub async fn wait_exit(&mut self, until: Instant) -> Option<(ExitStatus, Instant)> {
        if self.exit.is_none()
            && let Ok(Ok(s)) = tokio::time::timeout_at(until, self.child.wait()).await
        {
            self.exit = Some((s, Instant::now()));
            // Let the readers catch the last lines.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.exit
    }

    /// SIGKILL (kubelet at the end of the grace period).
    pub async fn kill(&mut self) {
        if let Some(pid) = self.init_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.start_kill();
        let _ = self
            .wait_exit(Instant::now() + Duration::from_secs(10))
            .await;
    }

    /// The exit code as the container runtime reports it (128+N for a signal death).
    pub fn exit_code(&self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.exit
            .map(|(s, _)| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)))
    }

    /// The termination message file, if written.
    pub fn termination_message(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("termination-log")).ok()
    }
}

/// A read-only view of a pod's log and processes, usable while kubelet holds the [`Pod`].
#[derive(Debug, Clone)]
pub struct PodWatch {
    pub name: String,
    log: Arc<Mutex<Vec<LogLine>>>,
    unshare: Option<i32>,
}

impl PodWatch {
    pub fn lines(&self) -> Vec<LogLine> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn init_pid(&self) -> Option<i32> {
        children(self.unshare?).first().copied()
    }

    pub fn app_pid(&self) -> Option<i32> {
        children(self.init_pid()?).first().copied()
    }

    /// Waits for a line matching `pred` (None at `within`).
    pub async fn wait_for(
        &self,
        within: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> Option<LogLine> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Pod {
    /// A view for a task that watches the pod while kubelet terminates it.
    pub fn watch(&self) -> PodWatch {
        PodWatch {
            name: self.name.clone(),
            log: self.log.clone(),
            unshare: self.child.id().map(|p| p as i32),
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.exit.is_none() {
            if let Some(pid) = self.init_pid() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.child.start_kill();
        }
    }
}
