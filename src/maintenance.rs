//! Maintenance: the loops that keep tables from growing. Pruning deletes the relayed outbox
//! rows kept for CRM_ANALYTICS_OUTBOX_RETENTION, the idempotency ledger past
//! CRM_ANALYTICS_DEDUP_RETENTION and latency histograms older than a day, in slices so that
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
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM {table} WHERE {column} < now() - $1 * interval '1 millisecond' LIMIT $2))"
    );
    let mut total = 0;
    loop {
        let n = sqlx::query(&sql)
            .bind(age.as_millis() as i64)
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
        config.dedup_retention,
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
