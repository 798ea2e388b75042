//! The observer connection: polls the app's `status` (liveness) and `health` (dependencies).

use std::sync::Arc;
use std::time::Duration;

use quiesce_protocol::client::Client;
use quiesce_protocol::wire::Role;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use super::deps_up;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::state::Shared;

/// Control mode: keeps an observer connection and polls `status` (liveness) and `health` (readiness).
pub async fn poll(
    cfg: Arc<Config>,
    shared: Shared,
    life: watch::Receiver<Lifecycle>,
    hello: watch::Receiver<Option<quiesce_protocol::wire::HelloReply>>,
    deps_tx: watch::Sender<bool>,
    live_tx: watch::Sender<bool>,
) {
    let Some(path) = cfg.control_socket.clone() else {
        return;
    };
    let h = &cfg.health;
    let mut hello = hello;
    // Liveness is only judged once the app has answered hello (the startup probe covers the time before).
    if hello.wait_for(|h| h.is_some()).await.is_err() {
        return;
    }
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(h.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while life.borrow().end().is_none() {
        tick.tick().await;
        if client.is_none() {
            let until = Instant::now() + h.liveness_timeout;
            client = crate::control::connect(&path, Role::Observer, until, &life)
                .await
                .map(|(c, _)| c);
            if client.is_none() {
                live_tx.send_if_modified(|v| std::mem::replace(v, false));
                deps_tx.send_if_modified(|v| std::mem::replace(v, false));
                continue;
            }
        }
        let Some(c) = client.as_mut() else { continue };
        // A connection that failed either poll is out of step: the next round opens a fresh one.
        if !poll_status(c, &cfg, &shared, &live_tx).await
            || !poll_health(c, &cfg, &shared, &deps_tx).await
        {
            client = None;
        }
    }
}

/// `status` within `liveness_timeout`: liveness. False when the connection should be dropped.
async fn poll_status(
    c: &mut Client,
    cfg: &Config,
    shared: &Shared,
    live_tx: &watch::Sender<bool>,
) -> bool {
    let h = &cfg.health;
    let began = Instant::now();
    let why = match timeout(h.liveness_timeout, c.status()).await {
        Ok(Ok(_)) => {
            shared.metrics.rtt("status", began.elapsed().as_secs_f64());
            shared.lock().live_why.clear();
            live_tx.send_if_modified(|v| !std::mem::replace(v, true));
            return true;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "no answer to status within {}",
            humantime::format_duration(h.liveness_timeout)
        ),
    };
    shared.lock().live_why = why.clone();
    if live_tx.send_if_modified(|v| std::mem::replace(v, false)) {
        tracing::warn!(reason = %why, "liveness: the app's control socket does not answer");
    }
    false
}

/// `health`: readiness, and the names (with their reasons) of the dependencies that are down. False when
/// the connection should be dropped.
async fn poll_health(
    c: &mut Client,
    cfg: &Config,
    shared: &Shared,
    deps_tx: &watch::Sender<bool>,
) -> bool {
    let h = &cfg.health;
    let began = Instant::now();
    let wait = h.poll_interval.max(Duration::from_secs(2));
    let Ok(Ok(reply)) = timeout(wait, c.health()).await else {
        deps_tx.send_if_modified(|v| std::mem::replace(v, false));
        return false;
    };
    shared.metrics.rtt("health", began.elapsed().as_secs_f64());
    let ok = deps_up(&reply, &h.required);
    let down: Vec<String> = reply
        .checks
        .iter()
        .filter(|c| !c.up)
        .map(|c| match &c.error {
            Some(m) if !m.is_empty() => {
                let m: String = m.chars().take(120).filter(|c| !c.is_control()).collect();
                format!("{} ({m})", c.name)
            }
            _ => c.name.clone(),
        })
        .collect();
    let new_down = {
        let mut st = shared.lock();
        st.deps_down != down && {
            st.deps_down = down.clone();
            true
        }
    };
    if deps_tx.send_if_modified(|v| std::mem::replace(v, ok) != ok) {
        tracing::info!(ready = ok, down = %quiesce_protocol::log::json_text(&down), "dependency health changed");
    } else if new_down {
        // Same answer, other reasons: wake the tracker so `ctl status` says why.
        deps_tx.send_modify(|_| {});
    }
    true
}
