//! Repository and migration tests against a real PostgreSQL database per test.

mod common;

use std::time::Duration;

use common::{Sandbox, hard_timeout, insert_pending_orders, sandbox, scalar};
use order_service::db::orders::{self, CancelResult, CreateError};
use order_service::db::payments::{self, PaymentEffect, PaymentKind};
use order_service::db::{Db, outbox};
use order_service::domain::{NewOrder, OrderStatus};

fn new_order(customer: &str) -> NewOrder {
    NewOrder::validate(customer, [("a".to_owned(), 2, 150), ("b".to_owned(), 1, 5)]).unwrap()
}

async fn migrated(env: &Sandbox) -> Db {
    Db::connect(&env.config())
        .await
        .expect("connect and migrate")
}

#[tokio::test]
async fn migrations_create_the_schema_and_rerun_cleanly() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let db = migrated(&env).await;
        let pool = db.pool();
        let tables = scalar(
            pool,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' \
             AND table_name IN ('orders', 'order_items', 'outbox', 'processed_messages')",
        )
        .await;
        assert_eq!(tables, 4);
        let indexes = scalar(
            pool,
            "SELECT count(*) FROM pg_indexes WHERE indexname IN ('outbox_unsent_idx', \
             'orders_created_idx', 'orders_customer_created_idx', 'orders_pending_created_idx')",
        )
        .await;
        assert_eq!(indexes, 4, "every CONCURRENTLY index exists");
        let invalid = scalar(pool, "SELECT count(*) FROM pg_index WHERE NOT indisvalid").await;
        assert_eq!(
            invalid, 0,
            "no index left invalid by a failed concurrent build"
        );
        let applied = scalar(pool, "SELECT count(*) FROM _sqlx_migrations WHERE success").await;
        assert_eq!(applied, order_service::db::MIGRATOR.iter().count() as i64);
        // A second start applies nothing and does not fail.
        let again = migrated(&env).await;
        assert_eq!(
            scalar(again.pool(), "SELECT count(*) FROM _sqlx_migrations").await,
            applied
        );
        db.close(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
            .await;
        again
            .close(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
            .await;
    })
    .await;
}

#[tokio::test]
async fn missing_database_is_created_at_start() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let mut config = env.config();
        // A second, not yet existing database on the same server.
        let missing = format!("{}_new", env.database);
        config.database_url = order_service::config::SecretUrl::new(
            env.database_url().replace(&env.database, &missing),
        );
        let db = Db::connect(&config).await.expect("creates the database");
        db.ping().await.unwrap();
        db.close(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
            .await;
        let admin = sqlx::PgPool::connect(&common::pg_admin_url())
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE \"{missing}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        .unwrap();
    })
    .await;
}

#[tokio::test]
async fn create_writes_order_items_and_event_in_one_transaction() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let db = migrated(&env).await;
        let pool = db.pool();
        let order = orders::create(&mut pool.acquire().await.unwrap(), &new_order("c1"), None)
            .await
            .unwrap();
        assert_eq!(order.status, OrderStatus::Pending);
        assert_eq!(order.total_cents, 305);
        let read = orders::get(&mut pool.acquire().await.unwrap(), order.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read, order, "a re-read equals what create returned");

        let mut tx = pool.begin().await.unwrap();
        let events = outbox::claim_batch(&mut tx, 10).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type, "order.created");
        assert_eq!(events[0].aggregate_id, order.id);
        let payload: serde_json::Value = serde_json::from_str(&events[0].payload).unwrap();
        assert_eq!(payload["order_id"], order.id.to_string());
        assert_eq!(payload["event_id"], events[0].event_id.to_string());
        tx.rollback().await.unwrap();

        // A failure inside the transaction leaves neither the order nor its event: the
        // second create reuses the key, violates the unique index and rolls back.
        orders::create(
            &mut pool.acquire().await.unwrap(),
            &new_order("c1"),
            Some(("k1", "h1")),
        )
        .await
        .unwrap();
        let before = scalar(pool, "SELECT count(*) FROM outbox").await;
        let dup = orders::create(
            &mut pool.acquire().await.unwrap(),
            &new_order("c2"),
            Some(("k1", "h2")),
        )
        .await;
        assert!(matches!(dup, Err(CreateError::DuplicateKey)));
        assert_eq!(scalar(pool, "SELECT count(*) FROM outbox").await, before);
        assert_eq!(scalar(pool, "SELECT count(*) FROM orders").await, 2);
        let keyed = orders::find_by_key(&mut pool.acquire().await.unwrap(), "k1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(keyed.request_hash.as_deref(), Some("h1"));
        assert_eq!(keyed.order.customer_id, "c1");
    })
    .await;
}

#[tokio::test]
async fn claim_skips_rows_locked_by_another_poller_and_mark_sent_hides_them() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let db = migrated(&env).await;
        let pool = db.pool();
        for i in 0..5 {
            orders::create(
                &mut pool.acquire().await.unwrap(),
                &new_order(&format!("c{i}")),
                None,
            )
            .await
            .unwrap();
        }
        let mut first = pool.begin().await.unwrap();
        let a = outbox::claim_batch(&mut first, 3).await.unwrap();
        let mut second = pool.begin().await.unwrap();
        let b = outbox::claim_batch(&mut second, 10).await.unwrap();
        assert_eq!((a.len(), b.len()), (3, 2), "SKIP LOCKED: disjoint claims");
        assert!(a.iter().all(|x| b.iter().all(|y| x.id != y.id)));
        assert!(a.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
        let ids: Vec<i64> = a.iter().map(|e| e.id).collect();
        assert_eq!(outbox::mark_sent(&mut first, &ids).await.unwrap(), 3);
        first.commit().await.unwrap();
        second.rollback().await.unwrap();
        assert_eq!(outbox::count_unsent(pool).await.unwrap(), 2);
    })
    .await;
}

#[tokio::test]
async fn list_pages_newest_first_and_filters_by_customer() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let db = migrated(&env).await;
        let pool = db.pool();
        let mut created = Vec::new();
        for i in 0..7 {
            let customer = if i % 2 == 0 { "even" } else { "odd" };
            created.push(
                orders::create(
                    &mut pool.acquire().await.unwrap(),
                    &new_order(customer),
                    None,
                )
                .await
                .unwrap(),
            );
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = orders::list(&mut pool.acquire().await.unwrap(), 3, cursor, None)
                .await
                .unwrap();
            assert!(page.len() <= 3);
            seen.extend(page.into_iter().map(|o| o.id));
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let mut expected = created.clone();
        expected.sort_by_key(|o| std::cmp::Reverse((o.created_at, o.id)));
        assert_eq!(seen, expected.iter().map(|o| o.id).collect::<Vec<_>>());
        let (evens, next) =
            orders::list(&mut pool.acquire().await.unwrap(), 10, None, Some("even"))
                .await
                .unwrap();
        assert_eq!(evens.len(), 4);
        assert!(next.is_none());
        assert!(evens.iter().all(|o| o.customer_id == "even"));
        assert_eq!(evens[0].items.len(), 2, "lines come back with the order");
    })
    .await;
}

#[tokio::test]
async fn cancel_moves_only_pending_orders_and_writes_an_event() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let db = migrated(&env).await;
        let pool = db.pool();
        let order = orders::create(&mut pool.acquire().await.unwrap(), &new_order("c"), None)
            .await
            .unwrap();
        let CancelResult::Cancelled(cancelled) =
            orders::cancel(&mut pool.acquire().await.unwrap(), order.id)
                .await
                .unwrap()
        else {
            panic!("expected cancelled");
        };
        assert_eq!(cancelled.status, OrderStatus::Cancelled);
        assert!(cancelled.updated_at >= order.updated_at);
        // Again: unchanged, no second event.
        assert!(matches!(
            orders::cancel(&mut pool.acquire().await.unwrap(), order.id)
                .await
                .unwrap(),
            CancelResult::Cancelled(_)
        ));
        assert_eq!(
            scalar(
                pool,
                "SELECT count(*) FROM outbox WHERE event_type = 'order.cancelled'"
            )
            .await,
            1
        );
        assert!(matches!(
            orders::cancel(&mut pool.acquire().await.unwrap(), uuid::Uuid::new_v4())
                .await
                .unwrap(),
            CancelResult::NotFound
        ));
        let paid = orders::create(&mut pool.acquire().await.unwrap(), &new_order("c"), None)
            .await
            .unwrap();
        payments::apply(pool, "m-1", PaymentKind::Succeeded, paid.id)
            .await
            .unwrap();
        assert!(matches!(
            orders::cancel(&mut pool.acquire().await.unwrap(), paid.id)
                .await
                .unwrap(),
            CancelResult::NotPending(OrderStatus::Paid)
        ));
    })
    .await;
}

#[tokio::test]
async fn payment_message_applies_once() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let db = migrated(&env).await;
        let pool = db.pool();
        let order = orders::create(&mut pool.acquire().await.unwrap(), &new_order("c"), None)
            .await
            .unwrap();
        let first = payments::apply(pool, "msg-1", PaymentKind::Succeeded, order.id)
            .await
            .unwrap();
        assert_eq!(first, PaymentEffect::Applied(OrderStatus::Paid));
        let again = payments::apply(pool, "msg-1", PaymentKind::Succeeded, order.id)
            .await
            .unwrap();
        assert_eq!(again, PaymentEffect::Duplicate);
        // A different message for an order that is no longer pending changes nothing.
        let late = payments::apply(pool, "msg-2", PaymentKind::Failed, order.id)
            .await
            .unwrap();
        assert_eq!(late, PaymentEffect::Ignored(OrderStatus::Paid));
        let unknown = payments::apply(pool, "msg-3", PaymentKind::Succeeded, uuid::Uuid::new_v4())
            .await
            .unwrap();
        assert_eq!(unknown, PaymentEffect::UnknownOrder);
        assert_eq!(
            orders::get(&mut pool.acquire().await.unwrap(), order.id)
                .await
                .unwrap()
                .unwrap()
                .status,
            OrderStatus::Paid
        );
        assert_eq!(
            scalar(
                pool,
                "SELECT count(*) FROM outbox WHERE event_type = 'order.paid'"
            )
            .await,
            1
        );
        assert_eq!(
            scalar(pool, "SELECT count(*) FROM processed_messages").await,
            2
        );

        // Concurrent deliveries of one message: exactly one applies.
        let ids = insert_pending_orders(pool, 20).await;
        let mut tasks = Vec::new();
        for id in &ids {
            for _ in 0..3 {
                let pool = pool.clone();
                let id = *id;
                tasks.push(tokio::spawn(async move {
                    payments::apply(&pool, &format!("dup-{id}"), PaymentKind::Succeeded, id)
                        .await
                        .unwrap()
                }));
            }
        }
        let mut applied = 0;
        let mut duplicates = 0;
        for t in tasks {
            match t.await.unwrap() {
                PaymentEffect::Applied(_) => applied += 1,
                PaymentEffect::Duplicate => duplicates += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((applied, duplicates), (20, 40));
    })
    .await;
}

#[tokio::test]
async fn expiry_moves_old_pending_orders_with_events_and_counts_stuck() {
    let env = sandbox().await;
    hard_timeout(Duration::from_secs(60), async {
        let db = migrated(&env).await;
        let pool = db.pool();
        let ids = insert_pending_orders(pool, 3).await;
        sqlx::query("UPDATE orders SET created_at = now() - interval '2 hours' WHERE id = ANY($1)")
            .bind(&ids[..2])
            .execute(pool)
            .await
            .unwrap();
        assert_eq!(orders::count_stuck(pool, 3600.0).await.unwrap(), 2);
        assert_eq!(orders::expire_stale(pool, 3600.0, 1000).await.unwrap(), 2);
        assert_eq!(orders::expire_stale(pool, 3600.0, 1000).await.unwrap(), 0);
        assert_eq!(orders::count_stuck(pool, 3600.0).await.unwrap(), 0);
        assert_eq!(
            scalar(pool, "SELECT count(*) FROM orders WHERE status = 'expired'").await,
            2
        );
        let payloads: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT payload FROM outbox WHERE event_type = 'order.expired' ORDER BY id",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(payloads.len(), 2);
        for p in payloads {
            assert_eq!(p["status"], "expired");
            assert!(p["event_id"].as_str().is_some_and(|s| s.len() == 36));
        }
    })
    .await;
}
