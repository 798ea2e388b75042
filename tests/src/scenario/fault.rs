//! The faults: what each sets up while the pod is still routed ([`Armed::set_up`]), what it
//! does while kubelet terminates the pod ([`during_termination`]), and how it is undone once
//! the pod is gone ([`Armed::undo`]).

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::endpoints::Endpoints;
use crate::faults::{self, HeldLock, PgGuard, RabbitGuard};
use crate::load::{Kind, Record};
use crate::payments::{self, Published};
use crate::pod::{LogLine, Pod, PodWatch};
use crate::requests::{held_order, stuck_order};
use crate::sandbox::Sandbox;

/// What goes wrong during the termination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// A payment handler waits on an order row another transaction holds: step 5 cannot
    /// finish and must be cut at its budget.
    ConsumerHang,
    /// The same stuck handler, and the app is SIGKILLed 1 s into step 5.
    AppCrash,
    /// CreateOrder calls held on idempotency keys are in flight; PostgreSQL stops (fast) when
    /// step 3 starts and comes back after the pod exited.
    PostgresStop,
    /// `rabbitmqctl stop_app`, 3 s down, `start_app`, and the termination starts 1 s later.
    RabbitRestart,
}

/// A fault set up on pod `a` and not yet undone. Dropping it undoes what it holds (the guards
/// start the services again, the lock's connection closes).
#[derive(Default)]
pub(super) struct Armed {
    /// What was done, in order, for the figures.
    pub notes: Vec<String>,
    /// The payment the stuck handler waits on (published outside the publisher).
    pub extra_published: Vec<Published>,
    /// The idempotency keys of the held CreateOrder calls (retried on the successor).
    pub held_keys: Vec<String>,
    rabbit_guard: Option<RabbitGuard>,
    pg_guard: Option<PgGuard>,
    held_calls: Vec<JoinHandle<Record>>,
    lock: Option<HeldLock>,
}

impl Armed {
    /// Sets `fault` up while pod `a` is still routed.
    pub async fn set_up(
        fault: Fault,
        sandbox: &Sandbox,
        endpoints: &Endpoints,
        pod: &Pod,
    ) -> Armed {
        let mut armed = Armed::default();
        match fault {
            Fault::None => {}
            Fault::ConsumerHang | Fault::AppCrash => {
                armed.stick_a_payment_handler(sandbox, endpoints, pod).await;
            }
            Fault::PostgresStop => armed.hold_create_calls(sandbox, endpoints, pod).await,
            Fault::RabbitRestart => armed.restart_rabbit().await,
        }
        armed
    }

    /// An order whose row another transaction holds FOR UPDATE, and a payment for it: its
    /// handler blocks.
    async fn stick_a_payment_handler(
        &mut self,
        sandbox: &Sandbox,
        endpoints: &Endpoints,
        pod: &Pod,
    ) {
        let mut client = endpoints.client("a").expect("pod a tracked");
        let order = client
            .create_order(stuck_order())
            .await
            .expect("create the order the stuck handler will wait on")
            .into_inner()
            .order
            .expect("an order")
            .order_id;
        self.lock = Some(HeldLock::order_row(&sandbox.database_url(), &order).await);
        let p = payments::publish_one(&sandbox.payments_exchange(), &order)
            .await
            .expect("publish the payment the handler will hang on");
        self.extra_published.push(p);
        assert!(
            faults::wait_lock_waiters(&sandbox.database, 1, Duration::from_secs(15)).await,
            "the payment handler never blocked on the held order row\n{}",
            pod.tail(40)
        );
        self.notes.push(format!(
            "a payment handler waits on order {order}, whose row another transaction holds FOR UPDATE"
        ));
    }

    /// Four CreateOrder calls blocked on idempotency keys another transaction inserted; the
    /// PostgreSQL guard starts the database again if the test ends early.
    async fn hold_create_calls(&mut self, sandbox: &Sandbox, endpoints: &Endpoints, pod: &Pod) {
        let keys: Vec<String> = (0..4)
            .map(|i| format!("e2e-held-{}-{i}", sandbox.suffix))
            .collect();
        self.lock = Some(HeldLock::idempotency_keys(&sandbox.database_url(), &keys).await);
        self.held_keys = keys.clone();
        for key in keys {
            let client = endpoints.client("a").expect("pod a tracked");
            self.held_calls.push(tokio::spawn(held_call(client, key)));
        }
        assert!(
            faults::wait_lock_waiters(&sandbox.database, 4, Duration::from_secs(15)).await,
            "the held CreateOrder calls never blocked on their idempotency keys\n{}",
            pod.tail(40)
        );
        self.pg_guard = Some(PgGuard);
        self.notes.push(
            "4 CreateOrder calls wait on idempotency keys another transaction inserted".into(),
        );
    }

    /// `stop_app`, 3 s down, `start_app`, then 1 s before the termination.
    async fn restart_rabbit(&mut self) {
        self.rabbit_guard = Some(RabbitGuard);
        let t = Instant::now();
        tokio::task::spawn_blocking(faults::rabbit_stop)
            .await
            .expect("join")
            .expect("rabbitmqctl stop_app");
        let stopped = t.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::spawn_blocking(faults::rabbit_start)
            .await
            .expect("join")
            .expect("rabbitmqctl start_app");
        self.notes.push(format!(
            "RabbitMQ: stop_app took {:.1} s, down 3 s, start_app and listening after {:.1} s more; termination 1 s later",
            stopped.as_secs_f64(),
            (t.elapsed() - stopped - Duration::from_secs(3)).as_secs_f64()
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// Once the pod is gone: collects the held calls' answers (returned), starts PostgreSQL
    /// again, makes sure RabbitMQ runs and releases the held lock.
    pub async fn undo(&mut self) -> Vec<Record> {
        let mut held = Vec::new();
        for c in std::mem::take(&mut self.held_calls) {
            if let Ok(r) = c.await {
                self.notes.push(format!(
                    "held CreateOrder answered after {:.3} s: {}",
                    r.latency.as_secs_f64(),
                    match &r.result {
                        Ok(()) => "OK".to_owned(),
                        Err((code, msg)) => format!("{code:?} ({msg})"),
                    }
                ));
                held.push(r);
            }
        }
        if let Some(g) = self.pg_guard.take() {
            let t = Instant::now();
            drop(g); // starts PostgreSQL and waits for it
            self.notes.push(format!(
                "PostgreSQL started again after the pod exited ({:.1} s to accept connections)",
                t.elapsed().as_secs_f64()
            ));
        }
        drop(self.rabbit_guard.take());
        if let Some(l) = self.lock.take() {
            l.release().await;
        }
        held
    }
}

/// One CreateOrder on a held idempotency key, recorded like a load request.
async fn held_call(
    mut client: order_service::proto::order_service_client::OrderServiceClient<
        tonic::transport::Channel,
    >,
    key: String,
) -> Record {
    let sent_at = Instant::now();
    let r = client.create_order(held_order(&key)).await;
    Record {
        sent_at,
        pod: Some("a".into()),
        kind: Kind::Create,
        latency: sent_at.elapsed(),
        order_id: r
            .as_ref()
            .ok()
            .and_then(|r| r.get_ref().order.as_ref().map(|o| o.order_id.clone())),
        result: r
            .map(|_| ())
            .map_err(|s| (s.code(), s.message().to_owned())),
    }
}

fn is_supervisor_step_start(l: &LogLine, step: &str) -> bool {
    l.json().is_some_and(|v| {
        v.get("message").and_then(|m| m.as_str()) == Some("step start")
            && v.get("step").and_then(|s| s.as_str()) == Some(step)
    })
}

fn is_app_step_start(l: &LogLine, substep: &str) -> bool {
    l.json().is_some_and(|v| {
        v.get("message").and_then(|m| m.as_str()) == Some("sub-step started")
            && v.get("substep").and_then(|s| s.as_str()) == Some(substep)
    })
}

/// What the fault does while kubelet terminates the pod.
pub(super) async fn during_termination(fault: Fault, watch: PodWatch, t0: Instant) -> Vec<String> {
    let mut notes = Vec::new();
    let since = |at: Instant| at.saturating_duration_since(t0).as_secs_f64();
    match fault {
        Fault::AppCrash => {
            let Some(line) = watch
                .wait_for(Duration::from_secs(40), |l| {
                    is_supervisor_step_start(l, "stop-consumer")
                })
                .await
            else {
                notes.push("stop-consumer never started: no crash injected".into());
                return notes;
            };
            tokio::time::sleep_until(line.at + Duration::from_secs(1)).await;
            match watch.app_pid() {
                Some(pid) => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    notes.push(format!(
                        "SIGKILL to the app (host pid {pid}) at +{:.3} s, 1 s into stop-consumer",
                        since(Instant::now())
                    ));
                }
                None => notes.push("no app process to kill".into()),
            }
        }
        Fault::PostgresStop => {
            let Some(line) = watch
                .wait_for(Duration::from_secs(40), |l| {
                    is_app_step_start(l, "drain-in-flight")
                })
                .await
            else {
                notes.push("drain-in-flight never started: PostgreSQL not stopped".into());
                return notes;
            };
            let r = tokio::task::spawn_blocking(faults::pg_stop).await;
            notes.push(format!(
                "drain-in-flight started at +{:.3} s; PostgreSQL stopped (-m fast) by +{:.3} s ({})",
                since(line.at),
                since(Instant::now()),
                match r {
                    Ok(Ok(())) => "ok".to_owned(),
                    Ok(Err(e)) => e,
                    Err(e) => e.to_string(),
                }
            ));
        }
        _ => {}
    }
    notes
}
