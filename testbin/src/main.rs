//! `testbin`: a fixture program for quiesce's process tests. One mode per behaviour a test needs.
//!
//! ```text
//! testbin exit N                    exit with code N
//! testbin die-by SIG                kill itself with SIG (after restoring its default action)
//! testbin sleep                     sleep until killed
//! testbin ignore-sigterm            ignore SIGTERM and SIGINT, sleep until killed
//! testbin record-signals FILE       append the name of every signal received to FILE; exit 0 on SIGTERM
//!                                   unless `--stay` is given; with `--member FILE2`, first fork a second
//!                                   process in our process group that records the same way into FILE2
//! testbin spawn-orphans N [MODE]    double-fork N grandchildren that exit at once; then MODE: `exit` (default)
//!                                   or `sleep`; prints "spawned N" when done
//! testbin leave-daemon [stubborn]   start a grandchild that outlives us (ignoring SIGTERM if `stubborn`), exit 0
//! testbin print-sigmask             print SigBlk/SigIgn lines from /proc/self/status
//! testbin print-ids                 print "uid=U gid=G groups=[..]"
//! testbin block SIG -- CMD...       block SIG, then exec CMD (to test mask inheritance)
//! testbin zombie-burst N            orphan N exited processes at once to our parent (the init under test)
//!                                   and print "reaped N in MICROS us" once none is left unreaped
//! testbin print-foreground         print "foreground=yes" if our process group owns the terminal on stdin
//! testbin term-latency              print "ready", then on SIGTERM print "term NANOS" (CLOCK_MONOTONIC) and exit
//! ```
//!
//! Every mode dies with the process that started it (a parent-death SIGKILL, see
//! `quiesce_testbin::die_with_parent`), so a test that kills its supervisor leaves nothing running.
//! The daemon of `leave-daemon` outlives its parent by design, but not the supervisor that adopts it.
#![allow(unsafe_code)]

use std::io::Write;
use std::process::exit;
use std::time::Duration;

use nix::sys::signal::{SigHandler, SigSet, Signal, signal};
use nix::unistd::{ForkResult, fork};

fn main() {
    quiesce_testbin::die_with_parent("testbin");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["exit", n] => exit(n.parse().unwrap_or_else(|_| usage())),
        ["die-by", sig] => die_by(parse_sig(sig)),
        ["sleep"] => sleep_forever(),
        ["ignore-sigterm"] => {
            // SAFETY: SIG_IGN installs no handler.
            unsafe {
                let _ = signal(Signal::SIGTERM, SigHandler::SigIgn);
                let _ = signal(Signal::SIGINT, SigHandler::SigIgn);
            }
            println!("ignoring SIGTERM");
            sleep_forever()
        }
        ["record-signals", file, rest @ ..] => {
            let stay = rest.contains(&"--stay");
            let member = rest
                .iter()
                .position(|a| *a == "--member")
                .map(|i| rest.get(i + 1).copied().unwrap_or_else(|| usage()));
            if let Some(member) = member {
                start_group_member(member, stay);
            }
            record_signals(file, stay)
        }
        ["spawn-orphans", n, rest @ ..] => {
            spawn_orphans(n.parse().unwrap_or_else(|_| usage()), rest.first().copied())
        }
        ["leave-daemon", rest @ ..] => leave_daemon(rest.first() == Some(&"stubborn")),
        ["print-sigmask"] => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            for line in status
                .lines()
                .filter(|l| l.starts_with("SigBlk") || l.starts_with("SigIgn"))
            {
                println!("{line}");
            }
        }
        ["print-ids"] => {
            let groups: Vec<u32> = nix::unistd::getgroups()
                .unwrap_or_default()
                .iter()
                .map(|g| g.as_raw())
                .collect();
            println!(
                "uid={} gid={} groups={groups:?}",
                nix::unistd::getuid(),
                nix::unistd::getgid()
            );
        }
        ["zombie-burst", n] => zombie_burst(n.parse().unwrap_or_else(|_| usage())),
        ["term-latency"] => term_latency(),
        ["print-foreground"] => {
            let fg = nix::unistd::tcgetpgrp(std::io::stdin()).ok();
            let ours = nix::unistd::getpgrp();
            println!(
                "foreground={} pgrp={ours} pid={}",
                if fg == Some(ours) { "yes" } else { "no" },
                std::process::id()
            );
        }
        ["block", sig, "--", cmd @ ..] if !cmd.is_empty() => {
            let mut set = SigSet::empty();
            set.add(Signal::try_from(parse_sig(sig)).unwrap_or_else(|_| usage()));
            let _ = set.thread_block();
            let err = std::os::unix::process::CommandExt::exec(
                std::process::Command::new(cmd[0]).args(&cmd[1..]),
            );
            eprintln!("testbin: exec {}: {err}", cmd[0]);
            exit(127)
        }
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("testbin: unknown mode; see the doc comment in testbin/src/main.rs");
    exit(2)
}

fn parse_sig(s: &str) -> i32 {
    if let Ok(n) = s.parse() {
        return n;
    }
    let name = if s.starts_with("SIG") {
        s.to_string()
    } else {
        format!("SIG{s}")
    };
    name.parse::<Signal>()
        .map(|s| s as i32)
        .unwrap_or_else(|_| usage())
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn die_by(sig: i32) -> ! {
    // SAFETY: restoring the default action and raising a signal touch no memory of ours.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
    exit(1)
}

fn signal_name(n: i32) -> String {
    match Signal::try_from(n) {
        Ok(s) => s.as_str().to_string(),
        Err(_) => format!("SIGRTMIN+{}", n - libc::SIGRTMIN()),
    }
}

/// Blocks every signal and takes them one by one with sigwaitinfo, as tini does.
fn record_signals(file: &str, stay: bool) -> ! {
    // SAFETY: plain libc calls on a stack-allocated sigset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut set);
        for s in [
            libc::SIGKILL,
            libc::SIGSTOP,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
        ] {
            libc::sigdelset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .unwrap_or_else(|e| {
            eprintln!("testbin: cannot open {file}: {e}");
            exit(2)
        });
    let _ = writeln!(out, "ready");
    loop {
        // SAFETY: sigwaitinfo with a valid set and a null info pointer.
        let n = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if n <= 0 {
            continue;
        }
        let _ = writeln!(out, "{}", signal_name(n));
        let _ = out.flush();
        if n == libc::SIGTERM && !stay {
            exit(0);
        }
    }
}

/// Forks a second process that stays in our process group and records its signals into `file`
/// (so a test can see what the group, not only its leader, receives). It dies with us.
fn start_group_member(file: &str, stay: bool) {
    let parent = nix::unistd::getpid();
    // SAFETY: we are single-threaded here; the child only sets up and records signals.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            quiesce_testbin::die_with(parent);
            record_signals(file, stay)
        }
        Ok(ForkResult::Parent { .. }) => {}
        Err(e) => {
            eprintln!("testbin: fork: {e}");
            exit(3)
        }
    }
}

fn spawn_orphans(n: usize, then: Option<&str>) -> ! {
    for _ in 0..n {
        // SAFETY: the children only call fork and _exit.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // SAFETY: as above.
                if let Ok(ForkResult::Child) = unsafe { fork() } {
                    unsafe { libc::_exit(0) };
                }
                unsafe { libc::_exit(0) };
            }
            Ok(ForkResult::Parent { child }) => {
                let _ = nix::sys::wait::waitpid(child, None);
            }
            Err(e) => {
                eprintln!("testbin: fork: {e}");
                exit(3)
            }
        }
    }
    println!("spawned {n}");
    let _ = std::io::stdout().flush();
    match then {
        Some("sleep") => sleep_forever(),
        _ => exit(0),
    }
}

fn leave_daemon(stubborn: bool) -> ! {
    let parent = nix::unistd::getpid();
    // SAFETY: the child only sets a disposition and sleeps.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            if stubborn {
                unsafe {
                    let _ = signal(Signal::SIGTERM, SigHandler::SigIgn);
                }
            }
            // Outlive our parent (that is the point), then die with whoever adopted us (the
            // supervisor, a subreaper), so a killed supervisor does not leave us behind.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while nix::unistd::getppid() == parent && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            quiesce_testbin::die_with_parent("testbin daemon");
            sleep_forever()
        }
        Ok(ForkResult::Parent { child }) => {
            println!("daemon {child}");
            let _ = std::io::stdout().flush();
            exit(0)
        }
        Err(e) => {
            eprintln!("testbin: fork: {e}");
            exit(3)
        }
    }
}

fn monotonic_ns() -> u128 {
    let t =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or_else(|_| exit(4));
    t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128
}

/// Zombies whose parent is `parent`, from /proc.
fn count_zombies_of(parent: i32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(i) = stat.rfind(')') else {
                return false;
            };
            let mut f = stat[i + 2..].split(' ');
            f.next() == Some("Z") && f.next().and_then(|p| p.parse::<i32>().ok()) == Some(parent)
        })
        .count()
}

/// A middle process forks N children that exit at once, waits until all N are zombies, then exits: the
/// kernel hands the N zombies to the init (our parent) in one go. We time how long until it reaped them all.
fn zombie_burst(n: usize) -> ! {
    let init = nix::unistd::getppid().as_raw();
    let (rd, wr) = nix::unistd::pipe().unwrap_or_else(|_| exit(4));
    // SAFETY: the middle process only forks, reads /proc, writes a pipe and exits.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(rd);
            let me = nix::unistd::getpid().as_raw();
            for _ in 0..n {
                // SAFETY: the grandchild exits at once.
                if let Ok(ForkResult::Child) = unsafe { fork() } {
                    unsafe { libc::_exit(0) };
                }
            }
            while count_zombies_of(me) < n {
                std::thread::sleep(Duration::from_micros(200));
            }
            let _ = nix::unistd::write(&wr, &monotonic_ns().to_le_bytes());
            unsafe { libc::_exit(0) };
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(wr);
            let mut buf = [0u8; 16];
            let _ = nix::unistd::read(&rd, &mut buf);
            let start = u128::from_le_bytes(buf);
            // Our parent also reaps the middle process; wait until nothing it owns is a zombie.
            while count_zombies_of(init) > 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            let took = (monotonic_ns() - start) / 1000;
            println!("reaped {n} in {took} us");
            exit(0)
        }
        Err(_) => exit(3),
    }
}

fn term_latency() -> ! {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    let _ = set.thread_block();
    println!("ready");
    let _ = std::io::stdout().flush();
    let _ = set.wait();
    println!("term {}", monotonic_ns());
    let _ = std::io::stdout().flush();
    exit(0)
}
