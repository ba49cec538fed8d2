//! Relay: moves committed events from the CRM's outbox to the queue, in batches.
//!
//! Owns claiming (`FOR UPDATE SKIP LOCKED`, so several relays never double the work),
//! publishing, and removing the claimed rows in the same CRM transaction. It wakes on the
//! capture triggers' NOTIFY and polls as a safety net. If publishing succeeds but the commit
//! does not, the events are published again later: at least once, never lost.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::capture::OUTBOX_CHANNEL;
use crate::event::Envelope;
use crate::listen::ChannelWatcher;
use crate::queue::Queue;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub batch_size: usize,
    pub poll_interval: Duration,
    /// Keep relayed rows in event_outbox_processed (pruned by maintenance) when non-zero.
    pub outbox_retention: Duration,
}

/// An outbox row as claimed: id, type, aggregate, xid, creation time, payload text.
type OutboxRow = (Uuid, String, Option<Uuid>, i64, DateTime<Utc>, String);

/// Claims up to `batch_size` outbox rows, publishes them, removes them. Returns how many.
pub async fn relay_once(
    crm: &PgPool,
    queue: &dyn Queue,
    config: &RelayConfig,
) -> anyhow::Result<usize> {
    let mut tx = crm.begin().await?;
    // Claim by ctid: the locked rows cannot move, and a TID scan needs no index.
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "WITH claimed AS (
            DELETE FROM crm_analytics.event_outbox
            WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM crm_analytics.event_outbox
                WHERE processed_at IS NULL
                LIMIT $1
                FOR UPDATE SKIP LOCKED))
            RETURNING *
         ), kept AS (
            INSERT INTO crm_analytics.event_outbox_processed
                (event_id, event_type, aggregate_id, payload, xid, created_at, processed_at, retry_count)
            SELECT event_id, event_type, aggregate_id, payload, xid, created_at, now(), retry_count
            FROM claimed WHERE $2
         )
         SELECT event_id, event_type, aggregate_id, xid::text::int8, created_at, payload::text
         FROM claimed",
    )
    .bind(config.batch_size as i64)
    .bind(!config.outbox_retention.is_zero())
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut envelopes = Vec::with_capacity(rows.len());
    for (event_id, event_type, aggregate_id, xid, created_at, payload) in rows {
        envelopes.push(Envelope {
            event_id,
            event_type,
            aggregate_id,
            xid: xid as u64,
            created_at,
            payload: RawValue::from_string(payload)?,
        });
    }
    if let Err(error) = queue.publish(&envelopes).await {
        drop(tx); // rolls back: the rows stay in the outbox
        let ids: Vec<Uuid> = envelopes.iter().map(|e| e.event_id).collect();
        let _ = sqlx::query(
            "UPDATE crm_analytics.event_outbox SET retry_count = retry_count + 1
             WHERE event_id = ANY($1)",
        )
        .bind(&ids)
        .execute(crm)
        .await;
        return Err(error.into());
    }
    tx.commit().await?;
    crate::telemetry::metrics::events_relayed(envelopes.len());
    Ok(envelopes.len())
}

/// Relays until `shutdown` is cancelled; a batch under way finishes first.
pub async fn run(
    crm: PgPool,
    queue: Arc<dyn Queue>,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let watcher = ChannelWatcher::start(&crm, OUTBOX_CHANNEL).await?;
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        match queue.is_full().await {
            Ok(true) => {
                // Backpressure: the workers are behind; let them catch up.
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot read the queue's depth"),
        }
        let epoch = watcher.epoch();
        match relay_once(&crm, &*queue, &config).await {
            Ok(n) if n >= config.batch_size => failures = 0,
            Ok(_) => {
                failures = 0;
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = watcher.wait(epoch, config.poll_interval) => {}
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let pause = crate::worker::backoff(Duration::from_millis(200), failures);
                tracing::warn!(%error, pause_ms = pause.as_millis() as u64, "relay failed; will retry");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    Ok(())
}
