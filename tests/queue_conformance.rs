//! One conformance suite that every queue backend passes, the embedded PostgreSQL queue
//! and the outbox as the queue included: what the relay and the workers rely on, tested
//! against the real server of each backend. A new backend adds one line to `conformance!`
//! and one arm to `open`. Messages are events (the outbox carries nothing else), compared
//! as JSON (the outbox keeps a payload as jsonb, not as the text it was given).

mod common;

use crm_analytics::queue::{Message, Queue, QueueOptions, ReceivedBatch, Settlement};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The lease the suite opens queues with: short, so that "a consumer died" is quick.
const LEASE: Duration = Duration::from_secs(2);
const SQS_LEASE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Backend {
    Outbox,
    Postgres,
    Nats,
    Sqs,
}

/// A fresh, empty queue of `backend` and what keeps it alive (its database), or None when
/// the backend's server is not running outside CI.
struct Harness {
    queue: Arc<dyn Queue>,
    /// A second handle on the same queue, as another process would open it.
    other: Arc<dyn Queue>,
    _db: Option<common::TestDb>,
    _stream: Option<common::brokers::FreshNats>,
}

async fn open(backend: Backend, capacity: u64) -> Option<Harness> {
    let options = QueueOptions {
        capacity,
        lease: LEASE,
        ..QueueOptions::default()
    };
    match backend {
        Backend::Outbox | Backend::Postgres => {
            let (db, pool) = common::TestDb::migrated().await;
            let spec = match backend {
                Backend::Outbox => crm_analytics::queue::QueueSpec::Outbox,
                _ => crm_analytics::queue::QueueSpec::Postgres,
            };
            let queue = crm_analytics::queue::open(&spec, &pool, &options)
                .await
                .expect("open");
            let other = crm_analytics::queue::open(&spec, &db.pool(10).await, &options)
                .await
                .expect("open a second handle");
            Some(Harness {
                queue,
                other,
                _db: Some(db),
                _stream: None,
            })
        }
        Backend::Nats => {
            let mut fresh = common::brokers::FreshNats::new(LEASE)?;
            fresh.options.capacity = capacity;
            let queue: Arc<dyn Queue> = Arc::new(fresh.open().await);
            let other: Arc<dyn Queue> = Arc::new(fresh.open().await);
            Some(Harness {
                queue,
                other,
                _db: None,
                _stream: Some(fresh),
            })
        }
        Backend::Sqs => {
            // A longer lease: the local SQS-compatible server answers a visibility change in
            // up to a second under load, too slow to keep a 2 s lease alive reliably.
            let mut fresh = common::brokers::FreshSqs::new(SQS_LEASE)?;
            fresh.options.capacity = capacity;
            let queue: Arc<dyn Queue> = Arc::new(fresh.open().await);
            let other: Arc<dyn Queue> = Arc::new(fresh.open().await);
            Some(Harness {
                queue,
                other,
                _db: None,
                _stream: None,
            })
        }
    }
}

fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let event_id = Uuid::new_v4();
            let body = serde_json::json!({
                "event_id": event_id,
                "event_type": "leads.insert",
                "aggregate_id": null,
                "xid": 1000 + i,
                "created_at": "2026-01-01T00:00:00Z",
                "payload": {"new": {"n": i}},
            });
            Message {
                event_id,
                event_type: "leads.insert".into(),
                body: body.to_string(),
            }
        })
        .collect()
}

/// A body as JSON text in one spelling, whatever spacing the queue gave it.
fn normal(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .map(|value| value.to_string())
        .unwrap_or_else(|_| body.to_string())
}

/// Receives batches until `n` deliveries are held (unsettled) or `within` passes.
async fn hold(queue: &dyn Queue, n: usize, within: Duration) -> Vec<Box<dyn ReceivedBatch>> {
    let deadline = Instant::now() + within;
    let mut held = Vec::new();
    let mut count = 0;
    while count < n && Instant::now() < deadline {
        let batch = queue
            .receive(n - count, Duration::from_millis(500))
            .await
            .expect("receive");
        count += batch.deliveries().len();
        if !batch.deliveries().is_empty() {
            held.push(batch);
        }
    }
    held
}

fn bodies(batches: &[Box<dyn ReceivedBatch>]) -> Vec<(Option<Uuid>, String, u32)> {
    batches
        .iter()
        .flat_map(|b| b.deliveries().iter())
        .map(|d| (d.event_id, normal(&d.body), d.attempt))
        .collect()
}

/// Nothing arrives within `wait` (one long poll).
async fn assert_nothing(queue: &dyn Queue, wait: Duration, why: &str) {
    let batch = queue.receive(10, wait).await.expect("receive");
    let got: Vec<_> = batch.deliveries().iter().map(|d| normal(&d.body)).collect();
    assert!(got.is_empty(), "{why}: received {got:?}");
}

async fn eventually_depth(queue: &dyn Queue, expected: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let depth = queue.depth().await.expect("depth");
        if depth.events == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "depth {depth:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Everything published is received once with its id, body and a first attempt, and
/// once settled it is gone.
async fn publish_receive_settle(h: Harness) {
    let sent = messages(25);
    h.queue.publish_messages(&sent).await.expect("publish");
    eventually_depth(&*h.queue, 25, Duration::from_secs(10)).await;
    let held = hold(&*h.queue, 25, Duration::from_secs(20)).await;
    let mut got = bodies(&held);
    got.sort_by(|a, b| a.1.cmp(&b.1));
    let mut want: Vec<_> = sent
        .iter()
        .map(|m| (Some(m.event_id), normal(&m.body), 1))
        .collect();
    want.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(got, want);
    common::settle_all(held).await;
    eventually_depth(&*h.queue, 0, Duration::from_secs(10)).await;
    assert_nothing(
        &*h.queue,
        Duration::from_secs(1),
        "settled messages came back",
    )
    .await;
}

/// Concurrent consumers (two handles, several tasks) never hold the same message, except
/// where the backend documents rare duplicates (`doubles_allowed`: SQS standard queues
/// deliver "at least once" and may hand one message to two consumers; the workers' ledger
/// makes that harmless): then every message is still held and duplicates stay rare.
async fn disjoint_leases(h: Harness, doubles_allowed: bool) {
    let sent = messages(200);
    h.queue.publish_messages(&sent).await.expect("publish");
    let mut tasks = tokio::task::JoinSet::new();
    for consumer in 0..4 {
        let queue = if consumer % 2 == 0 {
            h.queue.clone()
        } else {
            h.other.clone()
        };
        tasks.spawn(async move {
            // Hold everything received until the end, so that a double lease would show.
            let mut held = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let batch = queue
                    .receive(50, Duration::from_millis(300))
                    .await
                    .expect("receive");
                if batch.deliveries().is_empty() {
                    if !held.is_empty() {
                        break;
                    }
                    continue;
                }
                held.push(batch);
            }
            held
        });
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = Vec::new();
    while let Some(held) = tasks.join_next().await {
        let held = held.expect("consumer task");
        for (_, body, _) in bodies(&held) {
            *seen.entry(body).or_default() += 1;
        }
        all.extend(held);
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    if doubles_allowed {
        assert!(doubled.len() <= 10, "leased twice, too often: {doubled:?}");
    } else {
        assert!(doubled.is_empty(), "leased twice: {doubled:?}");
    }
    assert_eq!(seen.len(), 200, "every message leased");
    common::settle_all(all).await;
}

/// A consumer that dies without settling (its batch dropped) loses nothing: the same
/// messages come back within the lease.
async fn redelivery_after_a_consumer_dies(h: Harness) {
    let sent = messages(3);
    h.queue.publish_messages(&sent).await.expect("publish");
    let held = hold(&*h.queue, 3, Duration::from_secs(10)).await;
    let first: BTreeSet<_> = bodies(&held).into_iter().map(|d| d.1).collect();
    assert_eq!(first.len(), 3);
    drop(held);
    let again = hold(&*h.other, 3, SQS_LEASE + Duration::from_secs(8)).await;
    let second: BTreeSet<_> = bodies(&again).into_iter().map(|d| d.1).collect();
    assert_eq!(first, second, "the dropped batch came back whole");
    common::settle_all(again).await;
}

/// A retry comes back after its delay, not before, with the attempt counted.
async fn delayed_retry_counts_the_attempt(h: Harness) {
    let sent = messages(1);
    h.queue.publish_messages(&sent).await.expect("publish");
    let held = hold(&*h.queue, 1, Duration::from_secs(10)).await;
    assert_eq!(bodies(&held)[0].2, 1, "first delivery is attempt 1");
    let delay = Duration::from_secs(3);
    let retried_at = Instant::now();
    for batch in held {
        batch
            .settle(Settlement {
                done: Vec::new(),
                retry: vec![(0, delay, "failed on purpose".into())],
            })
            .await
            .expect("settle retry");
    }
    assert_nothing(
        &*h.other,
        Duration::from_millis(1500),
        "a retry arrived before its delay",
    )
    .await;
    let back = hold(&*h.other, 1, delay + Duration::from_secs(8)).await;
    let got = bodies(&back);
    assert_eq!(got.len(), 1, "the retried message came back");
    assert!(
        retried_at.elapsed() >= delay - Duration::from_millis(200),
        "it came back after {:?}, before its delay of {delay:?}",
        retried_at.elapsed()
    );
    assert_eq!(got[0].1, normal(&sent[0].body));
    assert_eq!(got[0].2, 2, "the failed attempt is counted");
    common::settle_all(back).await;
}

/// Settling part of a batch: the settled are gone, the rest come back.
async fn partial_settlement(h: Harness) {
    let sent = messages(4);
    h.queue.publish_messages(&sent).await.expect("publish");
    let held = hold(&*h.queue, 4, Duration::from_secs(10)).await;
    let mut settled = BTreeSet::new();
    let mut left = BTreeSet::new();
    for batch in held {
        let deliveries = batch.deliveries().to_vec();
        let mut done = Vec::new();
        for (i, d) in deliveries.iter().enumerate() {
            if settled.len() < 2 {
                settled.insert(normal(&d.body));
                done.push(i);
            } else {
                left.insert(normal(&d.body));
            }
        }
        batch
            .settle(Settlement {
                done,
                retry: Vec::new(),
            })
            .await
            .expect("settle part");
    }
    let back = hold(&*h.other, left.len(), SQS_LEASE + Duration::from_secs(8)).await;
    let returned: BTreeSet<_> = bodies(&back).into_iter().map(|d| d.1).collect();
    assert_eq!(returned, left, "exactly the unsettled deliveries came back");
    common::settle_all(back).await;
    assert_nothing(
        &*h.queue,
        Duration::from_secs(1),
        "a settled message came back",
    )
    .await;
}

/// The outbox as the queue never holds anyone back: it takes whatever the CRM commits,
/// and no relay publishes into it.
async fn never_full(h: Harness) {
    h.queue
        .publish_messages(&messages(20))
        .await
        .expect("publish");
    eventually_depth(&*h.queue, 20, Duration::from_secs(10)).await;
    assert!(
        !h.queue.is_full().await.expect("is_full"),
        "20 events at capacity 10: the outbox is never full"
    );
}

/// At capacity the queue says so (publishers hold back), and it clears once drained.
async fn backpressure(h: Harness) {
    assert!(
        !h.queue.is_full().await.expect("is_full"),
        "empty is not full"
    );
    h.queue
        .publish_messages(&messages(10))
        .await
        .expect("publish");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.queue.is_full().await.expect("is_full") {
        assert!(
            Instant::now() < deadline,
            "10 messages at capacity 10: full"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // All done but one, which waits out a long retry delay; then one more is published.
    // Two messages at capacity 10, however far apart they were published: not full.
    let held = hold(&*h.queue, 10, Duration::from_secs(10)).await;
    let mut retried = false;
    for batch in held {
        let count = batch.deliveries().len();
        let mut settlement = Settlement {
            done: (0..count).collect(),
            retry: vec![],
        };
        if !retried && count > 0 {
            settlement.done.remove(0);
            settlement
                .retry
                .push((0, Duration::from_secs(60), "waits".into()));
            retried = true;
        }
        batch.settle(settlement).await.expect("settle");
    }
    h.queue
        .publish_messages(&messages(1))
        .await
        .expect("publish");
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.queue.is_full().await.expect("is_full") {
        assert!(
            Instant::now() < deadline,
            "two messages at capacity 10: no longer full"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A consumer waiting in a long poll wakes up promptly after a publish.
async fn wake_up_after_a_publish(h: Harness) {
    let waiting = {
        let queue = h.other.clone();
        tokio::spawn(async move {
            let batch = queue
                .receive(10, Duration::from_secs(20))
                .await
                .expect("receive");
            (Instant::now(), batch)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published = Instant::now();
    h.queue
        .publish_messages(&messages(1))
        .await
        .expect("publish");
    let (woke, batch) = waiting.await.expect("receiver");
    let latency = woke.saturating_duration_since(published);
    assert_eq!(batch.deliveries().len(), 1, "the waiting consumer got it");
    eprintln!("wake-up latency {latency:?}");
    assert!(
        latency < Duration::from_millis(1000),
        "woke {latency:?} after the publish"
    );
    common::settle_all(vec![batch]).await;
}

macro_rules! conformance {
    ($($module:ident => $backend:expr),* $(,)?) => {$(
        mod $module {
            use super::*;

            async fn harness(capacity: u64) -> Option<Harness> {
                open($backend, capacity).await
            }

            #[tokio::test]
            async fn publish_receive_settle() {
                if let Some(h) = harness(u64::MAX).await {
                    super::publish_receive_settle(h).await
                }
            }

            #[tokio::test]
            async fn disjoint_leases() {
                if let Some(h) = harness(u64::MAX).await {
                    super::disjoint_leases(h, matches!($backend, Backend::Sqs)).await
                }
            }

            #[tokio::test]
            async fn redelivery_after_a_consumer_dies() {
                if let Some(h) = harness(u64::MAX).await {
                    super::redelivery_after_a_consumer_dies(h).await
                }
            }

            #[tokio::test]
            async fn delayed_retry_counts_the_attempt() {
                if let Some(h) = harness(u64::MAX).await {
                    super::delayed_retry_counts_the_attempt(h).await
                }
            }

            #[tokio::test]
            async fn partial_settlement() {
                if let Some(h) = harness(u64::MAX).await {
                    super::partial_settlement(h).await
                }
            }

            #[tokio::test]
            async fn backpressure() {
                if let Some(h) = harness(10).await {
                    match $backend {
                        Backend::Outbox => super::never_full(h).await,
                        _ => super::backpressure(h).await,
                    }
                }
            }

            #[tokio::test]
            async fn wake_up_after_a_publish() {
                if let Some(h) = harness(u64::MAX).await {
                    super::wake_up_after_a_publish(h).await
                }
            }
        }
    )*};
}

conformance! {
    outbox => Backend::Outbox,
    postgres => Backend::Postgres,
    nats => Backend::Nats,
    sqs => Backend::Sqs,
}
