//! Maintenance: queue tables are vacuumed by the pipeline itself, and what is kept only
//! for a while is pruned after its retention.

mod common;

use common::TestDb;
use crm_analytics::maintenance::{self, MaintenanceConfig};
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_pipeline_vacuums_its_queue_tables() {
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.vacuum_interval = Duration::from_millis(200);
    let running = common::start(&db, &args).await;
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 3000) i")
        .execute(&pool)
        .await
        .unwrap();
    common::drain(&pool, Duration::from_secs(30)).await;
    let started = Instant::now();
    loop {
        let vacuumed: Vec<(String, i64)> = sqlx::query_as(
            "SELECT relname::text, vacuum_count FROM pg_stat_user_tables
             WHERE schemaname = 'crm_analytics' AND relname IN ('event_outbox', 'queue') AND vacuum_count > 0",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if vacuumed.len() == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not vacuumed: {vacuumed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    db.finish(pool).await;
}

#[tokio::test]
async fn retention_prunes_the_ledger_and_the_kept_outbox() {
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.outbox_retention = Duration::from_secs(3600);
    let running = common::start(&db, &args).await;
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 500) i")
        .execute(&pool)
        .await
        .unwrap();
    common::drain(&pool, Duration::from_secs(30)).await;
    running.stop().await;
    let counts = "SELECT (SELECT count(*) FROM crm_analytics.applied_events),
                         (SELECT count(*) FROM crm_analytics.event_outbox_processed)";
    let kept: (i64, i64) = sqlx::query_as(counts).fetch_one(&pool).await.unwrap();
    assert_eq!(kept, (500, 500));

    // Within retention nothing goes; past it everything does.
    let long = MaintenanceConfig {
        outbox_retention: Duration::from_secs(3600),
        dedup_retention: Duration::from_secs(3600),
    };
    maintenance::run_once(&pool, &pool, &long).await.unwrap();
    let kept: (i64, i64) = sqlx::query_as(counts).fetch_one(&pool).await.unwrap();
    assert_eq!(kept, (500, 500));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let short = MaintenanceConfig {
        outbox_retention: Duration::from_millis(10),
        dedup_retention: Duration::from_millis(10),
    };
    maintenance::run_once(&pool, &pool, &short).await.unwrap();
    let kept: (i64, i64) = sqlx::query_as(counts).fetch_one(&pool).await.unwrap();
    assert_eq!(kept, (0, 0));
    db.finish(pool).await;
}
