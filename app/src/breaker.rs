//! A circuit breaker around the outbox publisher: after `threshold` failed batches in a row it
//! opens and the poller stops hammering a broker that is down; after `open_for` it lets one
//! trial batch through (half-open), which closes it on success or re-opens it on failure.
//! Time is a parameter, so the state machine is tested without sleeping.

use std::time::Duration;

use prometheus::IntGaugeVec;
use serde::Serialize;
use tokio::time::Instant;

/// Breaker state, exported as `circuit_breaker_state{state=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down passes.
    Open,
    /// One trial call is allowed.
    HalfOpen,
}

impl BreakerState {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// The breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: &'static str,
    state: BreakerState,
    failures: u32,
    threshold: u32,
    open_for: Duration,
    opened_at: Option<Instant>,
    gauge: IntGaugeVec,
}

impl CircuitBreaker {
    /// A closed breaker named `name` (the metric's `breaker` label).
    pub fn new(name: &'static str, threshold: u32, open_for: Duration, gauge: IntGaugeVec) -> Self {
        let breaker = Self {
            name,
            state: BreakerState::Closed,
            failures: 0,
            threshold: threshold.max(1),
            open_for,
            opened_at: None,
            gauge,
        };
        breaker.export();
        breaker
    }

    fn export(&self) {
        for s in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            self.gauge
                .with_label_values(&[self.name, s.as_str()])
                .set(i64::from(s == self.state));
        }
    }

    fn set(&mut self, state: BreakerState) {
        if state != self.state {
            tracing::info!(
                breaker = self.name,
                from = self.state.as_str(),
                to = state.as_str(),
                "circuit breaker state change"
            );
            self.state = state;
            self.export();
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go ahead at `now`; if not, how long until it may.
    pub fn allow(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => Ok(()),
            BreakerState::Open => {
                let until = self.opened_at.unwrap_or(now) + self.open_for;
                if now >= until {
                    self.set(BreakerState::HalfOpen);
                    Ok(())
                } else {
                    Err(until - now)
                }
            }
        }
    }

    /// Records a successful call: closes the breaker.
    pub fn on_success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
        self.set(BreakerState::Closed);
    }

    /// Records a failed call at `now`.
    pub fn on_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.state == BreakerState::HalfOpen || self.failures >= self.threshold {
            self.opened_at = Some(now);
            self.set(BreakerState::Open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn gauge() -> IntGaugeVec {
        IntGaugeVec::new(
            Opts::new("circuit_breaker_state", "t"),
            &["breaker", "state"],
        )
        .unwrap()
    }

    fn value(g: &IntGaugeVec, state: &str) -> i64 {
        g.with_label_values(&["b", state]).get()
    }

    #[test]
    fn opens_after_threshold_and_recovers_through_half_open() {
        let g = gauge();
        let mut b = CircuitBreaker::new("b", 3, Duration::from_secs(5), g.clone());
        let t0 = Instant::now();
        assert_eq!(value(&g, "closed"), 1);
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(t0).is_ok());
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!((value(&g, "open"), value(&g, "closed")), (1, 0));
        assert_eq!(
            b.allow(t0 + Duration::from_secs(2)),
            Err(Duration::from_secs(3))
        );
        // Cool-down over: one trial.
        assert!(b.allow(t0 + Duration::from_secs(5)).is_ok());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(value(&g, "half_open"), 1);
        // Trial fails: open again for a full cool-down.
        let t1 = t0 + Duration::from_secs(6);
        b.on_failure(t1);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.allow(t1 + Duration::from_secs(4)).is_err());
        assert!(b.allow(t1 + Duration::from_secs(5)).is_ok());
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(
            (
                value(&g, "closed"),
                value(&g, "open"),
                value(&g, "half_open")
            ),
            (1, 0, 0)
        );
        // A success resets the failure count.
        b.on_failure(t1);
        b.on_failure(t1);
        b.on_success();
        b.on_failure(t1);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
