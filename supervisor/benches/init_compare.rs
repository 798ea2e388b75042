//! Side-by-side benchmark of quiesce against tini, tini-static, dumb-init and catatonit, each as PID 1 of a
//! fresh PID namespace: binary size, idle RSS (and its anonymous part), `INIT /bin/true` overhead over no
//! init, time to reap a 2000-zombie burst, and SIGTERM→app latency. Both quiesce builds run: the release
//! binary (dynamically linked) and the static one (`scripts/build-static.sh`). Rounds are interleaved, and
//! each round starts with a different init, so machine noise hits every init alike.
//!
//! Run:
//! ```text
//! cargo build --release -p quiesce -p quiesce-testbin && cp target/release/quiesce target/quiesce-release
//! scripts/build-static.sh
//! cargo bench -p quiesce --bench init_compare -- --dynamic target/quiesce-release
//! ```
//! Copy the release binary aside: `cargo bench` replaces `target/release/quiesce` with a build that has
//! the dev-dependencies' features (tokio's multi-thread runtime and test-util), which is measured, and
//! labelled so, when `--dynamic` is not given. Options (or environment variables), paths relative to the
//! workspace root: `--dynamic PATH` (`QUIESCE_DYNAMIC`), `--static PATH` (`QUIESCE_STATIC`, default
//! `target/x86_64-unknown-linux-gnu/release/quiesce`, skipped with a message when missing or not static),
//! `--tini-static PATH` (`TINI_STATIC`, default `/usr/bin/tini-static`, skipped when missing).
//! Writes `docs/benchmarks/init-compare.md` (and prints it).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Init {
    name: String,
    argv: Vec<String>,
}

impl Init {
    fn path(&self) -> &str {
        &self.argv[0]
    }
}

/// The binary `cargo bench` built, in `target/release/`. It is not the shipping one: a bench build turns on
/// the dev-dependencies' features (tokio's `rt-multi-thread` and `test-util`) in quiesce too.
fn quiesce() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quiesce"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A path given on the command line or in the environment, relative to the workspace root
/// (`cargo bench` runs this binary in `supervisor/`).
fn given(flag: &str, var: &str) -> Option<PathBuf> {
    arg(flag)
        .or_else(|| std::env::var(var).ok().filter(|s| !s.is_empty()))
        .map(|p| root().join(p))
}

/// `--dynamic PATH` / `QUIESCE_DYNAMIC`: the release binary as `cargo build --release` made it (copy it
/// aside first: `cargo bench` overwrites `target/release/quiesce` with its own build).
fn dynamic_quiesce() -> (PathBuf, &'static str) {
    match given("--dynamic", "QUIESCE_DYNAMIC") {
        Some(p) => (p, "quiesce"),
        None => {
            eprintln!(
                "quiesce: measuring the bench build (with dev-dependency features); pass --dynamic PATH for the release build"
            );
            (quiesce(), "quiesce (bench build)")
        }
    }
}

fn testbin() -> PathBuf {
    let p = quiesce().with_file_name("testbin");
    assert!(
        p.exists(),
        "build the fixture first: cargo build --release -p quiesce-testbin"
    );
    p
}

/// `--static PATH` / `--tini-static PATH` after `cargo bench … --`; `cargo bench` itself adds `--bench`.
fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            let prefix = format!("{name}=");
            args.iter()
                .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
        })
}

fn static_quiesce() -> PathBuf {
    given("--static", "QUIESCE_STATIC").unwrap_or_else(|| {
        // target/release/quiesce -> target/x86_64-unknown-linux-gnu/release/quiesce
        let target = quiesce()
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        target.join("x86_64-unknown-linux-gnu/release/quiesce")
    })
}

/// Whether an ELF file asks for a program interpreter (PT_INTERP): a dynamically linked executable does.
fn has_interp(path: &str) -> Option<bool> {
    let b = std::fs::read(path).ok()?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return None; // not a 64-bit ELF
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().ok()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    Some((0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) == 3
    }))
}

fn inits() -> Vec<Init> {
    let (dynamic, name) = dynamic_quiesce();
    assert!(dynamic.exists(), "{} not found", dynamic.display());
    let mut v = vec![Init {
        name: name.into(),
        argv: vec![dynamic.display().to_string(), "--".into()],
    }];
    let st = static_quiesce();
    match has_interp(&st.display().to_string()) {
        Some(false) => v.push(Init {
            name: "quiesce (static)".into(),
            argv: vec![st.display().to_string(), "--".into()],
        }),
        Some(true) => eprintln!(
            "skipping quiesce (static): {} is dynamically linked (build it with scripts/build-static.sh)",
            st.display()
        ),
        None => eprintln!(
            "skipping quiesce (static): {} not found (scripts/build-static.sh, or pass --static PATH)",
            st.display()
        ),
    }
    let tini_static = given("--tini-static", "TINI_STATIC")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/usr/bin/tini-static".into());
    for (name, path, sep, pkg) in [
        ("tini", "/usr/bin/tini".to_string(), true, "tini"),
        ("tini-static", tini_static, true, "tini"),
        ("dumb-init", "/usr/bin/dumb-init".into(), false, "dumb-init"),
        ("catatonit", "/usr/bin/catatonit".into(), true, "catatonit"),
    ] {
        if Path::new(&path).exists() {
            let mut argv = vec![path];
            if sep {
                argv.push("--".into());
            }
            v.push(Init {
                name: name.into(),
                argv,
            });
        } else {
            eprintln!("skipping {name}: {path} not installed (apt-get install {pkg})");
        }
    }
    v
}

fn command(init: &[String], app: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .args(init)
        .args(app);
    // Health and metrics are off by default and the log level is the default one; the admin socket and
    // the termination log would write to this machine's /run and /dev, so they are off.
    c.env_remove("QUIESCE_HEALTH_ENABLED")
        .env_remove("QUIESCE_METRICS_ENABLED")
        .env_remove("QUIESCE_LOG_LEVEL")
        .env("QUIESCE_ADMIN_SOCKET", "off")
        .env("QUIESCE_TERMINATION_LOG", "off")
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

fn loadavg() -> (f64, String) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three = load.split_whitespace().take(3).collect::<Vec<_>>();
    (
        three
            .first()
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN),
        three.join(" "),
    )
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
    format!(
        "{cpu}, {cores} cores, Linux {}, load average at start {}",
        kernel.trim(),
        loadavg().1
    )
}

/// The options given after `cargo bench … --`, as they would be typed.
fn invoked() -> String {
    let a: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if a.is_empty() {
        String::new()
    } else {
        format!(" -- {}", a.join(" "))
    }
}

/// Runs `f` for every init, `rounds` times; round `r` starts with init `r mod n`.
fn interleave(n: usize, rounds: usize, mut f: impl FnMut(usize)) {
    for r in 0..rounds {
        for k in 0..n {
            f((r + k) % n);
        }
    }
}

fn main() {
    let machine = machine();
    let inits = inits();
    let rounds_true = 200;
    let rounds_rss = 5;
    let rounds_reap = 8;
    let rounds_term = 60;
    let n = inits.len();
    let mut rss = vec![Vec::new(); n];
    let mut anon = vec![Vec::new(); n];
    let mut tru = vec![Vec::new(); n];
    let mut bare = Vec::new();
    let mut reap = vec![Vec::new(); n];
    let mut term = vec![Vec::new(); n];
    let mut loads = vec![loadavg().0];
    let started = Instant::now();
    interleave(n, rounds_rss, |i| {
        let (r, a) = idle_rss(&inits[i]);
        rss[i].push(r);
        anon[i].push(a);
    });
    loads.push(loadavg().0);
    // The no-init baseline takes its turn in the interleaving like any init.
    interleave(n + 1, rounds_true, |i| {
        if i == n {
            bare.push(run_true(None));
        } else {
            tru[i].push(run_true(Some(&inits[i])));
        }
    });
    loads.push(loadavg().0);
    interleave(n, rounds_reap, |i| {
        reap[i].push(reap_burst(&inits[i], 2000))
    });
    loads.push(loadavg().0);
    interleave(n, rounds_term, |i| term[i].push(term_latency(&inits[i])));
    loads.push(loadavg().0);
    let took = started.elapsed().as_secs();
    let bare_med = median(&mut bare);
    let over: Vec<f64> = tru.iter_mut().map(|t| median(t) - bare_med).collect();
    let term_med: Vec<f64> = term.iter_mut().map(|t| median(t)).collect();
    let tini = inits.iter().position(|i| i.name == "tini");
    let ratio = |v: &[f64], i: usize| match tini {
        Some(t) if v[t] > 0.0 => format!("{:.2}×", v[i] / v[t]),
        _ => "–".into(),
    };
    let mut out = String::new();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let (lo, hi) = loads.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &l| {
        (lo.min(l), hi.max(l))
    });
    out.push_str("# Init comparison (signal mode)\n\n");
    out.push_str(&format!(
        "Generated by `cargo bench -p quiesce --bench init_compare{}` on {date}.\n\nMachine: {machine}; \
         1-minute load average {lo:.2}–{hi:.2} across the run ({took} s), at end {}.\n\n",
        invoked(),
        loadavg().1
    ));
    out.push_str("Each init runs as PID 1 of a fresh PID namespace (`unshare --pid --fork --mount-proc`); rounds are interleaved, each starting with a different init. ");
    out.push_str("quiesce runs in signal mode with its defaults (no health or metrics ports, default log level), admin socket and termination log off (the tini-equivalent setup). ");
    out.push_str("RSS is `VmRSS` of the init, anonymous is `RssAnon` (heap, stacks, written data); the rest is file-backed (code and read-only data, shared through the page cache). ");
    out.push_str("The ×tini columns divide by tini's figure of the same run.\n\n");
    out.push_str(&format!("| init | linked | binary (KiB) | idle RSS (MiB, median of {rounds_rss}) | RssAnon (MiB) | `INIT /bin/true` overhead (ms, median of {rounds_true}) | ×tini | reap 2000-zombie burst (ms, median of {rounds_reap}) | SIGTERM→app latency (µs, median / p90 of {rounds_term}) | ×tini (median) |\n"));
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, init) in inits.iter().enumerate() {
        let size = std::fs::metadata(init.path())
            .map(|m| m.len() as f64 / 1024.0)
            .unwrap_or(f64::NAN);
        let linked = match has_interp(init.path()) {
            Some(true) => "dynamic",
            Some(false) => "static",
            None => "?",
        };
        out.push_str(&format!(
            "| {} | {linked} | {size:.0} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {:.0} / {:.0} | {} |\n",
            init.name,
            median(&mut rss[i]),
            median(&mut anon[i]),
            over[i],
            ratio(&over, i),
            median(&mut reap[i]),
            term_med[i],
            pct(&mut term[i], 0.9),
            ratio(&term_med, i),
        ));
    }
    out.push_str(&format!(
        "\nBaseline: `unshare … /bin/true` with no init takes {bare_med:.2} ms (median).\n"
    ));
    out.push_str("\nBinaries:\n\n");
    let root = root();
    for init in &inits {
        let p = Path::new(init.path());
        let shown = p.strip_prefix(&root).unwrap_or(p);
        out.push_str(&format!("- {}: `{}`\n", init.name, shown.display()));
    }
    print!("{out}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&dir).expect("docs/benchmarks");
    let path = dir.join("init-compare.md");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(out.as_bytes()))
        .expect("write results");
    eprintln!("wrote {}", path.display());
}
