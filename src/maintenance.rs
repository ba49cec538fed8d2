//! Maintenance: the loops that keep tables from growing. Pruning deletes the relayed outbox
//! rows kept for CRM_ANALYTICS_OUTBOX_RETENTION, the idempotency ledger past
//! CRM_ANALYTICS_DEDUP_RETENTION (never an entry whose event may still be published again,
//! see `ledger_keep`) and latency histograms older than a day, in slices so that
//! no statement holds locks for long. Vacuuming reclaims the dead rows that every relayed
//! or applied event leaves in queue-like tables (each row inserted once and deleted once),
//! so that claims never scan through them: the relay runs [`vacuum_loop`] on the outbox,
//! the embedded queue backend on its own table.

use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement.
const SLICE: i64 = 10_000;
/// How often the loop runs.
pub const INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    pub outbox_retention: Duration,
    pub dedup_retention: Duration,
}

async fn prune(
    pool: &PgPool,
    table: &str,
    column: &str,
    age: Duration,
) -> Result<u64, sqlx::Error> {
    // Nothing is that old (and the interval below would not hold it).
    let Ok(millis) = i64::try_from(age.as_millis()) else {
        return Ok(0);
    };
    if age > Duration::from_secs(100 * 365 * 86_400) {
        return Ok(0);
    }
    // The cutoff is read once: recomputed per slice, it would move forward during a long
    // prune (past what `ledger_keep` allowed for).
    let cutoff: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now() - $1 * interval '1 millisecond'")
            .bind(millis)
            .fetch_one(pool)
            .await?;
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))"
    );
    let mut total = 0;
    loop {
        let n = sqlx::query(&sql)
            .bind(cutoff)
            .bind(SLICE)
            .execute(pool)
            .await?
            .rows_affected();
        total += n;
        if n < SLICE as u64 {
            return Ok(total);
        }
    }
}

/// Beyond the age of the oldest event still in the outbox, ledger entries are kept this
/// much longer: it covers the time between reading that age and pruning.
const OUTBOX_MARGIN: Duration = Duration::from_secs(60);

/// How long the ledger must keep an applied event id: the retention, and at least as long
/// as the oldest event still in the CRM's outbox has existed. An event stays in the outbox
/// when a relay published it and died before its claim committed; it will be published
/// again whenever a relay runs next, however long that takes, and its ledger entry (applied
/// after it was created) must still be there to drop it. The age is measured on the CRM
/// server's clock and compared on the analytics server's as a duration, so the two
/// clocks need not agree.
async fn ledger_keep(crm: &PgPool, retention: Duration) -> Result<Duration, sqlx::Error> {
    let oldest: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(created_at))::float8 FROM crm_analytics.event_outbox
         WHERE processed_at IS NULL",
    )
    .fetch_one(crm)
    .await?;
    let outbox = match oldest {
        None => Duration::ZERO,
        // An age that is no duration (a clock far off) keeps everything.
        Some(seconds) => Duration::try_from_secs_f64(seconds.max(0.0))
            .map_or(Duration::MAX, |age| age.saturating_add(OUTBOX_MARGIN)),
    };
    Ok(retention.max(outbox))
}

/// One pass over everything that is pruned.
pub async fn run_once(
    crm: &PgPool,
    analytics: &PgPool,
    config: &MaintenanceConfig,
) -> Result<(), sqlx::Error> {
    let outbox = prune(
        crm,
        "crm_analytics.event_outbox_processed",
        "processed_at",
        config.outbox_retention,
    )
    .await?;
    let ledger = prune(
        analytics,
        "crm_analytics.applied_events",
        "applied_at",
        ledger_keep(crm, config.dedup_retention).await?,
    )
    .await?;
    let latency = prune(
        analytics,
        "crm_analytics.latency_histogram",
        "minute",
        Duration::from_secs(86_400),
    )
    .await?;
    if outbox + ledger + latency > 0 {
        tracing::info!(outbox, ledger, latency, "pruned old rows");
    }
    Ok(())
}

pub async fn run(
    crm: PgPool,
    analytics: PgPool,
    config: MaintenanceConfig,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(error) = run_once(&crm, &analytics, &config).await {
            tracing::warn!(%error, "maintenance pass failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

/// The upkeep of a queue table (the outbox as the queue, the embedded queue), for
/// [`crate::queue::Queue::maintenance`]: every event leaves a dead row behind, and
/// vacuuming often keeps claims from scanning through them between autovacuum runs.
pub fn queue_table_vacuum(
    pool: &PgPool,
    tables: &'static [&'static str],
    interval: Duration,
    shutdown: CancellationToken,
) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(vacuum_loop(pool.clone(), tables, interval, shutdown))
}

/// Vacuums `tables` every `interval` until `shutdown`; a table another process is
/// vacuuming is skipped. Without the right to vacuum, it says so once and stops.
pub async fn vacuum_loop(
    pool: PgPool,
    tables: &'static [&'static str],
    interval: Duration,
    shutdown: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        for table in tables {
            let sql = format!("VACUUM (SKIP_LOCKED) {table}");
            if let Err(error) = sqlx::raw_sql(&sql).execute(&pool).await {
                tracing::warn!(table, %error, "cannot vacuum; leaving it to autovacuum");
                return;
            }
        }
    }
}
