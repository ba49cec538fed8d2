//! The outbox as the queue: when the analytics live in the CRM's database and no broker is
//! configured, the workers claim the capture's outbox rows themselves.
//!
//! Owns every statement that consumes `crm_analytics.event_outbox` on this path (the table
//! itself belongs to capture). A claim deletes up to a batch of rows with `FOR UPDATE SKIP
//! LOCKED` inside a transaction that the batch holds, and the worker applies the batch
//! inside that same transaction ([`ReceivedBatch::transaction`]): the events leave the
//! outbox exactly when their effect commits. That removal is the idempotency, so this path
//! writes no ledger, no second copy of each event and needs no relay. The transaction
//! commits without waiting for its WAL to reach the disk (`synchronous_commit = off`): a
//! server crash that loses it loses the removal with the effect, and the events are
//! applied again. Settling puts back what is retried (with its attempt counted and its
//! delay) or left out, and commits. A worker that dies rolls back and gives its rows back
//! at once; one that hangs is ended
//! by the server after the lease or [`MIN_IDLE_BOUND`], whichever is longer
//! (`idle_in_transaction_session_timeout`), so it never holds the CRM's xmin horizon long.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Delivery, Depth, Message, Queue, QueueError, ReceivedBatch, Settlement};
use crate::capture::{wake::Pacer, OUTBOX_CHANNEL};
use crate::event::Envelope;
use crate::listen::ChannelWatcher;

/// While events trickle in, the workers of a process claim one after another, at most
/// once per turn between them (see [`OutboxQueue::take_turn`]). Shorter than the
/// [`AWAKE_POLL`](crate::capture::wake::AWAKE_POLL) each worker waits after a short claim:
/// the turns spread the workers' looks over that time instead of letting them look at once.
pub const TURN: Duration = Duration::from_millis(2);

/// The table, for the vacuum loop.
const TABLE: &str = "crm_analytics.event_outbox";

/// The least time a claiming transaction may sit idle (archiving, say) before the server
/// ends it: ending it rolls the batch back, so a short lease must not cut into slow but
/// healthy batches.
pub const MIN_IDLE_BOUND: Duration = Duration::from_secs(30);

pub struct OutboxQueue {
    pool: PgPool,
    watcher: ChannelWatcher,
    /// One sleep flag per process, shared by its workers.
    pacer: Mutex<Pacer>,
    /// How long a claiming transaction may sit idle before the server ends it.
    lease: Duration,
    /// Whether consumed rows are copied to event_outbox_processed (an outbox retention).
    keep_processed: bool,
    /// Whether the last claim of this process came back full (see [`Scan`]).
    backlog: AtomicBool,
    /// While events trickle in, when this process's next claim may start (see
    /// [`OutboxQueue::take_turn`]).
    next_turn: std::sync::Mutex<Instant>,
}

/// The claim statement around a `select` of the rows to take (see [`Scan::claim_sql`]),
/// spelled out at compile time for each scan.
macro_rules! claim_sql {
    ($select:literal) => {
        concat!(
            "WITH claimed AS (
                DELETE FROM crm_analytics.event_outbox
                WHERE ctid = ANY (ARRAY(",
            $select,
            "))
                RETURNING *
             ), kept AS (
                INSERT INTO crm_analytics.event_outbox_processed
                    (event_id, event_type, aggregate_id, payload, xid, created_at, processed_at, retry_count)
                SELECT event_id, event_type, aggregate_id, payload, xid, created_at, now(), retry_count
                FROM claimed WHERE $2
             )
             SELECT event_id, event_type, aggregate_id, xid::text::int8, created_at, payload::text, retry_count
             FROM claimed"
        )
    };
}

/// How a claim finds its rows. While a backlog drains (the last claim came back full),
/// a sequential scan finds a batch within the first pages it reads, and concurrent claims
/// share one pass over the table. When fewer rows wait than a claim asks for, a
/// sequential scan reads the table to its end, including every page that earlier batches
/// emptied and vacuum has not given back (the outbox keeps the size of its largest
/// backlog, since new rows keep its last pages in use); the primary key then finds the
/// few waiting rows after walking only the entries deleted since the last vacuum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    Sequential,
    ByKey,
}

impl Scan {
    fn after(backlog: bool) -> Self {
        if backlog {
            Scan::Sequential
        } else {
            Scan::ByKey
        }
    }

    /// The claim: deletes the rows it takes, locked, up to `$1`, copies them to
    /// event_outbox_processed when `$2`, and returns them.
    fn claim_sql(self) -> &'static str {
        match self {
            Scan::Sequential => claim_sql!(
                "SELECT ctid FROM crm_analytics.event_outbox
                 WHERE processed_at IS NULL AND (available_at IS NULL OR available_at <= now())
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED"
            ),
            Scan::ByKey => claim_sql!(
                "SELECT ctid FROM crm_analytics.event_outbox
                 WHERE processed_at IS NULL AND (available_at IS NULL OR available_at <= now())
                 ORDER BY event_id
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED"
            ),
        }
    }
}

impl OutboxQueue {
    /// The outbox of the database `pool` reaches (the CRM's, which is also the analytics
    /// database). `keep_processed`: copy consumed rows to event_outbox_processed.
    pub async fn connect(
        pool: PgPool,
        lease: Duration,
        keep_processed: bool,
    ) -> Result<Self, QueueError> {
        let watcher = ChannelWatcher::start(&pool, OUTBOX_CHANNEL).await?;
        Ok(Self {
            pacer: Mutex::new(Pacer::new(pool.clone())),
            pool,
            watcher,
            lease,
            keep_processed,
            backlog: AtomicBool::new(true),
            next_turn: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// Takes up to `max` ready rows out of the outbox in a transaction the batch holds.
    async fn claim(&self, max: usize) -> Result<OutboxBatch, QueueError> {
        // Whole milliseconds: an integer, nothing from user text.
        let idle = self
            .lease
            .max(MIN_IDLE_BOUND)
            .as_millis()
            .min(i32::MAX as u128);
        let mut tx = self
            .pool
            .begin_with(format!(
                "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {idle}; SET LOCAL synchronous_commit = off"
            ))
            .await?;
        let scan = Scan::after(self.backlog.load(Ordering::Relaxed));
        let rows: Vec<ClaimedRow> = sqlx::query_as(scan.claim_sql())
            .bind(max as i64)
            .bind(self.keep_processed)
            .fetch_all(&mut *tx)
            .await?;
        self.backlog.store(rows.len() >= max, Ordering::Relaxed);
        let mut deliveries = Vec::with_capacity(rows.len());
        for (event_id, event_type, aggregate_id, xid, created_at, payload, retry_count) in rows {
            deliveries.push(Delivery {
                event_id: Some(event_id),
                body: envelope_json(
                    event_id,
                    &event_type,
                    aggregate_id,
                    xid,
                    created_at,
                    &payload,
                ),
                attempt: retry_count.max(0) as u32 + 1,
            });
        }
        Ok(OutboxBatch {
            tx: (!deliveries.is_empty()).then_some(tx),
            deliveries,
            keep_processed: self.keep_processed,
        })
    }

    /// Whether this worker may claim now; else how long until the process's next turn.
    /// While a backlog drains every worker claims at will. While events trickle in, the
    /// workers of a process take turns, one claim per [`TURN`] between them: four
    /// workers each looking every few milliseconds would each find a handful of events,
    /// and every batch costs the database a dozen statements however small it is, on the
    /// cores the CRM's own writes need. Taking turns makes fewer, larger batches for the
    /// same wait.
    fn take_turn(&self) -> Option<Duration> {
        if self.backlog.load(Ordering::Relaxed) {
            return None;
        }
        // Nothing can leave the instant half-written.
        let mut next = self
            .next_turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if *next <= now {
            *next = now + TURN;
            None
        } else {
            Some(*next - now)
        }
    }

    /// How long to wait after a claim of `claimed` out of `max` (see [`Pacer`]), at most `wait`.
    async fn pace(
        &self,
        claimed: usize,
        max: usize,
        wait: Duration,
    ) -> Result<Duration, QueueError> {
        let mut pacer = self.pacer.lock().await;
        Ok(pacer.after_claim(claimed, max, wait).await?.min(wait))
    }
}

/// The envelope of an outbox row as JSON, written around the payload's text as PostgreSQL
/// gave it (valid JSON: it comes from a jsonb column), without parsing it here: the worker
/// parses each delivery once, as it does a broker's. Equal to [`Envelope::to_json`] (a
/// unit test holds them together).
fn envelope_json(
    event_id: Uuid,
    event_type: &str,
    aggregate_id: Option<Uuid>,
    xid: i64,
    created_at: DateTime<Utc>,
    payload: &str,
) -> String {
    // Serializing a string, an id or a time cannot fail.
    fn json<T: serde::Serialize>(value: &T) -> String {
        serde_json::to_string(value).unwrap_or_default()
    }
    format!(
        "{{\"event_id\":{},\"event_type\":{},\"aggregate_id\":{},\"xid\":{},\"created_at\":{},\"payload\":{}}}",
        json(&event_id),
        json(&event_type),
        json(&aggregate_id),
        xid as u64,
        json(&created_at),
        payload
    )
}

/// An outbox row as claimed: id, type, aggregate, xid, creation time, payload, attempts.
type ClaimedRow = (Uuid, String, Option<Uuid>, i64, DateTime<Utc>, String, i32);

/// The outbox columns of some events, one array each, as the inserts bind them.
struct Columns<'a> {
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    aggregates: Vec<Option<Uuid>>,
    payloads: Vec<&'a str>,
    /// As text: xid8 has no array binding of its own.
    xids: Vec<String>,
    created: Vec<DateTime<Utc>>,
}

impl<'a> Columns<'a> {
    /// Binds the six columns, in order, as the next parameters of `query`.
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.aggregates)
            .bind(&self.payloads)
            .bind(&self.xids)
            .bind(&self.created)
    }

    fn of(events: &'a [Envelope]) -> Self {
        Self {
            ids: events.iter().map(|e| e.event_id).collect(),
            types: events.iter().map(|e| e.event_type.as_str()).collect(),
            aggregates: events.iter().map(|e| e.aggregate_id).collect(),
            payloads: events.iter().map(|e| e.payload.get()).collect(),
            xids: events.iter().map(|e| e.xid.to_string()).collect(),
            created: events.iter().map(|e| e.created_at).collect(),
        }
    }
}

/// Appends events to the outbox on `conn` (in the caller's transaction, if any) and wakes
/// the workers when it commits. An event already there stays once. Used to put parked
/// events back (`failed retry`) on this path: in the same transaction that releases them
/// from failed_events, so that an event is parked or waiting, never both.
pub async fn insert(conn: &mut PgConnection, events: &[Envelope]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let columns = Columns::of(events);
    columns.bind(sqlx::query(
        "WITH inserted AS (
            INSERT INTO crm_analytics.event_outbox (event_id, event_type, aggregate_id, payload, xid, created_at)
            SELECT i, t, a, p::jsonb, x::xid8, c
            FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
                AS u(i, t, a, p, x, c)
            ON CONFLICT (event_id) DO NOTHING
            RETURNING 1
         )
         SELECT pg_notify($7, '') FROM (SELECT count(*) FROM inserted) n",
    ))
    .bind(OUTBOX_CHANNEL)
    .execute(conn)
    .await?;
    Ok(())
}

/// The envelopes `messages` carry; the outbox holds nothing else.
fn envelopes(messages: &[Message]) -> Result<Vec<Envelope>, QueueError> {
    messages
        .iter()
        .map(|message| {
            Envelope::from_json(&message.body).map_err(|error| {
                QueueError::Setting(format!(
                    "message {} is not an event ({error}): the outbox carries only events",
                    message.event_id
                ))
            })
        })
        .collect()
}

#[async_trait]
impl Queue for OutboxQueue {
    fn backend(&self) -> &'static str {
        "outbox"
    }

    fn needs_relay(&self) -> bool {
        false
    }

    async fn publish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        let events = envelopes(messages)?;
        let mut conn = self.pool.acquire().await?;
        insert(&mut conn, &events).await?;
        Ok(())
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn ReceivedBatch>, QueueError> {
        // Claims until something is there or `wait` has passed, as often as the pacer says
        // (every few milliseconds while events flow, else on a notification). The epoch is
        // read before looking, so a notification in between is not missed.
        let deadline = Instant::now() + wait;
        loop {
            let epoch = self.watcher.epoch();
            if let Some(turn) = self.take_turn() {
                // Then the turn is asked for again, also after a notification (the flag
                // was up): every waiting worker wakes on it, and one of them claims. Only
                // when `wait` is over does a worker claim out of turn, to return.
                let left = deadline.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    self.watcher.wait(epoch, turn.min(left)).await;
                    continue;
                }
            }
            let batch = self.claim(max).await?;
            let pause = self.pace(batch.deliveries.len(), max, wait).await?;
            let now = Instant::now();
            if !batch.deliveries.is_empty() || now >= deadline {
                return Ok(Box::new(batch));
            }
            if !pause.is_zero() {
                self.watcher.wait(epoch, pause.min(deadline - now)).await;
            }
        }
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        // The outbox lag, read as `status` reads it: exact up to a bound, then estimated,
        // so that a large backlog does not make every health check scan the outbox.
        let lag = crate::status::read_crm(&self.pool).await?;
        Ok(Depth {
            events: lag.events,
            approximate: lag.estimated,
        })
    }

    async fn is_full(&self) -> Result<bool, QueueError> {
        // The CRM's writers are never held back: the outbox takes whatever they commit.
        Ok(false)
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
}

struct OutboxBatch {
    /// Holds the claimed rows (deleted, not yet committed); None for an empty batch.
    tx: Option<Transaction<'static, Postgres>>,
    deliveries: Vec<Delivery>,
    keep_processed: bool,
}

#[async_trait]
impl ReceivedBatch for OutboxBatch {
    fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    fn transaction(&mut self) -> Option<&mut PgConnection> {
        self.tx.as_deref_mut()
    }

    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        let Some(mut tx) = self.tx.take() else {
            return Ok(());
        };
        // Done rows stay deleted. The others go back: retried ones with the attempt counted
        // and their delay, the rest as they were.
        let mut back: Vec<(usize, Option<(Duration, String)>)> = settlement
            .retry
            .into_iter()
            .map(|(i, delay, error)| (i, Some((delay, error))))
            .collect();
        let mut settled = vec![false; self.deliveries.len()];
        for &i in settlement.done.iter() {
            settled[i] = true;
        }
        for &(i, _) in &back {
            settled[i] = true;
        }
        back.extend(
            settled
                .iter()
                .enumerate()
                .filter(|(_, done)| !**done)
                .map(|(i, _)| (i, None)),
        );
        if !back.is_empty() {
            put_back(&mut tx, &self.deliveries, &back, self.keep_processed).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Puts claimed rows back into the outbox, inside the claiming transaction.
async fn put_back(
    tx: &mut PgConnection,
    deliveries: &[Delivery],
    back: &[(usize, Option<(Duration, String)>)],
    keep_processed: bool,
) -> Result<(), QueueError> {
    let mut events = Vec::with_capacity(back.len());
    let (mut attempts, mut delays, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for (i, retry) in back {
        let delivery = &deliveries[*i];
        // Built by `claim`, so it parses.
        let envelope = Envelope::from_json(&delivery.body)
            .map_err(|error| QueueError::Setting(format!("a claimed event: {error}")))?;
        let failed = i32::from(retry.is_some());
        attempts.push(delivery.attempt.saturating_sub(1) as i32 + failed);
        delays.push(retry.as_ref().map(|(delay, _)| delay.as_millis() as i64));
        errors.push(retry.as_ref().map(|(_, error)| error.clone()));
        events.push(envelope);
    }
    let columns = Columns::of(&events);
    columns.bind(sqlx::query(
        "INSERT INTO crm_analytics.event_outbox
            (event_id, event_type, aggregate_id, payload, xid, created_at, retry_count, available_at, last_error)
         SELECT i, t, a, p::jsonb, x::xid8, c, n,
                clock_timestamp() + d * interval '1 millisecond', e
         FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                     $6::timestamptz[], $7::int4[], $8::int8[], $9::text[])
            AS u(i, t, a, p, x, c, n, d, e)",
    ))
    .bind(&attempts)
    .bind(&delays)
    .bind(&errors)
    .execute(&mut *tx)
    .await?;
    if keep_processed {
        // Not consumed after all: their copies made at the claim go too.
        sqlx::query(
            "DELETE FROM crm_analytics.event_outbox_processed
             WHERE event_id = ANY($1) AND processed_at = now()",
        )
        .bind(&columns.ids)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_row_reads_as_the_envelope_a_relay_would_publish() {
        let envelope = Envelope {
            event_id: Uuid::new_v4(),
            event_type: "leads.update \"quoted\"".into(),
            aggregate_id: Some(Uuid::new_v4()),
            xid: 12_345,
            created_at: Utc::now(),
            payload: serde_json::value::RawValue::from_string(
                r#"{"old": null, "new": {"id": 1}}"#.into(),
            )
            .expect("JSON"),
        };
        let written = envelope_json(
            envelope.event_id,
            &envelope.event_type,
            envelope.aggregate_id,
            envelope.xid as i64,
            envelope.created_at,
            envelope.payload.get(),
        );
        assert_eq!(written, envelope.to_json());
        let none = envelope_json(envelope.event_id, "x", None, 1, envelope.created_at, "{}");
        let read = Envelope::from_json(&none).expect("an envelope");
        assert_eq!(read.aggregate_id, None);
    }
}
