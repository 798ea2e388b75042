//! The tracker: recomputes the statuses whenever an input changes, publishes them to the probe thread, the
//! metrics and `quiesce ctl status`.

use std::sync::Arc;

use tokio::sync::watch;

use super::{AppHealth, Inputs, Statuses, compute, reason};
use crate::config::Config;
use crate::runloop::Watches;
use crate::state::Shared;
use quiesce_protocol::log::json_text;

/// Keeps each service's status, since when and why in the shared status (`quiesce ctl status`).
fn publish(shared: &Shared, inputs: &Inputs, next: &Statuses) {
    let mut st = shared.lock();
    let (deps_down, live_why) = (st.deps_down.clone(), st.live_why.clone());
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    st.health.retain(|svc, _| next.contains_key(svc));
    for (svc, serving) in next {
        let status = if *serving { "SERVING" } else { "NOT_SERVING" };
        let why = reason(inputs, svc, &deps_down, &live_why);
        let e = st
            .health
            .entry(svc.clone())
            .or_insert_with(|| crate::state::ServiceHealth {
                status,
                since: now.clone(),
                why: why.clone(),
            });
        if e.status != status {
            e.status = status;
            e.since = now.clone();
        }
        e.why = why;
    }
}

/// Recomputes the statuses whenever an input changes; also mirrors them into the metrics and the shared
/// status.
pub async fn track(
    cfg: Arc<Config>,
    mut w: Watches,
    app: Option<AppHealth>,
    out: watch::Sender<Statuses>,
    shared: Shared,
) {
    let metrics = shared.metrics.clone();
    let control = cfg.mode() == crate::config::Mode::Control;
    let loud = cfg.health.address.is_some();
    let (mut deps, mut live) = match app {
        Some(a) => (a.deps_ok, a.live_ok),
        None => (watch::channel(true).1, watch::channel(true).1),
    };
    loop {
        let services = w
            .hello
            .borrow_and_update()
            .as_ref()
            .map(|h| h.services.clone());
        let life = w.lifecycle.borrow_and_update().clone();
        let inputs = Inputs {
            control,
            alive: life.end().is_none(),
            hello: services.is_some(),
            deps_ok: *deps.borrow_and_update(),
            live_ok: *live.borrow_and_update(),
            stopping: life.stop().is_some(),
            services: services.unwrap_or_default(),
        };
        let next = compute(&inputs);
        publish(&shared, &inputs, &next);
        out.send_if_modified(|cur| {
            if *cur == next {
                return false;
            }
            let (mut up, mut down) = (Vec::new(), Vec::new());
            for (svc, serving) in &next {
                if cur.get(svc) != Some(serving) {
                    // The overall service is "" on the wire; the log names it.
                    let name = if svc.is_empty() {
                        "overall"
                    } else {
                        svc.as_str()
                    };
                    if *serving {
                        up.push(name)
                    } else {
                        down.push(name)
                    }
                }
                metrics.health(svc, *serving);
            }
            // One line per transition, listing what it changed; at INFO only when probes are served.
            quiesce_protocol::event_if!(loud, info, debug,
                serving = %json_text(&up),
                not_serving = %json_text(&down),
                "health changed"
            );
            *cur = next.clone();
            true
        });
        tokio::select! {
            r = w.lifecycle.changed() => if r.is_err() { return },
            r = w.hello.changed() => if r.is_err() { return },
            Ok(()) = deps.changed() => {},
            Ok(()) = live.changed() => {},
        }
    }
}
