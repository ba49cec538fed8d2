//! `verify --archive`: compares the aggregates with a recomputation from the archive, so
//! the archive can be trusted before it is needed.
//!
//! Under the replay lock (no batch half done), the current aggregates are copied aside, the
//! archive is folded into the emptied tables as a full replay would, the two are compared
//! in SQL, and the transaction rolls back: nothing changes, the API keeps reading the
//! committed rows, and workers wait only for the duration.

use futures::TryStreamExt;
use sqlx::{PgConnection, PgPool};

use super::fold::{fold, Mode};
use super::ReplayError;
use crate::aggregates::verify::Comparison;
use crate::archive::Archive;
use crate::backfill::BACKFILL_LOCK;

/// Each aggregate table: its key columns and its value columns.
const TABLES: [(&str, &str, &str); 3] = [
    (
        "daily_account_metrics",
        "account_id, date",
        "leads_created, leads_converted, activities, deals_won, revenue_won",
    ),
    (
        "lead_funnel_metrics",
        "cohort_date, source",
        "new, contacted, qualified, converted, lost, total",
    ),
    ("revenue_metrics", "account_id, month", "deals_won, revenue"),
];

/// Compares; the first `shown` differences are described.
pub async fn verify_archive(
    analytics: &PgPool,
    archive: &Archive,
    location: &str,
    shown: usize,
) -> Result<Comparison, ReplayError> {
    let mut tx = analytics.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(BACKFILL_LOCK)
        .execute(&mut *tx)
        .await?;
    let listing = super::list(archive, location).await?;
    for (table, _, _) in TABLES {
        sqlx::raw_sql(&format!(
            "CREATE TEMP TABLE kept_{table} ON COMMIT DROP AS SELECT * FROM analytics.{table};
             DELETE FROM analytics.{table};"
        ))
        .execute(&mut *tx)
        .await?;
    }
    fold(&mut tx, archive, &listing, Mode::Compare).await?;
    let mut found = Comparison::default();
    for (table, key, values) in TABLES {
        compare(&mut tx, table, key, values, shown, &mut found).await?;
    }
    tx.rollback().await?;
    Ok(found)
}

/// Records the keys of `table` whose values differ between the archive's recomputation (in
/// the table now) and the aggregates (kept aside). Keys are joined as text, NULLs included,
/// so that the join can hash; values compare as values (numeric 1.0 equals 1).
async fn compare(
    tx: &mut PgConnection,
    table: &str,
    key: &str,
    values: &str,
    shown: usize,
    found: &mut Comparison,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "SELECT coalesce(e.k, a.k), e.v::text, a.v::text
         FROM (SELECT row({key})::text AS k, row({values}) AS v FROM analytics.{table}) e
         FULL JOIN (SELECT row({key})::text AS k, row({values}) AS v FROM kept_{table}) a
           ON e.k = a.k
         WHERE e.v IS DISTINCT FROM a.v
         ORDER BY 1"
    );
    let mut rows = sqlx::query_as::<_, (String, Option<String>, Option<String>)>(&sql).fetch(tx);
    let none = || "no row".to_string();
    while let Some((key, expected, actual)) = rows.try_next().await? {
        found.differences += 1;
        if found.shown.len() < shown {
            found.shown.push(format!(
                "{table} {key}: the archive gives {}, the aggregates hold {}",
                expected.unwrap_or_else(none),
                actual.unwrap_or_else(none)
            ));
        }
    }
    Ok(())
}
