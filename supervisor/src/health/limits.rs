//! What the probe thread's servers keep, at most, whatever their peers do (docs/OPERATIONS.md, "Limits").
//!
//! Every peer of the probe and metrics ports gets a slot from its server's [`Gate`] (a total and a
//! per-address cap, so one client cannot take every slot) or is closed at once; every admitted connection
//! is a [`Conn`] that closes itself when its peer goes silent or stops reading. What a connection may
//! hold inside (streams, windows, messages, header bytes) is set on the HTTP/2 and HTTP/1 builders.

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
