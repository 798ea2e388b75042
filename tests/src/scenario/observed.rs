//! What the terminated pod, the endpoints view and the prober showed, read once the pod has
//! exited: the termination message, the step logs, when routing and readiness changed, and a
//! timeline for diagnostics.

use std::time::Duration;

use tokio::time::Instant;

use super::setup::routing;
use crate::endpoints::Endpoints;
use crate::kubelet::{Prober, Termination};
use crate::load::LoadResult;
use crate::pod::Pod;
use crate::report::{self, Message, StepLogs};

/// What pod `a` and the things around it showed.
pub(super) struct Observed {
    pub message: Option<Message>,
    pub logs: StepLogs,
    pub log_tail: String,
    pub unrouted_after: Option<Duration>,
    pub readiness_failed_after: Option<Duration>,
    pub timeline: Vec<String>,
}

impl Observed {
    pub fn read(
        pod: &Pod,
        endpoints: &Endpoints,
        prober: &Prober,
        termination: &Termination,
        load: &LoadResult,
    ) -> Observed {
        let started = termination.started;
        Observed {
            message: termination_message(pod),
            logs: report::step_logs(&pod.lines()),
            log_tail: pod.tail(80),
            unrouted_after: endpoints
                .changes()
                .iter()
                .find(|c| c.pod == "a" && !c.routed && c.at >= started)
                .map(|c| c.at.saturating_duration_since(started)),
            readiness_failed_after: prober
                .results()
                .iter()
                .find(|r| r.probe == "readiness" && !r.serving && r.at >= started)
                .map(|r| r.at.saturating_duration_since(started)),
            timeline: timeline(endpoints, prober, started, load),
        }
    }
}

/// The pod's termination message, parsed; panics when it is there but unreadable.
fn termination_message(pod: &Pod) -> Option<Message> {
    let text = pod.termination_message();
    text.as_deref()
        .map(report::parse_message)
        .transpose()
        .unwrap_or_else(|e| {
            panic!(
                "unreadable termination message: {e}\n{}",
                text.clone().unwrap_or_default()
            )
        })
}

/// Routing changes, failed probes and the termination's start, in order, relative to the
/// load's first request.
fn timeline(
    endpoints: &Endpoints,
    prober: &Prober,
    started: Instant,
    load: &LoadResult,
) -> Vec<String> {
    let load_start = load.records.first().map_or(started, |r| r.sent_at);
    let rel = |at: Instant| at.saturating_duration_since(load_start).as_secs_f64();
    let mut timeline: Vec<(f64, String)> = endpoints
        .changes()
        .iter()
        .map(|c| (rel(c.at), format!("{} {}", c.pod, routing(c))))
        .collect();
    timeline.extend(
        prober
            .results()
            .iter()
            .filter(|r| !r.serving)
            .map(|r| (rel(r.at), format!("{} probe failed: {}", r.probe, r.detail))),
    );
    timeline.push((rel(started), "termination starts".into()));
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    timeline
        .into_iter()
        .map(|(t, s)| format!("+{t:.3} s {s}"))
        .collect()
}
