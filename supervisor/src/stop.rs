//! The stop: step 1 (readiness off, preStop delay), asking the app to stop, and the deadline's force.
//!
//! Every wait here ends as soon as its condition holds: the child's end arrives on a watch channel from the
//! reaper, so no wait sleeps past it. Deadlines come from the shutdown start (the earlier of the preStop call
//! and the signal) plus `grace_period - safety_margin`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout_at};

use crate::config::{Config, ForwardTo};
use crate::exit::{ChildEnd, StopResult};
use crate::lifecycle::Transitions;
use crate::signals::Sig;
use crate::state::{Outcome, RunningStep, Shared, StepRecord, ms};
use crate::steps::{Extra, STEPS};
use crate::sys::{Target, send};

/// What the stop sequence needs, shared by signal mode and control mode.
#[derive(Clone, Debug)]
pub struct StopCtx {
    pub cfg: Arc<Config>,
    pub shared: Shared,
    pub pid: i32,
    /// The lifecycle: the stop watches it for the child's end and marks step 1 over in it.
    pub life: Transitions,
    /// Shutdown start: the lifecycle's `Stopping.since`, copied because every deadline reads it.
    pub start: Instant,
    /// Readiness checks kubelet got NOT_SERVING for (for `health.observed_probes`).
    pub probes: watch::Receiver<u32>,
    /// That count when the stop began: only answers after it count.
    pub probes_before: u32,
    /// The signal that asks the app to stop, chosen once from the trigger ([`ask_signal`]).
    pub ask_with: Sig,
    /// Stop signals received and passed on, shared with the run loop.
    pub relay: Arc<Mutex<Relay>>,
    /// This stop's trace ids, when traces are exported ([`crate::trace`]): the step verbs carry them.
    pub trace: Option<Arc<crate::trace::Shutdown>>,
}

impl StopCtx {
    /// The moment everything must be over: start + grace_period - safety_margin.
    pub fn deadline(&self) -> Instant {
        self.start + self.cfg.stop_window()
    }

    /// The app's last chance between the deadline's SIGTERM and SIGKILL (control mode): a quarter of the
    /// safety margin, at most 500 ms. Taken from the end of the window, so the SIGKILL lands at the window's
    /// end and the safety margin stays whole.
    pub fn term_grace(&self) -> Duration {
        (self.cfg.safety_margin / 4).min(Duration::from_millis(500))
    }

    /// The latest moment quiesce exits, whatever the app does: the middle of the safety margin
    /// ([`exit_by`]). Every wait after the deadline ends by then, so kubelet's SIGKILL never finds quiesce
    /// still running, even with an app stuck in the kernel that SIGKILL cannot reap.
    pub fn hard_end(&self) -> Instant {
        self.start + exit_by(&self.cfg)
    }

    /// When the steps' time is over: the window's end minus [`StopCtx::term_grace`]. The deadline's SIGTERM
    /// goes out here.
    pub fn steps_deadline(&self) -> Instant {
        self.deadline() - self.term_grace()
    }

    /// The main child's end, once the reaper saw it.
    pub fn end(&self) -> Option<ChildEnd> {
        self.life.now().end()
    }

    pub fn child_ended(&self) -> bool {
        self.end().is_some()
    }

    /// Waits for the child's end until `until`; true if it ended.
    /// A deadline already reached returns at once: a timer would round it up to the next millisecond tick.
    pub async fn wait_end_until(&self, until: Instant) -> bool {
        if self.child_ended() {
            return true;
        }
        if until <= Instant::now() {
            return false;
        }
        let mut rx = self.life.subscribe();
        timeout_at(until, rx.wait_for(|l| l.end().is_some()))
            .await
            .is_ok()
    }

    /// Step `number` `name` began at `began` with `budget`: listed as running until it is recorded.
    pub fn started(&self, number: u8, name: &str, began: Instant, budget: Duration) {
        self.shared.started(RunningStep {
            number,
            name: name.to_string(),
            started_ms: ms(began.saturating_duration_since(self.start)),
            budget_ms: ms(budget),
        });
    }

    pub fn record(&self, number: u8, name: &str, outcome: Outcome, began: Instant, detail: String) {
        let r = StepRecord {
            number,
            name: name.to_string(),
            outcome,
            started_ms: ms(began.saturating_duration_since(self.start)),
            duration_ms: ms(began.elapsed()),
            counts: Default::default(),
            detail,
        };
        quiesce_protocol::event_if!(self.cfg.narrates_steps(), info, debug, step = %r.name, outcome = r.outcome.as_str(), duration_ms = r.duration_ms, detail = %r.detail, "step end");
        self.shared.record(r);
    }
}

/// Step 1: every service but liveness NOT_SERVING, then the preStop delay (ends early if the app exits).
pub async fn step_one(ctx: &StopCtx) {
    let began = Instant::now();
    // Health went NOT_SERVING when the stop began (the lifecycle's Stopping); only answers since count.
    let probes_before = ctx.probes_before;
    let delay = ctx.cfg.prestop_delay;
    quiesce_protocol::event_if!(
        ctx.cfg.narrates_steps(),
        info,
        debug,
        step = STEPS[0].name,
        delay_ms = ms(delay),
        "step start"
    );
    ctx.started(STEPS[0].number, STEPS[0].name, began, delay);
    let until = ctx.start + delay;
    let want = ctx.cfg.health.observed_probes;
    let mut early = false;
    let ended = if want > 0 && until > Instant::now() {
        // End the delay once kubelet has been seen to get NOT_SERVING `want` times, plus a propagation
        // margin for the endpoint controller, never later than the configured delay.
        let mut probes = ctx.probes.clone();
        let margin = ctx.cfg.health.propagation_margin;
        let observed = async move {
            let _ = probes.wait_for(|n| *n >= probes_before + want).await;
            sleep(margin).await;
        };
        tokio::select! {
            ended = ctx.wait_end_until(until) => ended,
            _ = observed => { early = true; ctx.child_ended() }
        }
    } else {
        ctx.wait_end_until(until).await
    };
    let d = humantime::format_duration(delay);
    let (outcome, detail) = if ended && Instant::now() < until {
        (
            Outcome::Skipped,
            format!("app exited during the {d} preStop delay"),
        )
    } else if early {
        (
            Outcome::Ok,
            format!("readiness NOT_SERVING; kubelet saw it {want} times; {d} delay ended early"),
        )
    } else {
        (
            Outcome::Ok,
            format!("readiness NOT_SERVING; preStop delay {d}"),
        )
    };
    ctx.record(STEPS[0].number, STEPS[0].name, outcome, began, detail);
    ctx.life.step_one_done();
}

/// Stop signals (SIGTERM, SIGINT) the supervisor received, against those the app got.
///
/// Once the stop has asked the app (signal mode, or control mode's no-connection fallback), the app gets one
/// signal per stop signal quiesce received, mapped by [`ask_signal`] and never more: a second Ctrl-C reaches
/// it as tini would pass it, a SIGTERM right behind a SIGINT is not swallowed, and kubelet's SIGTERM after a
/// preStop hook (which already made quiesce send one) is not sent twice. Before the app was asked (the
/// preStop delay) receipts are only counted; they are settled when it is asked. Control mode with a
/// connection never asks this way, so there they stay counted and ignored.
#[derive(Debug, Default)]
pub struct Relay {
    received: BTreeMap<Sig, u32>,
    delivered: BTreeMap<Sig, u32>,
    asked: bool,
}

impl Relay {
    /// A stop signal arrived (the one that started the stop included), counted as the signal it maps to.
    pub fn received(&mut self, mapped: Sig) {
        *self.received.entry(mapped).or_default() += 1;
    }

    /// The stop sequence asked the app with `sig` itself.
    pub fn asked(&mut self, sig: Sig) {
        self.asked = true;
        *self.delivered.entry(sig).or_default() += 1;
    }

    /// The signals the app is owed now (each counted as delivered).
    pub fn owed(&mut self) -> Vec<Sig> {
        if !self.asked {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (sig, n) in &self.received {
            let got = self.delivered.entry(*sig).or_default();
            while *got < *n {
                *got += 1;
                out.push(*sig);
            }
        }
        out
    }
}

/// Delivers what [`Relay::owed`] says the app is owed.
pub fn settle(relay: &Mutex<Relay>, pid: i32, to: ForwardTo) {
    let owed = relay.lock().unwrap_or_else(|p| p.into_inner()).owed();
    for sig in owed {
        tracing::info!(signal = %sig, "passing a repeated stop signal on to the app (the stop and its deadline stand)");
        deliver(pid, sig, to);
    }
}

/// From the stop's start, when quiesce has exited at the latest: the window plus half the safety margin.
/// The other half stays kubelet's, for the container runtime.
pub fn exit_by(cfg: &Config) -> Duration {
    cfg.stop_window() + cfg.safety_margin / 2
}

/// The one rule for the signal that asks the app to stop: a received SIGINT keeps its interactive meaning
/// and goes through `signals.rewrite` like any forwarded signal; every other trigger (SIGTERM, the preStop
/// hook, `quiesce ctl shutdown`) sends the configured `stop_signal`. Signal mode and control mode's
/// no-connection fallback both use it.
pub fn ask_signal(cfg: &Config, received: Option<Sig>) -> Sig {
    match received {
        Some(Sig::INT) => cfg.rewrite.apply(Sig::INT),
        _ => cfg.stop_signal,
    }
}

/// Signal mode: step 1, then the stop signal, then wait for the exit until the deadline, then SIGKILL.
pub async fn signal_mode(ctx: StopCtx) -> StopResult {
    step_one(&ctx).await;
    if ctx.child_ended() {
        return StopResult {
            asked_with: None,
            forced: false,
        };
    }
    ask_with_signal(&ctx, ctx.ask_with).await
}

/// Sends `send` to the app (or its group), waits for its end until the deadline, then forces it; records
/// the `stop-signal` row. Signal mode's stop, and control mode's fallback when the app never connected.
pub async fn ask_with_signal(ctx: &StopCtx, send: Sig) -> StopResult {
    let began = Instant::now();
    let target = match ctx.cfg.forward_to {
        ForwardTo::Child => format!("pid {}", ctx.pid),
        ForwardTo::Group => format!("process group {}", ctx.pid),
    };
    quiesce_protocol::event_if!(ctx.cfg.narrates_steps(), info, debug, step = Extra::StopSignal.name(), signal = %send, %target, "step start");
    ctx.started(
        0,
        Extra::StopSignal.name(),
        began,
        ctx.deadline().saturating_duration_since(began),
    );
    deliver(ctx.pid, send, ctx.cfg.forward_to);
    ctx.relay
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .asked(send);
    settle(&ctx.relay, ctx.pid, ctx.cfg.forward_to);
    if ctx.wait_end_until(ctx.deadline()).await {
        let end = ctx.end().map(|e| e.to_string()).unwrap_or_default();
        ctx.record(
            0,
            Extra::StopSignal.name(),
            Outcome::Ok,
            began,
            format!("sent {send} to {target}; app {end}"),
        );
        return StopResult {
            asked_with: Some(send),
            forced: false,
        };
    }
    ctx.record(
        0,
        Extra::StopSignal.name(),
        Outcome::Timeout,
        began,
        format!("sent {send} to {target}; still running at the deadline"),
    );
    force(ctx, false).await;
    StopResult {
        asked_with: Some(send),
        forced: true,
    }
}

/// The deadline passed: the app's whole process group gets SIGTERM (optionally, with what is left until the
/// window's end as a last chance to flush logs), then SIGKILL at the window's end.
pub async fn force(ctx: &StopCtx, term_first: bool) {
    let began = Instant::now();
    let mut detail = String::new();
    if term_first {
        let _ = send(Target::Group(ctx.pid), Sig::TERM);
        if ctx.wait_end_until(ctx.deadline()).await {
            ctx.record(
                0,
                Extra::Deadline.name(),
                Outcome::Timeout,
                began,
                "overall deadline: SIGTERM to the process group; app exited".into(),
            );
            return;
        }
        detail.push_str("overall deadline: SIGTERM, then ");
    } else {
        detail.push_str("overall deadline: ");
    }
    let _ = send(Target::Group(ctx.pid), Sig::KILL);
    let _ = send(Target::Process(ctx.pid), Sig::KILL); // in case the child left its group
    detail.push_str("SIGKILL to the process group");
    // SIGKILL cannot be refused; only a task stuck in the kernel (D state) keeps us here, and then for half
    // of what is left before the hard end: the leftover sweep and the report get the other half.
    let until = ctx.deadline() + (ctx.hard_end() - ctx.deadline()) / 2;
    let _ = ctx.wait_end_until(until).await;
    ctx.record(0, Extra::Deadline.name(), Outcome::Timeout, began, detail);
}

/// Sends a signal to the child or its group, as configured.
pub fn deliver(pid: i32, sig: Sig, to: ForwardTo) {
    let target = match to {
        ForwardTo::Child => Target::Process(pid),
        ForwardTo::Group => Target::Group(pid),
    };
    if let Err(e) = send(target, sig) {
        tracing::debug!(%target, signal = %sig, error = %e, "signal not delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_gets_one_signal_per_stop_signal_received_never_more() {
        // preStop asked with SIGTERM; kubelet's SIGTERM follows: nothing more.
        let mut r = Relay::default();
        r.asked(Sig::TERM);
        r.received(Sig::TERM);
        assert_eq!(r.owed(), []);
        // SIGINT then SIGTERM back to back, before the stop asked: both, once asked.
        let mut r = Relay::default();
        r.received(Sig::INT);
        r.received(Sig::TERM);
        assert_eq!(r.owed(), [], "nothing during the preStop delay");
        r.asked(Sig::INT);
        assert_eq!(r.owed(), [Sig::TERM]);
        assert_eq!(r.owed(), []);
        // A second Ctrl-C.
        r.received(Sig::INT);
        assert_eq!(r.owed(), [Sig::INT]);
    }
}
