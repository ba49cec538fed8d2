//! Backfill and rebuild: set the aggregates to a full recomputation from the CRM tables,
//! exactly, while the CRM keeps writing and whether or not the pipeline runs.
//!
//! How it stays exact: under an exclusive lock that workers take in shared mode, it reads
//! the CRM in one REPEATABLE READ snapshot and stores that snapshot as a watermark. A change
//! and its outbox row commit together, so every event is either seen by the snapshot (its
//! effect is in the recomputation, and workers skip it whenever it arrives) or not (workers
//! apply it). Every event applied before the lock was committed before the snapshot.

use chrono::Utc;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sqlx::PgPool;
use std::collections::HashMap;
use std::time::Duration;

use crate::aggregates::{apply::write_deltas, delta::Deltas, recompute};
use crate::event::Operation;

/// Advisory lock key: workers hold it shared while applying, backfill exclusively.
pub const BACKFILL_LOCK: i64 = 0x63726d5f616e61;

/// A PostgreSQL snapshot (`xmin:xmax:xip,...`), to tell which transactions it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = match parts.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Self {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Whether a committed transaction `xid` is visible in this snapshot.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }
}

#[derive(Debug, Default)]
pub struct BackfillReport {
    pub crm_rows: i64,
    pub snapshot: String,
}

/// Replaces the aggregates with a recomputation of the CRM tables. Idempotent.
pub async fn run(
    crm: &PgPool,
    analytics: &PgPool,
    crm_schema: &str,
    show_progress: bool,
) -> anyhow::Result<BackfillReport> {
    let bars = MultiProgress::new();
    if !show_progress {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let waiting =
        bars.add(ProgressBar::new_spinner().with_message("waiting for in-flight batches"));
    waiting.enable_steady_tick(Duration::from_millis(120));

    let mut out = analytics.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(BACKFILL_LOCK)
        .execute(&mut *out)
        .await?;
    waiting.finish_with_message("workers paused");

    let mut snap = crm.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *snap)
        .await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(&mut *snap)
        .await?;

    sqlx::raw_sql(
        "DELETE FROM analytics.daily_account_metrics;
         DELETE FROM analytics.lead_funnel_metrics;
         DELETE FROM analytics.revenue_metrics;",
    )
    .execute(&mut *out)
    .await?;

    let style = ProgressStyle::with_template("{spinner} {prefix:<24} {pos} rows {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut spinners: HashMap<&'static str, ProgressBar> = HashMap::new();
    let mut report = BackfillReport::default();
    recompute::stream_into(&mut snap, &mut out, crm_schema, |table, rows| {
        let bar = spinners.entry(table).or_insert_with(|| {
            let bar = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
            bar.set_prefix(table);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        bar.set_position(rows);
    })
    .await?;
    for bar in spinners.values() {
        bar.finish_with_message("done");
    }

    // The snapshot's rows count as processed "snapshot" events, dated today.
    let mut counts = Deltas::default();
    for (table, rows) in recompute::table_sizes(&mut snap, crm_schema).await? {
        report.crm_rows += rows;
        if rows > 0 {
            counts
                .counts
                .entry((Utc::now().date_naive(), table, Operation::Snapshot))
                .or_default()
                .processed += rows;
        }
    }
    write_deltas(&mut out, &counts).await?;

    sqlx::query(
        "INSERT INTO crm_analytics.snapshot_watermark (snapshot, taken_at) VALUES ($1, now())
         ON CONFLICT (singleton) DO UPDATE SET snapshot = excluded.snapshot, taken_at = excluded.taken_at",
    )
    .bind(&snapshot)
    .execute(&mut *out)
    .await?;
    out.commit().await?;
    snap.rollback().await?;
    report.snapshot = snapshot;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::Snapshot;

    #[test]
    fn snapshot_visibility_follows_postgres_rules() {
        let s = Snapshot::parse("100:110:102,105").expect("valid snapshot");
        assert!(s.sees(99));
        assert!(s.sees(100) && s.sees(101) && s.sees(109));
        assert!(!s.sees(102) && !s.sees(105));
        assert!(!s.sees(110) && !s.sees(500));
        let empty = Snapshot::parse("7:7:").expect("valid snapshot");
        assert!(empty.sees(6) && !empty.sees(7));
        assert!(Snapshot::parse("garbage").is_none());
    }
}
