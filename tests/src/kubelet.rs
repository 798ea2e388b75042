//! The parts of kubelet a pod's termination depends on.
//!
//! - Probes ([`Prober`]): gRPC `Check` on the supervisor's probe port with the manifest's
//!   period, timeout and thresholds, a fresh connection per probe and kubelet's
//!   `kube-probe/` user agent. The startup probe runs until it succeeds; readiness and liveness
//!   only after that. Their results make the pod's conditions: `started`, `ready` (after
//!   `successThreshold` successes / `failureThreshold` failures in a row) and `liveness_failed`
//!   (kubelet would restart the container).
//! - Termination ([`terminate`]): the pod is marked terminating (the endpoints controller drops
//!   it), the preStop exec hook runs (its time counts against the grace period), then SIGTERM to
//!   PID 1, then SIGKILL when `terminationGracePeriodSeconds` (minus the hook's time, at least
//!   2 s, as kubelet computes it) has passed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::manifest::{PodManifest, Probe};
use crate::pod::Pod;

/// Kubelet's user agent for probes (the supervisor counts NOT_SERVING answers to it).
pub const USER_AGENT: &str = "kube-probe/1.31";
/// Kubelet never gives the container less than this after the preStop hook.
pub const MIN_GRACE_AFTER_HOOK: Duration = Duration::from_secs(2);

/// What kubelet knows about the pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conditions {
    pub started: bool,
    pub ready: bool,
    /// The startup probe reached its failure threshold (kubelet would kill the container).
    pub startup_failed: bool,
    /// The liveness probe reached its failure threshold (kubelet would restart the container).
    pub liveness_failed: bool,
}

/// One probe result.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub at: Instant,
    pub probe: &'static str,
    pub serving: bool,
    pub detail: String,
}

/// The probe workers of one pod.
#[derive(Debug)]
pub struct Prober {
    pub conditions: watch::Receiver<Conditions>,
    results: Arc<Mutex<Vec<ProbeResult>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// One gRPC health check the way kubelet does it: new connection, timeout, user agent.
pub async fn check(addr: SocketAddr, service: &str, timeout: Duration) -> Result<bool, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .user_agent(USER_AGENT)
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout);
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = HealthClient::new(channel);
        let reply = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Ok(reply.into_inner().status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("probe timed out after {timeout:?}")))
}

impl Prober {
    /// Starts the startup, readiness and liveness workers against `pod`'s probe port.
    pub fn start(pod: &Pod, manifest: &PodManifest) -> Prober {
        let (tx, rx) = watch::channel(Conditions::default());
        let tx = Arc::new(tx);
        let results = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, probe) in [
            ("startup", manifest.startup.clone()),
            ("readiness", manifest.readiness.clone()),
            ("liveness", manifest.liveness.clone()),
        ] {
            tasks.push(tokio::spawn(worker(
                name,
                probe,
                pod.health,
                tx.clone(),
                results.clone(),
            )));
        }
        Prober {
            conditions: rx,
            results,
            tasks,
        }
    }

    pub fn now(&self) -> Conditions {
        *self.conditions.borrow()
    }

    /// Every probe result so far.
    pub fn results(&self) -> Vec<ProbeResult> {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the pod is Ready; panics at `within` or when the startup probe gives up.
    pub async fn wait_ready(&self, pod: &Pod, within: Duration) {
        let mut rx = self.conditions.clone();
        let got = tokio::time::timeout(
            within,
            rx.wait_for(|c| c.ready || c.startup_failed || c.liveness_failed),
        )
        .await
        .map(|r| r.is_ok());
        let c = self.now();
        assert!(
            got == Ok(true) && c.ready,
            "pod {} not Ready within {within:?} ({c:?}); last probes: {:?}\n{}",
            pod.name,
            self.results().iter().rev().take(6).collect::<Vec<_>>(),
            pod.tail(40)
        );
    }

    /// Stops probing (the pod is gone).
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn worker(
    name: &'static str,
    probe: Probe,
    addr: SocketAddr,
    conditions: Arc<watch::Sender<Conditions>>,
    results: Arc<Mutex<Vec<ProbeResult>>>,
) {
    tokio::time::sleep(probe.initial_delay).await;
    let mut ticks = tokio::time::interval(probe.period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0u32, 0u32);
    loop {
        ticks.tick().await;
        let started = conditions.borrow().started;
        if name == "startup" && started {
            return;
        }
        if name != "startup" && !started {
            continue;
        }
        let at = Instant::now();
        let (serving, detail) = match check(addr, &probe.service, probe.timeout).await {
            Ok(true) => (true, "SERVING".to_owned()),
            Ok(false) => (false, "NOT_SERVING".to_owned()),
            Err(e) => (false, e),
        };
        results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ProbeResult {
                at,
                probe: name,
                serving,
                detail,
            });
        if serving {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        conditions.send_if_modified(|c| {
            let before = *c;
            match name {
                "startup" if serving => c.started = true,
                "startup" if failures >= probe.failure_threshold => c.startup_failed = true,
                "readiness" if successes >= probe.success_threshold => c.ready = true,
                "readiness" if failures >= probe.failure_threshold => c.ready = false,
                "liveness" if failures >= probe.failure_threshold => c.liveness_failed = true,
                _ => {}
            }
            *c != before
        });
    }
}

/// What happened during one termination, on the simulator's clock.
#[derive(Debug, Clone)]
pub struct Termination {
    /// The pod was marked for deletion and the preStop hook started.
    pub started: Instant,
    pub prestop_code: Option<i32>,
    pub prestop_output: String,
    pub prestop_took: Duration,
    pub sigterm_at: Option<Instant>,
    /// Kubelet had to SIGKILL at the end of the grace period.
    pub killed: bool,
    pub ended: Option<Instant>,
    pub exit_code: Option<i32>,
}

impl Termination {
    /// From the start of the termination to the container's exit.
    pub fn wall(&self) -> Option<Duration> {
        self.ended
            .map(|e| e.saturating_duration_since(self.started))
    }
}

/// Terminates `pod` as kubelet does; `mark_terminating` runs first (the API server sets the
/// deletion timestamp, which the endpoints controller reacts to, while kubelet runs the hook).
pub async fn terminate(
    pod: &mut Pod,
    manifest: &PodManifest,
    mark_terminating: impl FnOnce(),
) -> Termination {
    let started = Instant::now();
    mark_terminating();
    let grace = manifest.termination_grace;
    let (prestop_code, prestop_output) = if manifest.prestop_command.is_empty() {
        (Some(0), String::new())
    } else {
        pod.exec_prestop(&manifest.prestop_command, grace).await
    };
    let prestop_took = started.elapsed();
    let left = grace.saturating_sub(prestop_took).max(MIN_GRACE_AFTER_HOOK);
    let sigterm_at = Instant::now();
    let sent = pod.signal_init(nix::sys::signal::Signal::SIGTERM);
    let mut killed = false;
    let ended = match pod.wait_exit(sigterm_at + left).await {
        Some((_, at)) => Some(at),
        None => {
            killed = true;
            pod.kill().await;
            pod.wait_exit(Instant::now() + Duration::from_secs(10))
                .await
                .map(|(_, at)| at)
        }
    };
    Termination {
        started,
        prestop_code,
        prestop_output,
        prestop_took,
        sigterm_at: sent.then_some(sigterm_at),
        killed,
        ended,
        exit_code: pod.exit_code(),
    }
}
