//! Cost of capture to the CRM's own writes: the same mixed OLTP transactions and the same
//! bulk INSERT on a database with capture attached and one without, alternating runs; on
//! the captured database both with `crm-analytics run` draining it (what a user meets) and,
//! as a breakdown, with no consumer at all.

use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use super::{cpu, BenchDb, Report, Scale};

const SECTION: &str = "1. Cost to the CRM's own writes";
const CLIENTS: usize = 4;

async fn crm_database(
    server: &str,
    label: &str,
    capture: bool,
) -> anyhow::Result<(BenchDb, PgPool)> {
    let db = BenchDb::create(server, label).await?;
    let pool = db.pool(CLIENTS as u32 + 2).await?;
    crm_analytics::capture::create_reference_schema(&pool, "public").await?;
    // A CRM in use, not empty tables: planned on empty tables, the CRM's own statements and
    // its foreign-key checks would keep sequential-scan plans for the whole run (until
    // autovacuum analyzes), slower the larger each table grows, which would weigh on
    // whichever database had been written to most.
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'account ' || i FROM generate_series(1, 1000) i;
         INSERT INTO projects (account_id, name, amount) SELECT id, 'deal', 1000 FROM accounts, generate_series(1, 3);
         INSERT INTO leads (account_id, source, status)
            SELECT id, 'web', (ARRAY['new', 'contacted', 'qualified'])[1 + i % 3] FROM accounts, generate_series(1, 20) i;
         INSERT INTO activities (account_id, lead_id, activity_type)
            SELECT account_id, id, 'call' FROM leads;",
    )
    .execute(&pool)
    .await?;
    if capture {
        crm_analytics::migrate::all(&pool, &pool, "public", false).await?;
    }
    sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await?;
    Ok((db, pool))
}

/// The floor of any trigger-based outbox, for the breakdown: on a copy of the plain CRM,
/// a row trigger whose function does nothing, and one that appends a fixed row to a
/// table keyed by a sequence (no row image, no JSON, no event id to compute). Each is
/// enabled alone for its run.
const FLOOR_TRIGGERS: &str = "
    CREATE TABLE floor_outbox (id bigserial PRIMARY KEY, event_type text NOT NULL, payload jsonb NOT NULL);
    CREATE FUNCTION floor_nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
    CREATE FUNCTION floor_append() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO floor_outbox (event_type, payload) VALUES (TG_TABLE_NAME, '{}');
        RETURN NULL;
    END $$;
    DO $$
    DECLARE t text;
    BEGIN
        FOREACH t IN ARRAY ARRAY['accounts', 'leads', 'projects', 'activities'] LOOP
            EXECUTE format('CREATE TRIGGER floor_nothing AFTER INSERT OR UPDATE OR DELETE ON %I
                            FOR EACH ROW EXECUTE FUNCTION floor_nothing()', t);
            EXECUTE format('CREATE TRIGGER floor_append AFTER INSERT OR UPDATE OR DELETE ON %I
                            FOR EACH ROW EXECUTE FUNCTION floor_append()', t);
        END LOOP;
    END $$;";

/// Enables exactly the floor trigger `name` on the four tables.
async fn floor_variant(pool: &PgPool, name: &str) -> anyhow::Result<()> {
    for table in ["accounts", "leads", "projects", "activities"] {
        for trigger in ["floor_nothing", "floor_append"] {
            let state = if trigger == name { "ENABLE" } else { "DISABLE" };
            sqlx::raw_sql(&format!("ALTER TABLE {table} {state} TRIGGER {trigger}"))
                .execute(pool)
                .await?;
        }
    }
    Ok(())
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
/// Where the CPU went while the clients wrote with `crm-analytics run` draining.
struct WithRun {
    rate: f64,
    cpu: cpu::Split,
    /// `crm-analytics run`'s CPU over the writes, in cores.
    ours: Option<f64>,
}

async fn oltp_with_pipeline(db: &BenchDb, pool: &PgPool, seconds: u64) -> anyhow::Result<WithRun> {
    let archive = std::env::temp_dir().join(format!("{}-archive", db.name));
    let mut run = super::drain::spawn(db, "run", &archive, &super::drain::DEFAULT_QUEUE, &[])?;
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
    let pids = [run.id()];
    let window = cpu::Window::start(&pids);
    let rate = oltp(pool, seconds).await;
    let (cpu, ours) = window.finish(&pids);
    let _ = run.start_kill();
    let _ = run.wait().await;
    let _ = std::fs::remove_dir_all(&archive);
    Ok(WithRun {
        rate: rate?,
        cpu,
        ours,
    })
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
    let (floor_db, floor) = crm_database(server, "floor", false).await?;
    sqlx::raw_sql(FLOOR_TRIGGERS).execute(&floor).await?;
    // The bulk statements first, while both databases hold the same rows: after the OLTP
    // runs the captured one is larger (it is written in more runs), which would weigh on it.
    let (mut t_without, mut t_with) = (Duration::MAX, Duration::MAX);
    for _ in 0..2 {
        t_without = t_without.min(bulk(&plain, scale.bulk_rows).await?);
        t_with = t_with.min(bulk(&captured, scale.bulk_rows).await?);
    }
    // Alternate the runs so that drift on the machine hits all sides alike. Under sustained
    // writes the relay is awake and polling, so writers do not notify (flag down); the
    // first write after the relay fell asleep also sends a NOTIFY (flag up).
    let half = (scale.oltp_seconds / 2).max(1);
    let (mut without, mut with, mut with_notify, mut with_run) = (0.0, 0.0, 0.0, 0.0);
    let (mut empty_trigger, mut fixed_append) = (0.0, 0.0);
    let mut last_with_run = None;
    for _ in 0..2 {
        without += oltp(&plain, half).await? / 2.0;
        set_relay_asleep(&captured, false).await?;
        with += oltp(&captured, half).await? / 2.0;
        set_relay_asleep(&captured, true).await?;
        with_notify += oltp(&captured, half).await? / 2.0;
        let measured = oltp_with_pipeline(&captured_db, &captured, half).await?;
        with_run += measured.rate / 2.0;
        last_with_run = Some(measured);
        floor_variant(&floor, "floor_nothing").await?;
        empty_trigger += oltp(&floor, half).await? / 2.0;
        floor_variant(&floor, "floor_append").await?;
        fixed_append += oltp(&floor, half).await? / 2.0;
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
    if let Some(measured) = &last_with_run {
        report.add(
            SECTION,
            "where the CPU went while the clients wrote with `crm-analytics run` draining (the last of those runs, from /proc; the clients' own CPU is the rest)",
            measured.cpu.describe(
                measured.ours.map(|cores| ("`crm-analytics run`", cores)),
                measured.rate * measured.cpu.seconds,
                "CRM transaction",
            ),
            None,
        );
    }
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
    report.add(
        SECTION,
        "floor of any trigger-based outbox: a row trigger that does nothing / without",
        format!("{:.3}", empty_trigger / without),
        None,
    );
    report.add(
        SECTION,
        "floor of any trigger-based outbox: a row trigger appending a fixed row (sequence key, no row image) / without",
        format!("{:.3}", fixed_append / without),
        None,
    );
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
        Some(("at most 1.5x".into(), slowdown <= 1.5)),
    );
    plain.close().await;
    captured.close().await;
    floor.close().await;
    floor_db.drop_db().await?;
    plain_db.drop_db().await?;
    captured_db.drop_db().await?;
    Ok(())
}
