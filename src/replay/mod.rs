//! Replay: the aggregates recomputed from the archive alone, exactly, while the CRM keeps
//! writing and whether or not the pipeline runs; and `verify --archive`, which compares the
//! aggregates with that recomputation.
//!
//! How the handover to the live stream stays exact: replay holds the lock backfill holds
//! (workers take it shared for each batch), so no batch is half done while it reads. Every
//! event it counts gets an entry in the idempotency ledger in the same transaction as the
//! aggregates. An event the archive holds but no batch committed (archived, then its batch
//! rolled back; its redelivery still to come) is therefore counted once, by replay, and
//! dropped as a duplicate when it arrives behind a relay; on the outbox as the queue (no
//! ledger there) it is still in the outbox, and replay leaves it to the workers. Events not in the archive were never applied:
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
    #[error("a backfill or rebuild on {taken_at} recomputed the aggregates from the CRM tables, and rows it loaded (those that existed before capture was attached) are not in the archive: a date range must start after that month ({first}: give --from {first} or later), or run a full replay or `crm-analytics rebuild`; nothing was changed")]
    BeforeBackfill {
        taken_at: DateTime<Utc>,
        first: chrono::NaiveDate,
    },
    #[error("{missing} events the idempotency ledger records as applied are not in the archive {location} (a wrong --archive, lost objects, or a time with CRM_ANALYTICS_ARCHIVE=none); a replay would drop them for good, so nothing was changed. Point --archive at the complete archive, run `crm-analytics rebuild` (from the CRM tables), or give --allow-incomplete to replay what the archive holds")]
    Incomplete { missing: i64, location: String },
    #[error("the archive reader stopped after {read} of {listed} objects; nothing was changed")]
    Truncated { read: u64, listed: u64 },
    /// The cause follows in the error's chain (not repeated in this message).
    #[error("the analytics database (nothing was changed)")]
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
    /// Events left out because they still wait in the outbox: a worker applies them.
    pub waiting: u64,
    /// Distinct events counted.
    pub events: u64,
    /// Events no batch had applied yet (a date-range replay counts them whole and takes
    /// them over from the queue).
    pub claimed: u64,
    /// Events whose ids were not in the ledger before the replay wrote them.
    pub fresh: u64,
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
    /// Replace the aggregates even when events the ledger records as applied are missing
    /// from the archive.
    pub allow_incomplete: bool,
    /// Where the archive is, for messages.
    pub location: String,
    /// Whether the workers read the outbox itself (no ledger on that path): a date-range
    /// replay then takes every archived event that is not waiting in the outbox as applied.
    pub outbox_is_queue: bool,
}

/// Replays the archive into the aggregates, in one transaction. See the module comment.
pub async fn replay(
    analytics: &PgPool,
    archive: &Archive,
    options: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let mut tx = analytics.begin().await?;
    tracing::info!("waiting for in-flight batches to finish; workers pause until the replay ends");
    let waiting = progress::waiting();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(BACKFILL_LOCK)
        .execute(&mut *tx)
        .await?;
    waiting.finish_and_clear();
    // Timed from here: waiting for in-flight batches (or another replay) is not replaying.
    let started = Instant::now();
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
            let watermark = match watermark {
                None => None,
                Some((snapshot, taken_at)) => {
                    let first = first_day_after_month_of(taken_at.date_naive());
                    if range.first_month().is_none_or(|month| month < first) {
                        return Err(ReplayError::BeforeBackfill { taken_at, first });
                    }
                    Snapshot::parse(&snapshot)
                }
            };
            delete_owned(&mut tx, &range).await?;
            // Every event applied since the oldest entry still in the ledger is in it (pruning
            // removes the oldest first); CLAIM_MARGIN covers the CRM's and the analytics
            // server's clocks disagreeing. An empty ledger vouches for nothing: claim none.
            // On the outbox as the queue the workers write no ledger, and an archived event
            // not left out as waiting in the outbox was applied: claim none either.
            let claim_after: DateTime<Utc> = sqlx::query_scalar(
                // Far in the future, not 'infinity' (which no chrono time can hold).
                "SELECT CASE WHEN $2 THEN timestamptz '9999-12-31 00:00Z'
                             ELSE coalesce(min(applied_at) + $1 * interval '1 second',
                                           timestamptz '9999-12-31 00:00Z') END
                 FROM crm_analytics.applied_events",
            )
            .bind(CLAIM_MARGIN.as_secs_f64())
            .bind(options.outbox_is_queue)
            .fetch_one(&mut *tx)
            .await?;
            Mode::Range {
                range,
                claim_after,
                watermark,
            }
        }
    };
    let ledger_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM crm_analytics.applied_events")
            .fetch_one(&mut *tx)
            .await?;
    let mut report = fold::fold(&mut tx, archive, &listing, mode).await?;
    if options.range.is_none() {
        // Ledger entries the archive did not match: applied events it does not hold.
        let missing = ledger_before - (report.events as i64 - report.fresh as i64);
        if missing > 0 && !options.allow_incomplete {
            return Err(ReplayError::Incomplete {
                missing,
                location: options.location.clone(),
            });
        }
        if missing > 0 {
            tracing::warn!(
                missing,
                "applied events missing from the archive are left out (--allow-incomplete)"
            );
        }
        sqlx::query("DELETE FROM analytics.event_counts WHERE processed = 0 AND failed = 0")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// How far apart the CRM's clock (event times) and the analytics server's (ledger times)
/// may be for a date-range replay to tell applied events from pending ones.
const CLAIM_MARGIN: Duration = Duration::from_secs(300);

/// The first day of the month after `day`'s.
fn first_day_after_month_of(day: chrono::NaiveDate) -> chrono::NaiveDate {
    use chrono::Datelike;
    let (year, month) = match day.month() {
        12 => (day.year() + 1, 1),
        m => (day.year(), m + 1),
    };
    chrono::NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(day)
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
