//! Floods against the probe thread (health on HTTP/2, `/metrics` on HTTP/1), as a peer anywhere in the
//! cluster can send them: Watch streams on one connection, streams past SETTINGS, connections past the caps,
//! idle and half-sent connections. PID 1's memory must stay bounded, idle peers must be let go, and
//! kubelet-style Checks (the independent Python client, on a connection of its own) must keep their answers.
//! The bounds are in docs/OPERATIONS.md ("Limits"); attackers connect from other loopback addresses
//! (127.0.0.2 and up) so the per-address caps leave room for the probe from 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use quiesce::health::limits::{HEALTH, METRICS};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const T: Duration = Duration::from_secs(30);
/// Growth of the debug build's RSS over its idle value that a flood may cause (the release build's bound,
/// 16 MiB in all, is in docs/OPERATIONS.md). Without the limits, 10,000 Watch streams grow it by ~70 MiB.
const GROWTH_KIB: u64 = 8 * 1024;

struct Pod {
    sup: Child,
    health: String,
    metrics: String,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.sup.kill();
        let _ = self.sup.wait();
    }
}

impl Pod {
    fn start(s: &Scratch) -> Pod {
        let health = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut c = quiesce(s);
        c.args(["--health-enabled", "true", "--health-address", &health])
            .args(["--metrics-enabled", "true", "--metrics-address", &metrics])
            .args(["--log-level", "warn", "--", "sleep", "3600"]);
        let sup = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let pod = Pod {
            sup,
            health,
            metrics,
        };
        assert!(
            wait_until(T, || pod.check() == "SERVING"),
            "readiness never SERVING"
        );
        pod
    }

    /// One kubelet-style Check of readiness on a fresh connection from 127.0.0.1.
    fn check(&self) -> String {
        check(&self.health, "readiness")
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.sup.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn scrape(&self) -> String {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "--max-time",
            "10",
            &format!("http://{}/metrics", self.metrics),
        ]);
        String::from_utf8_lossy(&output_timeout(c, T).stdout).into_owned()
    }

    /// RSS at rest: after a Check and a scrape have warmed both servers up.
    fn idle_rss(&self) -> u64 {
        assert!(self.scrape().contains("quiesce_build_info"));
        assert_eq!(self.check(), "SERVING");
        std::thread::sleep(Duration::from_millis(300));
        self.rss_kib()
    }
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A TCP connection to `addr` from 127.0.0.`last` (any 127/8 address is local on Linux).
fn tcp_from(last: u8, addr: &str) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let addr: SocketAddr = addr.parse().expect("addr");
    let s = rt
        .block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::from(([127, 0, 0, last], 0)))?;
            tokio::time::timeout(Duration::from_secs(10), sock.connect(addr)).await?
        })
        .and_then(|s| s.into_std())
        .expect("connect");
    s.set_nonblocking(true).expect("nonblocking");
    s
}

/// Whether the server has closed `s` (EOF or reset); drains what it sent.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

fn count_closed(conns: &mut [TcpStream]) -> usize {
    conns.iter_mut().map(closed).filter(|c| *c).count()
}

/// A hand-written HTTP/2 client that opens what it likes, SETTINGS or not.
struct H2 {
    s: TcpStream,
    buf: Vec<u8>,
    refused: usize,
    answered: usize,
    next_id: u32,
    /// The connection's send window: the client keeps to flow control, only not to the stream limit.
    window: i64,
    closed: bool,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A request's HEADERS block: HPACK literals without indexing, no Huffman (every string is < 127 bytes).
fn request_headers(path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        b.push(0);
        b.push(k.len() as u8);
        b.extend_from_slice(k.as_bytes());
        b.push(v.len() as u8);
        b.extend_from_slice(v.as_bytes());
    }
    b
}

impl H2 {
    fn open(last: u8, addr: &str) -> H2 {
        let mut h = H2 {
            s: tcp_from(last, addr),
            buf: Vec::new(),
            refused: 0,
            answered: 0,
            next_id: 1,
            window: 65_535,
            closed: false,
        };
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(4, 0, 0, &[]));
        h.send(&hello);
        h
    }

    fn send(&mut self, bytes: &[u8]) {
        // Written in one go on a non-blocking socket: small frames, and a closed peer is fine here.
        let _ = self.s.set_nonblocking(false);
        let _ = self.s.write_all(bytes);
        let _ = self.s.set_nonblocking(true);
    }

    /// Takes `n` bytes of the send window, pumping until the server has given them (10 s at most).
    fn room(&mut self, n: i64) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while self.window < n {
            if self.closed || Instant::now() > until {
                return false;
            }
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.window -= n;
        true
    }

    /// A complete `Watch(readiness)` request on a new stream.
    fn watch(&mut self) {
        if !self.room(16) {
            return;
        }
        let id = self.next_id;
        self.next_id += 2;
        let msg = [&[0u8, 0, 0, 0, 11, 0x0a, 9][..], b"readiness"].concat();
        let mut f = frame(1, 0x4, id, &request_headers("/grpc.health.v1.Health/Watch"));
        f.extend(frame(0, 0x1, id, &msg));
        self.send(&f);
    }

    /// A Check whose message never ends: 4,000 of the 4,096 bytes it announces, held until the server
    /// gives up on it.
    fn held_check(&mut self) {
        if !self.room(4005) {
            return;
        }
        let id = self.next_id;
        self.next_id += 2;
        let mut msg = vec![0u8, 0, 0, 0x10, 0];
        msg.resize(5 + 4000, b'x');
        let mut f = frame(1, 0x4, id, &request_headers("/grpc.health.v1.Health/Check"));
        f.extend(frame(0, 0, id, &msg));
        self.send(&f);
    }

    /// Reads what has arrived: counts refused streams and answers, acks SETTINGS and PING.
    fn pump(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.s.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => self.closed = true,
            }
            break;
        }
        while self.buf.len() >= 9 {
            let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
            if self.buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (self.buf[3], self.buf[4]);
            let stream = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]);
            let payload: Vec<u8> = self.buf[9..9 + len].to_vec();
            self.buf.drain(..9 + len);
            match kind {
                1 => self.answered += 1,
                3 if payload == [0, 0, 0, 7] => self.refused += 1,
                4 if flags & 1 == 0 => self.send(&frame(4, 1, 0, &[])),
                6 if flags & 1 == 0 => self.send(&frame(6, 1, 0, &payload)),
                8 if stream == 0 && len == 4 => {
                    let inc = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    self.window += i64::from(inc & 0x7fff_ffff);
                }
                _ => {}
            }
        }
    }
}

/// `n` Watch streams on one tonic channel (one HTTP/2 connection), each held until `stop`; counts the
/// streams that got their first message.
async fn watch_flood(
    addr: String,
    n: usize,
    opened: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("channel");
    let req = || HealthCheckRequest {
        service: "readiness".into(),
    };
    // One Check first, so the server's SETTINGS have been read before the flood.
    let _ = HealthClient::new(ch.clone()).check(req()).await;
    for _ in 0..n {
        let (ch, opened, mut stop) = (ch.clone(), opened.clone(), stop.clone());
        tokio::spawn(async move {
            if let Ok(r) = HealthClient::new(ch).watch(req()).await {
                let mut s = r.into_inner();
                if let Ok(Some(_)) = s.message().await {
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                let _ = stop.wait_for(|s| *s).await;
            }
        });
    }
}

#[test]
fn watch_flood_on_one_connection_keeps_rss_bounded() {
    let s = Scratch::new();
    let pod = Pod::start(&s);
    let idle = pod.idle_rss();
    // 10,000 Watch streams on one connection, as fast as flow control lets them go.
    let mut h = H2::open(2, &pod.health);
    let began = Instant::now();
    let mut peak = 0;
    let mut sent = 0;
    while sent < 10_000 && !h.closed && began.elapsed() < T {
        (0..100).for_each(|_| h.watch());
        sent += 100;
        h.pump();
        peak = peak.max(pod.rss_kib());
    }
    // Held open while kubelet-style probes come and go.
    for _ in 0..4 {
        h.pump();
        peak = peak.max(pod.rss_kib());
        assert_eq!(
            pod.check(),
            "SERVING",
            "a probe lost its answer during the flood"
        );
    }
    h.pump();
    eprintln!(
        "RSS idle {idle} KiB, peak {peak} KiB under {sent} Watch streams: {} answered, {} refused",
        h.answered, h.refused
    );
    assert!(
        peak <= idle + GROWTH_KIB,
        "RSS grew from {idle} KiB to {peak} KiB ({} Watch streams answered)",
        h.answered
    );
    let most = quiesce::health::limits::H2_STREAMS_PER_CONNECTION as usize;
    assert!(
        h.answered <= most,
        "{} streams answered on one connection",
        h.answered
    );
}

#[test]
fn streams_past_the_limit_are_refused_when_the_client_ignores_settings() {
    let s = Scratch::new();
    let pod = Pod::start(&s);
    let mut h = H2::open(2, &pod.health);
    // Sent before the server's SETTINGS are even read: a client that knows no limits.
    for _ in 0..100 {
        h.watch();
    }
    assert!(
        wait_until(T, || {
            h.pump();
            h.refused + h.answered >= 100
        }) || h.refused >= 92,
        "of 100 streams {} refused, {} answered",
        h.refused,
        h.answered
    );
    assert!(h.refused >= 92, "only {} of 100 streams refused", h.refused);
    assert_eq!(pod.check(), "SERVING");
}

#[test]
fn watch_streams_past_the_total_are_resource_exhausted() {
    let s = Scratch::new();
    let pod = Pod::start(&s);
    let rt = runtime();
    let addr = format!("http://{}", pod.health);
    let codes = rt.block_on(async {
        let mut calls = Vec::new();
        for _ in 0..6 {
            let ch = tonic::transport::Endpoint::from_shared(addr.clone())
                .expect("uri")
                .connect()
                .await
                .expect("channel");
            for _ in 0..8 {
                let mut c = HealthClient::new(ch.clone());
                calls.push(tokio::spawn(async move {
                    let req = HealthCheckRequest {
                        service: "readiness".into(),
                    };
                    let r = tokio::time::timeout(T, c.watch(req))
                        .await
                        .expect("answered");
                    r.map(|r| r.into_inner())
                }));
            }
        }
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.expect("task"));
        }
        out
    });
    let exhausted = codes
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == tonic::Code::ResourceExhausted))
        .count();
    let open = codes.iter().filter(|r| r.is_ok()).count();
    assert_eq!((open, exhausted), (32, 16), "Watch streams open / refused");
    assert_eq!(pod.check(), "SERVING");
    assert!(
        metric(
            &pod.scrape(),
            "quiesce_listener_refused_total{limit=\"watch_streams\",server=\"health\"}"
        ) >= 16.0
    );
    // Closing streams gives their slots back.
    drop(codes);
    let again = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(addr)
            .expect("uri")
            .connect()
            .await
            .expect("channel");
        // The server frees a slot when it sees the stream's reset: retry until it has, within T.
        let deadline = tokio::time::Instant::now() + T;
        let mut s = loop {
            let req = HealthCheckRequest {
                service: "readiness".into(),
            };
            match HealthClient::new(ch.clone()).watch(req).await {
                Ok(r) => break r.into_inner(),
                Err(e)
                    if e.code() == tonic::Code::ResourceExhausted
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("watch after the streams closed: {e:?}"),
            }
        };
        tokio::time::timeout(T, s.message()).await.expect("in time")
    });
    assert!(matches!(again, Ok(Some(_))), "{again:?}");
    rt.shutdown_timeout(Duration::from_secs(5));
}

#[test]
fn connections_past_the_caps_are_closed_and_probes_still_answer() {
    let s = Scratch::new();
    let pod = Pod::start(&s);
    // Per address (checked well within the idle timeout).
    let (hp, mp) = (HEALTH.per_peer, METRICS.per_peer);
    let mut health: Vec<TcpStream> = (0..hp + 4).map(|_| tcp_from(2, &pod.health)).collect();
    let mut metrics: Vec<TcpStream> = (0..mp + 2).map(|_| tcp_from(2, &pod.metrics)).collect();
    // Refused ones are closed at once; the admitted ones only after the idle timeout (10 s).
    let refused = wait_until(Duration::from_secs(5), || {
        count_closed(&mut health) >= 4 && count_closed(&mut metrics) >= 2
    });
    assert!(refused, "connections past the per-address caps were kept");
    std::thread::sleep(Duration::from_millis(300));
    let closed_now = (count_closed(&mut health), count_closed(&mut metrics));
    assert_eq!(closed_now, (4, 2), "admitted connections were closed");
    // In all, the ones from 127.0.0.2 included.
    let peers = (HEALTH.connections / hp) as u8;
    let mut more: Vec<TcpStream> = (3..2 + peers)
        .flat_map(|ip| std::iter::repeat_n(ip, hp))
        .map(|ip| tcp_from(ip, &pod.health))
        .collect();
    let mut past = vec![tcp_from(10, &pod.health), tcp_from(10, &pod.health)];
    let refused = wait_until(T, || count_closed(&mut past) == 2);
    assert!(refused, "connections past the total cap were kept");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count_closed(&mut more),
        0,
        "an admitted connection was closed"
    );
    assert_eq!(
        count_closed(&mut health),
        4,
        "an admitted connection was closed"
    );
    // Their slots come back when they close.
    drop((health, more, metrics));
    assert!(wait_until(T, || pod.check() == "SERVING"));
    let text = pod.scrape();
    for (server, limit, at_least) in [
        ("health", "peer_connections", 4.0),
        ("health", "connections", 2.0),
        ("metrics", "peer_connections", 2.0),
    ] {
        let name =
            format!("quiesce_listener_refused_total{{limit=\"{limit}\",server=\"{server}\"}}");
        assert!(metric(&text, &name) >= at_least, "{name} in\n{text}");
    }
}

#[test]
fn flood_on_both_ports_at_every_cap_keeps_rss_bounded() {
    let s = Scratch::new();
    let pod = Pod::start(&s);
    let idle = pod.idle_rss();
    // All but 8 probe-port connections, from other addresses, each with 8 Checks that never finish their
    // message and 8 more streams past the limit; 10,000 Watch calls on one more; every metrics connection
    // sending half a request head.
    let peers = (HEALTH.connections / HEALTH.per_peer) as u8 - 1;
    let mut raw: Vec<H2> = (2..2 + peers)
        .flat_map(|ip| std::iter::repeat_n(ip, HEALTH.per_peer))
        .map(|ip| H2::open(ip, &pod.health))
        .collect();
    let mut heads: Vec<TcpStream> = (2..2 + (METRICS.connections / METRICS.per_peer) as u8)
        .flat_map(|ip| std::iter::repeat_n(ip, METRICS.per_peer))
        .map(|ip| tcp_from(ip, &pod.metrics))
        .collect();
    for h in &mut heads {
        let _ = h.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ");
    }
    let rt = runtime();
    let opened = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    rt.spawn(watch_flood(
        pod.health.clone(),
        10_000,
        opened.clone(),
        stop,
    ));
    let began = Instant::now();
    let (mut peak, mut batches) = (0, 0);
    while began.elapsed() < Duration::from_secs(12) {
        // A batch fits a connection's flow-control window; the next one comes after the request timeout.
        let batch = began.elapsed() >= Duration::from_secs(6 * batches);
        for h in &mut raw {
            h.pump();
            if batch {
                (0..8).for_each(|_| h.held_check());
                (0..8).for_each(|_| h.watch());
            }
        }
        batches += u64::from(batch);
        peak = peak.max(pod.rss_kib());
        assert_eq!(
            pod.check(),
            "SERVING",
            "a probe lost its answer during the flood"
        );
    }
    let refused: usize = raw.iter().map(|h| h.refused).sum();
    let open = opened.load(Ordering::Relaxed);
    eprintln!(
        "RSS idle {idle} KiB, peak {peak} KiB at every cap; {refused} raw streams refused, {open} Watch open"
    );
    let _ = stop_tx.send(true);
    rt.shutdown_timeout(Duration::from_secs(5));
    assert!(
        peak <= idle + GROWTH_KIB,
        "RSS grew from {idle} KiB to {peak} KiB"
    );
}

#[test]
fn idle_and_half_sent_connections_are_closed() {
    let s = Scratch::new();
    let pod = Pod::start(&s);
    let (h, m) = (pod.health.clone(), pod.metrics.clone());
    let mut conns: Vec<TcpStream> = Vec::new();
    // Probe port: silent connections and a preface cut short.
    conns.extend((0..4).map(|_| tcp_from(2, &h)));
    for _ in 0..2 {
        let mut c = tcp_from(3, &h);
        c.write_all(b"PRI * HTTP/2.0\r\n").expect("write");
        conns.push(c);
    }
    // Metrics port: silent connections and request heads cut short.
    conns.extend((0..2).map(|_| tcp_from(2, &m)));
    for _ in 0..2 {
        let mut c = tcp_from(3, &m);
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .expect("write");
        conns.push(c);
    }
    // And a slow one: a header byte every 200 ms never goes idle, the header timeout still ends it.
    let mut slow = tcp_from(4, &m);
    let began = Instant::now();
    assert_eq!(count_closed(&mut conns), 0, "closed at once");
    assert_eq!(pod.check(), "SERVING");
    assert!(pod.scrape().contains("quiesce_build_info"));
    let mut slow_closed = false;
    let all = wait_until(Duration::from_secs(60), || {
        if !slow_closed {
            slow_closed = slow.write_all(b"X").is_err() || closed(&mut slow);
            std::thread::sleep(Duration::from_millis(200));
        }
        slow_closed && count_closed(&mut conns) == conns.len()
    });
    let open = conns.len() - count_closed(&mut conns);
    assert!(
        all,
        "after {:?}: {open} of {} idle connections open, slow one closed: {slow_closed}",
        began.elapsed(),
        conns.len()
    );
    assert_eq!(pod.check(), "SERVING");
    let text = pod.scrape();
    let timeouts = metric(&text, "quiesce_listener_timeouts_total{server=\"health\"}");
    assert!(timeouts >= 6.0, "{text}");
}
