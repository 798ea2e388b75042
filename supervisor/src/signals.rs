//! Signal names, the forwarded set, and the rewrite map.
//!
//! The supervisor handles signals as plain numbers because the realtime range (SIGRTMIN..SIGRTMAX) is not in
//! `nix::Signal`, and tini forwards those too.

use std::collections::BTreeMap;
use std::fmt;

use nix::sys::signal::Signal;

/// A signal number that we know how to name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sig(pub i32);

impl Sig {
    pub const TERM: Sig = Sig(libc::SIGTERM);
    pub const INT: Sig = Sig(libc::SIGINT);
    pub const KILL: Sig = Sig(libc::SIGKILL);
    pub const CHLD: Sig = Sig(libc::SIGCHLD);
    pub const PIPE: Sig = Sig(libc::SIGPIPE);

    /// `SIGTERM`, `SIGRTMIN+3`, or `signal 99` for numbers we cannot name.
    pub fn name(self) -> String {
        if let Ok(s) = Signal::try_from(self.0) {
            return s.as_str().to_string();
        }
        let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
        if (min..=max).contains(&self.0) {
            return format!("SIGRTMIN+{}", self.0 - min);
        }
        format!("signal {}", self.0)
    }

    /// Parses `SIGTERM`, `TERM`, `term`, `15`, `SIGRTMIN+2` or `RTMIN+2`.
    pub fn parse(text: &str) -> Result<Sig, String> {
        let t = text.trim();
        if let Ok(n) = t.parse::<i32>() {
            if (1..=libc::SIGRTMAX()).contains(&n) {
                return Ok(Sig(n));
            }
            return Err(format!(
                "signal number {n} is out of range 1..={}",
                libc::SIGRTMAX()
            ));
        }
        let upper = t.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        if let Some(rest) = full.strip_prefix("SIGRTMIN") {
            let off = if rest.is_empty() {
                0
            } else {
                rest.strip_prefix('+')
                    .and_then(|n| n.parse::<i32>().ok())
                    .unwrap_or(-1)
            };
            let n = libc::SIGRTMIN() + off;
            if off >= 0 && n <= libc::SIGRTMAX() {
                return Ok(Sig(n));
            }
        }
        full.parse::<Signal>()
            .map(|s| Sig(s as i32))
            .map_err(|_| format!("unknown signal '{text}': use a name such as SIGTERM, SIGUSR1 or SIGRTMIN+1, or a number"))
    }
}

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Signals tini does not forward: the synchronous faults, SIGCHLD (ours to reap), and the job-control pair
/// (SIGTTIN/SIGTTOU are ignored so a background supervisor is never stopped by its terminal). SIGKILL and
/// SIGSTOP cannot be caught at all.
const NOT_FORWARDED: [i32; 12] = [
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGTRAP,
    libc::SIGSYS,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGCHLD,
    libc::SIGKILL,
    libc::SIGSTOP,
];

/// Every signal the supervisor catches and passes on (tini's set): 1..=31 minus the above, plus the realtime
/// range. SIGTERM and SIGINT are in it but start the stop sequence instead of being passed straight through.
pub fn forwarded() -> Vec<Sig> {
    let mut v: Vec<Sig> = (1..32)
        .filter(|n| !NOT_FORWARDED.contains(n))
        .map(Sig)
        .collect();
    v.extend((libc::SIGRTMIN()..=libc::SIGRTMAX()).map(Sig));
    v
}

/// dumb-init style rewrite map: a received signal is passed on as another one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrite(pub BTreeMap<Sig, Sig>);

impl Rewrite {
    pub fn apply(&self, s: Sig) -> Sig {
        self.0.get(&s).copied().unwrap_or(s)
    }

    /// Parses `SIGHUP=SIGUSR1,SIGWINCH=SIGUSR2` (the env/flag form).
    pub fn parse_list(text: &str) -> Result<Rewrite, String> {
        let mut map = BTreeMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (from, to) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not FROM=TO (for example SIGHUP=SIGUSR1)"))?;
            map.insert(Sig::parse(from)?, Sig::parse(to)?);
        }
        Ok(Rewrite(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in forwarded() {
            assert_eq!(Sig::parse(&s.name()), Ok(s), "{}", s.name());
        }
        assert_eq!(Sig::parse("term"), Ok(Sig::TERM));
        assert_eq!(Sig::parse("15"), Ok(Sig::TERM));
        assert_eq!(Sig::parse("SIGRTMIN+2"), Ok(Sig(libc::SIGRTMIN() + 2)));
        assert!(
            Sig::parse("SIGNOPE")
                .unwrap_err()
                .contains("unknown signal 'SIGNOPE'")
        );
        assert!(Sig::parse("0").is_err());
        assert!(Sig::parse("SIGRTMIN+99").is_err());
    }

    #[test]
    fn forwarded_set_matches_tini() {
        let names: Vec<String> = forwarded()
            .iter()
            .filter(|s| s.0 < 32)
            .map(|s| s.name())
            .collect();
        assert_eq!(
            names,
            [
                "SIGHUP",
                "SIGINT",
                "SIGQUIT",
                "SIGUSR1",
                "SIGUSR2",
                "SIGPIPE",
                "SIGALRM",
                "SIGTERM",
                "SIGSTKFLT",
                "SIGCONT",
                "SIGTSTP",
                "SIGURG",
                "SIGXCPU",
                "SIGXFSZ",
                "SIGVTALRM",
                "SIGPROF",
                "SIGWINCH",
                "SIGIO",
                "SIGPWR"
            ]
        );
    }

    #[test]
    fn rewrite_list() {
        let r = Rewrite::parse_list("SIGHUP=SIGUSR1, TERM=QUIT").expect("valid list");
        assert_eq!(r.apply(Sig(libc::SIGHUP)), Sig(libc::SIGUSR1));
        assert_eq!(r.apply(Sig::TERM), Sig(libc::SIGQUIT));
        assert_eq!(r.apply(Sig::INT), Sig::INT);
        assert!(
            Rewrite::parse_list("SIGHUP")
                .unwrap_err()
                .contains("FROM=TO")
        );
    }
}
