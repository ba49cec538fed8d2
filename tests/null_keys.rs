//! NULL keys: a CRM whose grouping columns (source, account, dates, statuses) hold NULLs.
//! Such rows are counted under a NULL key, retracted exactly when they change or go, kept
//! exact by backfill, and served by the API with `null` keys.

mod common;

use common::{Server, TestDb};
use serde_json::Value;
use std::time::Duration;

/// The reference schema with every column a metric reads made nullable, as a CRM may
/// have it (`account_id` of leads and activities, `converted_at` and `closed_at` already are).
const NULLABLE: &str = "
    ALTER TABLE leads ALTER COLUMN source DROP NOT NULL, ALTER COLUMN status DROP NOT NULL,
        ALTER COLUMN created_at DROP NOT NULL;
    ALTER TABLE projects ALTER COLUMN account_id DROP NOT NULL,
        ALTER COLUMN status DROP NOT NULL;
    ALTER TABLE activities ALTER COLUMN occurred_at DROP NOT NULL;
";

/// Inserts with NULL in every nullable key column, updates from and to NULL in each of
/// them, and deletes (including the only row of a NULL group, which must disappear).
const HISTORY: &str = "
    INSERT INTO accounts (id, name) VALUES ('00000000-0000-0000-0000-00000000000a', 'A');
    INSERT INTO leads (id, account_id, source, status, converted_at, created_at) VALUES
        ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-00000000000a', NULL, 'new', NULL, '2026-03-01 10:00+00'),
        ('00000000-0000-0000-0000-000000000002', NULL, 'web', NULL, NULL, NULL),
        ('00000000-0000-0000-0000-000000000003', '00000000-0000-0000-0000-00000000000a', NULL, 'converted', NULL, '2026-03-02 10:00+00'),
        ('00000000-0000-0000-0000-000000000004', NULL, NULL, NULL, NULL, NULL),
        ('00000000-0000-0000-0000-000000000005', '00000000-0000-0000-0000-00000000000a', 'ads', 'contacted', NULL, '2026-03-03 10:00+00'),
        ('00000000-0000-0000-0000-000000000006', NULL, 'event', 'converted', '2026-03-04 10:00+00', '2026-03-01 09:00+00'),
        ('00000000-0000-0000-0000-000000000007', NULL, 'gone', 'new', NULL, NULL);
    INSERT INTO projects (id, account_id, name, status, amount, closed_at) VALUES
        ('00000000-0000-0000-0000-0000000000f1', NULL, 'P1', 'won', 10.00, '2026-03-05 12:00+00'),
        ('00000000-0000-0000-0000-0000000000f2', '00000000-0000-0000-0000-00000000000a', 'P2', 'won', 20.00, '2026-03-06 12:00+00'),
        ('00000000-0000-0000-0000-0000000000f3', '00000000-0000-0000-0000-00000000000a', 'P3', 'won', 30.00, NULL),
        ('00000000-0000-0000-0000-0000000000f4', NULL, 'P4', NULL, 40.00, NULL),
        ('00000000-0000-0000-0000-0000000000f5', '00000000-0000-0000-0000-00000000000a', 'P5', 'won', 50.00, '2026-04-01 12:00+00'),
        ('00000000-0000-0000-0000-0000000000f6', NULL, 'P6', 'won', 60.00, NULL);
    INSERT INTO activities (id, account_id, activity_type, occurred_at) VALUES
        ('00000000-0000-0000-0000-0000000000a1', NULL, 'call', NULL),
        ('00000000-0000-0000-0000-0000000000a2', '00000000-0000-0000-0000-00000000000a', 'email', '2026-03-05 11:00+00'),
        ('00000000-0000-0000-0000-0000000000a3', '00000000-0000-0000-0000-00000000000a', 'note', '2026-03-06 11:00+00'),
        ('00000000-0000-0000-0000-0000000000a4', NULL, 'task', NULL);

    -- from NULL to a value, and from a value to NULL, in every key column
    UPDATE leads SET source = 'web' WHERE id = '00000000-0000-0000-0000-000000000001';
    UPDATE leads SET account_id = '00000000-0000-0000-0000-00000000000a', status = 'qualified',
        created_at = '2026-03-02 08:00+00' WHERE id = '00000000-0000-0000-0000-000000000002';
    UPDATE leads SET converted_at = '2026-03-07 10:00+00' WHERE id = '00000000-0000-0000-0000-000000000003';
    UPDATE leads SET source = NULL, account_id = NULL, status = NULL, created_at = NULL
        WHERE id = '00000000-0000-0000-0000-000000000005';
    UPDATE leads SET converted_at = NULL WHERE id = '00000000-0000-0000-0000-000000000006';
    UPDATE projects SET account_id = '00000000-0000-0000-0000-00000000000a' WHERE name = 'P1';
    UPDATE projects SET account_id = NULL, closed_at = NULL WHERE name = 'P2';
    UPDATE projects SET closed_at = '2026-03-08 12:00+00' WHERE name = 'P3';
    UPDATE projects SET status = 'won' WHERE name = 'P4';
    UPDATE projects SET status = NULL WHERE name = 'P5';
    UPDATE activities SET account_id = '00000000-0000-0000-0000-00000000000a',
        occurred_at = '2026-03-09 11:00+00' WHERE id = '00000000-0000-0000-0000-0000000000a1';
    UPDATE activities SET account_id = NULL WHERE id = '00000000-0000-0000-0000-0000000000a2';
    UPDATE activities SET occurred_at = NULL WHERE id = '00000000-0000-0000-0000-0000000000a3';

    -- deletes: the only lead of group (NULL, 'gone'), an all-NULL lead, a won deal
    -- without date, an activity without account or date
    DELETE FROM leads WHERE id IN ('00000000-0000-0000-0000-000000000007', '00000000-0000-0000-0000-000000000004');
    DELETE FROM projects WHERE name = 'P6';
    DELETE FROM activities WHERE id = '00000000-0000-0000-0000-0000000000a4';
";

/// Every aggregate row as text, money at two decimals (sums may carry 0 or 0.00).
async fn aggregates(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT 'daily ' || (account_id, date, leads_created, leads_converted, activities,
                             deals_won, round(revenue_won, 2))::text
           FROM analytics.daily_account_metrics
         UNION ALL SELECT 'funnel ' || t::text FROM analytics.lead_funnel_metrics t
         UNION ALL SELECT 'revenue ' || (account_id, month, deals_won, round(revenue, 2))::text
           FROM analytics.revenue_metrics
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn null_keys_are_counted_retracted_backfilled_and_served_as_null() {
    let (db, pool) = TestDb::migrated().await;
    sqlx::raw_sql(NULLABLE).execute(&pool).await.unwrap();
    let running = common::start(&db, &db.args()).await;
    sqlx::raw_sql(HISTORY).execute(&pool).await.unwrap();
    common::drain(&pool, Duration::from_secs(30)).await;
    running.stop().await;

    let parked: Vec<String> =
        sqlx::query_scalar("SELECT error_message FROM crm_analytics.failed_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(parked.is_empty(), "no event is parked: {parked:?}");
    common::assert_exact(&pool).await;

    // The NULL groups, as the history leaves them (amounts in revenue_won / revenue).
    let rows = aggregates(&pool).await;
    for want in [
        // no account, no date: lead 5 created, lead 6 converted without converted_at,
        // P2 and P4 won without account or closed_at
        "daily (,,1,1,0,2,60.00)",
        // no account: lead 6 created, activity a2
        "daily (,2026-03-01,1,0,0,0,0.00)",
        "daily (,2026-03-05,0,0,1,0,0.00)",
        // account A: activity a3 lost its date
        "daily (00000000-0000-0000-0000-00000000000a,,0,0,1,0,0.00)",
        "funnel (,,0,0,0,0,0,1)",
        "funnel (2026-03-02,,0,0,0,1,0,1)",
        "revenue (,,2,60.00)",
    ] {
        assert!(
            rows.iter().any(|r| r == want),
            "{want} missing in {rows:#?}"
        );
    }
    assert!(
        !rows.iter().any(|r| r.contains("gone")),
        "a NULL group whose only row went is removed: {rows:#?}"
    );
    let zero_rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM analytics.daily_account_metrics
                  WHERE leads_created = 0 AND leads_converted = 0 AND activities = 0
                    AND deals_won = 0 AND revenue_won = 0)
              + (SELECT count(*) FROM analytics.lead_funnel_metrics WHERE total = 0)
              + (SELECT count(*) FROM analytics.revenue_metrics WHERE deals_won = 0 AND revenue = 0)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        zero_rows, 0,
        "rows that net to zero are deleted, NULL keys too"
    );

    // Backfill recomputes the same numbers (it used to fail on the NOT NULL keys).
    crm_analytics::backfill::run(&pool, &pool, "public", false)
        .await
        .unwrap();
    assert_eq!(aggregates(&pool).await, rows);
    common::assert_exact(&pool).await;

    // The API shows NULL keys as null, and filters on them with <column>__isnull.
    let server = Server::start(&db).await;
    let daily = common::get_all(&server.base, "/api/daily-metrics/").await;
    assert!(daily
        .iter()
        .any(|r| r["account_id"] == Value::Null && r["date"] == Value::Null));
    let nulls = common::get_all(&server.base, "/api/daily-metrics/?account_id__isnull=true").await;
    assert!(!nulls.is_empty() && nulls.iter().all(|r| r["account_id"] == Value::Null));
    let set = common::get_all(&server.base, "/api/daily-metrics/?account_id__isnull=false").await;
    assert_eq!(set.len() + nulls.len(), daily.len());
    assert!(set.iter().all(|r| r["account_id"].is_string()));

    let funnel = common::get_all(&server.base, "/api/funnel-metrics/?source__isnull=true").await;
    assert_eq!(funnel.len(), 2, "{funnel:#?}");
    assert!(funnel
        .iter()
        .all(|r| r["source"] == Value::Null && r["total"] == 1));
    assert!(funnel.iter().any(|r| r["cohort_date"] == Value::Null));

    let revenue = common::get_all(
        &server.base,
        "/api/revenue-metrics/?account_id__isnull=true",
    )
    .await;
    assert_eq!(
        revenue,
        vec![
            serde_json::json!({"account_id": null, "month": null, "deals_won": 2, "revenue": "60.00"})
        ]
    );
    let (status, body) =
        common::get_json(&server.base, "/api/funnel-metrics/?source__isnull=yes").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("true, false"));
    server.stop().await;
    db.finish(pool).await;
}

/// Won deals without amount: only NULL amounts in one group (a NULL sum in SQL), NULL and
/// set amounts mixed in another, an amount set and cleared, and a NULL-amount deal deleted.
const NULL_AMOUNTS: &str = "
    ALTER TABLE projects ALTER COLUMN amount DROP NOT NULL, ALTER COLUMN amount DROP DEFAULT;
    INSERT INTO accounts (id, name) VALUES ('00000000-0000-0000-0000-00000000000b', 'B');
    INSERT INTO projects (account_id, name, status, amount, closed_at) VALUES
        ('00000000-0000-0000-0000-00000000000b', 'only-null', 'won', NULL, '2026-05-02 12:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'mixed-1', 'won', 15.00, '2026-06-03 12:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'mixed-2', 'won', NULL, '2026-06-03 13:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'cleared', 'won', 7.00, '2026-07-04 12:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'set', 'won', NULL, '2026-08-05 12:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'deleted', 'won', NULL, '2026-05-02 13:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'later', 'open', NULL, '2026-05-02 14:00+00');
    UPDATE projects SET amount = NULL WHERE name = 'cleared';
    UPDATE projects SET amount = 25.00 WHERE name = 'set';
    UPDATE projects SET status = 'won' WHERE name = 'later';
    DELETE FROM projects WHERE name = 'deleted';
";

#[tokio::test]
async fn a_won_deal_without_amount_counts_with_revenue_zero() {
    let (db, pool) = TestDb::migrated().await;
    let running = common::start(&db, &db.args()).await;
    sqlx::raw_sql(NULL_AMOUNTS).execute(&pool).await.unwrap();
    common::drain(&pool, Duration::from_secs(30)).await;
    running.stop().await;

    let parked: Vec<String> =
        sqlx::query_scalar("SELECT error_message FROM crm_analytics.failed_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(parked.is_empty(), "no event is parked: {parked:?}");
    let rows = aggregates(&pool).await;
    let b = "00000000-0000-0000-0000-00000000000b";
    for want in [
        format!("daily ({b},2026-05-02,0,0,0,2,0.00)"),
        format!("daily ({b},2026-06-03,0,0,0,2,15.00)"),
        format!("daily ({b},2026-07-04,0,0,0,1,0.00)"),
        format!("daily ({b},2026-08-05,0,0,0,1,25.00)"),
        format!("revenue ({b},2026-05-01,2,0.00)"),
        format!("revenue ({b},2026-06-01,2,15.00)"),
        format!("revenue ({b},2026-07-01,1,0.00)"),
        format!("revenue ({b},2026-08-01,1,25.00)"),
    ] {
        assert!(rows.contains(&want), "{want} missing in {rows:#?}");
    }
    common::assert_exact(&pool).await;

    // Backfill recomputes the same (a group of NULL amounts only must not sum to NULL).
    crm_analytics::backfill::run(&pool, &pool, "public", false)
        .await
        .unwrap();
    assert_eq!(aggregates(&pool).await, rows);
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}
