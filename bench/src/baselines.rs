//! Pure-SQL baselines of the drain, run on copies of the same backlog as `run`, each loop
//! claiming batches of 1,000 outbox rows with `FOR UPDATE SKIP LOCKED` in transactions that
//! commit as ours do on the default queue (`synchronous_commit = off`, see [`BEGIN`]):
//!
//! * the one-aggregate floor: one statement per batch that deletes the rows and upserts only
//!   the funnel (the least any consumer must do); its funnel is checked against the
//!   recomputation.
//! * the equivalent baseline: the same work as ours minus what only a separate process can
//!   do (queue hop, idempotency ledger, archive, retries): one transaction per batch that
//!   deletes the claimed rows, applies all four aggregates with retractions (new row image
//!   minus old) set-based in SQL, removes rows that net to zero and adds the event counts;
//!   its aggregates are checked against the recomputation row for row.

use sqlx::PgPool;
use std::time::{Duration, Instant};

use super::{cpu, BenchDb};

/// The funnel-only statement: deletes a batch, upserts the funnel, returns the batch size.
const FUNNEL_ONLY: &str = "WITH batch AS (
        DELETE FROM crm_analytics.event_outbox
        WHERE ctid = ANY (ARRAY(SELECT ctid FROM crm_analytics.event_outbox LIMIT 1000 FOR UPDATE SKIP LOCKED))
        RETURNING event_type, payload
     ), images AS (
        SELECT payload->'new' AS row, 1 AS sign FROM batch WHERE event_type LIKE 'leads.%' AND jsonb_typeof(payload->'new') = 'object'
        UNION ALL
        SELECT payload->'old', -1 FROM batch WHERE event_type LIKE 'leads.%' AND jsonb_typeof(payload->'old') = 'object'
     ), up AS (
        INSERT INTO analytics.lead_funnel_metrics AS t (cohort_date, source, new, contacted, qualified, converted, lost, total)
        SELECT ((row->>'created_at')::timestamptz AT TIME ZONE 'UTC')::date, row->>'source',
               coalesce(sum(sign) FILTER (WHERE row->>'status' = 'new'), 0),
               coalesce(sum(sign) FILTER (WHERE row->>'status' = 'contacted'), 0),
               coalesce(sum(sign) FILTER (WHERE row->>'status' = 'qualified'), 0),
               coalesce(sum(sign) FILTER (WHERE row->>'status' = 'converted'), 0),
               coalesce(sum(sign) FILTER (WHERE row->>'status' = 'lost'), 0),
               sum(sign)
        FROM images GROUP BY 1, 2
        ON CONFLICT (cohort_date, source) DO UPDATE SET
           new = t.new + excluded.new, contacted = t.contacted + excluded.contacted,
           qualified = t.qualified + excluded.qualified, converted = t.converted + excluded.converted,
           lost = t.lost + excluded.lost, total = t.total + excluded.total
     )
     SELECT count(*) FROM batch";

/// The equivalent batch: deletes it, applies the four aggregates and the counts; returns the
/// batch size and the addresses of aggregate rows left all zero (deleted next).
const EQUIVALENT: &str = "WITH batch AS (
        DELETE FROM crm_analytics.event_outbox
        WHERE ctid = ANY (ARRAY(SELECT ctid FROM crm_analytics.event_outbox LIMIT 1000 FOR UPDATE SKIP LOCKED))
        RETURNING event_type, payload, created_at
     ), images AS (
        SELECT split_part(event_type, '.', 1) AS tbl, payload->'new' AS r, 1 AS sign
          FROM batch WHERE jsonb_typeof(payload->'new') = 'object'
        UNION ALL
        SELECT split_part(event_type, '.', 1), payload->'old', -1
          FROM batch WHERE jsonb_typeof(payload->'old') = 'object'
     ), daily AS (
        SELECT (r->>'account_id')::uuid AS account_id,
               ((r->>'created_at')::timestamptz AT TIME ZONE 'UTC')::date AS day,
               sign AS lc, 0 AS lv, 0 AS a, 0 AS dw, 0::numeric AS rw
          FROM images WHERE tbl = 'leads'
        UNION ALL
        SELECT (r->>'account_id')::uuid, ((r->>'converted_at')::timestamptz AT TIME ZONE 'UTC')::date,
               0, sign, 0, 0, 0
          FROM images WHERE tbl = 'leads' AND r->>'status' = 'converted'
        UNION ALL
        SELECT (r->>'account_id')::uuid, ((r->>'occurred_at')::timestamptz AT TIME ZONE 'UTC')::date,
               0, 0, sign, 0, 0
          FROM images WHERE tbl = 'activities'
        UNION ALL
        SELECT (r->>'account_id')::uuid, ((r->>'closed_at')::timestamptz AT TIME ZONE 'UTC')::date,
               0, 0, 0, sign, sign * coalesce((r->>'amount')::numeric, 0)
          FROM images WHERE tbl = 'projects' AND r->>'status' = 'won'
     ), daily_up AS (
        INSERT INTO analytics.daily_account_metrics AS t
            (account_id, date, leads_created, leads_converted, activities, deals_won, revenue_won)
        SELECT account_id, day, sum(lc), sum(lv), sum(a), sum(dw), sum(rw) FROM daily GROUP BY 1, 2
        ON CONFLICT (account_id, date) DO UPDATE SET
            leads_created = t.leads_created + excluded.leads_created,
            leads_converted = t.leads_converted + excluded.leads_converted,
            activities = t.activities + excluded.activities,
            deals_won = t.deals_won + excluded.deals_won,
            revenue_won = t.revenue_won + excluded.revenue_won
        RETURNING t.ctid, (t.leads_created = 0 AND t.leads_converted = 0 AND t.activities = 0
                           AND t.deals_won = 0 AND t.revenue_won = 0) AS zero
     ), funnel_up AS (
        INSERT INTO analytics.lead_funnel_metrics AS t
            (cohort_date, source, new, contacted, qualified, converted, lost, total)
        SELECT ((r->>'created_at')::timestamptz AT TIME ZONE 'UTC')::date, r->>'source',
               coalesce(sum(sign) FILTER (WHERE r->>'status' = 'new'), 0),
               coalesce(sum(sign) FILTER (WHERE r->>'status' = 'contacted'), 0),
               coalesce(sum(sign) FILTER (WHERE r->>'status' = 'qualified'), 0),
               coalesce(sum(sign) FILTER (WHERE r->>'status' = 'converted'), 0),
               coalesce(sum(sign) FILTER (WHERE r->>'status' = 'lost'), 0),
               sum(sign)
          FROM images WHERE tbl = 'leads' GROUP BY 1, 2
        ON CONFLICT (cohort_date, source) DO UPDATE SET
           new = t.new + excluded.new, contacted = t.contacted + excluded.contacted,
           qualified = t.qualified + excluded.qualified, converted = t.converted + excluded.converted,
           lost = t.lost + excluded.lost, total = t.total + excluded.total
        RETURNING t.ctid, (t.new = 0 AND t.contacted = 0 AND t.qualified = 0 AND t.converted = 0
                           AND t.lost = 0 AND t.total = 0) AS zero
     ), revenue_up AS (
        INSERT INTO analytics.revenue_metrics AS t (account_id, month, deals_won, revenue)
        SELECT (r->>'account_id')::uuid,
               date_trunc('month', (r->>'closed_at')::timestamptz AT TIME ZONE 'UTC')::date,
               sum(sign), sum(sign * coalesce((r->>'amount')::numeric, 0))
          FROM images WHERE tbl = 'projects' AND r->>'status' = 'won' GROUP BY 1, 2
        ON CONFLICT (account_id, month) DO UPDATE SET
           deals_won = t.deals_won + excluded.deals_won, revenue = t.revenue + excluded.revenue
        RETURNING t.ctid, (t.deals_won = 0 AND t.revenue = 0) AS zero
     ), counts_up AS (
        INSERT INTO analytics.event_counts AS t (date, table_name, operation, processed)
        SELECT (created_at AT TIME ZONE 'UTC')::date, split_part(event_type, '.', 1),
               split_part(event_type, '.', 2), count(*)
          FROM batch GROUP BY 1, 2, 3
        ON CONFLICT (date, table_name, operation) DO UPDATE SET processed = t.processed + excluded.processed
     )
     SELECT (SELECT count(*) FROM batch),
            ARRAY(SELECT ctid::text FROM daily_up WHERE zero),
            ARRAY(SELECT ctid::text FROM funnel_up WHERE zero),
            ARRAY(SELECT ctid::text FROM revenue_up WHERE zero)";

/// Deletes the aggregate rows a batch left all zero (by address, as ours does).
const DELETE_ZEROS: [&str; 3] = [
    "DELETE FROM analytics.daily_account_metrics WHERE ctid = ANY($1::text[]::tid[])
       AND leads_created = 0 AND leads_converted = 0 AND activities = 0 AND deals_won = 0
       AND revenue_won = 0",
    "DELETE FROM analytics.lead_funnel_metrics WHERE ctid = ANY($1::text[]::tid[])
       AND new = 0 AND contacted = 0 AND qualified = 0 AND converted = 0 AND lost = 0 AND total = 0",
    "DELETE FROM analytics.revenue_metrics WHERE ctid = ANY($1::text[]::tid[])
       AND deals_won = 0 AND revenue = 0",
];

/// How many loops a baseline may run: one per core, and as many as the pipeline has
/// workers by default (two per core). The drain section runs each baseline with both and
/// compares ours with the faster: more loops than cores overlap commits, but they also
/// wait on each other's locks on the rows every batch shares.
pub(super) fn loop_counts() -> Vec<usize> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut counts = vec![cores, crm_analytics::config::default_workers()];
    counts.dedup();
    counts
}

/// Whether a baseline statement failed only on a conflict with another loop (retried).
fn conflict(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().is_some_and(|c| c.starts_with("40")))
}

/// A baseline's batch transaction commits as ours on the default queue does: without
/// waiting for its WAL to reach the disk (a batch lost in a server crash loses its removal
/// from the outbox with it, so its events are applied again).
const BEGIN: &str = "BEGIN; SET LOCAL synchronous_commit = off";

/// One batch of the equivalent baseline in one transaction; the events it moved.
async fn equivalent_batch(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin_with(BEGIN).await?;
    let (moved, daily, funnel, revenue): (i64, Vec<String>, Vec<String>, Vec<String>) =
        sqlx::query_as(EQUIVALENT).fetch_one(&mut *tx).await?;
    for (sql, ctids) in DELETE_ZEROS.iter().zip([daily, funnel, revenue]) {
        if !ctids.is_empty() {
            sqlx::query(sql).bind(ctids).execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(moved)
}

/// One batch of the funnel-only floor; the events it moved.
async fn funnel_batch(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin_with(BEGIN).await?;
    let moved = sqlx::query_scalar(FUNNEL_ONLY).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(moved)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Baseline {
    FunnelOnly,
    Equivalent,
}

/// What one baseline drain measured.
pub(super) struct Drained {
    pub seconds: f64,
    /// Where the machine's CPU went from the first batch to the last.
    pub cpu: cpu::Split,
    /// CPU of the loops' client side (this process) over the same window, in cores.
    pub client: Option<f64>,
}

/// Drains `db`'s outbox with `baseline` in `loops` concurrent loops. Fails if the result is
/// not what the recomputation gives (the funnel for the floor, every aggregate otherwise);
/// that check and the connections' setup are outside the measured window.
pub(super) async fn drain(
    db: &BenchDb,
    baseline: Baseline,
    loops: usize,
    timeout: Duration,
) -> anyhow::Result<Drained> {
    let pool = db.pool(loops as u32 + 2).await?;
    // Every connection open before the window starts, so that their start is not counted.
    let warm: Vec<_> = futures::future::try_join_all((0..loops).map(|_| pool.acquire())).await?;
    drop(warm);
    // The loops' client side runs in this process.
    let this = [Some(std::process::id())];
    let window = cpu::Window::start(&this);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..loops {
        let pool = pool.clone();
        tasks.spawn(async move {
            loop {
                let moved = match baseline {
                    Baseline::FunnelOnly => funnel_batch(&pool).await,
                    Baseline::Equivalent => equivalent_batch(&pool).await,
                };
                match moved {
                    // Another loop may still hold rows this one skipped: done only when
                    // nothing is left at all.
                    Ok(0) => {
                        let left: bool = sqlx::query_scalar(
                            "SELECT EXISTS (SELECT 1 FROM crm_analytics.event_outbox)",
                        )
                        .fetch_one(&pool)
                        .await?;
                        if !left {
                            return Ok::<_, sqlx::Error>(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) if conflict(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Read while the loops' connections (and their server processes) are still open.
    let (cpu, client) = window.finish(&this);
    anyhow::ensure!(
        started.elapsed() < timeout * 4,
        "baseline too slow: {seconds:.0} s"
    );
    check(&pool, baseline).await?;
    pool.close().await;
    Ok(Drained {
        seconds,
        cpu,
        client,
    })
}

/// The baseline's result against the recomputation from the CRM tables.
async fn check(pool: &PgPool, baseline: Baseline) -> anyhow::Result<()> {
    match baseline {
        Baseline::Equivalent => {
            let found = crm_analytics::aggregates::verify::verify(pool, pool, "public", 5).await?;
            anyhow::ensure!(
                found.differences == 0,
                "the equivalent baseline's aggregates differ from the recomputation in {} rows: {:?}",
                found.differences,
                found.shown
            );
        }
        Baseline::FunnelOnly => {
            let funnel = crm_analytics::aggregates::recompute::funnel_sql("public");
            let differing: i64 = sqlx::query_scalar(&format!(
                // The floor leaves rows that netted to zero (no lead left): not rows.
                "SELECT count(*) FROM (
                    (SELECT * FROM ({funnel}) expected
                     EXCEPT ALL
                     SELECT cohort_date, source, new, contacted, qualified, converted, lost, total
                     FROM analytics.lead_funnel_metrics WHERE total <> 0)
                    UNION ALL
                    (SELECT cohort_date, source, new, contacted, qualified, converted, lost, total
                     FROM analytics.lead_funnel_metrics WHERE total <> 0
                     EXCEPT ALL
                     SELECT * FROM ({funnel}) expected)
                 ) differing"
            ))
            .fetch_one(pool)
            .await?;
            anyhow::ensure!(
                differing == 0,
                "the funnel-only baseline's funnel differs from the recomputation in {differing} rows"
            );
        }
    }
    Ok(())
}
