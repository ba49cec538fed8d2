//! Verification: compares the incremental aggregates with the full recomputation
//! ([`super::recompute`]) in bounded memory, and counts and describes the rows that differ.
//! `crm-analytics verify`, the demo and the tests call [`verify`].

use futures::{Stream, TryStreamExt};
use sqlx::{PgConnection, PgPool};
use std::cmp::Ordering;
use std::fmt::Debug;

use super::delta::{DailyDelta, FunnelDelta, RevenueDelta};
use super::recompute::{daily_sql, funnel_sql, revenue_sql, DailyRow, FunnelRow, RevenueRow};

/// Differences `verify` describes line by line by default; beyond that they are only
/// counted, so a badly diverged database neither floods the terminal nor grows memory.
pub const SHOWN: usize = 1000;

/// Compares the aggregates with a recomputation, streaming both in key order (bounded
/// memory at any size): the number of differing rows and the first `shown` of them.
pub async fn verify(
    crm: &PgPool,
    analytics: &PgPool,
    crm_schema: &str,
    shown: usize,
) -> Result<Comparison, VerifyError> {
    let mut crm = crm.acquire().await.map_err(|source| VerifyError::Connect {
        database: "CRM",
        source,
    })?;
    let mut analytics = analytics
        .acquire()
        .await
        .map_err(|source| VerifyError::Connect {
            database: "analytics",
            source,
        })?;
    compare(&mut crm, &mut analytics, crm_schema, shown).await
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("connecting to the {database} database: {source}")]
    Connect {
        database: &'static str,
        #[source]
        source: sqlx::Error,
    },
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
