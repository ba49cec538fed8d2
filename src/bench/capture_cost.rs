//! Cost of capture to the CRM's own writes: the same mixed OLTP transactions and the same
//! bulk INSERT on a database with capture attached and one without, alternating runs; on
//! the captured database both with `crm-analytics run` draining it (what a user meets) and,
//! as a breakdown, with no consumer at all.

use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use super::{BenchDb, Report, Scale};

const SECTION: &str = "1. Cost to the CRM's own writes";
const CLIENTS: usize = 4;

async fn crm_database(
    server: &str,
    label: &str,
    capture: bool,
) -> anyhow::Result<(BenchDb, PgPool)> {
    let db = BenchDb::create(server, label).await?;
    let pool = db.pool(CLIENTS as u32 + 2).await?;
    crate::capture::create_reference_schema(&pool, "public").await?;
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'account ' || i FROM generate_series(1, 1000) i;
         INSERT INTO projects (account_id, name, amount) SELECT id, 'deal', 1000 FROM accounts, generate_series(1, 3);",
    )
    .execute(&pool)
    .await?;
    if capture {
        crate::migrate::all(&pool, &pool, "public", false).await?;
    }
    sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await?;
    Ok((db, pool))
}

async fn ids(pool: &PgPool, table: &str) -> anyhow::Result<Arc<Vec<Uuid>>> {
    Ok(Arc::new(
        sqlx::query_scalar(&format!("SELECT id FROM {table}"))
            .fetch_all(pool)
            .await?,
    ))
}

/// One CRM write transaction: insert a lead, log an activity, move the lead on, win a deal.
async fn mixed_transaction(
    pool: &PgPool,
    accounts: &[Uuid],
    projects: &[Uuid],
    rng: &mut rand::rngs::StdRng,
) -> Result<(), sqlx::Error> {
    let account = accounts[rng.gen_range(0..accounts.len())];
    let project = projects[rng.gen_range(0..projects.len())];
    let mut tx = pool.begin().await?;
    let lead: Uuid = sqlx::query_scalar(
        "INSERT INTO leads (account_id, source) VALUES ($1, 'web') RETURNING id",
    )
    .bind(account)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO activities (account_id, lead_id, activity_type) VALUES ($1, $2, 'call')",
    )
    .bind(account)
    .bind(lead)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE leads SET status = 'contacted', updated_at = now() WHERE id = $1")
        .bind(lead)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE projects SET status = 'won', closed_at = now(), amount = amount + 1 WHERE id = $1",
    )
    .bind(project)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Transactions per second over `seconds` with CLIENTS concurrent clients.
async fn oltp(pool: &PgPool, seconds: u64) -> anyhow::Result<f64> {
    let (accounts, projects) = (ids(pool, "accounts").await?, ids(pool, "projects").await?);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let (pool, accounts, projects) = (pool.clone(), accounts.clone(), projects.clone());
        clients.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(client as u64);
            let mut done = 0u64;
            while Instant::now() < deadline {
                // A deadlock between two clients on the same deal is a CRM's normal life: retry.
                if mixed_transaction(&pool, &accounts, &projects, &mut rng)
                    .await
                    .is_ok()
                {
                    done += 1;
                }
            }
            done
        });
    }
    let mut total = 0;
    while let Some(done) = clients.join_next().await {
        total += done?;
    }
    Ok(total as f64 / seconds as f64)
}

/// Sets the flag a relay raises when it goes to sleep (capture migration 3).
async fn set_relay_asleep(pool: &PgPool, asleep: bool) -> anyhow::Result<()> {
    sqlx::query("SELECT setval('crm_analytics.relay_asleep', $1)")
        .bind(i64::from(asleep))
        .execute(pool)
        .await?;
    Ok(())
}

/// [`oltp`] on the captured database while `crm-analytics run` (its own process, the
/// default queue) drains it on the same server: the cost a user meets. The run starts, drains
/// what earlier runs left in the outbox, then the clients write for `seconds`.
async fn oltp_with_pipeline(db: &BenchDb, pool: &PgPool, seconds: u64) -> anyhow::Result<f64> {
    let archive = std::env::temp_dir().join(format!("{}-archive", db.name));
    let mut run = super::drain::spawn(db, "run", &archive)?;
    let started = Instant::now();
    loop {
        let left: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM crm_analytics.event_outbox)")
                .fetch_one(pool)
                .await?;
        if !left {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "`crm-analytics run` did not drain the outbox within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = oltp(pool, seconds).await;
    let _ = run.start_kill();
    let _ = run.wait().await;
    let _ = std::fs::remove_dir_all(&archive);
    rate
}

async fn bulk(pool: &PgPool, rows: i64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO leads (account_id, source, estimated_value)
         SELECT a.id, 'import', 100 FROM generate_series(1, $1) i
         JOIN LATERAL (SELECT id FROM accounts OFFSET (i % 1000) LIMIT 1) a ON true",
    )
    .bind(rows)
    .execute(pool)
    .await?;
    Ok(started.elapsed())
}

pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let (plain_db, plain) = crm_database(server, "plain", false).await?;
    let (captured_db, captured) = crm_database(server, "captured", true).await?;
    // Alternate the runs so that drift on the machine hits all sides alike. Under sustained
    // writes the relay is awake and polling, so writers do not notify (flag down); the
    // first write after the relay fell asleep also sends a NOTIFY (flag up).
    let half = (scale.oltp_seconds / 2).max(1);
    let (mut without, mut with, mut with_notify, mut with_run) = (0.0, 0.0, 0.0, 0.0);
    for _ in 0..2 {
        without += oltp(&plain, half).await? / 2.0;
        set_relay_asleep(&captured, false).await?;
        with += oltp(&captured, half).await? / 2.0;
        set_relay_asleep(&captured, true).await?;
        with_notify += oltp(&captured, half).await? / 2.0;
        with_run += oltp_with_pipeline(&captured_db, &captured, half).await? / 2.0;
    }
    let ratio_run = with_run / without;
    let ratio = with / without;
    report.add(
        SECTION,
        format!("mixed CRM transaction, {CLIENTS} clients, without capture"),
        format!("{without:.0} tx/s"),
        None,
    );
    report.add(
        SECTION,
        "same, with capture attached and `crm-analytics run` draining on the same server",
        format!("{with_run:.0} tx/s"),
        None,
    );
    report.add(
        SECTION,
        "OLTP throughput with capture and the pipeline running / without",
        format!("{ratio_run:.3}"),
        Some(("at least 0.70".into(), ratio_run >= 0.70)),
    );
    report.add(
        SECTION,
        "breakdown: capture attached, no consumer (notify flag down, as under sustained writes)",
        format!("{with:.0} tx/s"),
        None,
    );
    report.add(
        SECTION,
        "breakdown: capture attached, no consumer / without",
        format!("{ratio:.3}"),
        Some(("at least 0.90".into(), ratio >= 0.90)),
    );
    report.add(
        SECTION,
        "breakdown: capture attached, relay asleep (every transaction also sends a NOTIFY) / without",
        format!("{:.3}", with_notify / without),
        None,
    );
    let (mut t_without, mut t_with) = (Duration::MAX, Duration::MAX);
    for _ in 0..2 {
        t_without = t_without.min(bulk(&plain, scale.bulk_rows).await?);
        t_with = t_with.min(bulk(&captured, scale.bulk_rows).await?);
    }
    let slowdown = t_with.as_secs_f64() / t_without.as_secs_f64();
    report.add(
        SECTION,
        format!("bulk INSERT of {} leads, without capture", scale.bulk_rows),
        format!("{:.0} ms", t_without.as_secs_f64() * 1000.0),
        None,
    );
    report.add(
        SECTION,
        "same, with capture attached",
        format!("{:.0} ms", t_with.as_secs_f64() * 1000.0),
        None,
    );
    report.add(
        SECTION,
        "bulk INSERT time with capture / without",
        format!("{slowdown:.2}x"),
        Some(("at most 2.0x".into(), slowdown <= 2.0)),
    );
    plain.close().await;
    captured.close().await;
    plain_db.drop_db().await?;
    captured_db.drop_db().await?;
    Ok(())
}
