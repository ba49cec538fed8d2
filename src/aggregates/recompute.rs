//! Full recomputation of the metrics by SQL over the CRM tables: what backfill and rebuild
//! load, and what `verify` compares the incremental aggregates against. The SQL here is the
//! specification the incremental deltas must agree with, written independently of them.

use chrono::NaiveDate;
use futures::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::delta::{CountDelta, DailyDelta, Deltas, FunnelDelta, RevenueDelta};
use crate::event::{CrmTable, Operation};

/// Rows are written to the analytics database in chunks of this many keys.
const CHUNK: usize = 5_000;

pub(crate) fn daily_sql(crm: &str) -> String {
    format!(
        "SELECT account_id, day, sum(lc)::int8, sum(lv)::int8, sum(a)::int8, sum(dw)::int8, sum(rw)
         FROM (
            SELECT account_id, (created_at AT TIME ZONE 'UTC')::date AS day,
                   1 AS lc, 0 AS lv, 0 AS a, 0 AS dw, 0::numeric AS rw
              FROM {crm}.leads WHERE account_id IS NOT NULL
            UNION ALL
            SELECT account_id, (converted_at AT TIME ZONE 'UTC')::date, 0, 1, 0, 0, 0
              FROM {crm}.leads
             WHERE account_id IS NOT NULL AND status = 'converted' AND converted_at IS NOT NULL
            UNION ALL
            SELECT account_id, (occurred_at AT TIME ZONE 'UTC')::date, 0, 0, 1, 0, 0
              FROM {crm}.activities WHERE account_id IS NOT NULL
            UNION ALL
            SELECT account_id, (closed_at AT TIME ZONE 'UTC')::date, 0, 0, 0, 1, amount
              FROM {crm}.projects
             WHERE account_id IS NOT NULL AND status = 'won' AND closed_at IS NOT NULL
         ) contributions
         GROUP BY account_id, day"
    )
}

pub(crate) fn funnel_sql(crm: &str) -> String {
    format!(
        "SELECT (created_at AT TIME ZONE 'UTC')::date, source,
                count(*) FILTER (WHERE status = 'new'),
                count(*) FILTER (WHERE status = 'contacted'),
                count(*) FILTER (WHERE status = 'qualified'),
                count(*) FILTER (WHERE status = 'converted'),
                count(*) FILTER (WHERE status = 'lost'),
                count(*)
         FROM {crm}.leads
         GROUP BY 1, 2"
    )
}

pub(crate) fn revenue_sql(crm: &str) -> String {
    format!(
        "SELECT account_id, date_trunc('month', closed_at AT TIME ZONE 'UTC')::date,
                count(*), sum(amount)
         FROM {crm}.projects
         WHERE account_id IS NOT NULL AND status = 'won' AND closed_at IS NOT NULL
         GROUP BY 1, 2"
    )
}

type DailyRow = (Uuid, NaiveDate, i64, i64, i64, i64, Decimal);
type FunnelRow = (NaiveDate, String, i64, i64, i64, i64, i64, i64);
type RevenueRow = (Uuid, NaiveDate, i64, Decimal);

fn add_daily(deltas: &mut Deltas, (account, day, lc, lv, a, dw, rw): DailyRow) {
    deltas.daily.insert(
        (account, day),
        DailyDelta {
            leads_created: lc,
            leads_converted: lv,
            activities: a,
            deals_won: dw,
            revenue_won: rw,
        },
    );
}

fn add_funnel(deltas: &mut Deltas, (day, source, n, c, q, v, l, t): FunnelRow) {
    deltas.funnel.insert(
        (day, source),
        FunnelDelta {
            new: n,
            contacted: c,
            qualified: q,
            converted: v,
            lost: l,
            total: t,
        },
    );
}

fn add_revenue(deltas: &mut Deltas, (account, month, won, revenue): RevenueRow) {
    deltas.revenue.insert(
        (account, month),
        RevenueDelta {
            deals_won: won,
            revenue,
        },
    );
}

/// The metrics of the current CRM rows, all in memory (for verification and tests).
pub async fn compute(crm: &mut PgConnection, crm_schema: &str) -> Result<Deltas, sqlx::Error> {
    let mut deltas = Deltas::default();
    for row in sqlx::query_as::<_, DailyRow>(&daily_sql(crm_schema))
        .fetch_all(&mut *crm)
        .await?
    {
        add_daily(&mut deltas, row);
    }
    for row in sqlx::query_as::<_, FunnelRow>(&funnel_sql(crm_schema))
        .fetch_all(&mut *crm)
        .await?
    {
        add_funnel(&mut deltas, row);
    }
    for row in sqlx::query_as::<_, RevenueRow>(&revenue_sql(crm_schema))
        .fetch_all(&mut *crm)
        .await?
    {
        add_revenue(&mut deltas, row);
    }
    deltas.prune_zeros();
    Ok(deltas)
}

/// Streams the recomputed metrics from `crm` into the (emptied) aggregate tables through
/// `analytics`, a chunk at a time so memory stays bounded. `progress` gets the rows written.
pub async fn stream_into(
    crm: &mut PgConnection,
    analytics: &mut PgConnection,
    crm_schema: &str,
    mut progress: impl FnMut(&'static str, u64),
) -> Result<(), sqlx::Error> {
    let daily = (daily_sql(crm_schema), "daily_account_metrics");
    stream_table(
        crm,
        analytics,
        daily,
        add_daily,
        |d| d.daily.len(),
        &mut progress,
    )
    .await?;
    let funnel = (funnel_sql(crm_schema), "lead_funnel_metrics");
    stream_table(
        crm,
        analytics,
        funnel,
        add_funnel,
        |d| d.funnel.len(),
        &mut progress,
    )
    .await?;
    let revenue = (revenue_sql(crm_schema), "revenue_metrics");
    stream_table(
        crm,
        analytics,
        revenue,
        add_revenue,
        |d| d.revenue.len(),
        &mut progress,
    )
    .await
}

/// One aggregate table of [`stream_into`]: rows of `sql` added with `add`, flushed every
/// CHUNK keys (`len` counts them).
async fn stream_table<R>(
    crm: &mut PgConnection,
    analytics: &mut PgConnection,
    (sql, table): (String, &'static str),
    add: fn(&mut Deltas, R),
    len: fn(&Deltas) -> usize,
    progress: &mut impl FnMut(&'static str, u64),
) -> Result<(), sqlx::Error>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let mut chunk = Deltas::default();
    let mut written = 0u64;
    let mut rows = sqlx::query_as::<_, R>(&sql).fetch(&mut *crm);
    while let Some(row) = rows.try_next().await? {
        add(&mut chunk, row);
        if len(&chunk) >= CHUNK {
            written += flush(analytics, &mut chunk).await?;
            progress(table, written);
        }
    }
    written += flush(analytics, &mut chunk).await?;
    progress(table, written);
    Ok(())
}

async fn flush(analytics: &mut PgConnection, chunk: &mut Deltas) -> Result<u64, sqlx::Error> {
    chunk.prune_zeros();
    let rows = (chunk.daily.len() + chunk.funnel.len() + chunk.revenue.len()) as u64;
    super::apply::write_deltas(analytics, chunk).await?;
    *chunk = Deltas::default();
    Ok(rows)
}

/// Counts the rows of each captured table (what a snapshot reads), for `event_counts`.
pub async fn table_sizes(
    crm: &mut PgConnection,
    crm_schema: &str,
) -> Result<Vec<(CrmTable, i64)>, sqlx::Error> {
    let mut sizes = Vec::new();
    for table in CrmTable::ALL {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {crm_schema}.{}",
            table.name()
        ))
        .fetch_one(&mut *crm)
        .await?;
        sizes.push((table, n));
    }
    Ok(sizes)
}

/// The aggregate tables as they are now, in the same shape as [`compute`] returns.
pub async fn load_current(analytics: &mut PgConnection) -> Result<Deltas, sqlx::Error> {
    let mut deltas = Deltas::default();
    for row in sqlx::query_as::<_, DailyRow>(
        "SELECT account_id, date, leads_created, leads_converted, activities, deals_won, revenue_won
         FROM analytics.daily_account_metrics",
    )
    .fetch_all(&mut *analytics)
    .await?
    {
        add_daily(&mut deltas, row);
    }
    for row in sqlx::query_as::<_, FunnelRow>(
        "SELECT cohort_date, source, new, contacted, qualified, converted, lost, total
         FROM analytics.lead_funnel_metrics",
    )
    .fetch_all(&mut *analytics)
    .await?
    {
        add_funnel(&mut deltas, row);
    }
    for row in sqlx::query_as::<_, RevenueRow>(
        "SELECT account_id, month, deals_won, revenue FROM analytics.revenue_metrics",
    )
    .fetch_all(&mut *analytics)
    .await?
    {
        add_revenue(&mut deltas, row);
    }
    for (date, table, operation, processed, failed) in
        sqlx::query_as::<_, (NaiveDate, String, String, i64, i64)>(
            "SELECT date, table_name, operation, processed, failed FROM analytics.event_counts",
        )
        .fetch_all(&mut *analytics)
        .await?
    {
        if let (Some(table), Some(operation)) = (
            CrmTable::from_name(&table),
            Operation::from_name(&operation),
        ) {
            deltas
                .counts
                .insert((date, table, operation), CountDelta { processed, failed });
        }
    }
    Ok(deltas)
}
