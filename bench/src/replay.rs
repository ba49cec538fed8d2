//! Replay from the archive: a backlog drained by `crm-analytics run` into a local archive,
//! then the aggregates rebuilt by `crm-analytics replay` from that archive alone, side by
//! side with `crm-analytics rebuild` from the CRM tables of the same database. Both are run
//! as a user runs them (the binary, wall time from start to exit) and both results are
//! checked against the recomputation.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{drain, Report, Scale};
use crm_analytics::archive::{Archive, Layout};

const SECTION: &str = "9. Replay from the archive";

/// Runs `crm-analytics <args>` on `db` with `archive` and waits; its wall time.
async fn timed(url: &str, archive: &Path, args: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let output = crate::crm_analytics()?
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("CRM_ANALYTICS_ARCHIVE", archive)
        .env("CRM_ANALYTICS_QUEUE", drain::DEFAULT_QUEUE.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        output.status.success(),
        "crm-analytics {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(elapsed)
}

/// Fails the benchmark when the aggregates are not exact: a fast wrong answer is no result.
async fn check_exact(pool: &sqlx::PgPool, what: &str) -> anyhow::Result<()> {
    let found = crm_analytics::aggregates::verify::verify(pool, pool, "public", 5).await?;
    anyhow::ensure!(
        found.differences == 0,
        "after {what}, {} aggregate rows differ from the recomputation: {:?}",
        found.differences,
        found.shown
    );
    Ok(())
}

pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let (db, backlog) = drain::template(server, scale.backlog).await?;
    // The queue's listener, and verify's two connections (CRM and analytics side).
    let pool = db.pool(4).await?;
    let archive_dir = std::env::temp_dir().join(&db.name);
    let timeout = Duration::from_secs(((backlog / 2_000) as u64).max(120));

    // The archive, as `run` writes it.
    let started = Instant::now();
    let mut child = drain::spawn(&db, "run", &archive_dir, &drain::DEFAULT_QUEUE, &[])?;
    let queue = drain::open_queue(&pool, &drain::DEFAULT_QUEUE).await?;
    while !drain::drained(&pool, &*queue).await? {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the backlog did not drain within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    // Every event of the backlog was applied (the outbox is empty), none parked.
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.failed_events")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(parked == 0, "{parked} events of the backlog were parked");
    let events = backlog;
    let archive = Archive::open(&archive_dir.to_string_lossy(), Layout::Batch)?;
    let listing = archive.list().await?;
    let bytes: u64 = listing.folders.iter().map(|f| f.bytes).sum();
    report.add(
        SECTION,
        "archive written by `run` (default layout: gzip JSON Lines per batch, table, day)",
        format!(
            "{events} events, {} objects, {:.1} MB",
            listing.objects(),
            bytes as f64 / 1_048_576.0
        ),
        None,
    );

    // The aggregates lost, then replayed from the archive alone.
    sqlx::raw_sql(
        "DELETE FROM analytics.daily_account_metrics;
         DELETE FROM analytics.lead_funnel_metrics;
         DELETE FROM analytics.revenue_metrics;",
    )
    .execute(&pool)
    .await?;
    let replay = timed(&db.url, &archive_dir, &["replay"]).await?;
    check_exact(&pool, "the replay").await?;
    let replay_rate = events as f64 / replay.as_secs_f64();
    report.add(
        SECTION,
        "`crm-analytics replay` from the local archive (wall time of the command)",
        format!("{replay_rate:.0} events/s ({:.1} s)", replay.as_secs_f64()),
        Some(("at least 25,000 events/s".into(), replay_rate >= 25_000.0)),
    );

    let rebuild = timed(&db.url, &archive_dir, &["rebuild"]).await?;
    check_exact(&pool, "the rebuild").await?;
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM leads) + (SELECT count(*) FROM projects)
              + (SELECT count(*) FROM activities) + (SELECT count(*) FROM accounts)",
    )
    .fetch_one(&pool)
    .await?;
    report.add(
        SECTION,
        "`crm-analytics rebuild` from the CRM tables of the same data",
        format!("{:.1} s ({rows} CRM rows)", rebuild.as_secs_f64()),
        None,
    );
    report.add(
        SECTION,
        "replay time / rebuild time (same data; the replay reads every event, the rebuild the rows they left)",
        format!("{:.1}x", replay.as_secs_f64() / rebuild.as_secs_f64()),
        None,
    );

    pool.close().await;
    let _ = std::fs::remove_dir_all(&archive_dir);
    db.drop_db().await?;
    Ok(())
}
