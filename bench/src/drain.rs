//! Drain throughput: a backlog of mixed events drained by `crm-analytics run` (all four
//! aggregates and the archive) on the default queue (the outbox itself) and behind the
//! relay (the embedded queue, as with a separate analytics database), against two pure-SQL
//! baselines on copies of the same backlog (see [`super::baselines`]); and peak memory of
//! the process. Scale-out over worker processes is section 7 (scale_out.rs).

use sqlx::{Connection, PgConnection, PgPool};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;

use super::baselines::{self, Baseline};
use super::cpu;
use super::{BenchDb, Report, Scale};
use crm_analytics::queue::{Queue, QueueOptions, QueueSpec};

const SECTION: &str = "2. Drain throughput and memory";

/// Builds a database with capture attached and a backlog of about `events` mixed events.
pub(super) async fn template(server: &str, events: i64) -> anyhow::Result<(BenchDb, i64)> {
    let db = BenchDb::create(server, "backlog").await?;
    let pool = db.pool(2).await?;
    crm_analytics::migrate::all(&pool, &pool, "public", true).await?;
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

/// The queue `crm-analytics run` uses on one database with no setting: the outbox itself.
pub(super) const DEFAULT_QUEUE: QueueSpec = QueueSpec::Outbox;

/// The queue the spawned processes drain (see [`spawn`]), to watch its depth.
pub(super) async fn open_queue(pool: &PgPool, queue: &QueueSpec) -> anyhow::Result<Arc<dyn Queue>> {
    let options = QueueOptions {
        consumes: false,
        ..QueueOptions::default()
    };
    Ok(crm_analytics::queue::open(queue, pool, &options).await?)
}

/// Starts `crm-analytics <command>` on `db` with `queue` (set whatever the environment
/// says: the benchmark watches the queue it measures, see [`open_queue`]) and any other
/// `settings`.
pub(super) fn spawn(
    db: &BenchDb,
    command: &str,
    archive: &std::path::Path,
    queue: &QueueSpec,
    settings: &[(&str, String)],
) -> anyhow::Result<Child> {
    Ok(crate::crm_analytics()?
        .arg(command)
        .envs(settings.iter().map(|(name, value)| (name, value)))
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        // Default settings unless the measurement says otherwise.
        .env_remove("CRM_ANALYTICS_WORKERS")
        .env("CRM_ANALYTICS_QUEUE", queue.to_string())
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

/// What one drain by `crm-analytics` processes measured.
struct Drained {
    seconds: f64,
    /// Peak RSS of the processes, MB.
    peak: f64,
    /// Where the machine's CPU went during the drain.
    cpu: cpu::Split,
    /// CPU the processes used, in cores over the drain (None: not readable here).
    ours: Option<f64>,
}

/// Drains `db` with the given processes.
async fn drain_with(
    db: &BenchDb,
    commands: &[&str],
    queue: &QueueSpec,
    archiving: bool,
    settings: &[(&str, String)],
    timeout: Duration,
) -> anyhow::Result<Drained> {
    let pool = db.pool(2).await?;
    let archive = match archiving {
        true => std::env::temp_dir().join(&db.name),
        false => std::path::PathBuf::from("none"),
    };
    let started = Instant::now();
    // The children start inside the window: they count from zero.
    let window = cpu::Window::start(&[]);
    let mut children = Vec::new();
    for command in commands {
        children.push(spawn(db, command, &archive, queue, settings)?);
    }
    let queue = open_queue(&pool, queue).await?;
    while !drained(&pool, &*queue).await? {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the backlog did not drain within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let pids: Vec<Option<u32>> = children.iter().map(|child| child.id()).collect();
    let (cpu, ours) = window.finish(&pids);
    let peak = children.iter().filter_map(peak_rss_mb).fold(0.0, f64::max);
    for mut child in children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    pool.close().await;
    if archiving {
        let _ = std::fs::remove_dir_all(archive);
    }
    Ok(Drained {
        seconds,
        peak,
        cpu,
        ours,
    })
}

/// One drain by a pure-SQL baseline.
struct BaselineRun {
    events_per_second: f64,
    loops: usize,
    cpu: cpu::Split,
    /// CPU of the loops' client side (this process), in cores.
    client: Option<f64>,
}

/// Drains a fresh copy of `template` with `which` in `loops` loops.
async fn baseline_run(
    server: &str,
    template: &BenchDb,
    label: &str,
    which: Baseline,
    loops: usize,
    backlog: i64,
    timeout: Duration,
) -> anyhow::Result<BaselineRun> {
    let db = copy(server, template, label).await?;
    let drained = baselines::drain(&db, which, loops, timeout).await?;
    db.drop_db().await?;
    Ok(BaselineRun {
        events_per_second: backlog as f64 / drained.seconds,
        loops,
        cpu: drained.cpu,
        client: drained.client,
    })
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
    let ours_drain = drain_with(&ours_db, &["run"], &DEFAULT_QUEUE, true, &[], timeout).await?;
    let (ours, peak) = (backlog as f64 / ours_drain.seconds, ours_drain.peak);
    ours_db.drop_db().await?;
    // The ablation: the same without the archive, the one part of our work that is neither
    // SQL nor moving events (gzip and a file per table and day, in our process).
    let unarchived_db = copy(server, &template, "unarchived").await?;
    let unarchived = backlog as f64
        / drain_with(
            &unarchived_db,
            &["run"],
            &DEFAULT_QUEUE,
            false,
            &[],
            timeout,
        )
        .await?
        .seconds;
    unarchived_db.drop_db().await?;
    // The ablation of the default worker count: one worker per core instead of two.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let one_per_core_db = copy(server, &template, "one_per_core").await?;
    let one_per_core = backlog as f64
        / drain_with(
            &one_per_core_db,
            &["run"],
            &DEFAULT_QUEUE,
            true,
            &[("CRM_ANALYTICS_WORKERS", cores.to_string())],
            timeout,
        )
        .await?
        .seconds;
    one_per_core_db.drop_db().await?;
    let relayed_db = copy(server, &template, "relayed").await?;
    let relayed_queue = QueueSpec::Postgres;
    let relayed_drain =
        drain_with(&relayed_db, &["run"], &relayed_queue, true, &[], timeout).await?;
    let (relayed, relayed_peak) = (backlog as f64 / relayed_drain.seconds, relayed_drain.peak);
    relayed_db.drop_db().await?;
    let peak = peak.max(relayed_peak);
    // Each baseline with every loop count it may use; ours is compared with the fastest.
    let mut equivalent: Option<BaselineRun> = None;
    let mut floor: Option<BaselineRun> = None;
    let mut tried = Vec::new();
    for loops in baselines::loop_counts() {
        for (which, label) in [
            (Baseline::Equivalent, "equivalent"),
            (Baseline::FunnelOnly, "floor"),
        ] {
            let run =
                baseline_run(server, &template, label, which, loops, backlog, timeout).await?;
            if which == Baseline::Equivalent {
                tried.push(format!(
                    "{:.0} events/s with {loops} loops",
                    run.events_per_second
                ));
            }
            let best = match which {
                Baseline::Equivalent => &mut equivalent,
                Baseline::FunnelOnly => &mut floor,
            };
            if best
                .as_ref()
                .is_none_or(|b| run.events_per_second > b.events_per_second)
            {
                *best = Some(run);
            }
        }
    }
    let (Some(equivalent_run), Some(floor_run)) = (equivalent, floor) else {
        anyhow::bail!("no baseline ran");
    };
    let (equivalent, floor) = (
        equivalent_run.events_per_second,
        floor_run.events_per_second,
    );
    report.add(
        SECTION,
        "`crm-analytics run` on the default queue (the outbox itself: claim, four aggregates, archive, delete in one transaction per batch)",
        format!("{ours:.0} events/s"),
        Some(("at least 60,000 events/s".into(), ours >= 60_000.0)),
    );
    report.add(
        SECTION,
        "`crm-analytics run` behind the relay (CRM_ANALYTICS_QUEUE=postgres, as with a separate analytics database: relay, queue, ledger, archive)",
        format!("{relayed:.0} events/s"),
        Some(("at least 25,000 events/s".into(), relayed >= 25_000.0)),
    );
    report.add(
        SECTION,
        format!(
            "equivalent pure-SQL baseline: one transaction per batch, the four aggregates with retractions, zero rows removed, event counts (no ledger, queue or archive); result verified exact; the fastest of {}",
            tried.join(", ")
        ),
        format!("{equivalent:.0} events/s"),
        None,
    );
    let ratio = ours / equivalent;
    report.add(
        SECTION,
        "ours (default queue) / equivalent baseline",
        format!("{ratio:.2}x"),
        Some(("at least 1.0x".into(), ratio >= 1.0)),
    );
    report.add(
        SECTION,
        "ablation: the default queue without the archive (CRM_ANALYTICS_ARCHIVE=none) / equivalent baseline",
        format!("{:.2}x ({unarchived:.0} events/s)", unarchived / equivalent),
        None,
    );
    report.add(
        SECTION,
        format!(
            "ablation: the default queue with one worker per core (CRM_ANALYTICS_WORKERS={cores}) instead of two (the default, {})",
            crm_analytics::config::default_workers()
        ),
        format!("{one_per_core:.0} events/s ({:.2}x of the default)", one_per_core / ours),
        None,
    );
    // What limits the ratio, measured: the CPU of the machine, ours and PostgreSQL's.
    report.add(
        SECTION,
        "where the CPU went: ours on the default queue (`/proc`, over the drain)",
        ours_drain.cpu.describe(
            ours_drain.ours.map(|cores| ("`crm-analytics run`", cores)),
            backlog as f64,
            "event",
        ),
        None,
    );
    report.add(
        SECTION,
        "where the CPU went: the equivalent baseline",
        equivalent_run.cpu.describe(
            equivalent_run
                .client
                .map(|cores| ("the baseline's client loops", cores)),
            backlog as f64,
            "event",
        ),
        None,
    );
    report.add(
        SECTION,
        "where the CPU went: ours behind the relay",
        relayed_drain.cpu.describe(
            relayed_drain
                .ours
                .map(|cores| ("`crm-analytics run`", cores)),
            backlog as f64,
            "event",
        ),
        None,
    );
    report.add(
        SECTION,
        format!(
            "one-aggregate floor: one statement per batch, funnel only; its funnel verified exact ({} loops, the faster)",
            floor_run.loops
        ),
        format!("{floor:.0} events/s"),
        None,
    );
    report.add(
        SECTION,
        "ours (default queue) / one-aggregate floor",
        format!("{:.2}x", ours / floor),
        None,
    );
    report.add(
        SECTION,
        "peak RSS of `crm-analytics run` during the drains",
        format!("{peak:.0} MB"),
        Some(("under 150 MB".into(), peak < 150.0)),
    );

    template.drop_db().await?;
    Ok(())
}
