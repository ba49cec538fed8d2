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

/// The real queue, except that a publish reports failure after the queue took the events:
/// a relay that dies between its publish and its commit. The events are in the queue and
/// still in the outbox, to be published again whenever a relay runs next.
struct PublishedThenFailed(std::sync::Arc<dyn crm_analytics::queue::Queue>);

#[async_trait::async_trait]
impl crm_analytics::queue::Queue for PublishedThenFailed {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    async fn publish_messages(
        &self,
        messages: &[crm_analytics::queue::Message],
    ) -> Result<(), crm_analytics::queue::QueueError> {
        self.0.publish_messages(messages).await?;
        Err(crm_analytics::queue::QueueError::Setting(
            "the relay died before its commit".into(),
        ))
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn crm_analytics::queue::ReceivedBatch>, crm_analytics::queue::QueueError>
    {
        self.0.receive(max, wait).await
    }
    async fn depth(&self) -> Result<crm_analytics::queue::Depth, crm_analytics::queue::QueueError> {
        self.0.depth().await
    }
    async fn is_full(&self) -> Result<bool, crm_analytics::queue::QueueError> {
        self.0.is_full().await
    }
}

/// Event ids in the idempotency ledger.
async fn ledger_size(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM crm_analytics.applied_events")
        .fetch_one(pool)
        .await
        .expect("count the ledger")
}

#[tokio::test]
async fn a_relay_down_longer_than_the_dedup_retention_does_not_count_an_event_twice() {
    let (db, pool) = TestDb::migrated().await;
    common::run_workload(&pool, 2, 250, 17).await;
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    let args = db.args();
    let queue = common::open_queue(&pool, u64::MAX).await;
    let relay = crm_analytics::relay::RelayConfig {
        loops: 1,
        batch_size: 100_000,
        poll_interval: Duration::from_millis(250),
        outbox_retention: Duration::ZERO,
        timeout: Duration::from_secs(30),
        renew_ledger_after: Duration::from_secs(1800),
    };
    crm_analytics::relay::relay_once(&pool, &pool, &PublishedThenFailed(queue.clone()), &relay)
        .await
        .expect_err("the relay died after publishing");

    // Workers alone (no relay runs) apply what reached the queue.
    let pipeline = crm_analytics::pipeline::Pipeline::assemble(
        db.pool(4).await,
        db.pool(12).await,
        queue.clone(),
        &args,
    )
    .expect("assemble");
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = tokio::spawn({
        let stop = stop.clone();
        async move {
            let roles = crm_analytics::pipeline::Roles {
                relay: false,
                workers: true,
            };
            pipeline.run(roles, stop).await
        }
    });
    let started = Instant::now();
    loop {
        let applied: i64 = ledger_size(&pool).await;
        if applied == written {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{applied} of {written}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    workers.await.expect("join").expect("workers");

    // Long past the retention (here 10 ms), the ledger still holds every event the outbox
    // holds: those are published again when a relay comes back.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let short = MaintenanceConfig {
        outbox_retention: Duration::from_millis(10),
        dedup_retention: Duration::from_millis(10),
    };
    maintenance::run_once(&pool, &pool, &short).await.unwrap();
    let kept: i64 = ledger_size(&pool).await;
    assert_eq!(
        kept, written,
        "ledger entries of events still in the outbox were pruned"
    );

    // The relay comes back and publishes them again: they leave the outbox and wait in
    // the queue. Their ledger entries, renewed as they were published, outlive a retention
    // their first application is already past.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let back = crm_analytics::relay::RelayConfig {
        renew_ledger_after: Duration::ZERO,
        ..relay
    };
    let again = crm_analytics::relay::relay_once(&pool, &pool, &*queue, &back)
        .await
        .expect("relay");
    assert_eq!(again as i64, written);
    let one_second = MaintenanceConfig {
        outbox_retention: Duration::from_secs(1),
        dedup_retention: Duration::from_secs(1),
    };
    maintenance::run_once(&pool, &pool, &one_second)
        .await
        .unwrap();
    let kept: i64 = ledger_size(&pool).await;
    assert_eq!(
        kept, written,
        "ledger entries of events published again were pruned before their copies arrived"
    );

    let running = common::start(&db, &args).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;

    // Once the outbox is empty, the retention applies again.
    maintenance::run_once(&pool, &pool, &short).await.unwrap();
    let kept: i64 = ledger_size(&pool).await;
    assert_eq!(kept, 0);
    db.finish(pool).await;
}

/// After a backlog the outbox keeps its size (its last page stays in use), and most of its
/// pages are empty. A claim while few events wait must not read them all: it goes through
/// the primary key. Its batch also commits without waiting for the disk (a lost batch
/// loses its removal from the outbox with it).
#[tokio::test]
async fn a_short_claim_after_a_backlog_skips_the_emptied_pages() {
    let (db, pool) = TestDb::migrated().await;
    // Three connections (the notification listener, a claim's transaction and the pacing
    // beside it); the last two have their statistics reset before the measured claim.
    let claims = db.pool(3).await;
    let queue = common::open_outbox(&claims, false).await;
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 5000) i;
         -- the last row waits an hour (a retry's delay): vacuum cannot cut the table short
         UPDATE crm_analytics.event_outbox SET available_at = now() + interval '1 hour'
         WHERE event_id = (SELECT event_id FROM crm_analytics.event_outbox ORDER BY event_id DESC LIMIT 1);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut drained = 0;
    loop {
        let batch = queue
            .receive(1000, Duration::from_millis(100))
            .await
            .unwrap();
        let n = batch.deliveries().len();
        common::settle_all(vec![batch]).await;
        drained += n;
        if n == 0 {
            break;
        }
    }
    assert_eq!(drained, 4999, "the backlog but its delayed row");
    sqlx::raw_sql("VACUUM crm_analytics.event_outbox")
        .execute(&pool)
        .await
        .unwrap();
    let pages: i64 =
        sqlx::query_scalar("SELECT pg_relation_size('crm_analytics.event_outbox') / 8192")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(pages > 100, "the outbox kept its size: {pages} pages");
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'b' || i FROM generate_series(1, 3) i")
        .execute(&pool)
        .await
        .unwrap();
    // Each connection's pending statistics are flushed as it goes idle, so what the
    // claiming one counts next is the claim's own reads.
    let mut both = Vec::new();
    for _ in 0..2 {
        let mut conn = claims.acquire().await.unwrap();
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&mut *conn)
            .await
            .unwrap();
        both.push(conn);
    }
    drop(both);
    let mut batch = queue.receive(1000, Duration::from_secs(5)).await.unwrap();
    assert_eq!(batch.deliveries().len(), 3);
    let tx = batch.transaction().expect("the batch's transaction");
    let fetched: i64 = sqlx::query_scalar(
        "SELECT pg_stat_get_xact_blocks_fetched('crm_analytics.event_outbox'::regclass)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert!(
        fetched < 20,
        "the claim read {fetched} of the outbox's {pages} pages"
    );
    let durable: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(durable, "off");
    common::settle_all(vec![batch]).await;
    claims.close().await;
    db.finish(pool).await;
}
