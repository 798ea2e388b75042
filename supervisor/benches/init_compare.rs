//! Side-by-side benchmark of quiesce against tini, dumb-init and catatonit, each as PID 1 of a fresh PID
//! namespace: idle RSS, `INIT /bin/true` overhead over no init, time to reap a 2000-zombie burst, and
//! SIGTERM→app latency. Rounds are interleaved so machine noise hits every init alike.
//!
//! Run: `cargo build --release -p quiesce-testbin && cargo bench -p quiesce --bench init_compare`
//! Writes `docs/benchmarks/init-compare.md` (and prints it).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Init {
    name: &'static str,
    argv: Vec<String>,
}

fn quiesce() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quiesce"))
}

fn testbin() -> PathBuf {
    let p = quiesce().with_file_name("testbin");
    assert!(
        p.exists(),
        "build the fixture first: cargo build --release -p quiesce-testbin"
    );
    p
}

fn inits() -> Vec<Init> {
    let mut v = vec![Init {
        name: "quiesce",
        argv: vec![quiesce().display().to_string(), "--".into()],
    }];
    for (name, path, sep) in [
        ("tini", "/usr/bin/tini", true),
        ("dumb-init", "/usr/bin/dumb-init", false),
        ("catatonit", "/usr/bin/catatonit", true),
    ] {
        if Path::new(path).exists() {
            let mut argv = vec![path.to_string()];
            if sep {
                argv.push("--".into());
            }
            v.push(Init { name, argv });
        } else {
            eprintln!("skipping {name}: {path} not installed (apt-get install {name})");
        }
    }
    v
}

fn command(init: &[String], app: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .args(init)
        .args(app);
    c.env("QUIESCE_HEALTH_ENABLED", "false")
        .env("QUIESCE_METRICS_ENABLED", "false")
        .env("QUIESCE_ADMIN_SOCKET", "off")
        .env("QUIESCE_TERMINATION_LOG", "off")
        .env("QUIESCE_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn ns_init(unshare: u32) -> u32 {
    let path = format!("/proc/{unshare}/task/{unshare}/children");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(p) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        {
            return p;
        }
        assert!(Instant::now() < deadline, "no init started");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn children(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default()
}

/// (VmRSS, RssAnon) in KiB: the file-backed rest is mapped code and libraries, shared through the page cache.
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

fn monotonic_ns() -> u128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
}

fn idle_rss(init: &Init) -> (f64, f64) {
    let tb = testbin().display().to_string();
    let mut child = command(&init.argv, &[&tb, "sleep"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = ns_init(child.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while children(pid).trim().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300)); // let it settle: a measurement, not a test
    let (rss, anon) = rss_kib(pid);
    let _ = child.kill();
    let _ = child.wait();
    (rss as f64 / 1024.0, anon as f64 / 1024.0)
}

fn run_true(init: Option<&Init>) -> f64 {
    let argv = init.map(|i| i.argv.clone()).unwrap_or_default();
    let began = Instant::now();
    let s = command(&argv, &["/bin/true"])
        .stdout(Stdio::null())
        .status()
        .expect("run");
    assert!(s.success());
    began.elapsed().as_secs_f64() * 1000.0
}

fn reap_burst(init: &Init, n: usize) -> f64 {
    let tb = testbin().display().to_string();
    let arg = n.to_string();
    let out = command(&init.argv, &[&tb, "zombie-burst", &arg])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    let us: f64 = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == "us")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("{}: unexpected output {text:?}", init.name));
    us / 1000.0
}

fn term_latency(init: &Init) -> f64 {
    let tb = testbin().display().to_string();
    let mut child = command(&init.argv, &[&tb, "term-latency"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = ns_init(child.id());
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    let t0 = monotonic_ns();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let line = lines.next().and_then(Result::ok).expect("term line");
    let t1: u128 = line
        .strip_prefix("term ")
        .and_then(|n| n.parse().ok())
        .expect("term NANOS");
    let _ = child.wait();
    (t1.saturating_sub(t0)) as f64 / 1000.0
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, Linux {}, load average at start {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let inits = inits();
    let rounds_true = 150;
    let rounds_rss = 3;
    let rounds_reap = 8;
    let rounds_term = 40;
    let n = inits.len();
    let mut rss = vec![Vec::new(); n];
    let mut anon = vec![Vec::new(); n];
    let mut tru = vec![Vec::new(); n];
    let mut bare = Vec::new();
    let mut reap = vec![Vec::new(); n];
    let mut term = vec![Vec::new(); n];
    for _ in 0..rounds_rss {
        for (i, init) in inits.iter().enumerate() {
            let (r, a) = idle_rss(init);
            rss[i].push(r);
            anon[i].push(a);
        }
    }
    for _ in 0..rounds_true {
        bare.push(run_true(None));
        for (i, init) in inits.iter().enumerate() {
            tru[i].push(run_true(Some(init)));
        }
    }
    for _ in 0..rounds_reap {
        for (i, init) in inits.iter().enumerate() {
            reap[i].push(reap_burst(init, 2000));
        }
    }
    for _ in 0..rounds_term {
        for (i, init) in inits.iter().enumerate() {
            term[i].push(term_latency(init));
        }
    }
    let bare_med = median(&mut bare);
    let mut out = String::new();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out.push_str("# Init comparison (signal mode)\n\n");
    out.push_str(&format!(
        "Generated by `cargo bench -p quiesce --bench init_compare` on {date}.\n\nMachine: {}.\n\n",
        machine()
    ));
    out.push_str("Each init runs as PID 1 of a fresh PID namespace (`unshare --pid --fork --mount-proc`); rounds are interleaved. ");
    out.push_str("quiesce runs in signal mode with its health and metrics servers off (the tini-equivalent setup).\n\n");
    out.push_str(&format!("| init | idle RSS (MiB, median of {rounds_rss}) | of which anonymous (MiB) | `INIT /bin/true` overhead (ms, median of {rounds_true}) | reap 2000-zombie burst (ms, median of {rounds_reap}) | SIGTERM→app latency (µs, median / p90 of {rounds_term}) |\n"));
    out.push_str("|---|---:|---:|---:|---:|---:|\n");
    for (i, init) in inits.iter().enumerate() {
        let over = median(&mut tru[i]) - bare_med;
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} / {:.0} |\n",
            init.name,
            median(&mut rss[i]),
            median(&mut anon[i]),
            over,
            median(&mut reap[i]),
            median(&mut term[i]),
            pct(&mut term[i], 0.9)
        ));
    }
    out.push_str(&format!(
        "\nBaseline: `unshare … /bin/true` with no init takes {bare_med:.2} ms (median).\n"
    ));
    print!("{out}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&dir).expect("docs/benchmarks");
    let path = dir.join("init-compare.md");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(out.as_bytes()))
        .expect("write results");
    eprintln!("wrote {}", path.display());
}
