//! Health for kubelet: the `grpc.health.v1.Health` service (Check and Watch) on the probe port.
//!
//! | service | SERVING when |
//! |---|---|
//! | `liveness` | the app process is alive and (control mode) its socket answers `status` in time |
//! | `readiness`, `""` and the names the app announces | hello seen, required dependencies up, no stop begun |
//! | `startup` | hello seen once (signal mode: the process started), no stop begun |
//!
//! Three parts: [`compute`] is the pure rule above; [`track`] (main runtime) recomputes it whenever an input
//! changes and publishes a map on a watch channel; [`spawn_server`] answers probes from that map on its own
//! thread and runtime, so a busy supervisor never delays a probe. The [`poll`] task keeps an *observer*
//! connection to the app for `status` (liveness) and `health` (dependencies). The probe port is open to
//! every pod unless a NetworkPolicy says otherwise, so both servers on that thread are bounded ([`limits`]).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use quiesce_protocol::client::Client;
use quiesce_protocol::wire::{HealthReply, Role};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::config::Config;
use crate::exit::ChildEnd;
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::supervisor::Watches;

/// Service name → SERVING?
pub type Statuses = BTreeMap<String, bool>;

pub const LIVENESS: &str = "liveness";
pub const READINESS: &str = "readiness";
pub const STARTUP: &str = "startup";

/// Everything the rule looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    pub control: bool,
    pub alive: bool,
    pub hello: bool,
    pub deps_ok: bool,
    pub live_ok: bool,
    pub stopping: bool,
    pub services: Vec<String>,
}

/// The table in the module docs, as code.
pub fn compute(i: &Inputs) -> Statuses {
    let started = (if i.control { i.hello } else { i.alive }) && !i.stopping;
    let live = i.alive && (!i.control || i.live_ok);
    let ready = i.alive && !i.stopping && (!i.control || (i.hello && i.deps_ok));
    let mut m = Statuses::new();
    m.insert(LIVENESS.into(), live);
    m.insert(STARTUP.into(), started);
    m.insert(READINESS.into(), ready);
    m.insert(String::new(), ready);
    for s in &i.services {
        if !m.contains_key(s) {
            m.insert(s.clone(), ready);
        }
    }
    m
}

/// Watches fed by the observer poll.
#[derive(Debug)]
pub struct AppHealth {
    pub deps_ok: watch::Receiver<bool>,
    pub live_ok: watch::Receiver<bool>,
}

/// Why `service` has the answer [`compute`] gives it, in the words `quiesce ctl status` shows.
pub fn reason(i: &Inputs, service: &str, deps_down: &[String], live_why: &str) -> String {
    if !i.alive {
        return "the app is not running".into();
    }
    if service == LIVENESS {
        return match (i.control, i.live_ok) {
            (false, _) => "the app process is running".into(),
            (true, true) => "the app answers status on its control socket".into(),
            (true, false) if live_why.is_empty() => "the app does not answer status".into(),
            (true, false) => format!("the app does not answer status: {live_why}"),
        };
    }
    if i.stopping {
        return "the shutdown has begun".into();
    }
    if !i.control {
        return "the app process is running".into();
    }
    if !i.hello {
        return "the app has not said hello on its control socket yet".into();
    }
    if service == STARTUP {
        return "the app said hello".into();
    }
    match (i.deps_ok, deps_down.is_empty()) {
        (true, _) => "the app's required dependencies are up".into(),
        (false, true) => "no health answer from the app yet".into(),
        (false, false) => format!("{} down", deps_down.join(", ")),
    }
}

/// Keeps each service's status, since when and why in the shared status (`quiesce ctl status`).
fn publish(shared: &Shared, inputs: &Inputs, next: &Statuses) {
    let mut st = shared.lock();
    let (deps_down, live_why) = (st.deps_down.clone(), st.live_why.clone());
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    st.health.retain(|svc, _| next.contains_key(svc));
    for (svc, serving) in next {
        let status = if *serving { "SERVING" } else { "NOT_SERVING" };
        let why = reason(inputs, svc, &deps_down, &live_why);
        let e = st
            .health
            .entry(svc.clone())
            .or_insert_with(|| crate::state::ServiceHealth {
                status,
                since: now.clone(),
                why: why.clone(),
            });
        if e.status != status {
            e.status = status;
            e.since = now.clone();
        }
        e.why = why;
    }
}

/// Recomputes the statuses whenever an input changes; also mirrors them into the metrics and the shared
/// status.
pub async fn track(
    cfg: Arc<Config>,
    mut w: Watches,
    app: Option<AppHealth>,
    out: watch::Sender<Statuses>,
    shared: Shared,
) {
    let metrics = shared.metrics.clone();
    let control = cfg.control_socket.is_some();
    let (mut deps, mut live) = match app {
        Some(a) => (a.deps_ok, a.live_ok),
        None => (watch::channel(true).1, watch::channel(true).1),
    };
    loop {
        let services = w
            .hello
            .borrow_and_update()
            .as_ref()
            .map(|h| h.services.clone());
        let inputs = Inputs {
            control,
            alive: w.end.borrow_and_update().is_none(),
            hello: services.is_some(),
            deps_ok: *deps.borrow_and_update(),
            live_ok: *live.borrow_and_update(),
            stopping: *w.stopping.borrow_and_update(),
            services: services.unwrap_or_default(),
        };
        let next = compute(&inputs);
        publish(&shared, &inputs, &next);
        out.send_if_modified(|cur| {
            if *cur == next {
                return false;
            }
            for (svc, serving) in &next {
                if cur.get(svc) != Some(serving) {
                    let name = if svc.is_empty() { "\"\"" } else { svc.as_str() };
                    tracing::info!(service = name, serving, "health changed");
                }
                metrics.health(svc, *serving);
            }
            *cur = next.clone();
            true
        });
        tokio::select! {
            r = w.end.changed() => if r.is_err() { return },
            r = w.hello.changed() => if r.is_err() { return },
            r = w.stopping.changed() => if r.is_err() { return },
            Ok(()) = deps.changed() => {},
            Ok(()) = live.changed() => {},
        }
    }
}

/// Whether a health reply says every required dependency is up. `required` empty: the app's own flags.
pub fn deps_up(reply: &HealthReply, required: &[String]) -> bool {
    if required.is_empty() {
        return reply.checks.iter().filter(|c| c.required).all(|c| c.up);
    }
    required
        .iter()
        .all(|name| reply.checks.iter().any(|c| &c.name == name && c.up))
}

/// Control mode: keeps an observer connection and polls `status` (liveness) and `health` (readiness).
pub async fn poll(
    cfg: Arc<Config>,
    shared: Shared,
    end: watch::Receiver<Option<ChildEnd>>,
    hello: watch::Receiver<Option<quiesce_protocol::wire::HelloReply>>,
    deps_tx: watch::Sender<bool>,
    live_tx: watch::Sender<bool>,
) {
    let Some(path) = cfg.control_socket.clone() else {
        return;
    };
    let h = &cfg.health;
    let mut hello = hello;
    // Liveness is only judged once the app has answered hello (the startup probe covers the time before).
    if hello.wait_for(|h| h.is_some()).await.is_err() {
        return;
    }
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(h.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while end.borrow().is_none() {
        tick.tick().await;
        if client.is_none() {
            let until = Instant::now() + h.liveness_timeout;
            client = crate::control::connect(&path, Role::Observer, until, &end)
                .await
                .map(|(c, _)| c);
            if client.is_none() {
                live_tx.send_if_modified(|v| std::mem::replace(v, false));
                deps_tx.send_if_modified(|v| std::mem::replace(v, false));
                continue;
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let began = Instant::now();
        match timeout(h.liveness_timeout, c.status()).await {
            Ok(Ok(_)) => {
                shared.metrics.rtt("status", began.elapsed().as_secs_f64());
                shared.lock().live_why.clear();
                live_tx.send_if_modified(|v| !std::mem::replace(v, true));
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!(
                        "no answer to status within {}",
                        humantime::format_duration(h.liveness_timeout)
                    ),
                };
                shared.lock().live_why = why.clone();
                if live_tx.send_if_modified(|v| std::mem::replace(v, false)) {
                    tracing::warn!(reason = %why, "liveness: the app's control socket does not answer");
                }
                client = None;
                continue;
            }
        }
        let began = Instant::now();
        let wait = h.poll_interval.max(Duration::from_secs(2));
        match timeout(wait, c.health()).await {
            Ok(Ok(reply)) => {
                shared.metrics.rtt("health", began.elapsed().as_secs_f64());
                let ok = deps_up(&reply, &h.required);
                let down: Vec<String> = reply
                    .checks
                    .iter()
                    .filter(|c| !c.up)
                    .map(|c| match &c.error {
                        Some(m) if !m.is_empty() => {
                            let m: String =
                                m.chars().take(120).filter(|c| !c.is_control()).collect();
                            format!("{} ({m})", c.name)
                        }
                        _ => c.name.clone(),
                    })
                    .collect();
                let new_down = {
                    let mut st = shared.lock();
                    st.deps_down != down && {
                        st.deps_down = down.clone();
                        true
                    }
                };
                if deps_tx.send_if_modified(|v| std::mem::replace(v, ok) != ok) {
                    tracing::info!(ready = ok, down = ?down, "dependency health changed");
                } else if new_down {
                    // Same answer, other reasons: wake the tracker so `ctl status` says why.
                    deps_tx.send_modify(|_| {});
                }
            }
            _ => {
                deps_tx.send_if_modified(|v| std::mem::replace(v, false));
                client = None;
            }
        }
    }
}

/// The gRPC service kubelet calls.
#[derive(Clone, Debug)]
pub struct HealthSvc {
    statuses: watch::Receiver<Statuses>,
    /// Count of readiness Checks from kubelet (`kube-probe/` user agent) answered NOT_SERVING.
    probes_seen: watch::Sender<u32>,
    /// One permit per open Watch stream ([`limits::WATCH_STREAMS`]): each holds a task and a receiver.
    watch_slots: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
}

fn to_status(serving: bool) -> i32 {
    if serving {
        ServingStatus::Serving as i32
    } else {
        ServingStatus::NotServing as i32
    }
}

#[tonic::async_trait]
impl Health for HealthSvc {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let kube = req
            .metadata()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ua| ua.starts_with("kube-probe/"));
        let service = req.into_inner().service;
        let serving = self.statuses.borrow().get(&service).copied();
        match serving {
            None => Err(Status::not_found(format!(
                "unknown service '{service}': ask for liveness, readiness, startup or \"\""
            ))),
            Some(serving) => {
                if kube && !serving && (service == READINESS || service.is_empty()) {
                    self.probes_seen.send_modify(|n| *n += 1);
                }
                Ok(Response::new(HealthCheckResponse {
                    status: to_status(serving),
                }))
            }
        }
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let Ok(slot) = self.watch_slots.clone().try_acquire_owned() else {
            self.metrics.refused("health", "watch_streams");
            return Err(Status::resource_exhausted(format!(
                "{} Watch streams are open, the most this probe port keeps: use Check, as kubelet does",
                limits::WATCH_STREAMS
            )));
        };
        let service = req.into_inner().service;
        let rx = self.statuses.clone();
        // First the current status, then every change; an unknown service reports SERVICE_UNKNOWN and keeps
        // watching, as the gRPC health spec asks. The slot goes back when the stream is dropped.
        let stream = futures_util::stream::unfold(
            (rx, None::<i32>, true, slot),
            move |(mut rx, last, first, slot)| {
                let service = service.clone();
                async move {
                    loop {
                        if !first && rx.changed().await.is_err() {
                            return None;
                        }
                        let now = match rx.borrow_and_update().get(&service) {
                            Some(s) => to_status(*s),
                            None => ServingStatus::ServiceUnknown as i32,
                        };
                        if last != Some(now) {
                            return Some((
                                Ok(HealthCheckResponse { status: now }),
                                (rx, Some(now), false, slot),
                            ));
                        }
                        if first {
                            // unreachable: `last` is None on the first pass
                            return None;
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Starts the probe thread: its own current-thread runtime serving gRPC health and, if bound, `/metrics`.
/// Both servers are bounded as [`limits`] says, so no peer can grow PID 1's memory or descriptors.
pub fn spawn_server(
    health: Option<TcpListener>,
    metrics: Option<TcpListener>,
    statuses: watch::Receiver<Statuses>,
    probes_seen: watch::Sender<u32>,
    registry: Arc<Metrics>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("quiesce-probes".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Some(l) = metrics {
                    tokio::spawn(crate::metrics::serve(l, registry.clone()));
                }
                match health {
                    Some(l) => serve_health(l, statuses, probes_seen, registry).await,
                    None => std::future::pending::<()>().await,
                }
            });
        })?;
    Ok(())
}

/// gRPC health over HTTP/2 with every limit set: tonic's defaults leave streams, windows and messages
/// unbounded and keep a connection for as long as its peer likes.
async fn serve_health(
    l: TcpListener,
    statuses: watch::Receiver<Statuses>,
    probes_seen: watch::Sender<u32>,
    registry: Arc<Metrics>,
) {
    use limits::*;
    let listener = match listener(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "health listener unusable");
            return;
        }
    };
    let gate = Gate::new(HEALTH, registry.clone());
    let svc = HealthServer::new(HealthSvc {
        statuses,
        probes_seen,
        watch_slots: Arc::new(tokio::sync::Semaphore::new(WATCH_STREAMS)),
        metrics: registry,
    })
    .max_decoding_message_size(MAX_MESSAGE);
    let res = tonic::transport::Server::builder()
        .max_concurrent_streams(H2_STREAMS_PER_CONNECTION)
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .http2_max_header_list_size(H2_MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(H2_KEEPALIVE))
        .http2_keepalive_timeout(Some(H2_KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
        .timeout(REQUEST_TIMEOUT)
        .serve_with_incoming(svc, incoming(listener, gate))
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "health server stopped");
    }
}

/// A bound std listener, made usable by the probe thread's runtime.
pub(crate) fn listener(l: TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// The accepted connections `gate` admits, each wrapped in its idle timer; the others are closed at once.
fn incoming(
    listener: tokio::net::TcpListener,
    gate: Arc<limits::Gate>,
) -> impl Stream<Item = std::io::Result<limits::Conn>> {
    futures_util::stream::unfold((listener, gate), |(listener, gate)| async move {
        let conn = limits::accept(&listener, &gate).await;
        Some((Ok(conn), (listener, gate)))
    })
}

/// Binds a probe-side listener before the child starts (so the app cannot take the port first).
pub fn bind(what: &str, addr: std::net::SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| {
        format!("cannot bind the {what} address {addr}: {e}; free the port or set a different {what}.address")
    })
}

/// What the probe thread's servers keep, at most, whatever their peers do (docs/OPERATIONS.md, "Limits").
///
/// Every peer of the probe and metrics ports gets a slot from its server's [`Gate`] (a total and a
/// per-address cap, so one client cannot take every slot) or is closed at once; every admitted connection
/// is a [`Conn`] that closes itself when its peer goes silent or stops reading. What a connection may
/// hold inside (streams, windows, messages, header bytes) is set on the HTTP/2 and HTTP/1 builders.
pub mod limits {
    use std::collections::HashMap;
    use std::io;
    use std::net::IpAddr;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;
    use tokio::time::{Instant, Sleep};

    use crate::metrics::Metrics;

    /// HTTP/2 streams one connection may have open (kubelet uses one per probe connection).
    pub const H2_STREAMS_PER_CONNECTION: u32 = 8;
    /// Watch streams open on the probe port in total; more are answered RESOURCE_EXHAUSTED.
    pub const WATCH_STREAMS: usize = 32;
    /// HTTP/2 flow-control windows (stream and connection): unread request bytes one connection can park.
    pub const H2_WINDOW: u32 = 65_535;
    /// HPACK-decoded header bytes per HTTP/2 request.
    pub const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
    /// A `HealthCheckRequest` is one service name.
    pub const MAX_MESSAGE: usize = 4 * 1024;
    /// A ping after this much silence from an HTTP/2 peer; no ack within the timeout closes it.
    pub const H2_KEEPALIVE: Duration = Duration::from_secs(4);
    pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Then GOAWAY (clients reconnect); after the grace the connection is closed, open streams or not.
    pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
    pub const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(5);
    /// A gRPC handler's answer (a Watch stream's first message), request body included.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// HTTP/1: a request's head, from the first moment the server waits for it (idle keep-alive included).
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
    /// HTTP/1 read buffer per connection (hyper's default is ~400 KiB).
    pub const HTTP1_MAX_BUF: usize = 16 * 1024;
    /// No byte from the peer for this long, or a write stuck for this long: the connection is closed.
    pub const IDLE: Duration = Duration::from_secs(10);
    /// How often a refusal is logged at most (each one is counted in the metrics).
    const WARN_EVERY: Duration = Duration::from_secs(60);

    /// The connection caps of one server.
    #[derive(Clone, Copy, Debug)]
    pub struct Caps {
        pub server: &'static str,
        pub connections: usize,
        pub per_peer: usize,
    }

    pub const HEALTH: Caps = Caps {
        server: "health",
        connections: 32,
        per_peer: 8,
    };
    pub const METRICS: Caps = Caps {
        server: "metrics",
        connections: 16,
        per_peer: 4,
    };

    #[derive(Debug, Default)]
    struct Open {
        total: usize,
        peers: HashMap<IpAddr, usize>,
        refused: u64,
        warned: Option<Instant>,
    }

    /// Admits connections up to its [`Caps`].
    #[derive(Debug)]
    pub struct Gate {
        caps: Caps,
        open: Mutex<Open>,
        metrics: Arc<Metrics>,
    }

    impl Gate {
        pub fn new(caps: Caps, metrics: Arc<Metrics>) -> Arc<Gate> {
            Arc::new(Gate {
                caps,
                open: Mutex::new(Open::default()),
                metrics,
            })
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
            self.open.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// A slot for one connection from `peer`, or the name of the cap it would pass.
        fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, &'static str> {
            let mut open = self.lock();
            let from_peer = open.peers.get(&peer).copied().unwrap_or(0);
            let full = if open.total >= self.caps.connections {
                Some("connections")
            } else if from_peer >= self.caps.per_peer {
                Some("peer_connections")
            } else {
                None
            };
            if let Some(limit) = full {
                open.refused += 1;
                if open.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    tracing::warn!(server = self.caps.server, limit, peer = %peer, refused = open.refused,
                        "connections refused: the server is at its cap (see Limits in docs/OPERATIONS.md)");
                    open.warned = Some(Instant::now());
                    open.refused = 0;
                }
                drop(open);
                self.metrics.refused(self.caps.server, limit);
                return Err(limit);
            }
            open.total += 1;
            open.peers.insert(peer, from_peer + 1);
            drop(open);
            self.metrics.connections(self.caps.server, 1.0);
            Ok(Slot {
                gate: self.clone(),
                peer,
            })
        }
    }

    /// One admitted connection's place in its gate, given back on drop.
    #[derive(Debug)]
    pub struct Slot {
        gate: Arc<Gate>,
        peer: IpAddr,
    }

    impl Drop for Slot {
        fn drop(&mut self) {
            let mut open = self.gate.lock();
            open.total = open.total.saturating_sub(1);
            if let Some(n) = open.peers.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    open.peers.remove(&self.peer);
                }
            }
            drop(open);
            self.gate.metrics.connections(self.gate.caps.server, -1.0);
        }
    }

    /// The next connection `gate` admits; the refused ones are closed as they come. Accept errors
    /// (EMFILE) back off instead of spinning.
    pub async fn accept(listener: &tokio::net::TcpListener, gate: &Arc<Gate>) -> Conn {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(server = gate.caps.server, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Ok(slot) = gate.admit(peer.ip()) {
                let _ = stream.set_nodelay(true);
                return Conn::new(stream, slot);
            }
        }
    }

    /// An admitted TCP connection that fails its reads once the peer has sent nothing for [`IDLE`], and
    /// its writes once one has been stuck that long, so the server drops it.
    #[derive(Debug)]
    pub struct Conn {
        io: TcpStream,
        last_read: Instant,
        read_timer: Pin<Box<Sleep>>,
        write_stuck: Option<Instant>,
        write_timer: Pin<Box<Sleep>>,
        slot: Slot,
    }

    impl Conn {
        fn new(io: TcpStream, slot: Slot) -> Conn {
            let now = Instant::now();
            Conn {
                io,
                last_read: now,
                read_timer: Box::pin(tokio::time::sleep_until(now + IDLE)),
                write_stuck: None,
                write_timer: Box::pin(tokio::time::sleep_until(now + IDLE)),
                slot,
            }
        }

        fn timed_out(&self, what: &str) -> io::Error {
            let server = self.slot.gate.caps.server;
            tracing::debug!(server, peer = %self.slot.peer, what, "connection closed: idle");
            self.slot.gate.metrics.timed_out(server);
            io::Error::new(io::ErrorKind::TimedOut, format!("{what} idle for {IDLE:?}"))
        }
    }

    /// Whether `since + IDLE` has passed; if not, `cx` is woken when it does.
    fn expired(timer: &mut Pin<Box<Sleep>>, since: Instant, cx: &mut Context<'_>) -> bool {
        let deadline = since + IDLE;
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    impl AsyncRead for Conn {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            let before = buf.filled().len();
            match Pin::new(&mut this.io).poll_read(cx, buf) {
                Poll::Pending if expired(&mut this.read_timer, this.last_read, cx) => {
                    Poll::Ready(Err(this.timed_out("read")))
                }
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    this.last_read = Instant::now();
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        }
    }

    impl Conn {
        /// The write-side rule around one write attempt.
        fn on_write(
            &mut self,
            cx: &mut Context<'_>,
            r: Poll<io::Result<usize>>,
        ) -> Poll<io::Result<usize>> {
            match r {
                Poll::Pending => {
                    let since = *self.write_stuck.get_or_insert_with(Instant::now);
                    if expired(&mut self.write_timer, since, cx) {
                        return Poll::Ready(Err(self.timed_out("write")));
                    }
                    Poll::Pending
                }
                done => {
                    self.write_stuck = None;
                    done
                }
            }
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.io).poll_write(cx, buf);
            self.on_write(cx, r)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            self.on_write(cx, r)
        }

        fn is_write_vectored(&self) -> bool {
            self.io.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    impl tonic::transport::server::Connected for Conn {
        type ConnectInfo = tonic::transport::server::TcpConnectInfo;

        fn connect_info(&self) -> Self::ConnectInfo {
            tonic::transport::server::Connected::connect_info(&self.io)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            control: true,
            alive: true,
            hello: true,
            deps_ok: true,
            live_ok: true,
            stopping: false,
            services: vec!["order.v1.OrderService".into()],
        }
    }

    #[test]
    fn all_serving_when_all_is_well() {
        let m = compute(&inputs());
        assert!(m.values().all(|s| *s), "{m:?}");
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn dependency_outage_makes_unready_never_dead() {
        let m = compute(&Inputs {
            deps_ok: false,
            ..inputs()
        });
        assert!(m[LIVENESS] && m[STARTUP]);
        assert!(!m[READINESS] && !m[""] && !m["order.v1.OrderService"]);
    }

    #[test]
    fn frozen_app_fails_liveness_only() {
        let m = compute(&Inputs {
            live_ok: false,
            ..inputs()
        });
        assert!(!m[LIVENESS]);
        assert!(m[READINESS]);
    }

    #[test]
    fn stopping_turns_everything_but_liveness_off() {
        let m = compute(&Inputs {
            stopping: true,
            ..inputs()
        });
        assert!(m[LIVENESS]);
        assert!(!m[STARTUP]);
        assert!(!m[READINESS] && !m[""] && !m["order.v1.OrderService"]);
    }

    #[test]
    fn before_hello_nothing_but_liveness() {
        let m = compute(&Inputs {
            hello: false,
            services: vec![],
            ..inputs()
        });
        assert!(m[LIVENESS]);
        assert!(!m[STARTUP] && !m[READINESS]);
    }

    #[test]
    fn signal_mode_follows_the_process() {
        let base = Inputs {
            control: false,
            hello: false,
            deps_ok: false,
            live_ok: false,
            services: vec![],
            ..inputs()
        };
        assert!(compute(&base).values().all(|s| *s));
        let dead = compute(&Inputs {
            alive: false,
            ..base
        });
        assert!(dead.values().all(|s| !*s));
    }

    #[test]
    fn required_list_overrides_app_flags() {
        use quiesce_protocol::wire::CheckReply;
        let c = |name: &str, required: bool, up: bool| CheckReply {
            name: name.into(),
            required,
            up,
            latency_ms: 1.0,
            error: None,
        };
        let reply = HealthReply {
            ok: true,
            healthy: false,
            checks: vec![
                c("db", true, true),
                c("cache", false, false),
                c("mq", true, false),
            ],
        };
        assert!(!deps_up(&reply, &[]));
        assert!(deps_up(&reply, &["db".into()]));
        assert!(!deps_up(&reply, &["db".into(), "missing".into()]));
    }
}
