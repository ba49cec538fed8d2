//! Poison events: retried with backoff, parked in failed_events after the last attempt
//! without holding anything else up, and replayed by `crm-analytics failed retry`.

mod common;

use common::TestDb;
use crm_analytics::queue::Message;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs the binary on `db` with `queue` (the one the test's pipeline runs on).
fn cli(db: &TestDb, queue: &str, args: &[&str]) -> String {
    let output = Command::new(common::binary())
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("CRM_ANALYTICS_QUEUE", queue)
        .output()
        .expect("run crm-analytics");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn poison_events_are_parked_then_replayed_once_fixed() {
    poison_events_are_parked_then_replayed_once_fixed_on("postgres").await
}

/// On the outbox as the queue, parking happens in the transaction that takes the event
/// out of the outbox, and `failed retry` puts it back in the outbox in its own.
#[tokio::test]
async fn on_the_outbox_poison_events_are_parked_then_replayed_once_fixed() {
    poison_events_are_parked_then_replayed_once_fixed_on("outbox").await
}

async fn poison_events_are_parked_then_replayed_once_fixed_on(queue: &str) {
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.outbox_retention = Duration::from_secs(3600);
    args.max_attempts = 3;
    args.retry_backoff = Duration::from_millis(200);

    // Cause 1, in the database: the analytics side rejects a revenue above a million.
    sqlx::raw_sql(
        "ALTER TABLE analytics.revenue_metrics ADD CONSTRAINT test_cap CHECK (revenue < 1000000)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Cause 2, in the event: a lead whose event arrives with a broken created_at.
    let lead = uuid::Uuid::new_v4();
    // Written with triggers off (SET LOCAL: this transaction only), as if its event had
    // been mangled on the way.
    let mut conn = pool.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO leads (id, source, status, created_at) VALUES ($1, 'web', 'new', '2026-01-01 00:00+00')")
        .bind(lead)
        .execute(&mut *conn)
        .await
        .unwrap();
    conn.commit().await.unwrap();

    let running = match queue {
        "outbox" => common::start_on_outbox(&db, &args).await,
        _ => common::start(&db, &args).await,
    };
    let started = Instant::now();
    common::insert_poison_lead(&pool, lead).await;
    // Good events around the bad ones, some in the same transactions and batches.
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'Account ' || i FROM generate_series(1, 20) i;
         INSERT INTO leads (account_id, source) SELECT id, 'web' FROM accounts;
         INSERT INTO projects (account_id, name, status, amount, closed_at)
             SELECT id, 'Normal', 'won', 100, now() FROM accounts;
         BEGIN;
         INSERT INTO projects (account_id, name, status, amount, closed_at)
             SELECT id, 'Huge', 'won', 2000000, now() FROM accounts LIMIT 1;
         INSERT INTO activities (account_id, activity_type) SELECT id, 'call' FROM accounts;
         COMMIT;",
    )
    .execute(&pool)
    .await
    .unwrap();

    // Both end in failed_events after three attempts; nothing else waits for them.
    loop {
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.failed_events")
            .fetch_one(&pool)
            .await
            .unwrap();
        if parked == 2 {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            // What the queue would deliver next, looked at and given back unsettled.
            let batch = running.pipeline.queue.receive(100, Duration::ZERO).await;
            let waiting: Vec<(Option<uuid::Uuid>, u32)> = batch
                .map(|b| {
                    b.deliveries()
                        .iter()
                        .map(|d| (d.event_id, d.attempt))
                        .collect()
                })
                .unwrap_or_default();
            panic!("poison events were not parked: {parked} parked, queue (event, attempt) {waiting:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200),
        "two backoffs of at least 100 ms each: {elapsed:?}"
    );
    common::drain(&pool, Duration::from_secs(30)).await;
    let parked: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT event_type, retry_count, error_message FROM crm_analytics.failed_events ORDER BY event_type",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(parked[0].0, "leads.insert");
    assert_eq!(parked[1].0, "projects.insert");
    assert!(parked.iter().all(|p| p.1 == 3), "{parked:?}");
    assert!(parked[0].2.contains("created_at"), "{}", parked[0].2);
    assert!(parked[1].2.contains("test_cap"), "{}", parked[1].2);
    let (relayed, applied, processed): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_analytics.event_outbox_processed),
                (SELECT count(*) FROM crm_analytics.applied_events),
                (SELECT sum(processed)::int8 FROM analytics.event_counts)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(processed, relayed - 2, "every other event was applied");
    match queue {
        // The outbox's removal is the idempotency: no ledger on that path.
        "outbox" => assert_eq!(applied, 0),
        _ => assert_eq!(applied, relayed - 2, "every other event is in the ledger"),
    }
    let failed: i64 = sqlx::query_scalar("SELECT sum(failed)::int8 FROM analytics.event_counts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed, 2);
    let listing = cli(&db, queue, &["failed", "list"]);
    assert!(
        listing.contains("leads.insert") && listing.contains("attempts 3"),
        "{listing}"
    );

    // The operator fixes both causes and replays.
    sqlx::raw_sql(
        "ALTER TABLE analytics.revenue_metrics DROP CONSTRAINT test_cap;
         UPDATE crm_analytics.failed_events
            SET payload = jsonb_set(payload, '{new,created_at}', '\"2026-01-01T00:00:00+00:00\"')
          WHERE event_type = 'leads.insert';",
    )
    .execute(&pool)
    .await
    .unwrap();
    let replay = cli(&db, queue, &["failed", "retry", "--all"]);
    assert!(replay.contains("2 events put back"), "{replay}");
    common::drain(&pool, Duration::from_secs(30)).await;
    running.stop().await;
    let (parked, failed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_analytics.failed_events),
                (SELECT coalesce(sum(failed), 0)::int8 FROM analytics.event_counts)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((parked, failed), (0, 0));
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn a_message_that_is_not_an_event_is_parked_with_its_raw_text() {
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.max_attempts = 1;
    let running = common::start(&db, &args).await;
    // Published through the queue as any message is, with a body that is no envelope.
    let garbage = Message {
        event_id: uuid::Uuid::new_v4(),
        event_type: "unknown".into(),
        body: "not json at all".into(),
    };
    running
        .pipeline
        .queue
        .publish_messages(&[garbage])
        .await
        .unwrap();
    sqlx::query("INSERT INTO accounts (name) VALUES ('fine')")
        .execute(&pool)
        .await
        .unwrap();
    common::drain(&pool, Duration::from_secs(30)).await;
    running.stop().await;
    let (raw, error): (Option<String>, String) =
        sqlx::query_as("SELECT raw_message, error_message FROM crm_analytics.failed_events")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(raw.as_deref(), Some("not json at all"));
    assert!(error.contains("not an event envelope"), "{error}");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.applied_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, 1);
    db.finish(pool).await;
}
