//! OpenTelemetry traces against a real OTLP/gRPC receiver run by the test
//! (`order_service::testing::otlp`), with the real PostgreSQL, Redis and RabbitMQ:
//!
//! - one CreateOrder carrying a `traceparent` is one trace: the server span (child of the
//!   caller's span), its database and Redis spans, after the relay the publish span (whose
//!   context the AMQP message carries), and the payment consumer's span of a payment for that
//!   order (published with the context the order event carried, as a payment service would);
//! - a collector that is slow or down drops spans, counted in `otel_spans_dropped_total`, and
//!   neither requests nor the stop wait for it.
//!
//! The trace pipeline and the subscriber are process-wide; nextest runs each test in its own
//! process.

mod common;

use std::time::{Duration, Instant};

use common::{client, confirm_channel, create_request, hard_timeout, wait_until};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use order_service::App;
use order_service::config::LogFormat;
use order_service::control::stop_all;
use order_service::proto::GetOrderRequest;
use order_service::testing::Sandbox;
use order_service::testing::otlp::{Collector, ReceivedSpan, kind};
use order_service::traces::{self, TraceSettings};
use uuid::Uuid;

/// Starts the trace pipeline towards `endpoint` and the subscriber recording into it.
fn install(settings: TraceSettings) {
    let t = traces::start(&settings).expect("start the trace pipeline");
    order_service::telemetry::init_with_traces(LogFormat::Json, Some(t));
}

fn fast(endpoint: String) -> TraceSettings {
    TraceSettings {
        service_name: Some("order-service-test".to_owned()),
        batch_delay: Duration::from_millis(50),
        ..TraceSettings::new(endpoint)
    }
}

fn one<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    f: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "expected one {what} span in {spans:#?}");
    found[0]
}

fn header(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

#[tokio::test]
async fn one_create_order_is_one_trace_through_the_outbox_and_the_payment() {
    let collector = Collector::start().await;
    install(fast(collector.endpoint()));
    let env = Sandbox::new("test").await;
    hard_timeout(Duration::from_secs(90), async {
        let app = App::start(env.config()).await.expect("start");
        let amqp = env.amqp().await;
        let channel = confirm_channel(&amqp).await;
        let queue = env
            .bind_event_queue(&channel, "created", "order.created")
            .await;

        // The caller's span: a sampled W3C context in the request metadata.
        let trace_id = Uuid::new_v4().simple().to_string();
        let caller_span = "00f067aa0ba902b7";
        let mut request = tonic::Request::new(create_request("traced", "trace-key-1"));
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
        );
        let order_id = client(app.grpc_addr())
            .await
            .create_order(request)
            .await
            .expect("CreateOrder")
            .into_inner()
            .order
            .unwrap()
            .order_id;

        // The order event carries the publish span's context.
        let deadline = Instant::now() + Duration::from_secs(20);
        let delivery = loop {
            let got = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            if let Some(d) = got {
                break d;
            }
            assert!(
                Instant::now() < deadline,
                "no order.created event within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let event_tp = header(delivery.properties.headers().as_ref(), "traceparent")
            .expect("the event carries a traceparent header");
        let parts: Vec<&str> = event_tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{event_tp}");
        assert_eq!(parts[1], trace_id, "the event is in the request's trace");
        let publish_span_id = parts[2].to_owned();

        // A payment service: pays the order, its message in the same trace.
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(event_tp.clone().into()),
        );
        let body = serde_json::json!({ "order_id": order_id }).to_string();
        channel
            .basic_publish(
                env.topology().payments_exchange.as_str().into(),
                "payment.succeeded".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_message_id(Uuid::new_v4().to_string().into())
                    .with_content_type("application/json".into())
                    .with_headers(headers),
            )
            .await
            .expect("publish the payment")
            .await
            .expect("payment confirmed");
        let c = client(app.grpc_addr()).await;
        wait_until("the order paid", Duration::from_secs(20), || {
            let mut c = c.clone();
            let order_id = order_id.clone();
            async move {
                let o = c
                    .get_order(GetOrderRequest { order_id })
                    .await
                    .unwrap()
                    .into_inner()
                    .order
                    .unwrap();
                o.status == order_service::proto::OrderStatus::Paid as i32
            }
        })
        .await;

        // The payment's own event (order.paid) is relayed in the same trace.
        let pool = env.pool().await;
        wait_until("every outbox row sent", Duration::from_secs(20), || async {
            common::scalar(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await == 0
        })
        .await;

        // The stop flushes what is still queued (close-db).
        let replies = stop_all(&app, Duration::from_secs(10)).await;
        assert!(
            replies
                .iter()
                .all(|r| r.outcome != quiesce_protocol::wire::Outcome::Error),
            "{replies:?}"
        );
        wait_until(
            "the consumer's and the order.paid publish spans exported",
            Duration::from_secs(10),
            || async {
                let spans = collector.trace(&trace_id);
                spans.iter().any(|s| s.kind == kind::CONSUMER)
                    && spans.iter().any(|s| s.name == "publish order.paid")
            },
        )
        .await;

        let spans = collector.trace(&trace_id);
        let server = one(&spans, "server", |s| s.kind == kind::SERVER);
        assert_eq!(server.name, "order.v1.OrderService/CreateOrder");
        assert_eq!(
            server.parent_span_id.as_deref(),
            Some(caller_span),
            "child of the caller"
        );
        assert_eq!(server.service_name.as_deref(), Some("order-service-test"));
        assert_eq!(server.attribute("rpc.grpc.status_code"), Some("OK"));

        let db = one(&spans, "database", |s| s.name == "db.create_order");
        assert_eq!(db.kind, kind::CLIENT);
        assert_eq!(db.parent_span_id.as_deref(), Some(server.span_id.as_str()));
        assert_eq!(db.attribute("db.system"), Some("postgresql"));

        let redis = one(&spans, "redis claim", |s| s.name == "redis.claim_key");
        assert_eq!(
            redis.parent_span_id.as_deref(),
            Some(server.span_id.as_str())
        );
        assert_eq!(redis.attribute("db.system"), Some("redis"));

        let publish = one(&spans, "publish", |s| s.name == "publish order.created");
        assert_eq!(publish.kind, kind::PRODUCER);
        assert_eq!(
            publish.span_id, publish_span_id,
            "the message names the publish span"
        );
        assert_eq!(
            publish.parent_span_id.as_deref(),
            Some(db.span_id.as_str()),
            "the publish continues the context stored with the outbox row"
        );
        assert_eq!(publish.attribute("messaging.system"), Some("rabbitmq"));

        let consumer = one(&spans, "consumer", |s| s.kind == kind::CONSUMER);
        assert_eq!(consumer.name, "process payment.succeeded");
        assert_eq!(
            consumer.parent_span_id.as_deref(),
            Some(publish_span_id.as_str()),
            "the consumer continues the producer's context"
        );
        let apply = one(&spans, "payment's database", |s| {
            s.name == "db.apply_payment"
        });
        assert_eq!(
            apply.parent_span_id.as_deref(),
            Some(consumer.span_id.as_str())
        );
        let paid = one(&spans, "order.paid publish", |s| {
            s.name == "publish order.paid"
        });
        assert_eq!(
            paid.parent_span_id.as_deref(),
            Some(apply.span_id.as_str()),
            "the payment's event continues from the payment's transaction"
        );

        // The relay's polling makes no traces; each expiry run is its own.
        assert!(
            collector
                .spans()
                .iter()
                .all(|s| !s.name.contains("outbox_batch"))
        );
        let cron: Vec<ReceivedSpan> = collector
            .spans()
            .into_iter()
            .filter(|s| s.name == "cron.expire_orders")
            .collect();
        assert!(!cron.is_empty(), "the first expiry run is exported");
        for run in &cron {
            assert_eq!(run.parent_span_id, None, "each cron run is its own trace");
            assert_ne!(run.trace_id, trace_id);
        }
    })
    .await;
}

async fn requests_unaffected_by(collector_endpoint: String, what: &str) {
    install(TraceSettings {
        queue_size: 4,
        batch_size: 2,
        batch_delay: Duration::from_millis(10),
        export_timeout: Duration::from_millis(300),
        ..fast(collector_endpoint)
    });
    let env = Sandbox::new("test").await;
    hard_timeout(Duration::from_secs(90), async {
        let app = App::start(env.config()).await.expect("start");
        let mut c = client(app.grpc_addr()).await;
        let started = Instant::now();
        for i in 0..40 {
            let mut request = tonic::Request::new(create_request(&format!("c{i}"), ""));
            request.metadata_mut().insert(
                "traceparent",
                format!("00-{}-00f067aa0ba902b7-01", Uuid::new_v4().simple())
                    .parse()
                    .unwrap(),
            );
            tokio::time::timeout(Duration::from_secs(2), c.create_order(request))
                .await
                .unwrap_or_else(|_| panic!("CreateOrder {i} waited for the {what} collector"))
                .expect("CreateOrder succeeds");
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "40 CreateOrders took {took:?} with the collector {what}"
        );
        wait_until(
            "spans dropped and counted",
            Duration::from_secs(10),
            || async {
                common::metric_value(&app.metrics().render(), "otel_spans_dropped_total")
                    .is_some_and(|n| n > 0.0)
            },
        )
        .await;

        // The stop's flush stays inside the budget.
        let budget = Duration::from_secs(3);
        let stopping = Instant::now();
        let replies = stop_all(&app, budget).await;
        let stop_took = stopping.elapsed();
        assert!(
            stop_took < budget + Duration::from_millis(500),
            "the stop took {stop_took:?} (budget {budget:?}) with the collector {what}"
        );
        assert!(
            replies
                .iter()
                .all(|r| r.outcome != quiesce_protocol::wire::Outcome::Error),
            "{replies:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_slow_collector_drops_spans_and_the_service_does_not_wait() {
    let collector = Collector::start_slow(Duration::from_secs(30)).await;
    requests_unaffected_by(collector.endpoint(), "slow").await;
    assert!(collector.requests() > 0, "exports were attempted");
}

#[tokio::test]
async fn a_collector_that_is_down_drops_spans_and_the_service_does_not_wait() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    requests_unaffected_by(format!("http://127.0.0.1:{port}"), "down").await;
}

#[tokio::test]
async fn a_substep_cut_at_its_deadline_still_ends_its_span_as_a_timeout() {
    use quiesce_protocol::agent::{Agent, Report, StepCtx};
    use quiesce_protocol::wire::{Outcome, StepVerb, SubStep};
    hard_timeout(Duration::from_secs(30), async {
        let collector = Collector::start().await;
        install(fast(collector.endpoint()));
        // stop-cron never returns (the agent drops it at its deadline); stop-consumer finishes.
        let agent = Agent::builder("traced-cut")
            .on(SubStep::StopCron, |ctx: StepCtx| async move {
                order_service::control::traced(&ctx, std::future::pending()).await
            })
            .on(SubStep::StopConsumer, |ctx: StepCtx| async move {
                order_service::control::traced(&ctx, async { Ok(Report::new()) }).await
            })
            .build();
        let budget = Duration::from_millis(200);
        agent.step(StepVerb::Drain, budget).await.expect("drain");
        let cut = agent
            .step(StepVerb::StopCron, budget)
            .await
            .expect("stop-cron");
        assert_eq!(cut.outcome, Outcome::Timeout, "{cut:?}");
        let done = agent
            .step(StepVerb::StopConsumer, budget)
            .await
            .expect("stop-consumer");
        assert_eq!(done.outcome, Outcome::Ok, "{done:?}");
        let t = traces::installed().expect("traces on");
        assert!(
            t.flush(tokio::time::Instant::now() + Duration::from_secs(5))
                .await
        );
        wait_until("both sub-step spans", Duration::from_secs(5), || async {
            let names: Vec<String> = collector.spans().into_iter().map(|s| s.name).collect();
            names.iter().any(|n| n == "stop-cron") && names.iter().any(|n| n == "stop-consumer")
        })
        .await;
        let spans = collector.spans();
        let cron = one(&spans, "stop-cron", |s| s.name == "stop-cron");
        assert_eq!(
            cron.attribute("quiesce.step.outcome"),
            Some("timeout"),
            "{cron:?}"
        );
        let consumer = one(&spans, "stop-consumer", |s| s.name == "stop-consumer");
        assert_eq!(
            consumer.attribute("quiesce.step.outcome"),
            Some("ok"),
            "{consumer:?}"
        );
        // No supervisor sent a context: each sub-step is a trace of its own.
        assert_eq!(cron.parent_span_id, None);
        assert_ne!(cron.trace_id, consumer.trace_id);
    })
    .await;
}
