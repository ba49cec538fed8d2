//! The embedded queue backend: a table in the analytics database, nothing else to install.
//!
//! Owns its table `crm_analytics.queue`: the migrations that create it (component
//! [`COMPONENT`], applied by `crm-analytics migrate`), its upkeep (a vacuum loop the
//! workers run through [`Queue::maintenance`]) and every statement that reads or writes it.
//!
//! Receiving locks rows with `FOR UPDATE SKIP LOCKED` inside a transaction held by the
//! batch: concurrent workers never see the same row, and a worker that dies releases its
//! rows by rolling back. Settling deletes what is done and reschedules what is retried.

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::{PgPool, Postgres, Transaction};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Delivery, Depth, Message, Queue, QueueError, ReceivedBatch, Settlement};
use crate::listen::ChannelWatcher;
use crate::migrate::{MigrateError, Migration};

pub const QUEUE_CHANNEL: &str = "crm_analytics_queue";

/// The table, for the vacuum loop.
const TABLE: &str = "crm_analytics.queue";

/// The embedded queue's migrations, bookkept under their own component.
pub const COMPONENT: &str = "postgres_queue";

/// Migrations of the embedded queue, in the analytics database (component [`COMPONENT`]).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "the embedded queue's table",
    sql: include_str!("sql/001_queue.sql"),
}];

/// Creates or upgrades the queue's table in the analytics database.
pub async fn migrate(analytics: &PgPool) -> Result<Vec<i32>, MigrateError> {
    crate::migrate::apply(analytics, COMPONENT, MIGRATIONS).await
}

/// Fails saying to run `migrate` unless the queue's table is installed and current.
/// `setting` names where the analytics database's URL came from.
pub async fn require(analytics: &PgPool, setting: &'static str) -> Result<(), MigrateError> {
    let what = "the embedded queue (CRM_ANALYTICS_QUEUE=postgres)";
    crate::migrate::require(analytics, COMPONENT, MIGRATIONS, what, setting).await
}

/// Events in the embedded queue's table (0 when it is not installed).
pub async fn waiting_events(analytics: &PgPool) -> Result<i64, sqlx::Error> {
    let installed: bool =
        sqlx::query_scalar("SELECT to_regclass('crm_analytics.queue') IS NOT NULL")
            .fetch_one(analytics)
            .await?;
    if !installed {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT count(*) FROM (SELECT 1 FROM crm_analytics.queue LIMIT 1000000) q")
        .fetch_one(analytics)
        .await
}

pub struct PostgresQueue {
    pool: PgPool,
    capacity: u64,
    watcher: ChannelWatcher,
}

impl PostgresQueue {
    /// `capacity` bounds the events waiting in the table before publishers hold back.
    pub async fn connect(pool: PgPool, capacity: u64) -> Result<Self, QueueError> {
        let watcher = ChannelWatcher::start(&pool, QUEUE_CHANNEL).await?;
        Ok(Self {
            pool,
            capacity,
            watcher,
        })
    }

    /// Locks up to `max` ready rows in a transaction the batch holds until it is settled.
    async fn claim(&self, max: usize) -> Result<PostgresBatch, QueueError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, Uuid, String, i32)> = sqlx::query_as(
            "SELECT id, event_id, body, attempts FROM crm_analytics.queue
             WHERE available_at <= now()
             ORDER BY id
             LIMIT $1
             FOR UPDATE SKIP LOCKED",
        )
        .bind(max as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut deliveries = Vec::with_capacity(rows.len());
        for (id, event_id, body, attempts) in rows {
            ids.push(id);
            deliveries.push(Delivery {
                event_id: Some(event_id),
                body,
                attempt: attempts.max(0) as u32 + 1,
            });
        }
        Ok(PostgresBatch {
            tx,
            ids,
            deliveries,
        })
    }
}

#[async_trait]
impl Queue for PostgresQueue {
    async fn publish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = messages.iter().map(|m| m.event_id).collect();
        let bodies: Vec<&str> = messages.iter().map(|m| m.body.as_str()).collect();
        // One statement: insert the batch and wake the workers when it commits.
        sqlx::query(
            "WITH inserted AS (
                INSERT INTO crm_analytics.queue (event_id, body)
                SELECT * FROM unnest($1::uuid[], $2::text[])
                RETURNING 1
             )
             SELECT pg_notify($3, '') FROM (SELECT count(*) FROM inserted) n",
        )
        .bind(&ids)
        .bind(&bodies)
        .bind(QUEUE_CHANNEL)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn shared_pool(&self) -> Option<&PgPool> {
        Some(&self.pool)
    }

    fn maintenance(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        Some(crate::maintenance::queue_table_vacuum(
            &self.pool,
            &[TABLE],
            interval,
            shutdown,
        ))
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn ReceivedBatch>, QueueError> {
        // Look, and if nothing is there wait for a notification (or the timeout) and look
        // once more: the epoch is read first, so a publish in between is not missed.
        let epoch = self.watcher.epoch();
        let batch = self.claim(max).await?;
        if !batch.deliveries.is_empty() || wait.is_zero() {
            return Ok(Box::new(batch));
        }
        drop(batch);
        self.watcher.wait(epoch, wait).await;
        Ok(Box::new(self.claim(max).await?))
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.queue")
            .fetch_one(&self.pool)
            .await?;
        Ok(Depth {
            events: n as u64,
            approximate: false,
        })
    }

    async fn is_full(&self) -> Result<bool, QueueError> {
        // Two index probes instead of a count: the id span bounds the rows from above.
        let span: Option<i64> =
            sqlx::query_scalar("SELECT max(id) - min(id) + 1 FROM crm_analytics.queue")
                .fetch_one(&self.pool)
                .await?;
        if (span.unwrap_or(0) as u64) < self.capacity {
            return Ok(false);
        }
        // The span also counts the ids between: one old row waiting out a long retry delay
        // would make a near-empty queue look full. Confirmed by counting, at most up to the
        // capacity, only when the span says full.
        let rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM crm_analytics.queue LIMIT $1) AS held",
        )
        .bind(i64::try_from(self.capacity).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await?;
        Ok(rows as u64 >= self.capacity)
    }
}

struct PostgresBatch {
    tx: Transaction<'static, Postgres>,
    ids: Vec<i64>,
    deliveries: Vec<Delivery>,
}

#[async_trait]
impl ReceivedBatch for PostgresBatch {
    fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let done: Vec<i64> = settlement.done.iter().map(|&i| self.ids[i]).collect();
        if !done.is_empty() {
            sqlx::query("DELETE FROM crm_analytics.queue WHERE id = ANY($1)")
                .bind(&done)
                .execute(&mut *self.tx)
                .await?;
        }
        if !settlement.retry.is_empty() {
            let mut ids = Vec::with_capacity(settlement.retry.len());
            let mut delays = Vec::with_capacity(settlement.retry.len());
            let mut errors = Vec::with_capacity(settlement.retry.len());
            for (i, delay, error) in settlement.retry {
                ids.push(self.ids[i]);
                delays.push(delay.as_millis() as i64);
                errors.push(error);
            }
            sqlx::query(
                "UPDATE crm_analytics.queue q
                 SET attempts = q.attempts + 1,
                     available_at = now() + r.delay_ms * interval '1 millisecond',
                     last_error = r.error
                 FROM unnest($1::int8[], $2::int8[], $3::text[]) AS r(id, delay_ms, error)
                 WHERE q.id = r.id",
            )
            .bind(&ids)
            .bind(&delays)
            .bind(&errors)
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}
