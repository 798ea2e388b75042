//! quiesce control protocol v1: the line protocol between the `quiesce` supervisor and the app it
//! runs, and the app-side agent any Rust service embeds.
//!
//! The normative description is `docs/PROTOCOL.md`; a test drives every example in it against a
//! real agent, so the document and this crate cannot drift apart.
//!
//! # Layout
//!
//! - [`wire`]: framing (one line per request, 4096-byte limit), the request grammar with its one
//!   parser and renderer, the typed JSON replies, the stable error codes, and the step table
//!   (five verbs, eight sub-steps). No I/O policy; the supervisor's admin socket reuses it.
//! - [`client`]: the async client the supervisor drives an app with.
//! - [`log`]: the log-line conventions the agent and the supervisor share (JSON text for maps and lists).
//! - [`socket`]: the Unix socket file a server owns (stale-file rule, mode, SO_PEERCRED peer
//!   check, remove-only-our-own), shared by the agent's control socket and the supervisor's
//!   admin socket.
//! - [`agent`]: the app side: register step handlers and dependency checks, then serve them on
//!   the control socket ([`agent::Agent::serve`]) or run them in-process on SIGTERM without a
//!   supervisor ([`agent::Agent::run_local`]).
//!
//! # Theory of operation (agent)
//!
//! | thing | owner |
//! |---|---|
//! | the socket file | the agent, through [`socket`]: removes a stale one, creates it 0600, removes only its own on shutdown |
//! | the step state (pending → running → done) | one mutex in the agent, never held across an await |
//! | a running step | its own task: a vanished connection cannot cancel it; the result is recorded |
//! | a running handler | its own task, aborted at the deadline (recorded `timeout`) |
//! | the driver slot | the connection that said `hello role=driver`, until it closes |

pub mod agent;
pub mod client;
pub mod log;
pub mod socket;
pub mod wire;

/// The environment variable that carries the control socket path from supervisor to app.
pub const CONTROL_SOCKET_ENV: &str = "QUIESCE_CONTROL_SOCKET";
