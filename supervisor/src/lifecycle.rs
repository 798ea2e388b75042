//! The supervisor's lifecycle: one state, in one watch channel.
//!
//! ```text
//!   Starting ──spawn──▶ Running ──stop signal, preStop, ctl shutdown──▶ Stopping { since, trigger, step_one_done }
//!                          │                                                   │
//!                          └─────────── main child reaped ──────────▶ Exited { end, stop } ◀──┘
//! ```
//!
//! Every transition is a method of [`Lifecycle`]'s sender, [`Transitions`], and refuses what the diagram does
//! not allow (a second stop, a stop after the end, a second end), so "has the stop started?" and "has the
//! child ended?" have one answer each. The run loop makes every transition but one: step 1's end, which the
//! stop sequence marks. Health, the admin socket, the stop sequence, the report and the control connection
//! subscribe.

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::exit::ChildEnd;
use crate::state::Trigger;

/// A stop that began: when, why, and whether step 1 (readiness off, the preStop delay) is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    /// The shutdown start: every deadline counts from here.
    pub since: Instant,
    pub trigger: Trigger,
    pub step_one_done: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Before the child is started.
    Starting,
    Running,
    Stopping(Stop),
    /// The main child is gone (`stop`: the stop that ran, if one did).
    Exited {
        end: ChildEnd,
        stop: Option<Stop>,
    },
}

/// The name `quiesce ctl status` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
    Stopping,
    Exiting,
}

impl Lifecycle {
    pub fn phase(&self) -> Phase {
        match self {
            Lifecycle::Starting => Phase::Starting,
            Lifecycle::Running => Phase::Running,
            Lifecycle::Stopping(_) => Phase::Stopping,
            Lifecycle::Exited { .. } => Phase::Exiting,
        }
    }

    /// The child has been started (it may have ended since).
    pub fn started(&self) -> bool {
        !matches!(self, Lifecycle::Starting)
    }

    /// The stop, once it began (also after the child's end).
    pub fn stop(&self) -> Option<&Stop> {
        match self {
            Lifecycle::Stopping(s) | Lifecycle::Exited { stop: Some(s), .. } => Some(s),
            _ => None,
        }
    }

    pub fn end(&self) -> Option<ChildEnd> {
        match self {
            Lifecycle::Exited { end, .. } => Some(*end),
            _ => None,
        }
    }

    /// Step 1 is over, or will never run again because the child is gone (`quiesce prestop` returns).
    pub fn step_one_over(&self) -> bool {
        match self {
            Lifecycle::Stopping(s) => s.step_one_done,
            Lifecycle::Exited { .. } => true,
            _ => false,
        }
    }
}

/// The writing end of the lifecycle watch: the only place a transition is made.
#[derive(Clone, Debug)]
pub struct Transitions(watch::Sender<Lifecycle>);

impl Default for Transitions {
    fn default() -> Self {
        Transitions(watch::channel(Lifecycle::Starting).0)
    }
}

impl Transitions {
    pub fn subscribe(&self) -> watch::Receiver<Lifecycle> {
        self.0.subscribe()
    }

    /// The current state (a copy: holding a borrow would block the writer).
    pub fn now(&self) -> Lifecycle {
        self.0.borrow().clone()
    }

    /// Starting → Running.
    pub fn running(&self) {
        self.0.send_if_modified(|l| {
            let go = matches!(l, Lifecycle::Starting);
            if go {
                *l = Lifecycle::Running;
            }
            go
        });
    }

    /// Running → Stopping. False if a stop already began or the child is gone: a later trigger joins.
    pub fn begin_stop(&self, since: Instant, trigger: Trigger) -> bool {
        self.0.send_if_modified(|l| {
            let go = matches!(l, Lifecycle::Running);
            if go {
                *l = Lifecycle::Stopping(Stop {
                    since,
                    trigger,
                    step_one_done: false,
                });
            }
            go
        })
    }

    /// Marks step 1 over (the stop sequence, once its delay ended).
    pub fn step_one_done(&self) {
        self.0.send_if_modified(|l| match l {
            Lifecycle::Stopping(s) if !s.step_one_done => {
                s.step_one_done = true;
                true
            }
            _ => false,
        });
    }

    /// Any state → Exited. False if the end was already recorded.
    pub fn exited(&self, end: ChildEnd) -> bool {
        self.0.send_if_modified(|l| {
            if l.end().is_some() {
                return false;
            }
            let stop = l.stop().cloned();
            *l = Lifecycle::Exited { end, stop };
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Sig;

    #[test]
    fn transitions_follow_the_diagram_and_refuse_the_rest() {
        let t = Transitions::default();
        let since = Instant::now();
        assert!(
            !t.begin_stop(since, Trigger::Operator),
            "no stop before the child runs"
        );
        t.running();
        assert_eq!(t.now().phase(), Phase::Running);
        assert!(t.begin_stop(since, Trigger::Prestop));
        assert!(
            !t.begin_stop(since, Trigger::Operator),
            "a second trigger joins the first"
        );
        assert_eq!(
            t.now().stop().map(|s| s.trigger.clone()),
            Some(Trigger::Prestop)
        );
        assert!(!t.now().step_one_over());
        t.step_one_done();
        assert!(t.now().step_one_over());
        assert!(t.exited(ChildEnd::Exited(0)));
        assert!(
            !t.exited(ChildEnd::Signaled(Sig::KILL)),
            "the first end stands"
        );
        let l = t.now();
        assert_eq!(l.end(), Some(ChildEnd::Exited(0)));
        assert_eq!(l.stop().map(|s| s.since), Some(since), "the stop is kept");
        assert!(
            !t.begin_stop(since, Trigger::Operator),
            "no stop after the end"
        );
    }

    #[test]
    fn an_end_without_a_stop_keeps_no_stop_and_releases_prestop() {
        let t = Transitions::default();
        t.running();
        assert!(t.exited(ChildEnd::Exited(3)));
        assert!(t.now().stop().is_none());
        assert!(t.now().step_one_over());
    }
}
