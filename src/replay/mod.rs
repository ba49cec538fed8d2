//! Replay: the aggregates recomputed from the archive alone, exactly, while the CRM keeps
//! writing and whether or not the pipeline runs; and `verify --archive`, which compares the
//! aggregates with that recomputation.
//!
//! How the handover to the live stream stays exact: replay holds the lock backfill holds
//! (workers take it shared for each batch), so no batch is half done while it reads. Every
//! event it counts gets an entry in the idempotency ledger in the same transaction as the
//! aggregates. An event the archive holds but no batch committed (archived, then its batch
//! rolled back; its redelivery still to come) is therefore counted once, by replay, and
//! dropped as a duplicate when it arrives. Events not in the archive were never applied:
//! workers apply them when they come, as always. Parked events (`failed_events`) were
//! archived by attempts that failed and are never counted.

mod fold;
mod progress;
pub mod range;
pub mod verify;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::{Duration, Instant};

use crate::archive::read::{Listing, ReadError};
use crate::archive::Archive;
use crate::backfill::{Snapshot, BACKFILL_LOCK};
use fold::Mode;
pub use range::DateRange;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{path}, event {line}: {reason}. The archive object is damaged; nothing was changed. Restore it from a copy, or move it out of the archive (its events are then left out)")]
    Event {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("the archive {location} holds no events (nothing under events/YYYY/MM/DD/<table>/); nothing was changed. Check --archive (CRM_ANALYTICS_ARCHIVE) and, for S3, CRM_ANALYTICS_S3_ENDPOINT")]
    Empty { location: String },
    #[error("the analytics database: {0}")]
    Database(#[from] sqlx::Error),
}

/// What a replay did.
#[derive(Debug, Default, Clone)]
pub struct ReplayReport {
    /// Archive objects read.
    pub objects: u64,
    /// Events read, copies included.
    pub read: u64,
    /// Copies of an event archived more than once (a retried batch), dropped.
    pub duplicates: u64,
    /// Events left out because they are parked in failed_events.
    pub parked: u64,
    /// Distinct events counted.
    pub events: u64,
    /// Events no batch had applied yet (a date-range replay counts them whole and takes
    /// them over from the queue).
    pub claimed: u64,
    pub elapsed: Duration,
}

impl ReplayReport {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// None: replace every aggregate. Some: recompute only the rows the range owns.
    pub range: Option<DateRange>,
    /// The pipeline's CRM_ANALYTICS_DEDUP_RETENTION. A date-range replay takes an event
    /// captured within it and missing from the ledger as not applied yet (it counts it
    /// whole); an older one missing from the ledger as applied and forgotten since.
    pub dedup_retention: Duration,
    /// Where the archive is, for messages.
    pub location: String,
}

/// Replays the archive into the aggregates, in one transaction. See the module comment.
pub async fn replay(
    analytics: &PgPool,
    archive: &Archive,
    options: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let mut tx = analytics.begin().await?;
    let waiting = progress::waiting();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(BACKFILL_LOCK)
        .execute(&mut *tx)
        .await?;
    waiting.finish_and_clear();
    // Listed under the lock: a batch that committed before it is in the listing.
    let listing = list(archive, &options.location).await?;
    let watermark: Option<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT snapshot, taken_at FROM crm_analytics.snapshot_watermark")
            .fetch_optional(&mut *tx)
            .await?;

    let mode = match options.range {
        None => {
            if let Some((_, taken_at)) = &watermark {
                tracing::warn!(
                    backfill_at = %taken_at,
                    "a backfill or rebuild recomputed these aggregates from the CRM tables; \
                     rows that existed before capture was attached are not in the archive and \
                     a replay does not count them (`crm-analytics rebuild` recomputes from the \
                     CRM tables instead)"
                );
            }
            sqlx::raw_sql(
                "DELETE FROM analytics.daily_account_metrics;
                 DELETE FROM analytics.lead_funnel_metrics;
                 DELETE FROM analytics.revenue_metrics;
                 UPDATE analytics.event_counts SET processed = 0 WHERE processed <> 0;
                 DELETE FROM crm_analytics.snapshot_watermark;",
            )
            .execute(&mut *tx)
            .await?;
            Mode::Replace
        }
        Some(range) => {
            delete_owned(&mut tx, &range).await?;
            let retention = chrono::Duration::from_std(options.dedup_retention)
                .unwrap_or(chrono::Duration::MAX);
            let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
                .fetch_one(&mut *tx)
                .await?;
            Mode::Range {
                range,
                claim_after: now
                    .checked_sub_signed(retention)
                    .unwrap_or(DateTime::<Utc>::MIN_UTC),
                watermark: watermark.and_then(|(s, _)| Snapshot::parse(&s)),
            }
        }
    };
    let mut report = fold::fold(&mut tx, archive, &listing, mode).await?;
    if options.range.is_none() {
        sqlx::query("DELETE FROM analytics.event_counts WHERE processed = 0 AND failed = 0")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The archive's objects; an archive without any is refused (a mistyped location would
/// otherwise replace the aggregates with nothing).
async fn list(archive: &Archive, location: &str) -> Result<Listing, ReplayError> {
    let listing = archive.list().await?;
    if listing.folders.is_empty() {
        return Err(ReplayError::Empty {
            location: location.to_string(),
        });
    }
    for path in listing.foreign.iter().take(5) {
        tracing::warn!(%path, "not an archived event object; left out");
    }
    Ok(listing)
}

/// Deletes the rows `range` owns (see [`range`]).
async fn delete_owned(tx: &mut sqlx::PgConnection, range: &DateRange) -> Result<(), sqlx::Error> {
    for (table, column, from) in [
        ("analytics.daily_account_metrics", "date", range.from),
        ("analytics.lead_funnel_metrics", "cohort_date", range.from),
        ("analytics.revenue_metrics", "month", range.first_month()),
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE {column}
               BETWEEN coalesce($1::date, '-infinity'::date) AND coalesce($2::date, 'infinity'::date)"
        ))
        .bind(from)
        .bind(range.to)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
