//! Full recomputation of the metrics by SQL over the CRM tables: what backfill and rebuild
//! load, and what `verify` compares the incremental aggregates against. The SQL here is the
//! specification the incremental deltas must agree with, written independently of them.
//! A NULL in a grouping column is a group of its own (NULL key), as GROUP BY makes it; a
//! won deal with a NULL amount is counted with revenue 0 (`coalesce`), as the deltas do.

use chrono::NaiveDate;
use futures::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::delta::{DailyDelta, Deltas, FunnelDelta, RevenueDelta};
use crate::event::CrmTable;

/// Rows are written to the analytics database in chunks of this many keys.
const CHUNK: usize = 5_000;

/// The query recomputing daily_account_metrics from the CRM tables in schema `crm`, one
/// [`DailyRow`] per row (public for the benchmark's baselines and materialized views).
pub fn daily_sql(crm: &str) -> String {
    format!(
        "SELECT account_id, day, sum(lc)::int8, sum(lv)::int8, sum(a)::int8, sum(dw)::int8, sum(rw)
         FROM (
            SELECT account_id, (created_at AT TIME ZONE 'UTC')::date AS day,
                   1 AS lc, 0 AS lv, 0 AS a, 0 AS dw, 0::numeric AS rw
              FROM {crm}.leads
            UNION ALL
            SELECT account_id, (converted_at AT TIME ZONE 'UTC')::date, 0, 1, 0, 0, 0
              FROM {crm}.leads WHERE status = 'converted'
            UNION ALL
            SELECT account_id, (occurred_at AT TIME ZONE 'UTC')::date, 0, 0, 1, 0, 0
              FROM {crm}.activities
            UNION ALL
            SELECT account_id, (closed_at AT TIME ZONE 'UTC')::date, 0, 0, 0, 1,
                   coalesce(amount, 0)
              FROM {crm}.projects WHERE status = 'won'
         ) contributions
         GROUP BY account_id, day"
    )
}

/// The query recomputing lead_funnel_metrics from the CRM tables in schema `crm`, one
/// [`FunnelRow`] per row (public for the benchmark's baselines and materialized views).
pub fn funnel_sql(crm: &str) -> String {
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

/// The query recomputing revenue_metrics from the CRM tables in schema `crm`, one
/// [`RevenueRow`] per row (public for the benchmark's baselines and materialized views).
pub fn revenue_sql(crm: &str) -> String {
    format!(
        "SELECT account_id, date_trunc('month', closed_at AT TIME ZONE 'UTC')::date,
                count(*), sum(coalesce(amount, 0))
         FROM {crm}.projects
         WHERE status = 'won'
         GROUP BY 1, 2"
    )
}

/// A row of each aggregate table as SQL returns it, keys first (NULL keys are `None`).
pub type DailyRow = (Option<Uuid>, Option<NaiveDate>, i64, i64, i64, i64, Decimal);
pub type FunnelRow = (
    Option<NaiveDate>,
    Option<String>,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);
pub type RevenueRow = (Option<Uuid>, Option<NaiveDate>, i64, Decimal);

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
