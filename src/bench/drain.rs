//! Drain throughput: a backlog of mixed events drained through the default queue, all four
//! aggregates and the archive by `crm-analytics run`, against two pure-SQL baselines on
//! copies of the same backlog (see [`super::baselines`]); and peak memory of the process. Scale-out over worker processes is section 7
//! (scale_out.rs).

use sqlx::{Connection, PgConnection, PgPool};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

use super::baselines::{self, Baseline};
use super::{BenchDb, Report, Scale};
use crate::queue::{Queue, QueueOptions, QueueSpec};

const SECTION: &str = "2. Drain throughput and memory";

/// Builds a database with capture attached and a backlog of about `events` mixed events.
pub(super) async fn template(server: &str, events: i64) -> anyhow::Result<(BenchDb, i64)> {
    let db = BenchDb::create(server, "backlog").await?;
    let pool = db.pool(2).await?;
    crate::migrate::all(&pool, &pool, "public", true).await?;
    let n = |share: f64| ((events as f64) * share).round() as i64;
    sqlx::query("INSERT INTO accounts (name) SELECT 'account ' || i FROM generate_series(1, $1) i")
        .bind(n(0.05).max(10))
        .execute(&pool)
        .await?;
    let accounts = n(0.05).max(10);
    for (sql, share) in [
        ("INSERT INTO leads (account_id, source, created_at)
          SELECT a.id, (ARRAY['web','event','referral','outbound'])[1 + i % 4], now() - (i % 120) * interval '1 day'
          FROM generate_series(1, $1) i JOIN (SELECT id, row_number() OVER () - 1 AS k FROM accounts) a ON a.k = i % $2", 0.40),
        ("INSERT INTO activities (account_id, activity_type, occurred_at)
          SELECT a.id, 'call', now() - (i % 90) * interval '1 day'
          FROM generate_series(1, $1) i JOIN (SELECT id, row_number() OVER () - 1 AS k FROM accounts) a ON a.k = i % $2", 0.25),
        ("INSERT INTO projects (account_id, name, amount)
          SELECT a.id, 'deal', (i % 5000) + 0.5
          FROM generate_series(1, $1) i JOIN (SELECT id, row_number() OVER () - 1 AS k FROM accounts) a ON a.k = i % $2", 0.10),
        ("UPDATE leads SET status = 'contacted' WHERE id IN (SELECT id FROM leads LIMIT $1 + 0 * $2)", 0.10),
        ("UPDATE projects SET status = 'won', closed_at = now() - (random() * 90) * interval '1 day'
          WHERE id IN (SELECT id FROM projects LIMIT $1 + 0 * $2)", 0.05),
        ("DELETE FROM activities WHERE id IN (SELECT id FROM activities LIMIT $1 + 0 * $2)", 0.05),
    ] {
        sqlx::query(sql).bind(n(share)).bind(accounts).execute(&pool).await?;
    }
    let backlog: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await?;
    sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await?;
    pool.close().await;
    Ok((db, backlog))
}

/// A copy of the template (a file copy inside PostgreSQL, cheap).
pub(super) async fn copy(server: &str, template: &BenchDb, label: &str) -> anyhow::Result<BenchDb> {
    let name = format!(
        "crm_analytics_bench_{label}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = PgConnection::connect(&format!("{server}/postgres")).await?;
    sqlx::raw_sql(&format!(
        "CREATE DATABASE {name} TEMPLATE {}",
        template.name
    ))
    .execute(&mut admin)
    .await?;
    Ok(BenchDb {
        url: format!("{server}/{name}"),
        name,
        server: server.to_string(),
    })
}

/// Whether the outbox and the queue are both empty.
pub(super) async fn drained(pool: &PgPool, queue: &dyn Queue) -> anyhow::Result<bool> {
    let outbox_empty: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM crm_analytics.event_outbox)")
            .fetch_one(pool)
            .await?;
    Ok(outbox_empty && queue.depth().await?.events == 0)
}

/// The queue the spawned processes drain (see [`spawn`]), to watch its depth.
pub(super) async fn open_queue(pool: &PgPool) -> anyhow::Result<Arc<dyn Queue>> {
    Ok(crate::queue::open(&QueueSpec::Postgres, pool, &QueueOptions::default()).await?)
}

pub(super) fn spawn(
    db: &BenchDb,
    command: &str,
    archive: &std::path::Path,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    Ok(Command::new(exe)
        .arg(command)
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        // The default queue whatever the environment says: the benchmark measures it, and
        // watches its depth (open_queue).
        .env("CRM_ANALYTICS_QUEUE", "postgres")
        .env("CRM_ANALYTICS_ARCHIVE", archive)
        .env("CRM_ANALYTICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

/// Peak resident memory of a process.
fn peak_rss_mb(child: &Child) -> Option<f64> {
    super::proc_status_mb(child.id()?, "VmHWM")
}

/// Drains `db` with the given processes; returns the seconds it took and their peak RSS.
async fn drain_with(
    db: &BenchDb,
    commands: &[&str],
    timeout: Duration,
) -> anyhow::Result<(f64, f64)> {
    let pool = db.pool(2).await?;
    let archive = std::env::temp_dir().join(&db.name);
    let started = Instant::now();
    let mut children = Vec::new();
    for command in commands {
        children.push(spawn(db, command, &archive)?);
    }
    let queue = open_queue(&pool).await?;
    while !drained(&pool, &*queue).await? {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the backlog did not drain within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak = children.iter().filter_map(peak_rss_mb).fold(0.0, f64::max);
    for mut child in children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    pool.close().await;
    let _ = std::fs::remove_dir_all(archive);
    Ok((seconds, peak))
}

pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let (template, backlog) = template(server, scale.backlog).await?;
    let timeout = Duration::from_secs(((backlog / 2_000) as u64).max(120));
    report.add(
        SECTION,
        "backlog of mixed events (inserts, updates, deletes of the four tables)",
        backlog.to_string(),
        None,
    );

    let ours_db = copy(server, &template, "run").await?;
    let (seconds, peak) = drain_with(&ours_db, &["run"], timeout).await?;
    let ours = backlog as f64 / seconds;
    ours_db.drop_db().await?;
    let baseline = |label| {
        let (server, template) = (server.to_string(), &template);
        async move {
            let db = copy(&server, template, label).await?;
            let which = match label {
                "floor" => Baseline::FunnelOnly,
                _ => Baseline::Equivalent,
            };
            let seconds = baselines::drain(&db, which, timeout).await?;
            db.drop_db().await?;
            anyhow::Ok(backlog as f64 / seconds)
        }
    };
    let equivalent = baseline("equivalent").await?;
    let floor = baseline("floor").await?;
    report.add(
        SECTION,
        "`crm-analytics run`: four aggregates, idempotency, archive",
        format!("{ours:.0} events/s"),
        Some(("at least 25,000 events/s".into(), ours >= 25_000.0)),
    );
    report.add(
        SECTION,
        "equivalent pure-SQL baseline: one transaction per batch, the four aggregates with retractions, zero rows removed, event counts (no ledger, queue or archive); result verified exact",
        format!("{equivalent:.0} events/s"),
        None,
    );
    let ratio = ours / equivalent;
    report.add(
        SECTION,
        "ours / equivalent baseline",
        format!("{ratio:.2}x"),
        Some(("at least 1.0x".into(), ratio >= 1.0)),
    );
    report.add(
        SECTION,
        "one-aggregate floor: one statement per batch, funnel only; its funnel verified exact",
        format!("{floor:.0} events/s"),
        None,
    );
    report.add(
        SECTION,
        "ours / one-aggregate floor",
        format!("{:.2}x", ours / floor),
        None,
    );
    report.add(
        SECTION,
        "peak RSS of `crm-analytics run` during the drain",
        format!("{peak:.0} MB"),
        Some(("under 150 MB".into(), peak < 150.0)),
    );

    template.drop_db().await?;
    Ok(())
}
