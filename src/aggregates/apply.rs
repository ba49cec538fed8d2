//! Writes summed deltas into the aggregate tables: one set-based upsert per table
//! (UNNEST of arrays, never a statement per event), then removal of rows that netted to zero.

use chrono::NaiveDate;
use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::delta::Deltas;

/// Deletes the rows at `ctids` (text form, as returned by an upsert) that are still all
/// zero. Rows are found by their physical address rather than by key: keys may be NULL,
/// which `IN`/`=` never match and `IS NOT DISTINCT FROM` cannot find through the index. The
/// addresses are stable: the upsert locked (or created) these rows in this transaction.
async fn delete_emptied(
    conn: &mut PgConnection,
    table: &str,
    all_zero: &str,
    ctids: Vec<String>,
) -> Result<(), sqlx::Error> {
    if ctids.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "DELETE FROM {table} WHERE ctid = ANY($1::text[]::tid[]) AND {all_zero}"
    ))
    .bind(&ctids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Applies `deltas` inside the caller's transaction. Tables are written in a fixed order
/// and keys sorted, so concurrent workers take row locks in the same order.
pub async fn write_deltas(conn: &mut PgConnection, deltas: &Deltas) -> Result<(), sqlx::Error> {
    write_daily(conn, deltas).await?;
    write_funnel(conn, deltas).await?;
    write_revenue(conn, deltas).await?;
    write_counts(conn, deltas).await?;
    Ok(())
}

const DAILY_ZERO: &str = "leads_created = 0 AND leads_converted = 0 AND activities = 0
    AND deals_won = 0 AND revenue_won = 0";
const FUNNEL_ZERO: &str =
    "new = 0 AND contacted = 0 AND qualified = 0 AND converted = 0 AND lost = 0 AND total = 0";
const REVENUE_ZERO: &str = "deals_won = 0 AND revenue = 0";

async fn write_daily(conn: &mut PgConnection, deltas: &Deltas) -> Result<(), sqlx::Error> {
    if deltas.daily.is_empty() {
        return Ok(());
    }
    let n = deltas.daily.len();
    let (mut accounts, mut dates) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut created, mut converted, mut activities, mut won, mut revenue) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((account, date), d) in &deltas.daily {
        accounts.push(*account);
        dates.push(*date);
        created.push(d.leads_created);
        converted.push(d.leads_converted);
        activities.push(d.activities);
        won.push(d.deals_won);
        revenue.push(d.revenue_won);
    }
    let emptied: Vec<String> = sqlx::query_scalar(&format!(
        "WITH up AS (
            INSERT INTO analytics.daily_account_metrics AS t
                (account_id, date, leads_created, leads_converted, activities, deals_won, revenue_won)
            SELECT * FROM unnest($1::uuid[], $2::date[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::numeric[])
            ON CONFLICT (account_id, date) DO UPDATE SET
                leads_created = t.leads_created + excluded.leads_created,
                leads_converted = t.leads_converted + excluded.leads_converted,
                activities = t.activities + excluded.activities,
                deals_won = t.deals_won + excluded.deals_won,
                revenue_won = t.revenue_won + excluded.revenue_won
            RETURNING ctid, *
         )
         SELECT ctid::text FROM up WHERE {DAILY_ZERO}"
    ),
    )
    .bind(&accounts)
    .bind(&dates)
    .bind(&created)
    .bind(&converted)
    .bind(&activities)
    .bind(&won)
    .bind(&revenue)
    .fetch_all(&mut *conn)
    .await?;
    delete_emptied(conn, "analytics.daily_account_metrics", DAILY_ZERO, emptied).await
}

async fn write_funnel(conn: &mut PgConnection, deltas: &Deltas) -> Result<(), sqlx::Error> {
    if deltas.funnel.is_empty() {
        return Ok(());
    }
    let n = deltas.funnel.len();
    let (mut dates, mut sources) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut columns: [Vec<i64>; 6] = Default::default();
    for ((date, source), d) in &deltas.funnel {
        dates.push(*date);
        sources.push(source.clone());
        for (column, value) in columns.iter_mut().zip([
            d.new,
            d.contacted,
            d.qualified,
            d.converted,
            d.lost,
            d.total,
        ]) {
            column.push(value);
        }
    }
    let emptied: Vec<String> = sqlx::query_scalar(&format!(
        "WITH up AS (
            INSERT INTO analytics.lead_funnel_metrics AS t
                (cohort_date, source, new, contacted, qualified, converted, lost, total)
            SELECT * FROM unnest($1::date[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[])
            ON CONFLICT (cohort_date, source) DO UPDATE SET
                new = t.new + excluded.new,
                contacted = t.contacted + excluded.contacted,
                qualified = t.qualified + excluded.qualified,
                converted = t.converted + excluded.converted,
                lost = t.lost + excluded.lost,
                total = t.total + excluded.total
            RETURNING ctid, *
         )
         SELECT ctid::text FROM up WHERE {FUNNEL_ZERO}"
    ),
    )
    .bind(&dates)
    .bind(&sources)
    .bind(&columns[0])
    .bind(&columns[1])
    .bind(&columns[2])
    .bind(&columns[3])
    .bind(&columns[4])
    .bind(&columns[5])
    .fetch_all(&mut *conn)
    .await?;
    delete_emptied(conn, "analytics.lead_funnel_metrics", FUNNEL_ZERO, emptied).await
}

async fn write_revenue(conn: &mut PgConnection, deltas: &Deltas) -> Result<(), sqlx::Error> {
    if deltas.revenue.is_empty() {
        return Ok(());
    }
    let n = deltas.revenue.len();
    let (mut accounts, mut months) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut won, mut revenue): (Vec<i64>, Vec<Decimal>) =
        (Vec::with_capacity(n), Vec::with_capacity(n));
    for ((account, month), d) in &deltas.revenue {
        accounts.push(*account);
        months.push(*month);
        won.push(d.deals_won);
        revenue.push(d.revenue);
    }
    let emptied: Vec<String> = sqlx::query_scalar(&format!(
        "WITH up AS (
            INSERT INTO analytics.revenue_metrics AS t (account_id, month, deals_won, revenue)
            SELECT * FROM unnest($1::uuid[], $2::date[], $3::int8[], $4::numeric[])
            ON CONFLICT (account_id, month) DO UPDATE SET
                deals_won = t.deals_won + excluded.deals_won,
                revenue = t.revenue + excluded.revenue
            RETURNING ctid, *
         )
         SELECT ctid::text FROM up WHERE {REVENUE_ZERO}"
    ))
    .bind(&accounts)
    .bind(&months)
    .bind(&won)
    .bind(&revenue)
    .fetch_all(&mut *conn)
    .await?;
    delete_emptied(conn, "analytics.revenue_metrics", REVENUE_ZERO, emptied).await
}

async fn write_counts(conn: &mut PgConnection, deltas: &Deltas) -> Result<(), sqlx::Error> {
    if deltas.counts.is_empty() {
        return Ok(());
    }
    let n = deltas.counts.len();
    let (mut dates, mut tables, mut operations) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut processed, mut failed): (Vec<i64>, Vec<i64>) =
        (Vec::with_capacity(n), Vec::with_capacity(n));
    for ((date, table, operation), d) in &deltas.counts {
        dates.push(*date);
        tables.push(table.name());
        operations.push(operation.name());
        processed.push(d.processed);
        failed.push(d.failed);
    }
    let emptied: Vec<(NaiveDate, String, String)> = sqlx::query_as(
        "WITH up AS (
            INSERT INTO analytics.event_counts AS t (date, table_name, operation, processed, failed)
            SELECT * FROM unnest($1::date[], $2::text[], $3::text[], $4::int8[], $5::int8[])
            ON CONFLICT (date, table_name, operation) DO UPDATE SET
                processed = t.processed + excluded.processed,
                failed = t.failed + excluded.failed
            RETURNING *
         )
         SELECT date, table_name, operation FROM up WHERE processed = 0 AND failed = 0",
    )
    .bind(&dates)
    .bind(&tables)
    .bind(&operations)
    .bind(&processed)
    .bind(&failed)
    .fetch_all(&mut *conn)
    .await?;
    if !emptied.is_empty() {
        let mut keys: (Vec<NaiveDate>, Vec<String>, Vec<String>) = Default::default();
        for (date, table, operation) in emptied {
            keys.0.push(date);
            keys.1.push(table);
            keys.2.push(operation);
        }
        sqlx::query(
            "DELETE FROM analytics.event_counts
             WHERE (date, table_name, operation) IN (SELECT * FROM unnest($1::date[], $2::text[], $3::text[]))
               AND processed = 0 AND failed = 0",
        )
        .bind(&keys.0)
        .bind(&keys.1)
        .bind(&keys.2)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
