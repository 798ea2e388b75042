//! The allowed range of every duration key, and why it is that range (said when a value is refused).

use std::time::Duration;

/// An allowed range of a duration key, and why it is that range (said when a value is refused).
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub min: Duration,
    pub max: Duration,
    pub why: &'static str,
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(super) const HOUR: Duration = secs(3600);

/// 1s is the shortest non-zero terminationGracePeriodSeconds; a day is past any real stop, and keeps every
/// deadline (start + grace period) far from an `Instant` overflow.
pub const GRACE_PERIOD: Limit = Limit {
    min: secs(1),
    max: secs(24 * 3600),
    why: "set it to the pod's terminationGracePeriodSeconds",
};
/// The time kept for the escalation and the report before kubelet's SIGKILL: seconds are enough.
pub const SAFETY_MARGIN: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "it must also be shorter than grace_period",
};
/// Endpoint removal takes seconds; the delay must also fit the stop window.
pub const PRESTOP_DELAY: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "it must also be shorter than grace_period - safety_margin",
};
/// 0s: SIGKILL leftovers at once; waiting hours for orphans after the app has gone helps no one.
pub const CLEANUP_TIMEOUT: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "leftover processes get this long after SIGTERM",
};
/// Below one CFS quota period (100ms) a throttled app misses its hello; an hour of start-up is a hung app.
pub const CONNECT_TIMEOUT: Limit = Limit {
    min: Duration::from_millis(100),
    max: HOUR,
    why: "the app's start-up time until it answers hello",
};
/// A step's budget: 0s is "no time for it"; the steps share the stop window anyway (scaled when over it).
pub const STEP_BUDGET: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "the steps share the stop window, grace_period - safety_margin",
};
/// 50ms is at most 20 status calls a second (a nanosecond burned 70 % of a CPU); past an hour readiness no
/// longer follows the dependencies.
pub const POLL_INTERVAL: Limit = Limit {
    min: Duration::from_millis(50),
    max: HOUR,
    why: "faster polling only burns CPU",
};
/// 0s failed liveness forever (a restart loop); under one CFS quota period (100ms) a throttled but healthy
/// app fails it too.
pub const LIVENESS_TIMEOUT: Limit = Limit {
    min: Duration::from_millis(100),
    max: HOUR,
    why: "a healthy app must be able to answer status within it",
};
/// It can only shorten the preStop delay, which is at most an hour.
pub const PROPAGATION_MARGIN: Limit = Limit {
    min: Duration::ZERO,
    max: HOUR,
    why: "the wait for endpoint propagation after the observed probes",
};
/// kubelet probes at most once a second and the preStop delay ends the wait anyway; also keeps the probe
/// count arithmetic far from overflow.
pub const MAX_OBSERVED_PROBES: u32 = 100;

/// A bound as the error messages say it: whole hours as `24h`, not `1day`.
pub(super) fn show(d: Duration) -> String {
    if d >= HOUR && d.as_nanos().is_multiple_of(HOUR.as_nanos()) {
        format!("{}h", d.as_secs() / 3600)
    } else {
        humantime::format_duration(d).to_string()
    }
}
