//! After a random CRM workload drains, the API's numbers equal a full SQL recomputation
//! over the CRM tables.

mod common;

use crm_analytics::aggregates::recompute::{DailyRow, FunnelRow};

use chrono::NaiveDate;
use common::{Server, TestDb};
use crm_analytics::aggregates::delta::{DailyDelta, Deltas, FunnelDelta, RevenueDelta};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

/// The aggregate tables as they stand, read directly.
async fn aggregate_tables(pool: &sqlx::PgPool) -> Deltas {
    let mut tables = Deltas::default();
    let daily: Vec<DailyRow> = sqlx::query_as(
        "SELECT account_id, date, leads_created, leads_converted, activities, deals_won,
                    revenue_won FROM analytics.daily_account_metrics",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (a, d, lc, lv, ac, dw, rw) in daily {
        let value = DailyDelta {
            leads_created: lc,
            leads_converted: lv,
            activities: ac,
            deals_won: dw,
            revenue_won: rw,
        };
        tables.daily.insert((a, d), value);
    }
    let funnel: Vec<FunnelRow> = sqlx::query_as(
        "SELECT cohort_date, source, new, contacted, qualified, converted, lost, total
         FROM analytics.lead_funnel_metrics",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (d, s, n, c, q, v, l, t) in funnel {
        let value = FunnelDelta {
            new: n,
            contacted: c,
            qualified: q,
            converted: v,
            lost: l,
            total: t,
        };
        tables.funnel.insert((d, s), value);
    }
    let revenue: Vec<(Option<Uuid>, Option<NaiveDate>, i64, Decimal)> = sqlx::query_as(
        "SELECT account_id, month, deals_won, revenue FROM analytics.revenue_metrics",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (a, m, deals_won, revenue) in revenue {
        let value = RevenueDelta { deals_won, revenue };
        tables.revenue.insert((a, m), value);
    }
    tables
}

#[tokio::test]
async fn api_numbers_equal_a_recomputation_after_a_random_workload() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 3, 300, 17).await;

    // The tables equal a full recomputation (streamed, row for row), so an API that
    // serves exactly the tables serves the recomputation.
    common::assert_exact(&pool).await;
    let expected = aggregate_tables(&pool).await;
    let server = Server::start(&db).await;
    let money =
        |v: &serde_json::Value| Decimal::from_str(v.as_str().expect("money is a string")).unwrap();
    // A key is a string, or null where the CRM column was NULL (the workload leaves some
    // leads and activities without an account).
    let key = |v: &serde_json::Value| v.as_str().map(str::to_string);

    let mut daily = BTreeMap::new();
    for r in common::get_all(&server.base, "/api/daily-metrics/?limit=250").await {
        let key = (key(&r["account_id"]), key(&r["date"]));
        let value = (
            r["leads_created"].as_i64().unwrap(),
            r["leads_converted"].as_i64().unwrap(),
            r["activities"].as_i64().unwrap(),
            r["deals_won"].as_i64().unwrap(),
            money(&r["revenue_won"]),
        );
        assert!(
            daily.insert(key, value).is_none(),
            "no row twice across pages"
        );
    }
    let want: BTreeMap<_, _> = expected
        .daily
        .iter()
        .map(|((a, d), v)| {
            (
                (a.map(|a| a.to_string()), d.map(|d| d.to_string())),
                (
                    v.leads_created,
                    v.leads_converted,
                    v.activities,
                    v.deals_won,
                    v.revenue_won,
                ),
            )
        })
        .collect();
    assert!(want.len() > 20);
    assert_eq!(daily, want);

    let mut funnel = BTreeMap::new();
    for r in common::get_all(&server.base, "/api/funnel-metrics/?limit=77").await {
        let key = (key(&r["cohort_date"]), key(&r["source"]));
        let total = r["total"].as_i64().unwrap();
        let converted = r["converted"].as_i64().unwrap();
        let rate = r["conversion_rate"].as_f64().unwrap();
        assert!(
            (rate - converted as f64 / total as f64).abs() < 1e-12 && (0.0..=1.0).contains(&rate)
        );
        funnel.insert(
            key,
            [
                r["new"].as_i64().unwrap(),
                r["contacted"].as_i64().unwrap(),
                r["qualified"].as_i64().unwrap(),
                converted,
                r["lost"].as_i64().unwrap(),
                total,
            ],
        );
    }
    let want: BTreeMap<_, _> = expected
        .funnel
        .iter()
        .map(|((d, s), v)| {
            (
                (d.map(|d| d.to_string()), s.clone()),
                [
                    v.new,
                    v.contacted,
                    v.qualified,
                    v.converted,
                    v.lost,
                    v.total,
                ],
            )
        })
        .collect();
    assert_eq!(funnel, want);

    let mut revenue = BTreeMap::new();
    for r in common::get_all(&server.base, "/api/revenue-metrics/?limit=50").await {
        let key = (key(&r["account_id"]), key(&r["month"]));
        revenue.insert(
            key,
            (r["deals_won"].as_i64().unwrap(), money(&r["revenue"])),
        );
    }
    let want: BTreeMap<_, _> = expected
        .revenue
        .iter()
        .map(|((a, m), v)| {
            (
                (
                    a.map(|a| a.to_string()),
                    m.map(|m| m.format("%Y-%m").to_string()),
                ),
                (v.deals_won, v.revenue),
            )
        })
        .collect();
    assert!(want.len() > 3);
    assert_eq!(revenue, want);

    let processed: i64 = common::get_all(&server.base, "/api/event-counts/?limit=1000")
        .await
        .iter()
        .map(|r| r["processed"].as_i64().unwrap())
        .sum();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.applied_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(processed, applied);
    server.stop().await;
    db.finish(pool).await;
}

#[tokio::test]
async fn metrics_expose_the_monitoring_points() {
    let (db, pool) = TestDb::migrated().await;
    let server = Server::start(&db).await;
    let running = common::start(&db, &db.args()).await;
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'm' || i FROM generate_series(1, 40) i")
        .execute(&pool)
        .await
        .unwrap();
    common::drain(&pool, Duration::from_secs(30)).await;
    running.stop().await;
    sqlx::query("INSERT INTO accounts (name) VALUES ('waiting')")
        .execute(&pool)
        .await
        .unwrap();
    let text = common::client()
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        value("crm_analytics_events_processed_total{table=\"accounts\",operation=\"insert\"}")
            >= 40.0
    );
    assert_eq!(value("crm_analytics_outbox_lag "), 1.0);
    assert_eq!(value("crm_analytics_queue_depth "), 0.0);
    assert_eq!(value("crm_analytics_failed_events "), 0.0);
    assert!(value("crm_analytics_event_latency_seconds_count") >= 40.0);
    assert!(value("crm_analytics_batch_size_count") >= 1.0);
    assert!(value("crm_analytics_events_relayed_total") >= 40.0);
    assert!(value("crm_analytics_archive_objects_total") >= 1.0);
    assert!(text.contains("crm_analytics_batch_duration_seconds_bucket"));
    assert!(text.contains("crm_analytics_retries_total"));
    server.stop().await;
    db.finish(pool).await;
}
