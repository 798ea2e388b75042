//! Health Check latency under a fixed 1,000 requests/s, and the supervisor's RSS idle and under that load.
//!
//! Run: `cargo build --release -p quiesce-testbin && cargo bench -p quiesce --bench health_load`
//! Writes `docs/benchmarks/health.md`. quiesce runs in signal mode with health and metrics serving (the
//! probe thread is the same in control mode; only the inputs differ).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const RATE: u64 = 1000;
const SECS: u64 = 20;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
}

fn main() {
    let quiesce = PathBuf::from(env!("CARGO_BIN_EXE_quiesce"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mport = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut sup = Command::new(&quiesce)
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
            "--log-level",
            "warn",
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
    let (lat, rss_idle, rss_load, rss_after, sent, failed) = rt.block_on(async {
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
        // Warm up, then let it settle.
        for _ in 0..200 {
            let _ = client
                .clone()
                .check(HealthCheckRequest {
                    service: "readiness".into(),
                })
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_idle = rss_kib(pid);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<f64>>();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = 0u64;
        let mut rss_load = 0u64;
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
                rss_load = rss_load.max(rss_kib(pid));
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
        (lat, rss_idle, rss_load, rss_kib(pid), sent, failed)
    });
    let _ = sup.kill();
    let _ = sup.wait();
    let mut lat = lat;
    lat.sort_by(|a, b| a.total_cmp(b));
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = String::new();
    out.push_str("# Health Check latency and supervisor memory\n\n");
    out.push_str(&format!(
        "Generated by `cargo bench -p quiesce --bench health_load` on {date}; {} cores, load average at start {}.\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    ));
    out.push_str(&format!("A tonic client sends `Check(readiness)` at a fixed {RATE}/s for {SECS} s over one HTTP/2 connection on loopback, to the release `quiesce` (health and metrics serving, signal mode).\n\n"));
    out.push_str("| requests | failed | p50 (µs) | p90 (µs) | p99 (µs) | max (µs) | RSS idle (MiB) | RSS under load, max (MiB) | RSS after (MiB) |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    out.push_str(&format!(
        "| {sent} | {failed} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        rss_idle as f64 / 1024.0,
        rss_load as f64 / 1024.0,
        rss_after as f64 / 1024.0
    ));
    print!("{out}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("health.md"), out).expect("write");
}
