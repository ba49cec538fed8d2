//! Failed events: parking poison events after their last attempt, and the operator's
//! `failed list` / `failed retry`. Parking and the `failed` count in event_counts change
//! in one transaction, so `failed` always equals the events parked.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::aggregates::{apply::write_deltas, delta::Deltas};
use crate::event::{parse_event_type, Envelope};
use crate::queue::Queue;

/// An event to park, as much of it as could be read.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_id: Option<Uuid>,
    pub xid: Option<u64>,
    pub created_at: Option<DateTime<Utc>>,
    /// The payload as JSON text, when the message was an event at all.
    pub payload: Option<String>,
    /// The message as received, when it was not.
    pub raw_message: Option<String>,
    pub error_message: String,
    pub retry_count: u32,
}

impl DeadLetter {
    pub fn from_envelope(envelope: &Envelope, error: String, attempts: u32) -> Self {
        Self {
            event_id: envelope.event_id,
            event_type: envelope.event_type.clone(),
            aggregate_id: envelope.aggregate_id,
            xid: Some(envelope.xid),
            created_at: Some(envelope.created_at),
            payload: Some(envelope.payload.get().to_string()),
            raw_message: None,
            error_message: error,
            retry_count: attempts,
        }
    }

    pub fn from_raw(event_id: Option<Uuid>, body: &str, error: String, attempts: u32) -> Self {
        Self {
            event_id: event_id.unwrap_or_else(Uuid::new_v4),
            event_type: "unknown".into(),
            aggregate_id: None,
            xid: None,
            created_at: None,
            payload: None,
            raw_message: Some(body.to_string()),
            error_message: error,
            retry_count: attempts,
        }
    }
}

/// Counts parked (sign 1) or released (sign -1) events in event_counts.failed.
fn count_failed(
    deltas: &mut Deltas,
    event_type: &str,
    created_at: Option<DateTime<Utc>>,
    sign: i64,
) {
    if let (Some((table, operation)), Some(at)) = (parse_event_type(event_type), created_at) {
        deltas
            .counts
            .entry((at.date_naive(), table, operation))
            .or_default()
            .failed += sign;
    }
}

/// Parks `letters` in failed_events (an event already parked stays parked once).
pub async fn park(pool: &PgPool, letters: &[DeadLetter]) -> Result<usize, sqlx::Error> {
    if letters.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let parked = park_in(&mut tx, letters).await?;
    tx.commit().await?;
    Ok(parked)
}

/// [`park`] inside a transaction the caller commits (the outbox as the queue parks in the
/// transaction that removes the event from the outbox).
pub async fn park_in(tx: &mut PgConnection, letters: &[DeadLetter]) -> Result<usize, sqlx::Error> {
    let ids: Vec<Uuid> = letters.iter().map(|l| l.event_id).collect();
    let types: Vec<&str> = letters.iter().map(|l| l.event_type.as_str()).collect();
    let aggregates: Vec<Option<Uuid>> = letters.iter().map(|l| l.aggregate_id).collect();
    let xids: Vec<Option<i64>> = letters.iter().map(|l| l.xid.map(|x| x as i64)).collect();
    let created: Vec<Option<DateTime<Utc>>> = letters.iter().map(|l| l.created_at).collect();
    let payloads: Vec<Option<&str>> = letters.iter().map(|l| l.payload.as_deref()).collect();
    let raws: Vec<Option<&str>> = letters.iter().map(|l| l.raw_message.as_deref()).collect();
    let errors: Vec<&str> = letters.iter().map(|l| l.error_message.as_str()).collect();
    let retries: Vec<i32> = letters.iter().map(|l| l.retry_count as i32).collect();
    let parked: Vec<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "INSERT INTO crm_analytics.failed_events
            (event_id, event_type, aggregate_id, xid, created_at, payload, raw_message, error_message, retry_count)
         SELECT id, t, a, x, c, p::jsonb, r, e, n
         FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::int8[], $5::timestamptz[],
                     $6::text[], $7::text[], $8::text[], $9::int4[]) AS u(id, t, a, x, c, p, r, e, n)
         ON CONFLICT (event_id) DO NOTHING
         RETURNING event_type, created_at",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&aggregates)
    .bind(&xids)
    .bind(&created)
    .bind(&payloads)
    .bind(&raws)
    .bind(&errors)
    .bind(&retries)
    .fetch_all(&mut *tx)
    .await?;
    let mut deltas = Deltas::default();
    for (event_type, created_at) in &parked {
        count_failed(&mut deltas, event_type, *created_at, 1);
    }
    write_deltas(tx, &deltas).await?;
    Ok(parked.len())
}

/// A parked event as `failed list` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct FailedEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_id: Option<Uuid>,
    pub created_at: Option<DateTime<Utc>>,
    pub error_message: String,
    pub retry_count: i32,
    pub failed_at: DateTime<Utc>,
    pub payload: Option<serde_json::Value>,
}

pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<FailedEvent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, event_type, aggregate_id, created_at, error_message, retry_count,
                failed_at, payload
         FROM crm_analytics.failed_events ORDER BY failed_at, event_id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Which parked events to replay.
pub enum Selection {
    All,
    Ids(Vec<Uuid>),
}

#[derive(Debug, Default)]
pub struct RetryReport {
    pub requeued: usize,
    /// Parked messages that were not events at all: they cannot be replayed.
    pub not_events: Vec<Uuid>,
}

/// Puts parked events back on the queue with fresh attempts, and releases their `failed`
/// count. The payload is taken from failed_events, so an operator may correct it first.
pub async fn retry(
    pool: &PgPool,
    queue: &dyn Queue,
    selection: Selection,
) -> anyhow::Result<RetryReport> {
    let mut tx = pool.begin().await?;
    let ids: Option<Vec<Uuid>> = match selection {
        Selection::All => None,
        Selection::Ids(ids) => Some(ids),
    };
    type Row = (
        Uuid,
        String,
        Option<Uuid>,
        Option<i64>,
        Option<DateTime<Utc>>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "DELETE FROM crm_analytics.failed_events
         WHERE ($1::uuid[] IS NULL OR event_id = ANY($1)) AND payload IS NOT NULL
         RETURNING event_id, event_type, aggregate_id, xid, created_at, payload::text",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    // Remembered until a worker applies them (replay leaves them out meanwhile).
    let retried: Vec<Uuid> = rows.iter().map(|row| row.0).collect();
    sqlx::query(
        "INSERT INTO crm_analytics.retried_events (event_id) SELECT unnest($1::uuid[])
         ON CONFLICT (event_id) DO UPDATE SET retried_at = excluded.retried_at",
    )
    .bind(&retried)
    .execute(&mut *tx)
    .await?;
    let not_events: Vec<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM crm_analytics.failed_events
         WHERE ($1::uuid[] IS NULL OR event_id = ANY($1)) AND payload IS NULL",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut deltas = Deltas::default();
    let mut envelopes = Vec::with_capacity(rows.len());
    for (event_id, event_type, aggregate_id, xid, created_at, payload) in rows {
        count_failed(&mut deltas, &event_type, created_at, -1);
        let payload = RawValue::from_string(payload.unwrap_or_else(|| "null".into()))?;
        envelopes.push(Envelope {
            event_id,
            event_type,
            aggregate_id,
            xid: xid.unwrap_or(0) as u64,
            created_at: created_at.unwrap_or_else(Utc::now),
            payload,
        });
    }
    write_deltas(&mut tx, &deltas).await?;
    if queue.backend() == "outbox" {
        // The outbox is in this database: back in it in the same transaction, so that the
        // event is parked or waiting, never both (this path keeps no ledger).
        crate::queue::outbox::insert(&mut tx, &envelopes).await?;
    } else {
        // Published before the commit: if the commit fails the event is both queued and
        // still parked, never lost; the idempotency ledger absorbs a second application.
        queue.republish(&envelopes).await?;
    }
    tx.commit().await?;
    Ok(RetryReport {
        requeued: envelopes.len(),
        not_events,
    })
}
