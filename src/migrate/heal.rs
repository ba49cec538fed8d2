//! Healing: `migrate` checks that what the analytics migrations made is still there, not
//! only that its bookkeeping says they ran. A schema, table, trigger or grant dropped by
//! hand (or lost in a partial restore) is recreated from the component's current shape
//! (`aggregates/sql/current.sql`), and the names of what was missing are returned so that
//! `migrate` can say what it recreated.

use sqlx::PgPool;

use super::MigrateError;

/// The tables of the analytics component, in both of its schemas.
const TABLES: [&str; 9] = [
    "analytics.daily_account_metrics",
    "analytics.lead_funnel_metrics",
    "analytics.revenue_metrics",
    "analytics.event_counts",
    "crm_analytics.applied_events",
    "crm_analytics.failed_events",
    "crm_analytics.retried_events",
    "crm_analytics.snapshot_watermark",
    "crm_analytics.latency_histogram",
];

/// The aggregate tables BI tools read: each has the change-notification trigger and the
/// reader role's SELECT.
const AGGREGATE_TABLES: [&str; 4] = [
    "analytics.daily_account_metrics",
    "analytics.lead_funnel_metrics",
    "analytics.revenue_metrics",
    "analytics.event_counts",
];

/// What the analytics component needs and does not find, by name ("table
/// analytics.revenue_metrics", "role analytics_reader", ...), read in one query.
pub async fn missing_analytics_objects(pool: &PgPool) -> Result<Vec<String>, MigrateError> {
    let read = |source| MigrateError::Read {
        component: "analytics",
        source,
    };
    let missing: Vec<String> = sqlx::query_scalar(
        "WITH wanted_tables AS (SELECT unnest($1::text[]) AS name),
              aggregates AS (SELECT unnest($2::text[]) AS name),
              reader AS (SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'analytics_reader') AS present)
         SELECT 'schema analytics' WHERE to_regnamespace('analytics') IS NULL
         UNION ALL
         SELECT 'table ' || name FROM wanted_tables WHERE to_regclass(name) IS NULL
         UNION ALL
         SELECT 'function analytics.notify_aggregates_changed()'
         WHERE to_regprocedure('analytics.notify_aggregates_changed()') IS NULL
         UNION ALL
         SELECT 'trigger notify_aggregates_changed on ' || name FROM aggregates
         WHERE to_regclass(name) IS NOT NULL AND NOT EXISTS (
             SELECT 1 FROM pg_trigger
             WHERE tgrelid = to_regclass(name) AND tgname = 'notify_aggregates_changed')
         UNION ALL
         SELECT 'role analytics_reader' FROM reader WHERE NOT present
         UNION ALL
         SELECT 'usage on schema analytics for analytics_reader' FROM reader
         WHERE CASE WHEN present AND to_regnamespace('analytics') IS NOT NULL
                    THEN NOT has_schema_privilege('analytics_reader', 'analytics', 'USAGE')
                    ELSE false END
         UNION ALL
         -- CASE: the privilege is asked only once the role and the table are known to exist.
         SELECT 'select on ' || name || ' for analytics_reader' FROM aggregates, reader
         WHERE CASE WHEN present AND to_regclass(name) IS NOT NULL
                    THEN NOT has_table_privilege('analytics_reader', name, 'SELECT')
                    ELSE false END",
    )
    .bind(TABLES.as_slice())
    .bind(AGGREGATE_TABLES.as_slice())
    .fetch_all(pool)
    .await
    .map_err(read)?;
    Ok(missing)
}

/// Recreates whatever of the analytics component is missing; returns what was.
pub async fn heal_analytics(pool: &PgPool) -> Result<Vec<String>, MigrateError> {
    let missing = missing_analytics_objects(pool).await?;
    if missing.is_empty() {
        return Ok(missing);
    }
    let step = |source| MigrateError::Step {
        component: "analytics",
        version: 0,
        description: "recreate missing objects",
        source,
    };
    let mut tx = pool.begin().await.map_err(step)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('crm_analytics.migrate'))")
        .execute(&mut *tx)
        .await
        .map_err(step)?;
    sqlx::raw_sql(crate::aggregates::CURRENT_SHAPE)
        .execute(&mut *tx)
        .await
        .map_err(step)?;
    tx.commit().await.map_err(step)?;
    Ok(missing)
}
