//! Queue: carries events from the relay to the workers, at least once.
//!
//! Owns the [`Queue`] trait every backend implements, the setting that picks one
//! ([`QueueSpec`], `CRM_ANALYTICS_QUEUE`), the [`open`] factory, and the backends themselves
//! (one module each, owning what it needs: tables, migrations, upkeep). Delivery is at least once and may duplicate; the workers make the
//! effect exactly once. Every backend is bounded, so a slow consumer slows the relay down
//! instead of filling memory.

pub mod nats;
pub mod outbox;
pub mod postgres;
mod spec;
pub mod sqs;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::event::Envelope;
use crate::migrate::MigrateError;
pub use spec::{QueueArgs, QueueSpec, SqsTarget};

/// What went wrong talking to a queue: which backend and operation, and whether trying
/// again later may succeed (a broker that is down) or not (a queue that does not exist).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the PostgreSQL queue: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("{backend} {operation} failed: {message}")]
    Broker {
        backend: &'static str,
        operation: &'static str,
        message: String,
        retryable: bool,
    },
    #[error("{0}")]
    Setting(String),
}

impl QueueError {
    /// Whether the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Postgres(error) => !matches!(
                error,
                sqlx::Error::Configuration(_) | sqlx::Error::ColumnDecode { .. }
            ),
            QueueError::Broker { retryable, .. } => *retryable,
            QueueError::Setting(_) => false,
        }
    }
}

/// One message as published: the event id (brokers de-duplicate and trace by it), the
/// event type (`<table>.<operation>`, a message attribute where the broker has them) and
/// the body, normally an [`Envelope`] as JSON.
#[derive(Debug, Clone)]
pub struct Message {
    pub event_id: Uuid,
    pub event_type: String,
    pub body: String,
}

impl From<&Envelope> for Message {
    fn from(envelope: &Envelope) -> Self {
        Message {
            event_id: envelope.event_id,
            event_type: envelope.event_type.clone(),
            body: envelope.to_json(),
        }
    }
}

/// One message as received: the raw body (decoded by the worker, so that a malformed
/// message fails alone) and how many times it was attempted before.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event id as the transport knows it, when it does.
    pub event_id: Option<Uuid>,
    pub body: String,
    /// 1 on the first delivery. The PostgreSQL queue counts failed attempts (a batch
    /// released after a transient failure does not count); brokers count deliveries.
    pub attempt: u32,
}

/// What the worker decided for each delivery of a batch, by index.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Done with: applied, skipped as duplicate, or parked in failed_events.
    pub done: Vec<usize>,
    /// To be delivered again after a delay, with the error that made it fail.
    pub retry: Vec<(usize, Duration, String)>,
}

/// A batch of deliveries leased to one worker until it is settled. Dropping it unsettled
/// gives the deliveries back to the queue (at once or when the backend's lease runs out).
#[async_trait]
pub trait ReceivedBatch: Send {
    fn deliveries(&self) -> &[Delivery];
    /// The database transaction this batch is leased under, when the batch lives in the
    /// analytics database itself (the outbox as the queue): the worker applies and parks
    /// the batch's events inside it, so that applying them and taking them off the queue
    /// commit together and no ledger is needed. None: the worker applies in transactions
    /// of its own and records every event in the ledger.
    fn transaction(&mut self) -> Option<&mut PgConnection> {
        None
    }
    /// Settles every delivery by index; a delivery left out goes back as if dropped.
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError>;
}

/// Events waiting or in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Depth {
    pub events: u64,
    /// The broker only estimates it (SQS's approximate counts).
    pub approximate: bool,
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// The backend's name for logs, status and metrics: outbox, postgres, sqs or nats.
    fn backend(&self) -> &'static str;
    /// Whether events reach this queue through the relay. The outbox as the queue needs
    /// none: its workers read the outbox themselves.
    fn needs_relay(&self) -> bool {
        true
    }
    /// Appends messages; returns once the queue acknowledged all of them. On error none
    /// or some may have been published (at least once).
    async fn publish_messages(&self, messages: &[Message]) -> Result<(), QueueError>;
    /// Appends events (see [`Queue::publish_messages`]).
    async fn publish(&self, events: &[Envelope]) -> Result<(), QueueError> {
        let messages: Vec<Message> = events.iter().map(Message::from).collect();
        self.publish_messages(&messages).await
    }
    /// Appends messages that were published before and are sent again on purpose (an
    /// operator's `failed retry`): a broker that drops re-published event ids as
    /// duplicates (NATS's duplicate window) must not drop these. Otherwise as
    /// [`Queue::publish_messages`].
    async fn republish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        self.publish_messages(messages).await
    }
    /// Appends events sent again on purpose (see [`Queue::republish_messages`]).
    async fn republish(&self, events: &[Envelope]) -> Result<(), QueueError> {
        let messages: Vec<Message> = events.iter().map(Message::from).collect();
        self.republish_messages(&messages).await
    }
    /// Leases up to `max` deliveries, waiting up to `wait` for the first to arrive (long
    /// poll); an empty batch means nothing arrived in time.
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn ReceivedBatch>, QueueError>;
    /// Events waiting or in flight, exact or estimated (see [`Depth::approximate`]).
    async fn depth(&self) -> Result<Depth, QueueError>;
    /// Whether the queue is at capacity and publishers should hold back. Called before
    /// every relay batch: a backend whose depth costs a paid call answers from a recent
    /// reading.
    async fn is_full(&self) -> Result<bool, QueueError>;
    /// Why this queue can never take `message` (it is over the broker's size limit), or
    /// None. The relay parks such an event in failed_events instead of retrying the
    /// batch that holds it forever.
    fn refuses(&self, _message: &Message) -> Option<String> {
        None
    }
    /// The PostgreSQL pool the queue takes its connections from, when it shares one with
    /// the rest of the process (the embedded queue: the analytics pool). A status read that
    /// timed out while that pool had no free connection waited for the pool, not for the
    /// queue: it is reported busy, not down. None: the queue has connections of its own.
    fn shared_pool(&self) -> Option<&PgPool> {
        None
    }
    /// The backend's own upkeep, run by every process that drains the queue (the workers)
    /// until `shutdown`: the embedded queue vacuums its table every `interval` (0: never).
    /// None: nothing to do (a broker keeps itself).
    fn maintenance(
        &self,
        _interval: Duration,
        _shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        None
    }
}

/// Settings every backend reads when it opens.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Events waiting before publishers hold back (u64::MAX: never).
    pub capacity: u64,
    /// How long a received batch stays leased before it is delivered again, unless the
    /// worker keeps it alive (brokers extend it while a batch is being applied).
    pub lease: Duration,
    /// The NATS consumer and subject (CRM_ANALYTICS_NATS_CONSUMER, _SUBJECT).
    pub nats: nats::NatsOptions,
    /// How to reach SQS beyond the standard AWS chain (the SQS backend only).
    pub sqs: sqs::SqsSettings,
    /// Whether this process receives from the queue (runs workers). Only such a process
    /// brings the broker's consumer settings in line with its lease (NATS ack wait); a
    /// relay, `status`, the API or `failed retry` use the consumer as they find it.
    pub consumes: bool,
    /// Whether a missing stream, consumer or queue is created. `status` only looks: a
    /// mistyped name must be reported, not created and shown as a healthy empty queue.
    pub creates: bool,
    /// Whether consumed outbox rows are copied to event_outbox_processed (an outbox
    /// retention is set; the outbox backend only: otherwise the relay copies them).
    pub keep_processed: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            capacity: u64::MAX,
            lease: Duration::from_secs(30),
            nats: nats::NatsOptions::default(),
            sqs: sqs::SqsSettings::default(),
            consumes: true,
            creates: true,
            keep_processed: false,
        }
    }
}

impl QueueSpec {
    /// The backend's name as [`Queue::backend`] gives it (the setting's scheme: postgres,
    /// sqs, nats), for reports about a queue that could not even be opened.
    pub fn backend_name(&self) -> String {
        let text = self.to_string();
        match text.split_once("://") {
            Some((scheme, _)) => scheme.to_string(),
            None => text,
        }
    }

    /// Whether the queue lives in the analytics database (the embedded queue), so that it
    /// is unreachable whenever that database is.
    pub fn lives_in_analytics_database(&self) -> bool {
        matches!(self, QueueSpec::Postgres | QueueSpec::Outbox)
    }
}

/// The queue a process uses: `CRM_ANALYTICS_QUEUE`, or its default
/// ([`crate::config::DatabaseArgs::queue_spec`]). A default of the outbox while the embedded
/// queue still holds events (written before an upgrade made the outbox the default, or
/// before ANALYTICS_DATABASE_URL was dropped) stays postgres until they are drained, so
/// that none of them is stranded; the next start then switches over.
pub async fn resolve(
    db: &crate::config::DatabaseArgs,
    analytics: &PgPool,
) -> Result<QueueSpec, QueueError> {
    db.check_queue().map_err(QueueError::Setting)?;
    let spec = db.queue_spec();
    if db.queue.spec.is_some() || spec != QueueSpec::Outbox {
        return Ok(spec);
    }
    Ok(match postgres::waiting_events(analytics).await? {
        0 => spec,
        waiting => {
            tracing::warn!(
                waiting,
                "the embedded queue still holds events: this process keeps to it \
                 (CRM_ANALYTICS_QUEUE=postgres, with the relay) and switches to the outbox as \
                 the queue on a start after they are drained"
            );
            QueueSpec::Postgres
        }
    })
}

/// Installs what the backends keep in the analytics database (the embedded queue's
/// table), whichever backend `CRM_ANALYTICS_QUEUE` names: the table costs nothing while
/// empty, and a database migrated once then works with any backend, including the
/// default one when a shell lacks the setting. Returns the versions applied.
pub async fn migrate(analytics: &PgPool) -> Result<Vec<i32>, MigrateError> {
    postgres::migrate(analytics).await
}

/// Fails saying to run `migrate` unless what the backend `spec` names keeps in the
/// analytics database is installed and current (nothing for a broker). `setting` names
/// where the analytics database's URL came from.
pub async fn require_installed(
    spec: &QueueSpec,
    analytics: &PgPool,
    setting: &'static str,
) -> Result<(), MigrateError> {
    match spec {
        QueueSpec::Postgres => postgres::require(analytics, setting).await?,
        // The outbox as the queue reads capture's table in the analytics database: it is
        // there only when that database is the CRM's.
        QueueSpec::Outbox => {
            let what = "the CRM's outbox (capture), which the outbox as the queue reads";
            crate::migrate::require(
                analytics,
                "capture",
                crate::capture::MIGRATIONS,
                what,
                setting,
            )
            .await?
        }
        QueueSpec::Nats(_) | QueueSpec::Sqs(_) => {}
    }
    Ok(())
}

/// Opens the queue `spec` names. The PostgreSQL queue lives in the analytics database; a
/// broker's stream or queue is created when missing.
pub async fn open(
    spec: &QueueSpec,
    analytics: &PgPool,
    options: &QueueOptions,
) -> Result<Arc<dyn Queue>, QueueError> {
    match spec {
        QueueSpec::Outbox => Ok(Arc::new(
            outbox::OutboxQueue::connect(analytics.clone(), options.lease, options.keep_processed)
                .await?,
        )),
        QueueSpec::Postgres => Ok(Arc::new(
            postgres::PostgresQueue::connect(analytics.clone(), options.capacity).await?,
        )),
        QueueSpec::Nats(spec) => Ok(Arc::new(nats::NatsQueue::open(spec, options).await?)),
        QueueSpec::Sqs(target) => Ok(Arc::new(sqs::SqsQueue::open(target, options).await?)),
    }
}
