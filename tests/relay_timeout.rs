//! Relay: a publish that hangs does not keep a CRM transaction open (and the CRM's xmin
//! horizon held back) beyond the relay timeout; once the queue answers again, every event
//! is delivered, exactly once in effect. A queue too slow to take a whole batch within the
//! timeout still gets every event: the relay sends smaller batches.

mod common;

use async_trait::async_trait;
use common::TestDb;
use crm_analytics::queue::{Depth, Message, Queue, QueueError, ReceivedBatch};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The real PostgreSQL queue, except that while `hang` is set a publish never returns
/// (a broker or analytics database that stopped answering), and that each publish takes
/// `per_message` for every message in it (a slow broker) before it is sent.
struct Hanging {
    inner: Arc<dyn Queue>,
    hang: Arc<AtomicBool>,
    hung: Arc<AtomicUsize>,
    per_message: Duration,
    largest_sent: Arc<AtomicUsize>,
}

#[async_trait]
impl Queue for Hanging {
    async fn publish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        if self.hang.load(Ordering::SeqCst) {
            self.hung.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        if !self.per_message.is_zero() {
            tokio::time::sleep(self.per_message * messages.len() as u32).await;
        }
        self.inner.publish_messages(messages).await?;
        self.largest_sent
            .fetch_max(messages.len(), Ordering::SeqCst);
        Ok(())
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn ReceivedBatch>, QueueError> {
        self.inner.receive(max, wait).await
    }
    async fn depth(&self) -> Result<Depth, QueueError> {
        self.inner.depth().await
    }
    async fn is_full(&self) -> Result<bool, QueueError> {
        self.inner.is_full().await
    }
}

#[tokio::test]
async fn a_hanging_publish_ends_the_crm_transaction_within_the_bound() {
    let (db, pool) = TestDb::migrated().await;
    let bound = Duration::from_secs(1);
    let mut args = db.args();
    args.relay_timeout = bound;
    args.outbox_retention = Duration::from_secs(3600); // to count relayed events
    let hang = Arc::new(AtomicBool::new(true));
    let hung = Arc::new(AtomicUsize::new(0));
    let inner = common::open_queue(&db.pool(12).await, 1_000_000).await;
    let queue = Hanging {
        inner,
        hang: hang.clone(),
        hung: hung.clone(),
        per_message: Duration::ZERO,
        largest_sent: Arc::default(),
    };
    let running = common::start_with(&db, &args, move |_| Arc::new(queue) as Arc<dyn Queue>).await;
    common::run_workload(&pool, 2, 100, 21).await;

    // While publishing hangs, watch the CRM's transactions: none may outlive the bound
    // by more than a margin for scheduling.
    let margin = Duration::from_millis(1500);
    let watch = Instant::now();
    let mut relay_seen = false;
    while watch.elapsed() < bound * 5 {
        let open: Vec<(f64, String, String)> = sqlx::query_as(
            "SELECT extract(epoch FROM clock_timestamp() - xact_start)::float8, state, query
             FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND xact_start IS NOT NULL",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        for (age, state, query) in open {
            relay_seen |= query.contains("event_outbox") && state == "idle in transaction";
            assert!(
                age < (bound + margin).as_secs_f64(),
                "a CRM transaction has been open {age:.1}s ({state}): {query}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        relay_seen,
        "a relay transaction was seen waiting on the publish"
    );
    assert!(
        hung.load(Ordering::SeqCst) >= 2,
        "the relay gave up on the hanging publish and tried again"
    );

    // The queue answers again: everything arrives, nothing twice.
    hang.store(false, Ordering::SeqCst);
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    let (relayed, distinct, applied, retried): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_analytics.event_outbox_processed),
                (SELECT count(DISTINCT event_id) FROM crm_analytics.event_outbox_processed),
                (SELECT count(*) FROM crm_analytics.applied_events),
                (SELECT count(*) FROM crm_analytics.event_outbox_processed WHERE retry_count > 0)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(relayed > 100, "{relayed}");
    assert_eq!(relayed, distinct, "an event was relayed twice");
    assert_eq!(relayed, applied);
    assert!(retried > 0, "the timed-out claims were counted as retries");
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn a_queue_slower_than_the_timeout_allows_for_a_batch_still_gets_every_event() {
    let (db, pool) = TestDb::migrated().await;
    // The whole backlog is in the outbox before the relay starts, so its first claim is a
    // full batch of 1,000 that would take 4 s at 250 events/s: four times the timeout.
    common::run_workload(&pool, 4, 300, 22).await;
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(waiting >= 1000, "the backlog fills a batch: {waiting}");
    let mut args = db.args();
    args.batch_size = 1000;
    args.relay_timeout = Duration::from_secs(1);
    args.outbox_retention = Duration::from_secs(3600); // to count retried claims
    let largest_sent = Arc::new(AtomicUsize::new(0));
    let queue = Hanging {
        inner: common::open_queue(&db.pool(12).await, 1_000_000).await,
        hang: Arc::default(),
        hung: Arc::default(),
        per_message: Duration::from_millis(4),
        largest_sent: largest_sent.clone(),
    };
    let running = common::start_with(&db, &args, move |_| Arc::new(queue) as Arc<dyn Queue>).await;

    // Without smaller batches every claim times out and nothing ever leaves the outbox.
    common::drain(&pool, Duration::from_secs(90)).await;
    running.stop().await;
    let largest = largest_sent.load(Ordering::SeqCst);
    assert!(
        // 250 would take the whole timeout: 125 is the largest batch that fits.
        (1..=125).contains(&largest),
        "only batches that fit the timeout were sent: {largest}"
    );
    let retried: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM crm_analytics.event_outbox_processed WHERE retry_count > 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(retried > 0, "the full batch timed out first");
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}
