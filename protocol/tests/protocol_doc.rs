//! Drives every example exchange in `docs/PROTOCOL.md` against a real agent, so the document
//! cannot drift from the code.
//!
//! Notation (explained in the document too): a fenced block tagged `exchange` is one scenario
//! against a fresh agent. `> line` is sent (with `\n`), `< json` is the reply that must come
//! back. `\xHH` in a request stands for one byte, `[N×c]` for N copies of `c`. Comment lines:
//! `# connection N` switches to (and opens) another connection; `# connection N as uid U` is a
//! connection from a process running as uid U (it sends `status` and gets one line back);
//! `# the app's NAME handler|check fails: MESSAGE` and `# the app's NAME handler hangs` configure
//! the agent for the block. Other `#` lines are prose. Fields `duration_ms`, `latency_ms` and `pid` are compared for presence only;
//! `…` inside an expected string matches any text.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use quiesce_protocol::agent::{Agent, HandlerError, Report, StepCtx};
use quiesce_protocol::wire::{AGENT_VERBS, ErrorCode, SubStep};
use serde_json::{Value, json};

const DOC: &str = include_str!("../../docs/PROTOCOL.md");
const VOLATILE: [&str; 3] = ["duration_ms", "latency_ms", "pid"];

#[test]
fn peer_helper() {
    peer_helper_main();
}

struct Block {
    line: usize,
    lines: Vec<(usize, String)>,
}

fn blocks() -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for (i, line) in DOC.lines().enumerate() {
        let n = i + 1;
        match (&mut current, line.trim_end()) {
            (None, "```exchange") => {
                current = Some(Block {
                    line: n,
                    lines: Vec::new(),
                })
            }
            (Some(_), "```") => out.extend(current.take()),
            (Some(block), text) => block.lines.push((n, text.to_owned())),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "unterminated exchange block");
    out
}

/// `\xHH` → byte, `[N×c]` → N copies of c.
fn expand(request: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = request;
    while !rest.is_empty() {
        if let Some(hex) = rest.strip_prefix("\\x") {
            out.push(u8::from_str_radix(&hex[..2], 16).expect("\\x needs two hex digits"));
            rest = &hex[2..];
        } else if rest.starts_with('[')
            && let Some(end) = rest.find(']')
            && let Some((count, what)) = rest[1..end].split_once('×')
        {
            let count: usize = count.parse().expect("[N×c] needs a number");
            out.extend(what.repeat(count).into_bytes());
            rest = &rest[end + 1..];
        } else {
            let c = rest.chars().next().unwrap();
            out.extend(c.to_string().into_bytes());
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The example app's handlers: the sub-step, the component it moves, the state it leaves it in,
/// its report and how long it takes.
fn doc_handlers() -> [(SubStep, &'static str, &'static str, Report, Duration); 7] {
    [
        (
            SubStep::StopAccepting,
            "grpc",
            "draining",
            Report::new().count("listeners_closed", 1),
            Duration::ZERO,
        ),
        (
            SubStep::DrainInFlight,
            "grpc",
            "stopped",
            Report::new()
                .count("requests_drained", 12)
                .count("requests_cancelled", 0),
            Duration::ZERO,
        ),
        (
            SubStep::StopCron,
            "cron",
            "stopped",
            Report::new().count("jobs_finished", 1),
            Duration::from_millis(300),
        ),
        (
            SubStep::StopConsumer,
            "consumer",
            "stopped",
            Report::new()
                .count("messages_acked", 3)
                .count("messages_requeued", 0),
            Duration::ZERO,
        ),
        (
            SubStep::CloseMq,
            "mq",
            "closed",
            Report::new(),
            Duration::ZERO,
        ),
        (
            SubStep::CloseRedis,
            "redis",
            "closed",
            Report::new(),
            Duration::ZERO,
        ),
        (
            SubStep::CloseDb,
            "db",
            "closed",
            Report::new().count("connections_closed", 10),
            Duration::ZERO,
        ),
    ]
}

/// The agent every example runs against (see "How to read the examples" in the document).
/// `failing` maps a handler or check name to its error message; a handler in `hanging` never
/// finishes (the agent cuts it).
fn doc_agent(failing: &BTreeMap<String, String>, hanging: &BTreeSet<String>) -> Agent {
    let components = Arc::new(Mutex::new(json!({
        "grpc": {"state": "serving", "in_flight": 0},
        "cron": {"state": "running"},
        "consumer": {"state": "consuming", "unacked": 0},
        "mq": {"state": "open"},
        "redis": {"state": "open"},
        "db": {"state": "open", "pool_size": 10},
    })));
    let set = |components: &Arc<Mutex<Value>>, name: &str, state: &str| {
        components.lock().unwrap()[name]["state"] = json!(state);
    };
    let mut builder = Agent::builder("order-service").service("order.v1.OrderService");
    for (substep, component, state, report, takes) in doc_handlers() {
        let failure = failing.get(substep.as_str()).cloned();
        let hangs = hanging.contains(substep.as_str());
        let components = Arc::clone(&components);
        builder = builder.on(substep, move |_ctx: StepCtx| {
            let failure = failure.clone();
            let report = report.clone();
            let components = Arc::clone(&components);
            async move {
                if hangs {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(takes).await;
                if let Some(message) = failure {
                    return Err(HandlerError::msg(message));
                }
                set(&components, component, state);
                Ok(report)
            }
        });
    }
    for name in ["db", "redis", "mq"] {
        let failure = failing.get(name).cloned();
        builder = builder.check(name, true, move || {
            let failure = failure.clone();
            async move {
                match failure {
                    Some(message) => Err(HandlerError::msg(message)),
                    None => Ok(()),
                }
            }
        });
    }
    let snapshot = Arc::clone(&components);
    builder
        .status(move || snapshot.lock().unwrap().clone())
        .build()
}

fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

fn matches(expected: &Value, actual: &Value, path: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let ek: BTreeSet<_> = e.keys().collect();
            let ak: BTreeSet<_> = a.keys().collect();
            if ek != ak {
                return Err(format!("{path}: keys differ: {ek:?} vs {ak:?}"));
            }
            for (k, ev) in e {
                if VOLATILE.contains(&k.as_str()) {
                    continue;
                }
                matches(ev, &a[k], &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => e
            .iter()
            .zip(a)
            .enumerate()
            .try_for_each(|(i, (ev, av))| matches(ev, av, &format!("{path}[{i}]"))),
        (Value::String(e), Value::String(a)) if e.contains('…') && glob(e, a) => Ok(()),
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{path}: expected {e}, got {a}")),
    }
}

#[derive(Default)]
struct Coverage {
    verbs: BTreeSet<String>,
    codes: BTreeSet<String>,
}

/// What a block's `#` lines ask of the agent and the test.
struct Setup {
    /// Handler or check name → its error message.
    failing: BTreeMap<String, String>,
    /// Handlers that never finish.
    hanging: BTreeSet<String>,
    /// Whether a connection comes from another uid.
    needs_peer: bool,
}

fn setup(block: &Block) -> Setup {
    let mut failing = BTreeMap::new();
    let mut hanging = BTreeSet::new();
    let mut needs_peer = false;
    for (_, text) in &block.lines {
        if let Some(rest) = text.strip_prefix("# the app's ")
            && let Some(name) = rest.strip_suffix(" handler hangs")
        {
            hanging.insert(name.to_owned());
        }
        if let Some(rest) = text.strip_prefix("# the app's ")
            && let Some((name, message)) = rest.split_once(" fails: ")
        {
            let name = name
                .strip_suffix(" handler")
                .or_else(|| name.strip_suffix(" check"))
                .expect("`handler` or `check`");
            failing.insert(name.to_owned(), message.to_owned());
        }
        needs_peer |= text.starts_with("# connection") && text.contains(" as uid ");
    }
    Setup {
        failing,
        hanging,
        needs_peer,
    }
}

/// Compares one documented reply with the agent's, noting the error code it covers.
fn compare(
    n: usize,
    reply: &str,
    expected: &Value,
    actual: &Value,
    line: &str,
    coverage: &mut Coverage,
) -> Option<String> {
    if let Some(code) = actual["error"].as_str() {
        coverage.codes.insert(code.to_owned());
    }
    matches(expected, actual, "$")
        .err()
        .map(|diff| format!("line {n}: {diff}\n  documented: {reply}\n  actual:     {line}"))
}

async fn run_block(block: &Block, coverage: &mut Coverage) -> Vec<String> {
    let Setup {
        failing,
        hanging,
        needs_peer,
    } = setup(block);
    if needs_peer
        && !needs_root(&format!(
            "the example at line {} connects as another uid",
            block.line
        ))
    {
        return Vec::new();
    }
    let agent = doc_agent(&failing, &hanging);
    let dir = SocketDir::new();
    let _handle = serve(&agent, &dir).await;
    if needs_peer {
        dir.open_up();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let mut conns: BTreeMap<u32, Conn> = BTreeMap::new();
    conns.insert(1, Conn::open(&dir.path()).await);
    let mut current = 1;
    let mut peer_reply: Option<Value> = None;
    let mut errors = Vec::new();
    for (n, text) in &block.lines {
        if let Some(rest) = text.strip_prefix("# connection ") {
            let (number, uid) = match rest.split_once(" as uid ") {
                Some((number, uid)) => (number, Some(uid.split_whitespace().next().unwrap())),
                None => (rest.split_whitespace().next().unwrap(), None),
            };
            current = number.parse().expect("# connection N");
            match uid {
                Some(uid) => {
                    let uid: u32 = uid.parse().expect("as uid U");
                    peer_reply = Some(run_peer(&dir.path(), uid, uid).await.0);
                }
                None => {
                    if let std::collections::btree_map::Entry::Vacant(slot) = conns.entry(current) {
                        slot.insert(Conn::open(&dir.path()).await);
                    }
                }
            }
        } else if let Some(request) = text.strip_prefix('>') {
            let request = request.strip_prefix(' ').unwrap_or(request);
            if let Some(verb) = request.split_whitespace().next() {
                coverage.verbs.insert(verb.to_owned());
            }
            let mut bytes = expand(request);
            bytes.push(b'\n');
            conns
                .get_mut(&current)
                .expect("requests go to an open connection")
                .send(&bytes)
                .await;
        } else if let Some(reply) = text.strip_prefix("< ") {
            let expected: Value = match serde_json::from_str(reply) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(format!("line {n}: the documented reply is not JSON: {e}"));
                    continue;
                }
            };
            let (actual, line) = match peer_reply.take() {
                Some(v) => (v.clone(), v.to_string()),
                None => {
                    let line = conns.get_mut(&current).unwrap().reply_line().await;
                    (
                        serde_json::from_str(&line).expect("the agent replies JSON"),
                        line,
                    )
                }
            };
            errors.extend(compare(*n, reply, &expected, &actual, &line, coverage));
        }
    }
    errors
}

#[tokio::test]
async fn every_example_in_protocol_md_matches_the_agent() {
    let blocks = blocks();
    assert!(
        blocks.len() >= 10,
        "found only {} exchange blocks",
        blocks.len()
    );
    let mut coverage = Coverage::default();
    let mut errors = Vec::new();
    for block in &blocks {
        let run = tokio::time::timeout(Duration::from_secs(20), run_block(block, &mut coverage));
        match run.await {
            Ok(block_errors) => errors.extend(block_errors),
            Err(_) => errors.push(format!("the example at line {} hung", block.line)),
        }
    }
    assert!(
        errors.is_empty(),
        "docs/PROTOCOL.md disagrees with the agent:\n{}",
        errors.join("\n")
    );
    for verb in AGENT_VERBS {
        assert!(coverage.verbs.contains(verb), "no example sends `{verb}`");
    }
    for code in ErrorCode::ALL {
        // `internal` cannot be provoked by a request (it reports a fault in the agent), so the
        // document shows it as a plain reply; peer_refused needs root to provoke.
        if code == ErrorCode::Internal || (code == ErrorCode::PeerRefused && !is_root()) {
            assert!(DOC.contains(&format!("\"error\":\"{code}\"")));
            continue;
        }
        assert!(
            coverage.codes.contains(code.as_str()),
            "no example provokes `{code}`"
        );
    }
}
