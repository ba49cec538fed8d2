//! Transient failures: a lock or statement timeout is not bad data. The batch is retried
//! whole with backoff, nothing is parked, and the aggregates end exact.

mod common;

use common::TestDb;
use sqlx::{Connection, PgConnection};
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_lock_held_longer_than_all_retries_parks_nothing() {
    let (db, pool) = TestDb::migrated().await;
    // Every new connection of this database gives up on a lock after 50 ms.
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {} SET lock_timeout = '50ms'",
        db.name
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mut args = db.args();
    args.max_attempts = 2;
    args.retry_backoff = Duration::from_millis(50);
    let running = common::start(&db, &args).await;

    // An operator's ALTER TABLE (say) holds an aggregate table for longer than
    // max_attempts × backoff many times over.
    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "BEGIN; LOCK TABLE analytics.daily_account_metrics, analytics.revenue_metrics IN ACCESS EXCLUSIVE MODE",
    )
    .execute(&mut holder)
    .await
    .unwrap();
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'Account ' || i FROM generate_series(1, 4) i;
         INSERT INTO leads (account_id, source) SELECT id, 'web' FROM accounts;
         INSERT INTO activities (account_id, activity_type) SELECT id, 'call' FROM accounts;
         INSERT INTO projects (account_id, name, status, amount, closed_at)
             SELECT id, 'Deal', 'won', 100, now() FROM accounts;",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The workers meet the lock again and again meanwhile. What the queue would deliver
    // next (the rows no worker holds right now) is looked at through the queue itself and
    // given back unsettled: every event is still on its first attempt.
    let queue = running.pipeline.queue.clone();
    let held = Instant::now();
    let mut seen = 0;
    while held.elapsed() < Duration::from_secs(6) {
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.failed_events")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(parked, 0, "a lock parked events");
        let batch = queue.receive(100, Duration::ZERO).await.unwrap();
        let attempts: Vec<u32> = batch.deliveries().iter().map(|d| d.attempt).collect();
        drop(batch);
        assert!(
            attempts.iter().all(|&a| a == 1),
            "a lock counted as failed attempts of the events: {attempts:?}"
        );
        seen += attempts.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen > 0, "the queue never had an event to look at");
    let waiting = queue.depth().await.unwrap().events;
    assert!(waiting > 0, "the lock kept events from being applied");
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();

    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    let (parked, failed, daily): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_analytics.failed_events),
                (SELECT coalesce(sum(failed), 0)::int8 FROM analytics.event_counts),
                (SELECT count(*) FROM analytics.daily_account_metrics)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((parked, failed), (0, 0));
    assert_eq!(daily, 4, "one row per account for today");
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}
