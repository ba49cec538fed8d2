//! Full recomputation of the metrics by SQL over the CRM tables: what backfill and rebuild
//! load, and what `verify` compares the incremental aggregates against. The SQL here is the
//! specification the incremental deltas must agree with, written independently of them.
//! A NULL in a grouping column is a group of its own (NULL key), as GROUP BY makes it; a
//! won deal with a NULL amount is counted with revenue 0 (`coalesce`), as the deltas do.

use chrono::NaiveDate;
use futures::{Stream, TryStreamExt};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use std::cmp::Ordering;
use std::fmt::Debug;
use uuid::Uuid;

use super::delta::{DailyDelta, Deltas, FunnelDelta, RevenueDelta};
use crate::event::CrmTable;

/// Rows are written to the analytics database in chunks of this many keys.
const CHUNK: usize = 5_000;

pub(crate) fn daily_sql(crm: &str) -> String {
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

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("reading the metrics for comparison: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{table}: rows did not arrive in key order ({previous} then {next}); cannot compare")]
    Unordered {
        table: &'static str,
        previous: String,
        next: String,
    },
}

/// What [`compare`] found: how many aggregate rows differ, and the first few described.
#[derive(Debug, Default)]
pub struct Comparison {
    pub differences: u64,
    pub shown: Vec<String>,
}

impl Comparison {
    fn record(&mut self, limit: usize, line: impl FnOnce() -> String) {
        self.differences += 1;
        if self.shown.len() < limit {
            self.shown.push(line());
        }
    }
}

/// Compares the aggregate tables (through `analytics`) with a recomputation from the CRM
/// (through `crm`) in bounded memory: both sides are streamed in the same key order and
/// merged like sorted files; only the first `limit` differences are kept as text.
///
/// Both queries sort by key with NULLs last and text in byte order (`COLLATE "C"`), which
/// is the order of [`key_order`]; a row out of that order stops the comparison with an
/// error rather than reporting false differences.
pub async fn compare(
    crm: &mut PgConnection,
    analytics: &mut PgConnection,
    crm_schema: &str,
    limit: usize,
) -> Result<Comparison, VerifyError> {
    let mut found = Comparison::default();
    let daily_key = |(a, d, lc, lv, ac, dw, rw): DailyRow| {
        let value = DailyDelta {
            leads_created: lc,
            leads_converted: lv,
            activities: ac,
            deals_won: dw,
            revenue_won: rw,
        };
        ((a, d), value)
    };
    let expected = format!(
        "{} ORDER BY account_id NULLS LAST, day NULLS LAST",
        daily_sql(crm_schema)
    );
    let actual = "SELECT account_id, date, leads_created, leads_converted, activities, deals_won, revenue_won
         FROM analytics.daily_account_metrics ORDER BY account_id NULLS LAST, date NULLS LAST";
    merge(
        "daily_account_metrics",
        sqlx::query_as::<_, DailyRow>(&expected)
            .fetch(&mut *crm)
            .map_ok(daily_key),
        sqlx::query_as::<_, DailyRow>(actual)
            .fetch(&mut *analytics)
            .map_ok(daily_key),
        &mut found,
        limit,
    )
    .await?;

    let funnel_key = |(d, s, n, c, q, v, l, t): FunnelRow| {
        let value = FunnelDelta {
            new: n,
            contacted: c,
            qualified: q,
            converted: v,
            lost: l,
            total: t,
        };
        ((d, s), value)
    };
    let expected = format!(
        "{} ORDER BY 1 NULLS LAST, source COLLATE \"C\" NULLS LAST",
        funnel_sql(crm_schema)
    );
    let actual = "SELECT cohort_date, source, new, contacted, qualified, converted, lost, total
         FROM analytics.lead_funnel_metrics
         ORDER BY cohort_date NULLS LAST, source COLLATE \"C\" NULLS LAST";
    merge(
        "lead_funnel_metrics",
        sqlx::query_as::<_, FunnelRow>(&expected)
            .fetch(&mut *crm)
            .map_ok(funnel_key),
        sqlx::query_as::<_, FunnelRow>(actual)
            .fetch(&mut *analytics)
            .map_ok(funnel_key),
        &mut found,
        limit,
    )
    .await?;

    let revenue_key = |(a, m, won, revenue): RevenueRow| {
        let value = RevenueDelta {
            deals_won: won,
            revenue,
        };
        ((a, m), value)
    };
    let expected = format!(
        "{} ORDER BY 1 NULLS LAST, 2 NULLS LAST",
        revenue_sql(crm_schema)
    );
    let actual = "SELECT account_id, month, deals_won, revenue FROM analytics.revenue_metrics
         ORDER BY account_id NULLS LAST, month NULLS LAST";
    merge(
        "revenue_metrics",
        sqlx::query_as::<_, RevenueRow>(&expected)
            .fetch(&mut *crm)
            .map_ok(revenue_key),
        sqlx::query_as::<_, RevenueRow>(actual)
            .fetch(&mut *analytics)
            .map_ok(revenue_key),
        &mut found,
        limit,
    )
    .await?;
    Ok(found)
}

/// The order both sides of [`compare`] are sorted in: component by component, NULL after
/// every value (PostgreSQL's default for ascending order). uuid, date and `COLLATE "C"`
/// text compare in PostgreSQL as their Rust types do (bytes, days, UTF-8 bytes).
fn key_order<A: Ord, B: Ord>(x: &(Option<A>, Option<B>), y: &(Option<A>, Option<B>)) -> Ordering {
    fn nulls_last<T: Ord>(x: &Option<T>, y: &Option<T>) -> Ordering {
        match (x, y) {
            (Some(x), Some(y)) => x.cmp(y),
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
        }
    }
    nulls_last(&x.0, &y.0).then_with(|| nulls_last(&x.1, &y.1))
}

/// One row of a stream [`merge`] compares: its two-column key and its values.
type Keyed<A, B, V, E> = Result<((Option<A>, Option<B>), V), E>;

/// Merge-compares two key-ordered streams of one table, recording every key whose values
/// differ or that only one side has. Holds one row of each side at a time.
async fn merge<A, B, V>(
    table: &'static str,
    expected: impl Stream<Item = Keyed<A, B, V, sqlx::Error>>,
    actual: impl Stream<Item = Keyed<A, B, V, sqlx::Error>>,
    found: &mut Comparison,
    limit: usize,
) -> Result<(), VerifyError>
where
    A: Ord + Clone + Debug,
    B: Ord + Clone + Debug,
    V: PartialEq + Default + Debug,
{
    // A recomputed group never sums to all zeros in practice, but backfill drops such rows
    // (`prune_zeros`), and so does the comparison; a zero row in the tables is a difference.
    let expected = expected.try_filter(|(_, value)| std::future::ready(*value != V::default()));
    let mut expected = std::pin::pin!(ordered(table, expected));
    let mut actual = std::pin::pin!(ordered(table, actual));
    let mut want = expected.try_next().await?;
    let mut have = actual.try_next().await?;
    loop {
        let order = match (&want, &have) {
            (None, None) => return Ok(()),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((w, _)), Some((h, _))) => key_order(w, h),
        };
        match order {
            Ordering::Equal => {
                if let (Some((key, w)), Some((_, h))) = (&want, &have) {
                    if w != h {
                        found.record(limit, || {
                            format!("{table} {key:?}: expected {w:?}, found {h:?}")
                        });
                    }
                }
                want = expected.try_next().await?;
                have = actual.try_next().await?;
            }
            Ordering::Less => {
                if let Some((key, w)) = &want {
                    found.record(limit, || {
                        format!("{table} {key:?}: expected {w:?}, found no row")
                    });
                }
                want = expected.try_next().await?;
            }
            Ordering::Greater => {
                if let Some((key, h)) = &have {
                    found.record(limit, || {
                        format!("{table} {key:?}: expected no row, found {h:?}")
                    });
                }
                have = actual.try_next().await?;
            }
        }
    }
}

/// Passes `rows` through, failing if a key is not strictly after the one before (the merge
/// would otherwise misreport).
fn ordered<A, B, V>(
    table: &'static str,
    rows: impl Stream<Item = Keyed<A, B, V, sqlx::Error>>,
) -> impl Stream<Item = Keyed<A, B, V, VerifyError>>
where
    A: Ord + Clone + Debug,
    B: Ord + Clone + Debug,
{
    let mut last: Option<(Option<A>, Option<B>)> = None;
    rows.map_err(VerifyError::from)
        .and_then(move |(key, value)| {
            let result = match &last {
                Some(before) if key_order(before, &key) != Ordering::Less => {
                    Err(VerifyError::Unordered {
                        table,
                        previous: format!("{before:?}"),
                        next: format!("{key:?}"),
                    })
                }
                _ => {
                    last = Some(key.clone());
                    Ok((key, value))
                }
            };
            std::future::ready(result)
        })
}
