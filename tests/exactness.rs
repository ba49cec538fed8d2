//! Exactness: after the pipeline drains, every aggregate equals a full SQL recomputation
//! over the CRM tables, for a known history, under backfills and two pipelines at once.
//! Concurrent random workloads and duplicate deliveries on every queue backend are in
//! exactness_queues.rs.

mod common;

use crm_analytics::aggregates::recompute::{DailyRow, FunnelRow};

use chrono::NaiveDate;
use common::TestDb;
use rust_decimal::Decimal;
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test]
async fn a_known_history_gives_known_numbers() {
    let (db, pool) = TestDb::migrated().await;
    let running = common::start(&db, &db.args()).await;
    let sql = "
        INSERT INTO accounts (id, name) VALUES
            ('00000000-0000-0000-0000-00000000000a', 'A'),
            ('00000000-0000-0000-0000-00000000000b', 'B');
        INSERT INTO leads (id, account_id, source, status, created_at) VALUES
            ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-00000000000a', 'web', 'new', '2026-03-01 10:00+00'),
            ('00000000-0000-0000-0000-000000000002', '00000000-0000-0000-0000-00000000000a', 'web', 'new', '2026-03-01 23:30-05'),
            ('00000000-0000-0000-0000-000000000003', NULL, 'event', 'new', '2026-03-01 12:00+00');
        -- lead 1 converts; lead 2 moves to account B; lead 3 is lost
        UPDATE leads SET status = 'converted', converted_at = '2026-03-05 09:00+00'
            WHERE id = '00000000-0000-0000-0000-000000000001';
        UPDATE leads SET account_id = '00000000-0000-0000-0000-00000000000b'
            WHERE id = '00000000-0000-0000-0000-000000000002';
        UPDATE leads SET status = 'lost' WHERE id = '00000000-0000-0000-0000-000000000003';
        INSERT INTO activities (account_id, activity_type, occurred_at) VALUES
            ('00000000-0000-0000-0000-00000000000a', 'call', '2026-03-05 10:00+00'),
            ('00000000-0000-0000-0000-00000000000a', 'email', '2026-03-05 11:00+00'),
            (NULL, 'note', '2026-03-05 11:00+00');
        INSERT INTO projects (id, account_id, name, status, amount, closed_at) VALUES
            ('00000000-0000-0000-0000-0000000000f1', '00000000-0000-0000-0000-00000000000a', 'Big', 'won', 1000.10, '2026-03-05 12:00+00'),
            ('00000000-0000-0000-0000-0000000000f2', '00000000-0000-0000-0000-00000000000a', 'Small', 'won', 0.20, '2026-04-02 12:00+00'),
            ('00000000-0000-0000-0000-0000000000f3', '00000000-0000-0000-0000-00000000000b', 'Gone', 'won', 77.00, '2026-03-06 12:00+00');
        -- edit a won amount; reopen the April deal; B is deleted with everything it had
        UPDATE projects SET amount = 1234.50 WHERE name = 'Big';
        UPDATE projects SET status = 'open', closed_at = NULL WHERE name = 'Small';
        DELETE FROM accounts WHERE id = '00000000-0000-0000-0000-00000000000b';
    ";
    sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    common::drain(&pool, Duration::from_secs(30)).await;
    running.stop().await;

    let a = Uuid::from_str("00000000-0000-0000-0000-00000000000a").unwrap();
    let daily: Vec<DailyRow> =
        sqlx::query_as("SELECT * FROM analytics.daily_account_metrics ORDER BY account_id, date")
            .fetch_all(&pool)
            .await
            .unwrap();
    let d = |s: &str| Some(NaiveDate::from_str(s).unwrap());
    let a = Some(a);
    assert_eq!(
        daily,
        vec![
            (a, d("2026-03-01"), 1, 0, 0, 0, Decimal::ZERO),
            (
                a,
                d("2026-03-05"),
                0,
                1,
                2,
                1,
                Decimal::from_str("1234.50").unwrap()
            ),
            (None, d("2026-03-01"), 1, 0, 0, 0, Decimal::ZERO),
            (None, d("2026-03-05"), 0, 0, 1, 0, Decimal::ZERO),
        ],
        "lead 3 and the note have no account: they count under a NULL account"
    );
    let funnel: Vec<FunnelRow> =
        sqlx::query_as("SELECT * FROM analytics.lead_funnel_metrics ORDER BY cohort_date, source")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        funnel,
        vec![
            (d("2026-03-01"), Some("event".into()), 0, 0, 0, 0, 1, 1),
            (d("2026-03-01"), Some("web".into()), 0, 0, 0, 1, 0, 1),
        ],
        "lead 2 was created on 2026-03-02 UTC and deleted with account B"
    );
    let revenue: Vec<(Option<Uuid>, Option<NaiveDate>, i64, Decimal)> =
        sqlx::query_as("SELECT * FROM analytics.revenue_metrics ORDER BY account_id, month")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        revenue,
        vec![(a, d("2026-03-01"), 1, Decimal::from_str("1234.50").unwrap())]
    );
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn backfill_with_writers_running_is_exact() {
    let db = TestDb::create().await;
    let pool = db.pool(12).await;
    // A CRM that had data before capture was attached.
    crm_analytics::capture::create_reference_schema(&pool, "public")
        .await
        .unwrap();
    common::run_workload(&pool, 2, 200, 3).await;
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM leads")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(before > 50);
    crm_analytics::migrate::all(&pool, &pool, "public", false)
        .await
        .unwrap();

    // Writers keep going while the pipeline runs and backfill runs twice in the middle.
    let running = common::start(&db, &db.args()).await;
    let writers = {
        let pool = pool.clone();
        tokio::spawn(async move { common::run_workload(&pool, 3, 400, 5).await })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        crm_analytics::backfill::run(&pool, &pool, "public", false)
            .await
            .unwrap();
    }
    writers.await.unwrap();
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;

    // Without a pipeline process: more writes pile up, backfill during writes, then drain.
    let writers = {
        let pool = pool.clone();
        tokio::spawn(async move { common::run_workload(&pool, 2, 300, 9).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    crm_analytics::backfill::run(&pool, &pool, "public", false)
        .await
        .unwrap();
    writers.await.unwrap();
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(pending > 0, "writes after the backfill wait in the outbox");
    let running = common::start(&db, &db.args()).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exact(&pool).await;
    let snapshots: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(processed), 0)::int8 FROM analytics.event_counts WHERE operation = 'snapshot'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        snapshots > before,
        "backfill counts the rows it read as snapshot events"
    );
    db.finish(pool).await;
}

#[tokio::test]
async fn two_pipelines_at_once_share_the_work_without_doing_it_twice() {
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.outbox_retention = Duration::from_secs(3600);
    args.batch_size = 50;
    let first = common::start(&db, &args).await;
    let second = common::start(&db, &args).await;
    common::run_workload(&pool, 3, 300, 13).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    first.stop().await;
    second.stop().await;
    let (relayed, distinct, applied): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT event_id),
                (SELECT count(*) FROM crm_analytics.applied_events)
         FROM crm_analytics.event_outbox_processed",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(relayed > 500);
    assert_eq!(relayed, distinct, "no event was relayed twice");
    assert_eq!(relayed, applied);
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}
