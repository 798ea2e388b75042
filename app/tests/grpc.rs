//! Every RPC's success and error paths through a real tonic client against the service started
//! in-process on real PostgreSQL, Redis and RabbitMQ; idempotency keys; RPC metrics.

mod common;

use std::time::Duration;

use common::{
    client, create_request, fetch_metrics, hard_timeout, idempotency_marker, metric_value,
    orders_with_key, sandbox, scalar,
};
use order_service::App;
use order_service::control::stop_all;
use order_service::proto::{
    CancelOrderRequest, CreateOrderRequest, GetOrderRequest, LineItem, ListOrdersRequest,
    OrderStatus,
};
use tonic::Code;

#[tokio::test]
async fn create_get_list_cancel_succeed() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let mut c = client(app.grpc_addr()).await;

        let created = c
            .create_order(create_request("cust-1", ""))
            .await
            .unwrap()
            .into_inner();
        assert!(!created.replayed);
        let order = created.order.unwrap();
        assert_eq!(order.customer_id, "cust-1");
        assert_eq!(order.total_cents, 2 * 1250 + 99);
        assert_eq!(order.status, OrderStatus::Pending as i32);
        assert_eq!(order.items.len(), 2);
        assert!(order.create_time.is_some() && order.update_time.is_some());

        let got = c
            .get_order(GetOrderRequest {
                order_id: order.order_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        assert_eq!(got, order);

        for i in 0..4 {
            c.create_order(create_request(&format!("cust-{}", i % 2), ""))
                .await
                .unwrap();
        }
        let page1 = c
            .list_orders(ListOrdersRequest {
                page_size: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page1.orders.len(), 3);
        assert!(!page1.next_page_token.is_empty());
        let page2 = c
            .list_orders(ListOrdersRequest {
                page_size: 3,
                page_token: page1.next_page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page2.orders.len(), 2);
        assert!(page2.next_page_token.is_empty());
        let mine = c
            .list_orders(ListOrdersRequest {
                customer_id: "cust-1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(mine.orders.len(), 3);
        // page_size above the maximum is lowered, not refused.
        let big = c
            .list_orders(ListOrdersRequest {
                page_size: 100_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(big.orders.len(), 5);

        let cancelled = c
            .cancel_order(CancelOrderRequest {
                order_id: order.order_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        assert_eq!(cancelled.status, OrderStatus::Cancelled as i32);
        // Cancelling again succeeds and changes nothing.
        let again = c
            .cancel_order(CancelOrderRequest {
                order_id: order.order_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        assert_eq!(again.update_time, cancelled.update_time);
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test]
async fn invalid_requests_are_refused_with_the_right_codes() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let mut c = client(app.grpc_addr()).await;
        let item = |sku: &str, quantity, price_cents| LineItem {
            sku: sku.to_owned(),
            quantity,
            price_cents,
        };
        let bad_creates = [
            (CreateOrderRequest { customer_id: "".into(), items: vec![item("a", 1, 1)], idempotency_key: "".into() }, "customer_id"),
            (CreateOrderRequest { customer_id: "c".into(), items: vec![], idempotency_key: "".into() }, "items"),
            (CreateOrderRequest { customer_id: "c".into(), items: vec![item("a", 0, 1)], idempotency_key: "".into() }, "items[0].quantity"),
            (CreateOrderRequest { customer_id: "c".into(), items: vec![item("a", 1, 1), item("", 1, 1)], idempotency_key: "".into() }, "items[1].sku"),
            (CreateOrderRequest { customer_id: "c".into(), items: vec![item("a", 1, -5)], idempotency_key: "".into() }, "items[0].price_cents"),
            (CreateOrderRequest { customer_id: "c".into(), items: vec![item("a", 1, 1)], idempotency_key: "k".repeat(200) }, "idempotency_key"),
        ];
        for (req, field) in bad_creates {
            let status = c.create_order(req).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
            assert!(status.message().starts_with(field), "{field}: {}", status.message());
        }
        let status = c
            .get_order(GetOrderRequest { order_id: "not-a-uuid".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let missing = uuid::Uuid::new_v4().to_string();
        let status = c
            .get_order(GetOrderRequest { order_id: missing.clone() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains(&missing));
        let status = c
            .cancel_order(CancelOrderRequest { order_id: missing })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let status = c
            .cancel_order(CancelOrderRequest { order_id: "x".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = c
            .list_orders(ListOrdersRequest { page_size: -1, ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = c
            .list_orders(ListOrdersRequest { page_token: "garbage".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);

        // FAILED_PRECONDITION: cancel an order that is no longer pending.
        let order = c.create_order(create_request("c", "")).await.unwrap().into_inner().order.unwrap();
        let pool = env.pool().await;
        sqlx::query("UPDATE orders SET status = 'expired' WHERE id = $1::uuid")
            .bind(&order.order_id)
            .execute(&pool)
            .await
            .unwrap();
        let status = c
            .cancel_order(CancelOrderRequest { order_id: order.order_id.clone() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("expired"), "{}", status.message());

        // Nothing invalid reached the database.
        assert_eq!(scalar(&pool, "SELECT count(*) FROM orders").await, 1);

        // The RPC layer counted every call by code.
        let metrics = fetch_metrics(app.metrics_addr().unwrap()).await;
        let handled = |method: &str, code: &str| {
            metric_value(
                &metrics,
                &format!("grpc_server_handled_total{{grpc_code=\"{code}\",grpc_method=\"{method}\",grpc_service=\"order.v1.OrderService\",grpc_type=\"unary\"}}"),
            )
            .unwrap_or(0.0)
        };
        assert_eq!(handled("CreateOrder", "InvalidArgument"), 6.0, "{metrics}");
        assert_eq!(handled("CreateOrder", "OK"), 1.0);
        assert_eq!(handled("GetOrder", "NotFound"), 1.0);
        assert_eq!(handled("CancelOrder", "FailedPrecondition"), 1.0);
        assert_eq!(handled("ListOrders", "InvalidArgument"), 2.0);
        assert!(metrics.contains("grpc_server_started_total{grpc_method=\"CreateOrder\""));
        assert!(metrics.contains("grpc_server_handling_seconds_bucket{grpc_method=\"GetOrder\""));
        assert!(metrics.contains("circuit_breaker_state{breaker=\"outbox_publisher\",state=\"closed\"} 1"));
        // The pool, read at the scrape: its limit, and the connections it holds, by state.
        assert_eq!(
            metric_value(&metrics, "db_pool_max_connections "),
            Some(f64::from(app.config().db_max_connections)),
            "{metrics}"
        );
        let pool = |state: &str| {
            metric_value(&metrics, &format!("db_pool_connections{{state=\"{state}\"}} "))
                .unwrap_or_else(|| panic!("no db_pool_connections{{state={state}}}: {metrics}"))
        };
        assert!(pool("idle") + pool("in_use") >= 1.0, "{metrics}");
        // Checked out now: the next scrape says so.
        let held = app.db().pool().acquire().await.expect("a connection");
        let again = fetch_metrics(app.metrics_addr().unwrap()).await;
        assert!(
            metric_value(&again, "db_pool_connections{state=\"in_use\"} ").unwrap_or(0.0) >= 1.0,
            "{again}"
        );
        drop(held);
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test]
async fn idempotency_key_returns_the_same_order() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let mut c = client(app.grpc_addr()).await;
        let first = c
            .create_order(create_request("c", "key-1"))
            .await
            .unwrap()
            .into_inner();
        let second = c
            .create_order(create_request("c", "key-1"))
            .await
            .unwrap()
            .into_inner();
        assert!(!first.replayed);
        assert!(second.replayed);
        assert_eq!(first.order, second.order);

        // Same key, different request.
        let status = c
            .create_order(create_request("someone-else", "key-1"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists);

        // Concurrent calls with one key: one order.
        let mut calls = Vec::new();
        for _ in 0..16 {
            let mut c = c.clone();
            calls.push(tokio::spawn(async move {
                c.create_order(create_request("c", "key-concurrent")).await
            }));
        }
        let mut ids = std::collections::HashSet::new();
        for call in calls {
            match call.await.unwrap() {
                Ok(r) => {
                    ids.insert(r.into_inner().order.unwrap().order_id);
                }
                Err(s) => assert_eq!(s.code(), Code::Aborted, "only 'retry' is acceptable: {s:?}"),
            }
        }
        assert_eq!(ids.len(), 1, "one order for one key");

        let pool = env.pool().await;
        assert_eq!(scalar(&pool, "SELECT count(*) FROM orders").await, 2);
        assert_eq!(
            scalar(
                &pool,
                "SELECT count(*) FROM outbox WHERE event_type = 'order.created'"
            )
            .await,
            2
        );
        // The key is in Redis under the environment's prefix, with a TTL.
        let redis = redis::Client::open(common::redis_url()).unwrap();
        let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
        let ttl: i64 = redis::cmd("TTL")
            .arg(format!("{}idem:key-1", env.redis_prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 3600, "ttl {ttl}");

        // Redis losing the key (flush, failover) still yields the same order: the database
        // holds the key too.
        let _: i64 = redis::cmd("DEL")
            .arg(format!("{}idem:key-1", env.redis_prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        let third = c
            .create_order(create_request("c", "key-1"))
            .await
            .unwrap()
            .into_inner();
        assert!(third.replayed);
        assert_eq!(third.order, first.order);
        assert_eq!(scalar(&pool, "SELECT count(*) FROM orders").await, 2);
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}

#[tokio::test]
async fn health_checks_report_each_dependency_and_closes_show_down() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let checks = app.health(Duration::from_secs(1)).await;
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        assert_eq!(names, ["db", "redis", "mq"]);
        assert!(
            checks
                .iter()
                .all(|c| c.up && c.required && c.latency_ms >= 0.0),
            "{checks:?}"
        );
        let results = stop_all(&app, Duration::from_secs(10)).await;
        assert_eq!(results.iter().map(|r| r.substeps.len()).sum::<usize>(), 8);
        let checks = app.health(Duration::from_secs(1)).await;
        assert!(
            checks.iter().all(|c| !c.up && c.error.is_some()),
            "{checks:?}"
        );
        let status = app.status();
        assert_eq!(status["grpc"]["state"], "drained");
        assert_eq!(status["db"]["state"], "closed");
        assert_eq!(status["redis"]["state"], "closed");
        assert_eq!(status["mq"]["state"], "closed");
        assert_eq!(status["consumer"]["state"], "stopped");
        assert_eq!(status["poller"]["state"], "stopped");
        assert_eq!(status["cron"]["state"], "stopped");
    })
    .await;
}

/// A `pending` marker without owner token was written by a version that kept it for the whole
/// TTL (24 h) and never released it: it must not block its key. With no order under the key
/// the request takes it over; the marker of a live request (with a lease) is still respected.
#[tokio::test]
async fn a_pending_marker_without_lease_from_an_older_version_does_not_block_its_key() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let app = App::start(env.config()).await.expect("start");
        let mut c = client(app.grpc_addr()).await;
        let request = create_request("c", "k-legacy");
        let fingerprint = order_service::domain::NewOrder::validate(
            &request.customer_id,
            request
                .items
                .iter()
                .map(|i| (i.sku.clone(), i64::from(i.quantity), i.price_cents)),
        )
        .unwrap()
        .fingerprint();
        let redis = redis::Client::open(common::redis_url()).unwrap();
        let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
        let set = |key: &str, value: String, px: u64| {
            redis::cmd("SET")
                .arg(format!("{}idem:{key}", env.redis_prefix))
                .arg(value)
                .arg("PX")
                .arg(px)
                .to_owned()
        };
        let () = set("k-legacy", format!("pending|{fingerprint}"), 86_400_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let created = c
            .create_order(request)
            .await
            .expect("not refused")
            .into_inner();
        assert!(!created.replayed);
        let (value, _) = idempotency_marker(&env, "k-legacy").await;
        assert!(value.is_some_and(|v| v.starts_with("done|")));

        // A live request's lease: refused (retry), and never a second order.
        let () = set("k-live", format!("pending|{fingerprint}|owner"), 30_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let status = c
            .create_order(create_request("c", "k-live"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        let pool = env.pool().await;
        assert_eq!(orders_with_key(&pool, "k-live").await, 0);
        stop_all(&app, Duration::from_secs(10)).await;
    })
    .await;
}
