//! Relay: moves committed events from the CRM's outbox to the queue, in batches.
//!
//! Owns claiming (`FOR UPDATE SKIP LOCKED`, so several relays never double the work),
//! publishing, and removing the claimed rows in the same CRM transaction. While events flow
//! it polls every few milliseconds; idle, it sleeps until the capture triggers' NOTIFY, with
//! a slow poll as the safety net. If publishing succeeds but the commit
//! does not, the events are published again later: at least once, never lost.
//! The claiming transaction is bounded in time (statement and idle-in-transaction timeouts
//! on the CRM side, a publish timeout here), so a hanging queue never holds the CRM's xmin.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::capture::{wake::Pacer, OUTBOX_CHANNEL};
use crate::event::Envelope;
use crate::listen::ChannelWatcher;
use crate::queue::{Message, Queue};
use crate::worker::failed::DeadLetter;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Concurrent relay loops (they never claim the same rows: SKIP LOCKED).
    pub loops: usize,
    pub batch_size: usize,
    pub poll_interval: Duration,
    /// Keep relayed rows in event_outbox_processed (pruned by maintenance) when non-zero.
    pub outbox_retention: Duration,
    /// Longest a claiming transaction may wait on one step (claim, publish, commit); zero:
    /// unbounded. It holds back the CRM's xmin horizon while it is open.
    pub timeout: Duration,
    /// Events older than this when relayed may have been published before by a relay that
    /// died before its commit, and applied long ago: their ledger entries (if any) are
    /// renewed as they are published again, so that the copies now in the queue are still
    /// recognised when they arrive, even after CRM_ANALYTICS_DEDUP_RETENTION. Half the
    /// retention by default.
    pub renew_ledger_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("publishing {events} events took longer than {timeout:?} (CRM_ANALYTICS_RELAY_TIMEOUT); the claim is rolled back and the events stay in the outbox")]
    PublishTimeout { events: usize, timeout: Duration },
}

/// Opens the claiming transaction with the CRM-side bounds in the same round trip:
/// a statement that hangs is cancelled, and a session left idle inside the transaction
/// (a publish or a process that hangs) is ended by the server, which rolls it back.
/// With no bound (0s) the session's own settings stay as the server's configuration has
/// them: 0 in a `SET` would switch a bound a DBA gave the role off instead.
fn begin_statement(timeout: Duration) -> String {
    if timeout.is_zero() {
        return "BEGIN".to_string();
    }
    // Whole milliseconds, at least 1 (0 means "no bound" to PostgreSQL); an integer, so
    // nothing here comes from user text.
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    // The idle bound is the backstop for a relay that hangs; the relay's own publish timeout
    // (counted from the same moment, the claim) comes first, so that a publish outliving
    // the bound is always seen as one and the relay shrinks its batch.
    let idle = (ms + IDLE_BOUND_MARGIN.as_millis()).min(i32::MAX as u128);
    format!(
        "BEGIN; SET LOCAL statement_timeout = {ms}; \
         SET LOCAL idle_in_transaction_session_timeout = {idle}"
    )
}

/// How much later than the relay's own publish timeout the server ends a claiming session
/// left idle.
const IDLE_BOUND_MARGIN: Duration = Duration::from_secs(1);

/// An outbox row as claimed: id, type, aggregate, xid, creation time, payload text.
type OutboxRow = (Uuid, String, Option<Uuid>, i64, DateTime<Utc>, String);

/// Claims up to `batch_size` outbox rows, publishes them, removes them. Returns how many.
/// An event the queue can never take (over a broker's size limit) is parked in the
/// failed_events of `analytics` instead, so that it does not hold back the rest.
pub async fn relay_once(
    crm: &PgPool,
    analytics: &PgPool,
    queue: &dyn Queue,
    config: &RelayConfig,
) -> anyhow::Result<usize> {
    let mut tx = crm.begin_with(begin_statement(config.timeout)).await?;
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
    // From the claim on, as the server's idle bound counts.
    let deadline = tokio::time::Instant::now() + config.timeout;
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
    let (messages, refused) = sendable(queue, &envelopes);
    if !refused.is_empty() {
        // Parked before the claim commits: if the publish below fails, the rows stay in
        // the outbox and are parked again next time, which keeps one row (ON CONFLICT).
        let parked = crate::worker::failed::park(analytics, &refused).await?;
        crate::telemetry::metrics::events_parked(parked);
        for letter in &refused {
            tracing::warn!(event_id = %letter.event_id, event_type = letter.event_type, error = letter.error_message, "event parked in failed_events: the queue cannot take it");
        }
    }
    let publish = queue.publish_messages(&messages);
    let published = if config.timeout.is_zero() {
        publish.await.map_err(anyhow::Error::from)
    } else {
        match tokio::time::timeout_at(deadline, publish).await {
            Ok(result) => result.map_err(anyhow::Error::from),
            Err(_) => Err(RelayError::PublishTimeout {
                events: messages.len(),
                timeout: config.timeout,
            }
            .into()),
        }
    };
    if let Err(error) = published {
        drop(tx); // rolls back: the rows stay in the outbox
        let ids: Vec<Uuid> = envelopes.iter().map(|e| e.event_id).collect();
        let _ = sqlx::query(
            "UPDATE crm_analytics.event_outbox SET retry_count = retry_count + 1
             WHERE event_id = ANY($1)",
        )
        .bind(&ids)
        .execute(crm)
        .await;
        return Err(error);
    }
    renew_ledger(analytics, &envelopes, config.renew_ledger_after).await?;
    tx.commit().await?;
    crate::telemetry::metrics::events_relayed(envelopes.len());
    Ok(envelopes.len())
}

/// Renews the ledger entries of the old events of a published batch (see
/// [`RelayConfig::renew_ledger_after`]). Ordinary batches hold only recent events and cost
/// nothing here. Before the claim commits: should this fail, the events stay in the outbox.
async fn renew_ledger(
    analytics: &PgPool,
    envelopes: &[Envelope],
    after: Duration,
) -> Result<(), sqlx::Error> {
    let horizon = chrono::Duration::from_std(after)
        .ok()
        .and_then(|after| Utc::now().checked_sub_signed(after));
    let Some(horizon) = horizon else {
        return Ok(()); // further back than any event
    };
    let old: Vec<Uuid> = envelopes
        .iter()
        .filter(|e| e.created_at < horizon)
        .map(|e| e.event_id)
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE crm_analytics.applied_events SET applied_at = now() WHERE event_id = ANY($1)",
    )
    .bind(&old)
    .execute(analytics)
    .await?;
    Ok(())
}

/// The claimed events as messages the queue takes, and those it never can (to park).
fn sendable(queue: &dyn Queue, envelopes: &[Envelope]) -> (Vec<Message>, Vec<DeadLetter>) {
    let mut messages = Vec::with_capacity(envelopes.len());
    let mut refused = Vec::new();
    for envelope in envelopes {
        let message = Message::from(envelope);
        match queue.refuses(&message) {
            None => messages.push(message),
            Some(reason) => refused.push(DeadLetter::from_envelope(envelope, reason, 1)),
        }
    }
    (messages, refused)
}

/// Longest pause between retries after failures: once the queue or the CRM is back, the
/// backlog starts moving within this time.
const PAUSE_CAP: Duration = Duration::from_secs(5);

/// Relays until `shutdown` is cancelled; a batch under way finishes first.
///
/// Awake, the relay polls often and writers do not notify; idle, it sleeps until a
/// notification or the safety-net poll (see [`crate::capture::wake`]).
pub async fn run(
    crm: PgPool,
    analytics: PgPool,
    queue: Arc<dyn Queue>,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let watcher = ChannelWatcher::start(&crm, OUTBOX_CHANNEL).await?;
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..config.loops.max(1) {
        let (crm, analytics) = (crm.clone(), analytics.clone());
        let (queue, config) = (queue.clone(), config.clone());
        let (watcher, shutdown) = (watcher.clone(), shutdown.clone());
        loops.spawn(
            async move { relay_loop(crm, analytics, queue, config, watcher, shutdown).await },
        );
    }
    while let Some(done) = loops.join_next().await {
        done?;
    }
    Ok(())
}

/// One relay loop: claims, publishes and sleeps on its own; loops share the listener.
async fn relay_loop(
    crm: PgPool,
    analytics: PgPool,
    queue: Arc<dyn Queue>,
    config: RelayConfig,
    watcher: ChannelWatcher,
    shutdown: CancellationToken,
) {
    let mut pacer = Pacer::new(crm.clone());
    let mut failures = 0u32;
    let mut batch = BatchSize::new(config.batch_size);
    let mut current = config.clone();
    while !shutdown.is_cancelled() {
        current.batch_size = batch.current;
        match queue.is_full().await {
            Ok(true) => {
                // Backpressure: the workers are behind; let them catch up.
                pause(&shutdown, Duration::from_millis(50)).await;
                continue;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot read the queue's depth"),
        }
        let epoch = watcher.epoch();
        let step = async {
            let started = std::time::Instant::now();
            let relayed = relay_once(&crm, &analytics, &*queue, &current).await?;
            batch.after_batch(relayed, started.elapsed(), config.timeout);
            let wait = pacer
                .after_claim(relayed, current.batch_size, config.poll_interval)
                .await?;
            Ok::<_, anyhow::Error>(wait)
        };
        match step.await {
            Ok(wait) => {
                if failures > 0 {
                    tracing::info!(failed_attempts = failures, "relaying again");
                }
                failures = 0;
                if !wait.is_zero() {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = watcher.wait(epoch, wait) => {}
                    }
                }
            }
            Err(error) => {
                if let Some(RelayError::PublishTimeout { events, .. }) = error.downcast_ref() {
                    if let Some(smaller) = batch.after_timeout(*events) {
                        tracing::warn!(events, batch_size = smaller, "publishing timed out (CRM_ANALYTICS_RELAY_TIMEOUT): a slow or unreachable queue; this relay loop claims smaller batches until publishes are quick again");
                    }
                }
                failures = failures.saturating_add(1);
                crate::telemetry::metrics::relay_failed();
                let wait =
                    crate::worker::backoff(Duration::from_millis(200), failures).min(PAUSE_CAP);
                // An outage logs its first failure and then every tenth, not one per retry.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(%error, failed_attempts = failures, pause_ms = wait.as_millis() as u64, "relay failed; events stay in the outbox, will retry");
                } else {
                    tracing::debug!(%error, failed_attempts = failures, pause_ms = wait.as_millis() as u64, "relay failed; will retry");
                }
                pause(&shutdown, wait).await;
            }
        }
    }
}

/// The relay's batch size, halved after a publish outlived the relay timeout and grown back
/// while batches publish well within it. Without it, a broker slower than
/// batch size / timeout (events per second) would time out on every full batch and the same
/// events would be published again and again without the outbox ever moving.
#[derive(Debug)]
struct BatchSize {
    limit: usize,
    current: usize,
}

impl BatchSize {
    fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        BatchSize {
            limit,
            current: limit,
        }
    }

    /// Halves the batch after a publish of `events` timed out (a claim may hold fewer than
    /// the batch size): the new size, or None at one event.
    fn after_timeout(&mut self, events: usize) -> Option<usize> {
        let smaller = (self.current.min(events) / 2).max(1);
        (smaller < self.current).then(|| {
            self.current = smaller;
            smaller
        })
    }

    /// Doubles the batch (up to the limit) after a full one took under a quarter of the
    /// timeout: twice as many then still take under half of it, so growing never
    /// brings the timeout back by itself.
    fn after_batch(&mut self, relayed: usize, took: Duration, timeout: Duration) {
        let quick = timeout.is_zero() || took < timeout / 4;
        if relayed >= self.current && self.current < self.limit && quick {
            self.current = (self.current * 2).min(self.limit);
        }
    }
}

async fn pause(shutdown: &CancellationToken, wait: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_bound_is_never_zero_unless_switched_off() {
        assert_eq!(begin_statement(Duration::ZERO), "BEGIN");
        let tiny = begin_statement(Duration::from_micros(500));
        assert!(tiny.contains("statement_timeout = 1;"), "{tiny}");
        let usual = begin_statement(Duration::from_secs(30));
        assert!(
            usual.contains("idle_in_transaction_session_timeout = 31000"),
            "{usual}"
        );
    }

    #[test]
    fn a_batch_that_timed_out_is_halved_and_grows_back_only_while_quick() {
        let timeout = Duration::from_secs(30);
        let quick = Duration::from_secs(1);
        let mut batch = BatchSize::new(1000);
        assert_eq!(batch.after_timeout(1000), Some(500));
        // A claim of 300 that timed out: half of what was claimed, not of the batch size.
        assert_eq!(batch.after_timeout(300), Some(150));
        // A full batch near the timeout does not grow: twice as many would time out.
        batch.after_batch(150, Duration::from_secs(10), timeout);
        assert_eq!(batch.current, 150);
        // Nor does one that was not full (nothing says a bigger one would be quick).
        batch.after_batch(100, Duration::from_millis(10), timeout);
        assert_eq!(batch.current, 150);
        batch.after_batch(150, quick, timeout);
        assert_eq!(batch.current, 300);
        for size in [300, 600] {
            batch.after_batch(size, quick, timeout);
        }
        assert_eq!(batch.current, 1000, "never above the configured size");
        let mut one = BatchSize::new(1);
        assert_eq!(
            one.after_timeout(1),
            None,
            "one event is as small as it gets"
        );
    }
}
