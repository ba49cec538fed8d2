//! Exactness on every queue backend: a concurrent random workload, with its archive in a
//! local folder and on S3, and every event delivered again after it was applied, end in
//! aggregates equal to a full recomputation over the CRM tables, on the outbox as the
//! queue, the embedded PostgreSQL queue, NATS JetStream and SQS. `exact_on!` generates the tests of each
//! backend (as `conformance!` does in queue_conformance.rs); SIGKILLed worker processes on
//! each backend are in distributed.rs.

mod common;

use async_trait::async_trait;
use common::brokers::{bucket_name, create_bucket, moto, FreshNats, FreshSqs};
use common::{Running, TestDb};
use crm_analytics::archive::{Archive, Layout};
use crm_analytics::config::PipelineArgs;
use crm_analytics::event::Envelope;
use crm_analytics::queue::{
    Delivery, Depth, Message, Queue, QueueError, ReceivedBatch, Settlement,
};
use futures::future::BoxFuture;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Outbox,
    Postgres,
    Nats,
    Sqs,
}

impl Backend {
    /// Writers and transactions per writer: `full`, or `sqs` on SQS. The local
    /// SQS-compatible server (moto) handles a few dozen messages a second on a busy
    /// machine: a smaller workload there keeps the test's time in line with the others
    /// (the base history keeps the aggregates nontrivial).
    fn workload(self, full: (usize, u64), sqs: (usize, u64)) -> (usize, u64) {
        match self {
            Backend::Sqs => sqs,
            Backend::Outbox | Backend::Postgres | Backend::Nats => full,
        }
    }

    /// Whether publishing an event twice puts it on the queue twice. NATS drops the second
    /// publish within its duplicate window (keyed by the event id), the outbox keeps one row
    /// per event id; the others keep both.
    fn keeps_second_publish(self) -> bool {
        !matches!(self, Backend::Nats | Backend::Outbox)
    }

    /// Whether an event applied and committed can be delivered again. Not on the outbox:
    /// the transaction that applies a batch also takes it out of the outbox, so the
    /// duplicate it can see is a batch applied and then rolled back (a worker that died
    /// before its commit).
    fn redelivers_committed(self) -> bool {
        !matches!(self, Backend::Outbox)
    }
}

/// The queue a test's pipeline runs on, and what keeps it alive (a NATS stream of its own).
struct TestQueue {
    queue: Arc<dyn Queue>,
    _stream: Option<FreshNats>,
}

/// A fresh queue of `backend`, or None when its server is not running (outside CI).
async fn test_queue(backend: Backend, db: &TestDb, args: &PipelineArgs) -> Option<TestQueue> {
    match backend {
        Backend::Outbox => {
            let analytics = db
                .pool(crm_analytics::pipeline::analytics_pool_size(args.workers()))
                .await;
            let options = crm_analytics::queue::QueueOptions {
                keep_processed: true,
                ..Default::default()
            };
            let spec = crm_analytics::queue::QueueSpec::Outbox;
            Some(TestQueue {
                queue: crm_analytics::queue::open(&spec, &analytics, &options)
                    .await
                    .expect("open the outbox as the queue"),
                _stream: None,
            })
        }
        Backend::Postgres => {
            let analytics = db
                .pool(crm_analytics::pipeline::analytics_pool_size(args.workers()))
                .await;
            Some(TestQueue {
                queue: common::open_queue(&analytics, args.queue_capacity).await,
                _stream: None,
            })
        }
        Backend::Nats => {
            let fresh = FreshNats::new(Duration::from_secs(5))?;
            Some(TestQueue {
                queue: Arc::new(fresh.open().await),
                _stream: Some(fresh),
            })
        }
        Backend::Sqs => {
            // The default lease: the local server takes up to a second per call under load,
            // so a batch may take several seconds, and shorter leases cost it more extensions.
            let fresh = FreshSqs::new(Duration::from_secs(30))?;
            Some(TestQueue {
                queue: Arc::new(fresh.open().await),
                _stream: None,
            })
        }
    }
}

/// Where the archive is written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ArchiveAt {
    Folder,
    S3,
}

/// Settings for a test pipeline keeping relayed events in the outbox (to count them).
fn args(db: &TestDb) -> PipelineArgs {
    let mut args = db.args();
    args.outbox_retention = Duration::from_secs(3600);
    args.archive_layout = Layout::Batch;
    args
}

/// A fixed history written before the random workload, while the pipeline runs: eight
/// accounts with leads over four days and sources, and won deals in two months, so that
/// `assert_nontrivial` holds however small the random part is.
async fn write_base_history(pool: &PgPool) {
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'Base ' || i FROM generate_series(1, 8) i;
         WITH base AS (
             SELECT id, row_number() OVER (ORDER BY id) AS n FROM accounts
             WHERE name LIKE 'Base %'
         )
         INSERT INTO leads (account_id, source, created_at)
         SELECT id, (ARRAY['web', 'referral', 'event', 'outbound', 'partner'])[1 + (n + d) % 5],
                now() - make_interval(days => d)
         FROM base, generate_series(0, 3) d;
         INSERT INTO projects (account_id, name, status, amount, closed_at)
         SELECT id, 'Base deal', 'won', 100 + m, now() - make_interval(days => 40 * m)
         FROM accounts, generate_series(0, 1) m WHERE name LIKE 'Base %';",
    )
    .execute(pool)
    .await
    .expect("write the base history");
}

async fn relayed_ids(pool: &PgPool) -> HashSet<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM crm_analytics.event_outbox_processed")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Four writers commit and roll back at random while the pipeline runs on `backend`; the
/// aggregates end exact, event_counts match the outbox, and the archive (in a folder or on
/// S3) holds exactly the relayed events.
async fn concurrent_random_workload_is_exact_and_archived(backend: Backend, at: ArchiveAt) {
    let endpoint = match at {
        ArchiveAt::Folder => None,
        ArchiveAt::S3 => match common::aws_endpoint() {
            Some(endpoint) => Some(endpoint),
            None => return,
        },
    };
    let (db, pool) = TestDb::migrated().await;
    let args = args(&db);
    let Some(queue) = test_queue(backend, &db, &args).await else {
        return db.finish(pool).await;
    };
    let archive = match &endpoint {
        None => {
            Archive::open(&args.archive.location, args.archive_layout).expect("open the archive")
        }
        Some(endpoint) => {
            let bucket = bucket_name();
            create_bucket(endpoint, &bucket).await;
            let location = format!("s3://{bucket}/archive");
            let archive = Archive::open_with(&location, args.archive_layout, &moto(endpoint))
                .expect("open the archive");
            archive.check().await.expect("the bucket exists");
            archive
        }
    };
    let handle = queue.queue.clone();
    let running: Running = match at {
        ArchiveAt::Folder => common::start_with(&db, &args, move |_| handle).await,
        ArchiveAt::S3 => {
            common::start_archiving_to(&db, &args, archive.clone(), move |_| handle).await
        }
    };
    let (writers, transactions) = backend.workload((4, 400), (4, 40));
    let total = writers as u64 * transactions;
    write_base_history(&pool).await;
    let stats = common::run_workload(&pool, writers, transactions, 7).await;
    // With 1600 transactions: more than 1000 committed, more than 50 rolled back.
    assert!(stats.committed() > total * 5 / 8, "{}", stats.committed());
    let rolled_back = stats.rolled_back.load(Ordering::Relaxed);
    assert!(rolled_back > total / 32, "{rolled_back} rolled back");
    common::drain_through(&pool, &*queue.queue, Duration::from_secs(60)).await;
    running.stop().await;

    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;

    // Every relayed event is in the archive (at least once), as JSON Lines of envelopes.
    assert_eq!(
        archived_ids(&archive).await,
        relayed_ids(&pool).await,
        "the archive holds exactly the relayed events"
    );
    drop(queue);
    db.finish(pool).await;
}

/// Every event id in a batch-layout archive, read back through object_store (the local
/// folder and S3 alike), after checking that each object is gzip JSON Lines of envelopes
/// under `events/YYYY/MM/DD/<table>/` of its events' date and table.
async fn archived_ids(archive: &Archive) -> HashSet<Uuid> {
    let bodies = common::archived_objects(archive).await;
    assert!(!bodies.is_empty(), "nothing was archived");
    let mut archived = HashSet::new();
    for (path, body) in bodies {
        assert!(path.ends_with(".jsonl.gz"), "{path}");
        let table = path.rsplit('/').nth(1).expect("a table folder").to_string();
        let mut text = String::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut text)
            .expect("gzip JSON Lines");
        for line in text.lines() {
            let envelope = Envelope::from_json(line).expect("archived lines are envelopes");
            assert!(
                envelope.event_type.starts_with(&table),
                "{path}: {}",
                envelope.event_type
            );
            let date = envelope.created_at.format("%Y/%m/%d").to_string();
            assert!(path.contains(&format!("events/{date}/{table}/")), "{path}");
            archived.insert(envelope.event_id);
        }
    }
    archived
}

/// What the workers were handed, as seen by [`Redeliver`].
#[derive(Default)]
struct Seen {
    /// Deliveries received, duplicates included.
    deliveries: AtomicU64,
    /// Deliveries per event id.
    per_event: Mutex<HashMap<Uuid, u32>>,
    /// Events whose first `done` was turned into a retry.
    sent_back: Mutex<HashSet<Uuid>>,
}

/// A real queue on which every event is delivered again after it was applied: the first
/// time a worker settles an event as done, the settlement becomes a retry without delay,
/// so the queue hands the worker again what it already applied and committed. Where the
/// queue keeps a second publish of an event, every batch is also published twice. Where
/// a committed batch cannot come back (`roll_back`: the outbox), the first settlement of
/// an event fails instead, as when a worker dies between applying a batch and committing.
struct Redeliver {
    inner: Arc<dyn Queue>,
    publish_twice: bool,
    roll_back: bool,
    seen: Arc<Seen>,
}

#[async_trait]
impl Queue for Redeliver {
    async fn publish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        self.inner.publish_messages(messages).await?;
        if self.publish_twice {
            self.inner.publish_messages(messages).await?;
        }
        Ok(())
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn needs_relay(&self) -> bool {
        self.inner.needs_relay()
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn ReceivedBatch>, QueueError> {
        let inner = self.inner.receive(max, wait).await?;
        let ids: Vec<Option<Uuid>> = inner.deliveries().iter().map(event_id).collect();
        self.seen
            .deliveries
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        {
            let mut per_event = self.seen.per_event.lock().unwrap();
            for id in ids.iter().flatten() {
                *per_event.entry(*id).or_default() += 1;
            }
        }
        Ok(Box::new(SendBack {
            inner,
            ids,
            roll_back: self.roll_back,
            seen: self.seen.clone(),
        }))
    }
    async fn depth(&self) -> Result<Depth, QueueError> {
        self.inner.depth().await
    }
    async fn is_full(&self) -> Result<bool, QueueError> {
        self.inner.is_full().await
    }
    fn shared_pool(&self) -> Option<&PgPool> {
        self.inner.shared_pool()
    }
    fn maintenance(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        self.inner.maintenance(interval, shutdown)
    }
}

/// The event id of a delivery: from the transport, else from its envelope.
fn event_id(delivery: &Delivery) -> Option<Uuid> {
    delivery
        .event_id
        .or_else(|| Envelope::from_json(&delivery.body).ok().map(|e| e.event_id))
}

/// A received batch whose first `done` of each event goes back to the queue.
struct SendBack {
    inner: Box<dyn ReceivedBatch>,
    ids: Vec<Option<Uuid>>,
    roll_back: bool,
    seen: Arc<Seen>,
}

#[async_trait]
impl ReceivedBatch for SendBack {
    fn deliveries(&self) -> &[Delivery] {
        self.inner.deliveries()
    }

    fn transaction(&mut self) -> Option<&mut sqlx::PgConnection> {
        self.inner.transaction()
    }

    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        if self.roll_back {
            let first = {
                let mut sent_back = self.seen.sent_back.lock().unwrap();
                let mut first = false;
                for &i in &settlement.done {
                    if let Some(id) = self.ids[i] {
                        first |= sent_back.insert(id);
                    }
                }
                first
            };
            if first {
                // Dropped unsettled: the batch's transaction rolls back, applied effect
                // and all, and its events come back.
                return Err(QueueError::Setting(
                    "died before the commit, on purpose".into(),
                ));
            }
            return self.inner.settle(settlement).await;
        }
        let Settlement { done, mut retry } = settlement;
        let (again, done): (Vec<usize>, Vec<usize>) = {
            let mut sent_back = self.seen.sent_back.lock().unwrap();
            done.into_iter()
                .partition(|&i| self.ids[i].is_some_and(|id| sent_back.insert(id)))
        };
        retry.extend(
            again
                .into_iter()
                .map(|i| (i, Duration::ZERO, "delivered again on purpose".to_string())),
        );
        self.inner.settle(Settlement { done, retry }).await
    }
}

/// Every event reaches a worker again after it was applied (and, where the queue keeps
/// both, as two published copies): each counts once, and the aggregates end exact.
async fn every_event_delivered_twice_counts_once(backend: Backend) {
    let (db, pool) = TestDb::migrated().await;
    let args = args(&db);
    let Some(queue) = test_queue(backend, &db, &args).await else {
        return db.finish(pool).await;
    };
    let seen = Arc::new(Seen::default());
    let redeliver = Arc::new(Redeliver {
        inner: queue.queue.clone(),
        publish_twice: backend.keeps_second_publish(),
        roll_back: !backend.redelivers_committed(),
        seen: seen.clone(),
    });
    let running = common::start_with(&db, &args, move |_| redeliver as Arc<dyn Queue>).await;
    let (writers, transactions) = backend.workload((3, 300), (3, 20));
    write_base_history(&pool).await;
    common::run_workload(&pool, writers, transactions, 11).await;
    common::drain_through(&pool, &*queue.queue, Duration::from_secs(60)).await;
    // Each event comes once per published copy, and once more after it was applied.
    let copies = if backend.keeps_second_publish() { 2 } else { 1 };
    let relayed_events = relayed_ids(&pool).await;
    let short = deliveries_short_of(&seen, &relayed_events, copies + 1);
    if short > 0 {
        // SQS counts its depth approximately (`Depth::approximate`): should it read zero
        // while a message is still due, wait for the deliveries due, then drain again.
        eprintln!("{backend:?}: the queue read empty while {short} events had deliveries due");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while deliveries_short_of(&seen, &relayed_events, copies + 1) > 0
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        common::drain_through(&pool, &*queue.queue, Duration::from_secs(30)).await;
    }
    running.stop().await;
    let (relayed, applied): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM crm_analytics.event_outbox_processed),
                (SELECT count(*) FROM crm_analytics.applied_events)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // With 900 transactions: more than 500 events.
    let total = writers as i64 * transactions as i64;
    assert!(relayed > total * 5 / 9, "{relayed} relayed");
    if backend.redelivers_committed() {
        assert_eq!(relayed, applied);
    } else {
        // The outbox's removal is the idempotency: no ledger is written on that path.
        assert_eq!(applied, 0, "the outbox as the queue writes no ledger");
    }

    // The duplicates really happened: every relayed event was delivered after it was
    // applied, and also as its second copy where the queue keeps one.
    let deliveries = seen.deliveries.load(Ordering::Relaxed);
    let per_event = seen.per_event.lock().unwrap().clone();
    let least = relayed_events
        .iter()
        .map(|id| per_event.get(id).copied().unwrap_or(0))
        .min()
        .expect("events were relayed");
    eprintln!(
        "{backend:?}: {relayed} events, {deliveries} deliveries, each delivered at least {least} times"
    );
    assert!(deliveries > relayed as u64, "{deliveries} deliveries");
    assert!(
        least > copies,
        "an event was delivered only {least} times ({copies} published)"
    );
    assert_eq!(seen.sent_back.lock().unwrap().len() as i64, relayed);

    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    drop(queue);
    db.finish(pool).await;
}

/// How many of `events` were delivered fewer than `times` times so far.
fn deliveries_short_of(seen: &Seen, events: &HashSet<Uuid>, times: u32) -> usize {
    let per_event = seen.per_event.lock().unwrap();
    events
        .iter()
        .filter(|id| per_event.get(id).copied().unwrap_or(0) < times)
        .count()
}

macro_rules! exact_on {
    ($($module:ident => $backend:expr),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[tokio::test]
            async fn concurrent_random_workload_is_exact_and_archived() {
                super::concurrent_random_workload_is_exact_and_archived($backend, ArchiveAt::Folder)
                    .await
            }

            #[tokio::test]
            async fn concurrent_random_workload_is_exact_and_archived_on_s3() {
                super::concurrent_random_workload_is_exact_and_archived($backend, ArchiveAt::S3)
                    .await
            }

            #[tokio::test]
            async fn every_event_delivered_twice_counts_once() {
                super::every_event_delivered_twice_counts_once($backend).await
            }
        }
    )*};
}

exact_on! {
    outbox => Backend::Outbox,
    postgres => Backend::Postgres,
    nats => Backend::Nats,
    sqs => Backend::Sqs,
}

/// An event a relay published and saw applied, but whose outbox row survived (the relay
/// died between the publish and its commit), then the outbox becomes the queue (an
/// upgrade): the ledger still knows the event, and it counts once.
#[tokio::test]
async fn an_event_applied_behind_a_relay_and_left_in_the_outbox_counts_once_on_the_outbox() {
    let (db, pool) = TestDb::migrated().await;
    let args = db.args();
    common::run_workload(&pool, 1, 5, 73).await;
    sqlx::raw_sql("CREATE TABLE public.outbox_copy AS SELECT * FROM crm_analytics.event_outbox")
        .execute(&pool)
        .await
        .expect("copy the outbox");
    let running = common::start(&db, &args).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exact(&pool).await;
    sqlx::raw_sql(
        "INSERT INTO crm_analytics.event_outbox SELECT * FROM public.outbox_copy LIMIT 3;
         DROP TABLE public.outbox_copy",
    )
    .execute(&pool)
    .await
    .expect("rows the relay did not get to delete");
    let running = common::start_on_outbox(&db, &args).await;
    let analytics = db.pool(4).await;
    let outbox = common::open_outbox(&analytics, false).await;
    common::drain_through(&pool, &*outbox, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}
