//! Workload: a realistic, random CRM write load for the demo and the tests.
//!
//! Several writers run mixed transactions against the reference CRM schema: accounts, leads
//! moving through the funnel (and sometimes back), leads moving between accounts,
//! activities, deals won, lost and reopened, amount edits, deletes and cascading account
//! deletes; some transactions roll back on purpose. Timestamps spread over past months so
//! that every date and month key is exercised. Seeded, so a failing run can be repeated.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub writers: usize,
    /// Transactions per writer; None runs until stopped.
    pub transactions_per_writer: Option<u64>,
    /// Share of transactions that end in ROLLBACK on purpose.
    pub rollback_ratio: f64,
    pub seed: u64,
    pub crm_schema: String,
}

/// Live counters, shared with whoever shows progress.
#[derive(Debug, Default)]
pub struct WorkloadStats {
    pub committed: AtomicU64,
    pub rolled_back: AtomicU64,
    /// Transactions the database refused (deadlock, concurrent delete): rolled back too.
    pub aborted: AtomicU64,
}

impl WorkloadStats {
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }
}

const SOURCES: [&str; 5] = ["web", "referral", "event", "outbound", "partner"];
const ACTIVITY_TYPES: [&str; 5] = ["call", "email", "meeting", "note", "task"];
const INDUSTRIES: [&str; 4] = ["software", "retail", "finance", "health"];

/// Runs the workload until every writer is done or `stop` is cancelled.
pub async fn run(
    pool: &PgPool,
    config: &WorkloadConfig,
    stats: Arc<WorkloadStats>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..config.writers {
        let (pool, config, stats, stop) =
            (pool.clone(), config.clone(), stats.clone(), stop.clone());
        writers.spawn(async move {
            let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(writer as u64 * 7919));
            let mut done = 0u64;
            while !stop.is_cancelled()
                && config
                    .transactions_per_writer
                    .is_none_or(|limit| done < limit)
            {
                done += 1;
                let rollback = rng.gen_bool(config.rollback_ratio.clamp(0.0, 1.0));
                match transaction(&pool, &config.crm_schema, &mut rng, rollback).await {
                    Ok(true) => stats.committed.fetch_add(1, Ordering::Relaxed),
                    Ok(false) => stats.rolled_back.fetch_add(1, Ordering::Relaxed),
                    Err(sqlx::Error::Database(_)) => stats.aborted.fetch_add(1, Ordering::Relaxed),
                    Err(error) => return Err(anyhow::Error::from(error)),
                };
            }
            Ok(())
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined??;
    }
    Ok(())
}

/// One transaction of 1 to 4 random operations. Returns whether it committed.
async fn transaction(
    pool: &PgPool,
    crm: &str,
    rng: &mut StdRng,
    rollback: bool,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    for _ in 0..rng.gen_range(1..=4) {
        operation(&mut tx, crm, rng).await?;
    }
    if rollback {
        tx.rollback().await?;
        Ok(false)
    } else {
        tx.commit().await?;
        Ok(true)
    }
}

/// A random existing id of `table`, found through its primary key index.
async fn pick(
    conn: &mut PgConnection,
    crm: &str,
    table: &str,
    rng: &mut StdRng,
) -> Result<Option<Uuid>, sqlx::Error> {
    let probe = Uuid::from_u128(rng.gen());
    sqlx::query_scalar(&format!(
        "(SELECT id FROM {crm}.{table} WHERE id >= $1 ORDER BY id LIMIT 1)
         UNION ALL (SELECT id FROM {crm}.{table} ORDER BY id LIMIT 1) LIMIT 1"
    ))
    .bind(probe)
    .fetch_optional(conn)
    .await
}

fn money(rng: &mut StdRng) -> Decimal {
    Decimal::new(rng.gen_range(10_000..50_000_000), 2)
}

fn days_ago(rng: &mut StdRng) -> f64 {
    rng.gen_range(0.0..120.0)
}

async fn operation(
    conn: &mut PgConnection,
    crm: &str,
    rng: &mut StdRng,
) -> Result<(), sqlx::Error> {
    let choice = rng.gen_range(0..100);
    let account = pick(conn, crm, "accounts", rng).await?;
    match choice {
        0..=7 => {
            sqlx::query(&format!(
                "INSERT INTO {crm}.accounts (name, industry) VALUES ($1, $2)"
            ))
            .bind(format!("Account {}", rng.gen::<u32>()))
            .bind(INDUSTRIES[rng.gen_range(0..INDUSTRIES.len())])
            .execute(&mut *conn)
            .await?;
        }
        8..=27 => {
            let account = if rng.gen_bool(0.85) { account } else { None };
            sqlx::query(&format!(
                "INSERT INTO {crm}.leads (account_id, source, estimated_value, created_at)
                 VALUES ($1, $2, $3, now() - $4 * interval '1 day')"
            ))
            .bind(account)
            .bind(SOURCES[rng.gen_range(0..SOURCES.len())])
            .bind(rng.gen_bool(0.7).then(|| money(rng)))
            .bind(days_ago(rng))
            .execute(&mut *conn)
            .await?;
        }
        28..=42 => {
            // Move a lead along the funnel, or sometimes back.
            let lead = pick(conn, crm, "leads", rng).await?;
            let status =
                ["contacted", "qualified", "converted", "lost", "new"][rng.gen_range(0..5)];
            sqlx::query(&format!(
                "UPDATE {crm}.leads SET status = $2,
                    converted_at = CASE WHEN $2 = 'converted' THEN now() - $3 * interval '1 day' END,
                    updated_at = now()
                 WHERE id = $1"
            ))
            .bind(lead)
            .bind(status)
            .bind(days_ago(rng) / 4.0)
            .execute(&mut *conn)
            .await?;
        }
        43..=47 => {
            let lead = pick(conn, crm, "leads", rng).await?;
            let to = if rng.gen_bool(0.9) { account } else { None };
            sqlx::query(&format!(
                "UPDATE {crm}.leads SET account_id = $2, source = $3, updated_at = now() WHERE id = $1"
            ))
            .bind(lead)
            .bind(to)
            .bind(SOURCES[rng.gen_range(0..SOURCES.len())])
            .execute(&mut *conn)
            .await?;
        }
        48..=64 => {
            let lead = pick(conn, crm, "leads", rng).await?;
            let account = if rng.gen_bool(0.9) { account } else { None };
            sqlx::query(&format!(
                "INSERT INTO {crm}.activities (account_id, lead_id, activity_type, occurred_at)
                 VALUES ($1, $2, $3, now() - $4 * interval '1 day')"
            ))
            .bind(account)
            .bind(lead)
            .bind(ACTIVITY_TYPES[rng.gen_range(0..ACTIVITY_TYPES.len())])
            .bind(days_ago(rng))
            .execute(&mut *conn)
            .await?;
        }
        65..=74 => {
            if account.is_some() {
                sqlx::query(&format!(
                    "INSERT INTO {crm}.projects (account_id, name, amount) VALUES ($1, $2, $3)"
                ))
                .bind(account)
                .bind(format!("Deal {}", rng.gen::<u16>()))
                .bind(money(rng))
                .execute(&mut *conn)
                .await?;
            }
        }
        75..=86 => {
            // Win, lose or reopen a deal.
            let project = pick(conn, crm, "projects", rng).await?;
            let status = ["won", "won", "lost", "open"][rng.gen_range(0..4)];
            sqlx::query(&format!(
                "UPDATE {crm}.projects SET status = $2,
                    closed_at = CASE WHEN $2 = 'open' THEN NULL ELSE now() - $3 * interval '1 day' END,
                    updated_at = now()
                 WHERE id = $1"
            ))
            .bind(project)
            .bind(status)
            .bind(days_ago(rng))
            .execute(&mut *conn)
            .await?;
        }
        87..=90 => {
            // Edit the amount of a deal, won or not, or move it to another account.
            let project = pick(conn, crm, "projects", rng).await?;
            sqlx::query(&format!(
                "UPDATE {crm}.projects SET amount = $2, account_id = COALESCE($3, account_id) WHERE id = $1"
            ))
            .bind(project)
            .bind(money(rng))
            .bind(if rng.gen_bool(0.3) { account } else { None })
            .execute(&mut *conn)
            .await?;
        }
        91..=92 => {
            // A bulk statement: every new lead of an account is contacted at once.
            sqlx::query(&format!(
                "UPDATE {crm}.leads SET status = 'contacted', updated_at = now()
                 WHERE account_id = $1 AND status = 'new'"
            ))
            .bind(account)
            .execute(&mut *conn)
            .await?;
        }
        93..=98 => {
            let table = ["leads", "activities", "projects"][rng.gen_range(0..3)];
            let id = pick(conn, crm, table, rng).await?;
            sqlx::query(&format!("DELETE FROM {crm}.{table} WHERE id = $1"))
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        _ => {
            // Cascades to the account's leads, deals and activities.
            sqlx::query(&format!("DELETE FROM {crm}.accounts WHERE id = $1"))
                .bind(account)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}
