//! Applying one batch of decoded events in one analytics transaction: idempotency record,
//! archive, aggregate deltas, event counts and latency histogram, all or nothing; the rows
//! every batch shares are locked last (see [`Applier::apply`]).

use chrono::Utc;
use sqlx::{PgConnection, PgPool};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

use crate::aggregates::{apply::write_deltas, delta::Deltas, rows::ChangeEvent};
use crate::archive::{Archive, ArchiveError, ArchivedEvent};
use crate::backfill::{Snapshot, BACKFILL_LOCK};
use crate::telemetry::metrics as telemetry;

/// A delivery that decoded into an event, with the raw JSON to archive.
pub struct Prepared {
    pub index: usize,
    pub event: ChangeEvent,
    pub json: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The infrastructure failed (connection, lock or statement timeout, cancel, resources,
    /// archive, a missing table): retry the whole batch later without holding any event
    /// responsible.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Concurrent transactions collided (deadlock, serialization): try again at once.
    #[error("conflict with a concurrent transaction: {0}")]
    Conflict(String),
    /// The database rejected what these events asked for.
    #[error("{0}")]
    Rejected(String),
}

/// What a retry can do about an error with this SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Concurrent transactions collided: an immediate retry usually succeeds.
    Conflict,
    /// The database or its operator is in the way: retry the same batch later.
    Transient,
    /// The data itself is refused: isolate the event and, in the end, park it.
    Rejected,
}

/// Classifies a SQLSTATE. Only errors that the event's own values can cause (data
/// exceptions, constraint violations, a trigger that raises) count toward parking; anything
/// the database, an operator or the schema causes is retried whole, because parking would
/// take every event of the moment with it.
pub fn classify(sqlstate: &str) -> ErrorKind {
    match sqlstate {
        // 40001 serialization failure, 40P01 deadlock.
        s if s.starts_with("40") => ErrorKind::Conflict,
        // 55P03 lock_not_available (lock_timeout, NOWAIT), 55006 object_in_use,
        // 55000 object_not_in_prerequisite_state: someone else holds the object.
        s if s.starts_with("55") => ErrorKind::Transient,
        // 25006 read_only_sql_transaction: a failover left us on a standby for a while.
        "25006" => ErrorKind::Transient,
        // 08 connection, 53 resources (disk, memory, connections), 57 operator intervention
        // (57014 statement_timeout and cancel, shutdown), 58 system/IO errors,
        // 28 authorization (a rotated password), 42 and 3F schema problems (a dropped or
        // renamed table, a revoked right): not the event's fault, and fixed by an operator
        // without touching the events.
        s if ["08", "53", "57", "58", "28", "42", "3F"]
            .iter()
            .any(|class| s.starts_with(class)) =>
        {
            ErrorKind::Transient
        }
        // 22 data exception, 23 integrity constraint, 44 check option, P0 raise in a
        // trigger, and anything unknown: the event's values are to blame.
        _ => ErrorKind::Rejected,
    }
}

impl From<sqlx::Error> for ApplyError {
    fn from(error: sqlx::Error) -> Self {
        let code = match &error {
            sqlx::Error::Database(db) => db.code().map(|c| c.to_string()).unwrap_or_default(),
            // I/O, TLS, protocol, pool timeouts: the connection, never the data.
            _ => return ApplyError::Transient(error.to_string()),
        };
        match classify(&code) {
            ErrorKind::Conflict => ApplyError::Conflict(error.to_string()),
            ErrorKind::Transient => ApplyError::Transient(error.to_string()),
            ErrorKind::Rejected => ApplyError::Rejected(error.to_string()),
        }
    }
}

impl From<ArchiveError> for ApplyError {
    fn from(error: ArchiveError) -> Self {
        ApplyError::Transient(error.to_string())
    }
}

/// What one successful transaction did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    /// Events applied for the first time.
    pub fresh: usize,
    /// Deliveries dropped as duplicates of events applied before.
    pub duplicates: usize,
}

/// How a batch's transaction tells the events it applies for the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Every event id goes into the ledger (crm_analytics.applied_events), and ids found
    /// there are duplicates: for queues that may deliver an event again after it was
    /// applied.
    Ledger,
    /// The same transaction removes the events from where they wait (the outbox as the
    /// queue): once it commits they cannot come back, and until it does nothing of it
    /// counts. The ledger is only read (an event a relay handed over and that was applied
    /// behind it, but whose outbox row survived, is a duplicate) and never written.
    Removal,
}

/// What to report once a batch's transaction has committed (not before: a batch that
/// rolls back was not applied).
#[derive(Debug, Default)]
pub struct Committed {
    /// Table, operation and age at apply of every event applied.
    ages: Vec<(&'static str, &'static str, Duration)>,
    archive_objects: usize,
}

impl Committed {
    /// Records the batch in the process's metrics.
    pub fn report(self) {
        for (table, operation, age) in self.ages {
            telemetry::event_applied(table, operation, age);
        }
        telemetry::archive_written(self.archive_objects);
    }
}

pub struct Applier {
    pub pool: PgPool,
    pub archive: Option<Archive>,
}

/// Growth factor of the latency histogram's buckets: each is 2 % wider than the one
/// below, so a percentile read from it is off by less than 2 % (see `status::percentiles`).
pub const LATENCY_BUCKET_GROWTH: f64 = 1.02;
/// Bucket numbers from here on are 2 % buckets; smaller ones are the 25 % buckets that
/// earlier versions wrote (ceil(log_1.25(ms))), still read correctly until they age out of
/// the five-minute window, so old and new workers can run side by side during an upgrade.
pub const FINE_BUCKET_OFFSET: i32 = 1_000_000;
/// Latencies at or below this many milliseconds share the lowest bucket.
const LATENCY_FLOOR_MS: f64 = 0.01;

/// Latency histogram bucket of a duration in milliseconds:
/// FINE_BUCKET_OFFSET + ceil(log_1.02(ms)); the bucket holds (1.02^(b-1), 1.02^b] ms.
pub fn latency_bucket(ms: f64) -> i32 {
    let ms = if ms.is_finite() { ms } else { 0.0 }.max(LATENCY_FLOOR_MS);
    FINE_BUCKET_OFFSET + (ms.ln() / LATENCY_BUCKET_GROWTH.ln()).ceil() as i32
}

/// The range of milliseconds a stored bucket stands for, (lower, upper].
pub fn latency_bucket_bounds(bucket: i32) -> (f64, f64) {
    if bucket >= FINE_BUCKET_OFFSET / 2 {
        let upper = LATENCY_BUCKET_GROWTH.powi(bucket - FINE_BUCKET_OFFSET);
        (upper / LATENCY_BUCKET_GROWTH, upper)
    } else {
        // A 25 % bucket of an earlier version: reported by its upper bound, as that
        // version did (they age out of the window within five minutes of an upgrade).
        let upper = 1.25f64.powi(bucket);
        (upper, upper)
    }
}

impl Applier {
    /// Applies `events` in one transaction. Statements, in order, and the rows they lock:
    ///
    /// 1. `pg_advisory_xact_lock_shared(BACKFILL_LOCK)`: shared with every other batch,
    ///    it only keeps a rebuild out.
    /// 2. the watermark: read, no lock.
    /// 3. the idempotency ledger: inserts this batch's event ids, sorted (two batches
    ///    holding the same redelivered events wait on each other in one order, never in a
    ///    cycle); rows no other batch touches unless it carries the same events. The same
    ///    statement forgets the ids of retried parked events it applies. (With
    ///    [`Idempotency::Removal`] no ledger: only the retried ids are forgotten.)
    /// 4. the archive write, before any shared row is locked: a slow write (an S3 round
    ///    trip) delays this batch alone. At least once: a batch whose transaction fails
    ///    after it is archived again on its retry; readers de-duplicate by event_id.
    /// 5. the aggregates (daily, funnel, revenue), each table's keys sorted, then
    ///    event_counts and the latency histogram: the rows every concurrent batch shares
    ///    (today's counts, this minute's buckets), locked last so that they are held only
    ///    for the last statements and the commit. The fixed table order and the sorted
    ///    keys make every batch lock in one global order: no deadlock.
    /// 6. commit.
    pub async fn apply(&self, events: &[&Prepared]) -> Result<Applied, ApplyError> {
        let mut tx = self.pool.begin().await?;
        let (applied, committed) = self.apply_in(&mut tx, events, Idempotency::Ledger).await?;
        tx.commit().await?;
        committed.report();
        Ok(applied)
    }

    /// The statements of [`Applier::apply`] on a transaction the caller commits (and then
    /// reports what [`Committed`] holds), with the idempotency that suits where the events
    /// came from.
    pub async fn apply_in(
        &self,
        tx: &mut PgConnection,
        events: &[&Prepared],
        idempotency: Idempotency,
    ) -> Result<(Applied, Committed), ApplyError> {
        // Shared with other workers, exclusive for backfill: a rebuild never interleaves.
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(BACKFILL_LOCK)
            .execute(&mut *tx)
            .await?;
        // A statement of its own, not folded into the lock's: a statement reads with the
        // snapshot taken when it starts, which would predate the watermark a backfill
        // committed while this batch waited for the lock.
        let watermark: Option<String> =
            sqlx::query_scalar("SELECT snapshot FROM crm_analytics.snapshot_watermark")
                .fetch_optional(&mut *tx)
                .await?;
        let watermark = watermark.as_deref().and_then(Snapshot::parse);

        let mut ids: Vec<Uuid> = events.iter().map(|p| p.event.event_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let fresh: HashSet<Uuid> = match idempotency {
            Idempotency::Ledger => self.record_in_ledger(tx, &ids).await?,
            Idempotency::Removal => {
                // An event put back by `failed retry` is no longer waiting once applied. An
                // id in the ledger was applied behind a relay that died before deleting its
                // outbox row (or before an upgrade made the outbox the queue): a duplicate.
                let known: HashSet<Uuid> = sqlx::query_scalar(
                    "WITH settled AS (
                        DELETE FROM crm_analytics.retried_events WHERE event_id = ANY($1)
                     )
                     SELECT event_id FROM crm_analytics.applied_events WHERE event_id = ANY($1)",
                )
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
                ids.into_iter().filter(|id| !known.contains(id)).collect()
            }
        };

        let mut deltas = Deltas::default();
        let mut seen = HashSet::with_capacity(fresh.len());
        let mut applied = Vec::with_capacity(fresh.len());
        for prepared in events {
            let event = &prepared.event;
            if !fresh.contains(&event.event_id) || !seen.insert(event.event_id) {
                continue;
            }
            deltas.count_processed(event);
            // Events the last rebuild's snapshot already saw are in the aggregates already.
            if !watermark.as_ref().is_some_and(|s| s.sees(event.xid)) {
                deltas.add_event(event);
            }
            applied.push(*prepared);
        }
        deltas.prune_zeros();

        let archive_objects = match (&self.archive, applied.is_empty()) {
            (Some(archive), false) => {
                let to_archive: Vec<ArchivedEvent> = applied
                    .iter()
                    .map(|p| ArchivedEvent {
                        event_id: p.event.event_id,
                        date: p.event.date(),
                        table: p.event.table,
                        json: &p.json,
                    })
                    .collect();
                archive.write(&to_archive).await?
            }
            _ => 0,
        };

        // Latency up to now, the archive write included: the commit follows at once.
        let now = Utc::now();
        let mut latency: BTreeMap<i32, i64> = BTreeMap::new();
        let mut ages = Vec::with_capacity(applied.len());
        for prepared in &applied {
            let event = &prepared.event;
            let age = (now - event.created_at).to_std().unwrap_or_default();
            *latency
                .entry(latency_bucket(age.as_secs_f64() * 1000.0))
                .or_default() += 1;
            ages.push((event.table.name(), event.operation.name(), age));
        }
        write_deltas(&mut *tx, &deltas).await?;
        if !latency.is_empty() {
            let (buckets, counts): (Vec<i32>, Vec<i64>) = latency.into_iter().unzip();
            sqlx::query(
                "INSERT INTO crm_analytics.latency_histogram AS h (minute, bucket, events)
                 SELECT date_trunc('minute', now()), b, n FROM unnest($1::int4[], $2::int8[]) AS u(b, n)
                 ON CONFLICT (minute, bucket) DO UPDATE SET events = h.events + excluded.events",
            )
            .bind(&buckets)
            .bind(&counts)
            .execute(&mut *tx)
            .await?;
        }
        let applied = Applied {
            fresh: seen.len(),
            duplicates: events.len() - seen.len(),
        };
        Ok((
            applied,
            Committed {
                ages,
                archive_objects,
            },
        ))
    }

    /// Inserts `ids` (sorted) into the ledger; returns those that were not there yet. The
    /// same statement forgets the ids of retried parked events it applies.
    async fn record_in_ledger(
        &self,
        tx: &mut PgConnection,
        ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, ApplyError> {
        // An event put back by `failed retry` is no longer waiting once applied.
        let fresh = sqlx::query_scalar("WITH fresh AS (
                INSERT INTO crm_analytics.applied_events (event_id)
                SELECT unnest($1::uuid[])
                ON CONFLICT (event_id) DO NOTHING
                RETURNING event_id
             ), settled AS (
                DELETE FROM crm_analytics.retried_events r USING fresh WHERE r.event_id = fresh.event_id
             )
             SELECT event_id FROM fresh",
        )
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_of_the_data_count_toward_parking() {
        // lock_timeout, NOWAIT, object in use, statement timeout/cancel, shutdown,
        // connection, resources, IO, read-only standby, authorization, missing table.
        for code in [
            "55P03", "55006", "55000", "57014", "57P01", "08006", "53300", "53100", "58030",
            "25006", "28P01", "42P01", "42501", "3F000",
        ] {
            assert_eq!(classify(code), ErrorKind::Transient, "{code}");
        }
        for code in ["40001", "40P01"] {
            assert_eq!(classify(code), ErrorKind::Conflict, "{code}");
        }
        // numeric overflow, invalid datetime, check/not-null/unique violation, RAISE.
        for code in ["22003", "22008", "23514", "23502", "23505", "P0001", ""] {
            assert_eq!(classify(code), ErrorKind::Rejected, "{code}");
        }
    }
}
