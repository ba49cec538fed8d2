//! Freshness: a committed change is visible in the aggregates well under a second later
//! on an idle machine (LISTEN/NOTIFY wake-ups, not the poll, carry it).

mod common;

use common::TestDb;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_commit_is_visible_in_the_aggregates_well_under_a_second() {
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    // A poll far slower than the target proves the notifications do the work.
    args.poll_interval = Duration::from_secs(30);
    let running = common::start(&db, &args).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut samples = Vec::new();
    for i in 0..10 {
        samples.push(commit_to_visible(&pool, &format!("fresh-{i}")).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then changes that each find the relay asleep (no event for over a second): only the
    // sleep flag and the notification it turns on can bring them in before the 30 s poll.
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        samples.push(commit_to_visible(&pool, &format!("after-sleep-{i}")).await);
    }
    running.stop().await;
    samples.sort();
    let median = samples[samples.len() / 2];
    let worst = samples[samples.len() - 1];
    println!("freshness: median {median:?}, worst {worst:?}");
    assert!(median < Duration::from_millis(250), "median {median:?}");
    assert!(worst < Duration::from_secs(1), "worst {worst:?}");
    db.finish(pool).await;
}

/// Inserts a lead of a new source and waits until the funnel counts it.
async fn commit_to_visible(pool: &sqlx::PgPool, source: &str) -> Duration {
    sqlx::query("INSERT INTO leads (source) VALUES ($1)")
        .bind(source)
        .execute(pool)
        .await
        .unwrap();
    let committed = Instant::now();
    loop {
        let seen: Option<i64> =
            sqlx::query_scalar("SELECT total FROM analytics.lead_funnel_metrics WHERE source = $1")
                .bind(source)
                .fetch_optional(pool)
                .await
                .unwrap();
        if seen == Some(1) {
            return committed.elapsed();
        }
        assert!(
            committed.elapsed() < Duration::from_secs(5),
            "change {source} never became visible"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
