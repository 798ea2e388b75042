//! Health Check latency under a fixed 1,000 requests/s, and the supervisor's RSS idle and under that load,
//! for the release `quiesce` (dynamically linked) and the static one (`scripts/build-static.sh`).
//!
//! Run:
//! ```text
//! cargo build --release -p quiesce && cp target/release/quiesce target/quiesce-release
//! scripts/build-static.sh
//! cargo bench -p quiesce --bench health_load -- --dynamic target/quiesce-release
//! ```
//! Without `--dynamic` (`QUIESCE_DYNAMIC`) the binary `cargo bench` built is measured, and labelled so: it
//! has the dev-dependencies' features. `--static PATH` (`QUIESCE_STATIC`) defaults to
//! `target/x86_64-unknown-linux-gnu/release/quiesce`, skipped with a message when missing. Paths are
//! relative to the workspace root. Writes `docs/benchmarks/health.md`. quiesce runs in
//! signal mode with health and metrics serving (`--health-address`, `--metrics-address`); the probe thread
//! is the same in control mode, only the inputs differ.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const RATE: u64 = 1000;
const SECS: u64 = 20;

/// (VmRSS, RssAnon) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `--flag PATH` (or `--flag=PATH`) after `cargo bench … --`, else the environment variable; relative to
/// the workspace root (`cargo bench` runs this binary in `supervisor/`).
fn given(flag: &str, var: &str) -> Option<PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    let prefix = format!("{flag}=");
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
        })
        .or_else(|| std::env::var(var).ok().filter(|s| !s.is_empty()))
        .map(|p| root().join(p))
}

/// The build `cargo bench` made is not the shipping one (it has the dev-dependencies' tokio features):
/// `--dynamic PATH` names a copy of `cargo build --release`'s binary.
fn dynamic_quiesce() -> (&'static str, PathBuf) {
    match given("--dynamic", "QUIESCE_DYNAMIC") {
        Some(p) => ("quiesce (dynamic)", p),
        None => {
            eprintln!(
                "quiesce: measuring the bench build (with dev-dependency features); pass --dynamic PATH for the release build"
            );
            (
                "quiesce (bench build)",
                PathBuf::from(env!("CARGO_BIN_EXE_quiesce")),
            )
        }
    }
}

fn static_quiesce() -> Option<PathBuf> {
    let p = given("--static", "QUIESCE_STATIC").unwrap_or_else(|| {
        let target = PathBuf::from(env!("CARGO_BIN_EXE_quiesce"))
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        target.join("x86_64-unknown-linux-gnu/release/quiesce")
    });
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping quiesce (static): {} not found (scripts/build-static.sh, or pass --static PATH)",
            p.display()
        );
        None
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Row {
    sent: u64,
    failed: u64,
    lat: Vec<f64>,
    idle: (u64, u64),
    load_max: (u64, u64),
    after: (u64, u64),
}

fn measure(quiesce: &Path) -> Row {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mport = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut sup = Command::new(quiesce)
        .args([
            "--health-address",
            &format!("127.0.0.1:{port}"),
            "--metrics-address",
            &format!("127.0.0.1:{mport}"),
        ])
        .args([
            "--admin-socket",
            "off",
            "--termination-log",
            "off",
            "--",
            "sleep",
            "3600",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start quiesce");
    let pid = sup.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let row = rt.block_on(async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("endpoint");
        let deadline = Instant::now() + Duration::from_secs(10);
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("cannot reach quiesce: {e}"),
            }
        };
        let client = HealthClient::new(channel);
        // Warm up (and one metrics scrape, so its encoder's pages count too), then let it settle.
        for _ in 0..200 {
            let _ = client
                .clone()
                .check(HealthCheckRequest {
                    service: "readiness".into(),
                })
                .await;
        }
        scrape(mport).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = rss_kib(pid);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<f64>>();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = 0u64;
        let mut load_max = (0u64, 0u64);
        let end = Instant::now() + Duration::from_secs(SECS);
        while Instant::now() < end {
            tick.tick().await;
            let mut c = client.clone();
            let tx = tx.clone();
            sent += 1;
            tokio::spawn(async move {
                let t = Instant::now();
                let ok = c
                    .check(HealthCheckRequest {
                        service: "readiness".into(),
                    })
                    .await
                    .is_ok();
                let _ = tx.send(ok.then(|| t.elapsed().as_secs_f64() * 1e6));
            });
            if sent.is_multiple_of(RATE) {
                let (r, a) = rss_kib(pid);
                load_max = (load_max.0.max(r), load_max.1.max(a));
            }
        }
        drop(tx);
        let mut lat = Vec::new();
        let mut failed = 0u64;
        while let Some(r) = rx.recv().await {
            match r {
                Some(us) => lat.push(us),
                None => failed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        Row {
            sent,
            failed,
            lat,
            idle,
            load_max,
            after: rss_kib(pid),
        }
    });
    let _ = sup.kill();
    let _ = sup.wait();
    let mut row = row;
    row.lat.sort_by(|a, b| a.total_cmp(b));
    row
}

/// One `GET /metrics` over a plain TCP connection; the answer is read and dropped.
async fn scrape(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let mut builds = vec![dynamic_quiesce()];
    if let Some(p) = static_quiesce() {
        builds.push(("quiesce (static)", p));
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load_start = loadavg();
    let rows: Vec<(&str, Row)> = builds.iter().map(|(n, p)| (*n, measure(p))).collect();
    let mut out = String::new();
    out.push_str("# Health Check latency and supervisor memory\n\n");
    out.push_str(&format!(
        "Generated by `cargo bench -p quiesce --bench health_load{}` on {date}; {} cores, load average at start {load_start}, at end {}.\n\n",
        {
            let a: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
            if a.is_empty() { String::new() } else { format!(" -- {}", a.join(" ")) }
        },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        loadavg()
    ));
    out.push_str(&format!("A tonic client sends `Check(readiness)` at a fixed {RATE}/s for {SECS} s over one HTTP/2 connection on loopback, to `quiesce` in signal mode with health and metrics serving (`--health-address`, `--metrics-address`; one metrics scrape during warm-up). The builds run one after the other. RSS is `VmRSS`, anon is `RssAnon`.\n\n"));
    out.push_str("| build | requests | failed | p50 (µs) | p90 (µs) | p99 (µs) | max (µs) | RSS idle (MiB) | RSS under load, max (MiB) | RSS after (MiB) | RssAnon idle / load max / after (MiB) |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (name, r) in &rows {
        out.push_str(&format!(
            "| {name} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} / {:.2} |\n",
            r.sent,
            r.failed,
            pct(&r.lat, 0.5),
            pct(&r.lat, 0.9),
            pct(&r.lat, 0.99),
            r.lat.last().copied().unwrap_or(f64::NAN),
            mib(r.idle.0),
            mib(r.load_max.0),
            mib(r.after.0),
            mib(r.idle.1),
            mib(r.load_max.1),
            mib(r.after.1),
        ));
    }
    out.push_str("\nBinaries:\n\n");
    let root = root();
    for (name, p) in &builds {
        let shown = p.strip_prefix(&root).unwrap_or(p);
        out.push_str(&format!("- {name}: `{}`\n", shown.display()));
    }
    print!("{out}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("health.md"), out).expect("write");
}
