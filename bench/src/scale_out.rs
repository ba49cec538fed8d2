//! Scale-out over worker processes: one backlog of random workload events, relayed into the
//! queue by one `crm-analytics relay` process, then drained by 1, 2 and 4 separate
//! `crm-analytics worker` processes, with the archive in a local folder and, when an
//! S3-compatible server is configured (`CRM_ANALYTICS_TEST_AWS_ENDPOINT`), in S3.
//!
//! Every drain goes through a fresh stream or queue of its own (`brokers`), so that a run
//! through NATS or SQS (section 8 runs those) never sees what an earlier one left.
//!
//! Reports events/s of the workers, the ratio to one process, and how many apply
//! transactions were waiting on a lock (pg_stat_activity, sampled): the serialization on
//! shared rows that would keep more processes from being faster. Every run ends with a
//! full verification of the aggregates against the CRM, so a fast run is also an exact one.

use sqlx::PgPool;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use super::brokers::{Broker, FreshQueue};
use super::{BenchDb, Report, Scale};
use crm_analytics::workload::{WorkloadConfig, WorkloadStats};

const SECTION: &str = "7. Scale-out over worker processes";
/// Worker processes of each run.
const PROCESSES: [usize; 3] = [1, 2, 4];
/// Workers (concurrent batches) per process. One, so that N processes apply exactly N
/// batches at once and any serialization between them shows in the ratio.
const WORKERS_PER_PROCESS: usize = 1;
/// Concurrent CRM writers producing the backlog.
const WRITERS: usize = 4;
/// How often the backlog is checked while it is written and relayed.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How often the drain is checked and pg_stat_activity sampled: often enough that the
/// quick run's drains of well under a second are timed to a few percent.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// Credentials and region handed to the processes for the S3-compatible server, which
/// accepts any.
const S3_REGION: &str = "us-east-1";
const S3_KEY: &str = "test";

/// Where a run archives.
enum ArchiveTarget {
    /// A temporary folder per run.
    Local,
    /// A bucket on an S3-compatible server, a prefix per run.
    S3 { endpoint: String, bucket: String },
}

impl ArchiveTarget {
    fn label(&self) -> &'static str {
        match self {
            ArchiveTarget::Local => "local archive",
            ArchiveTarget::S3 { .. } => "S3 archive",
        }
    }

    /// The CRM_ANALYTICS_ARCHIVE of a run on `db`.
    fn location(&self, db: &BenchDb) -> String {
        match self {
            ArchiveTarget::Local => local_folder(db).to_string_lossy().into_owned(),
            ArchiveTarget::S3 { bucket, .. } => format!("s3://{bucket}/{}", db.name),
        }
    }

    /// What object_store's `AmazonS3Builder::from_env` reads in the child processes.
    fn environment(&self) -> Vec<(&'static str, String)> {
        match self {
            ArchiveTarget::Local => Vec::new(),
            ArchiveTarget::S3 { endpoint, .. } => vec![
                ("AWS_ENDPOINT_URL", endpoint.clone()),
                ("AWS_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", S3_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY", S3_KEY.into()),
                ("AWS_REGION", S3_REGION.into()),
            ],
        }
    }
}

fn local_folder(db: &BenchDb) -> PathBuf {
    std::env::temp_dir().join(&db.name)
}

/// What one drain measured.
struct Drained {
    events_per_second: f64,
    /// Apply transactions waiting on a lock, averaged over the samples.
    lock_waiters: f64,
}

/// Runs the section through the default (PostgreSQL) queue.
pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let rows = Rows {
        section: SECTION,
        prefix: String::new(),
        s3_archive: true,
    };
    run_with_queue(
        server,
        scale.scale_out_backlog,
        report,
        &Broker::Postgres,
        &rows,
    )
    .await
}

/// Where the rows of a run go: this section's table, or another's with the backend's name
/// before each row; and whether to run with the archive on S3 too (when a server is set).
pub struct Rows {
    pub section: &'static str,
    pub prefix: String,
    pub s3_archive: bool,
}

/// Drains a backlog of about `events` with 1, 2 and 4 processes through fresh queues of
/// `broker` (the processes get each as CRM_ANALYTICS_QUEUE).
pub async fn run_with_queue(
    server: &str,
    events: i64,
    report: &mut Report,
    broker: &Broker,
    rows: &Rows,
) -> anyhow::Result<()> {
    let (template, backlog) = template(server, events).await?;
    report.add(
        rows.section,
        format!(
            "{}backlog: random workload events, relayed through a fresh {} queue before the \
             workers start (events/s of the workers, ratio to 1 process, apply transactions \
             waiting on a lock: mean of pg_stat_activity samples); {WORKERS_PER_PROCESS} \
             worker per process",
            rows.prefix,
            broker.name()
        ),
        backlog.to_string(),
        None,
    );
    let mut targets = vec![ArchiveTarget::Local];
    // Only the local archive when the caller compares something else than archives.
    match aws_endpoint().filter(|_| rows.s3_archive) {
        Some(endpoint) => {
            let bucket = format!(
                "crm-analytics-bench-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            create_bucket(&endpoint, &bucket).await?;
            targets.push(ArchiveTarget::S3 { endpoint, bucket });
        }
        None if rows.s3_archive => report.add(
            rows.section,
            format!(
                "{}S3 archive (CRM_ANALYTICS_TEST_AWS_ENDPOINT not set)",
                rows.prefix
            ),
            "skipped",
            None,
        ),
        None => {}
    }
    let mut outcome = Ok(());
    for target in &targets {
        outcome = runs(server, &template, backlog, target, broker, rows, report).await;
        if outcome.is_err() {
            break;
        }
    }
    for target in &targets {
        if let ArchiveTarget::S3 { endpoint, bucket } = target {
            if let Err(error) = remove_bucket(endpoint, bucket).await {
                println!("  (could not remove bucket {bucket}: {error:#})");
            }
        }
    }
    template.drop_db().await?;
    outcome
}

/// The drains with 1, 2 and 4 processes archiving to `target`, each through a fresh queue.
async fn runs(
    server: &str,
    template: &BenchDb,
    backlog: i64,
    target: &ArchiveTarget,
    broker: &Broker,
    rows: &Rows,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut single = None;
    for processes in PROCESSES {
        let db = super::drain::copy(server, template, "scaleout").await?;
        let queue = broker.fresh()?;
        let drained = drain(&db, backlog, processes, target, &queue).await;
        queue.remove_or_warn().await;
        if matches!(target, ArchiveTarget::Local) {
            let _ = std::fs::remove_dir_all(local_folder(&db));
        }
        db.drop_db().await?;
        let drained = drained?;
        let rate = drained.events_per_second;
        let ratio = rate / *single.get_or_insert(rate);
        let target_row = (processes > 1).then(|| ("above 1.00x".to_string(), ratio > 1.0));
        let plural = if processes == 1 { "" } else { "es" };
        report.add(
            rows.section,
            format!(
                "{}{}, {processes} worker process{plural}",
                rows.prefix,
                target.label()
            ),
            format!(
                "{rate:.0} events/s ({ratio:.2}x), {:.2} waiting on a lock",
                drained.lock_waiters
            ),
            target_row,
        );
    }
    Ok(())
}

/// A database with capture attached and a backlog of at least `events` events in the
/// outbox, written by the random workload (mixed tables and operations, dates spread over
/// months, rollbacks and cascades).
async fn template(server: &str, events: i64) -> anyhow::Result<(BenchDb, i64)> {
    let db = BenchDb::create(server, "scaleout_backlog").await?;
    let pool = db.pool(WRITERS as u32 + 1).await?;
    crm_analytics::migrate::all(&pool, &pool, "public", true).await?;
    let stop = CancellationToken::new();
    let load = {
        let (pool, stop) = (pool.clone(), stop.clone());
        let config = WorkloadConfig {
            writers: WRITERS,
            transactions_per_writer: None,
            rollback_ratio: 0.1,
            seed: 20_261_125,
            crm_schema: "public".into(),
        };
        tokio::spawn(async move {
            crm_analytics::workload::run(&pool, &config, Arc::new(WorkloadStats::default()), stop)
                .await
        })
    };
    let started = Instant::now();
    while outbox(&pool).await? < events {
        anyhow::ensure!(
            !load.is_finished(),
            "the workload stopped before writing the backlog"
        );
        anyhow::ensure!(
            started.elapsed() < timeout(events),
            "the workload did not write {events} events within {:?}",
            timeout(events)
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
    stop.cancel();
    load.await??;
    let backlog = outbox(&pool).await?;
    sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await?;
    pool.close().await;
    Ok((db, backlog))
}

/// Longest writing the backlog may take (relaying and draining it: `FreshQueue::timeout`).
fn timeout(events: i64) -> Duration {
    Duration::from_secs((events as u64 / 500).max(120))
}

async fn outbox(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
            .fetch_one(pool)
            .await?,
    )
}

/// A `crm-analytics` process on `db`; its stderr goes to `log`.
fn spawn(
    db: &BenchDb,
    command: &str,
    target: &ArchiveTarget,
    queue: &FreshQueue,
    capacity: i64,
    log: &std::path::Path,
) -> anyhow::Result<Child> {
    let mut child = crate::crm_analytics()?;
    child
        .arg(command)
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("CRM_ANALYTICS_ARCHIVE", target.location(db))
        .env("CRM_ANALYTICS_WORKERS", WORKERS_PER_PROCESS.to_string())
        .envs(queue.env.iter().cloned())
        // Room for the whole backlog: the relay fills the queue before the workers start.
        .env("CRM_ANALYTICS_QUEUE_CAPACITY", capacity.to_string())
        .env("RUST_LOG", "warn")
        .envs(target.environment())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .kill_on_drop(true);
    Ok(child.spawn()?)
}

/// Fails when one of `children` has exited: it would never finish the drain.
fn still_running(children: &mut [(String, Child)]) -> anyhow::Result<()> {
    for (log, child) in children.iter_mut() {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("a crm-analytics process exited ({status}); its log: {log}");
        }
    }
    Ok(())
}

/// Relays the backlog of `db` into the queue, then drains it with `processes` worker
/// processes; verifies the result against the CRM.
async fn drain(
    db: &BenchDb,
    backlog: i64,
    processes: usize,
    target: &ArchiveTarget,
    queue: &FreshQueue,
) -> anyhow::Result<Drained> {
    let pool = db.pool(2).await?;
    let capacity = backlog.saturating_mul(2).max(200_000);
    let log = |role: &str| std::env::temp_dir().join(format!("{}-{role}.log", db.name));
    let mut children = Vec::new();
    let relay_log = log("relay");
    children.push((
        relay_log.display().to_string(),
        spawn(db, "relay", target, queue, capacity, &relay_log)?,
    ));
    let started = Instant::now();
    while outbox(&pool).await? > 0 {
        still_running(&mut children)?;
        anyhow::ensure!(
            started.elapsed() < queue.timeout(backlog),
            "the relay did not empty the outbox within {:?}",
            queue.timeout(backlog)
        );
        tokio::time::sleep(POLL_EVERY).await;
    }

    for i in 0..processes {
        let worker_log = log(&format!("worker{i}"));
        children.push((
            worker_log.display().to_string(),
            spawn(db, "worker", target, queue, capacity, &worker_log)?,
        ));
    }
    let started = Instant::now();
    let mut clock = super::DrainClock::start();
    let (mut samples, mut waiting) = (0u64, 0i64);
    let took = loop {
        // Backend-independent progress: every applied event is counted once in
        // event_counts, in the transaction that applies it.
        let (processed, waiters): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT coalesce(sum(processed), 0) FROM analytics.event_counts)::int8,
                    (SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock')",
        )
        .fetch_one(&pool)
        .await?;
        if processed > 0 {
            samples += 1;
            waiting += waiters;
        }
        if let Some(took) = clock.sample(processed, backlog) {
            break took;
        }
        still_running(&mut children)?;
        anyhow::ensure!(
            started.elapsed() < queue.timeout(backlog),
            "{processes} worker process(es) did not drain {backlog} events within {:?}",
            queue.timeout(backlog)
        );
        tokio::time::sleep(SAMPLE_EVERY).await;
    };
    for (_, mut child) in children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let found = crm_analytics::aggregates::verify::verify(&pool, &pool, "public", 3).await?;
    anyhow::ensure!(
        found.differences == 0,
        "after the drain with {processes} worker process(es), {} aggregate rows differ from \
         the CRM, first: {:?}",
        found.differences,
        found.shown
    );
    pool.close().await;
    for role in
        std::iter::once("relay".to_string()).chain((0..processes).map(|i| format!("worker{i}")))
    {
        let _ = std::fs::remove_file(log(&role));
    }
    Ok(Drained {
        events_per_second: backlog as f64 / took.as_secs_f64().max(f64::EPSILON),
        lock_waiters: waiting as f64 / samples.max(1) as f64,
    })
}

/// The S3-compatible server of CRM_ANALYTICS_TEST_AWS_ENDPOINT, when set.
fn aws_endpoint() -> Option<String> {
    std::env::var("CRM_ANALYTICS_TEST_AWS_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.trim_end_matches('/').to_string())
}

/// Creates `bucket` (path-style PUT; the server accepts any credentials).
async fn create_bucket(endpoint: &str, bucket: &str) -> anyhow::Result<()> {
    let response = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("creating bucket {bucket} at {endpoint} failed: {e}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "creating bucket {bucket} at {endpoint} answered {}",
        response.status()
    );
    Ok(())
}

/// Deletes every object of `bucket`, then the bucket.
async fn remove_bucket(endpoint: &str, bucket: &str) -> anyhow::Result<()> {
    use futures::{StreamExt, TryStreamExt};
    use object_store::ObjectStore;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region(S3_REGION)
        .with_access_key_id(S3_KEY)
        .with_secret_access_key(S3_KEY)
        .with_bucket_name(bucket)
        .build()?;
    let locations = store.list(None).map_ok(|meta| meta.location).boxed();
    store
        .delete_stream(locations)
        .try_collect::<Vec<_>>()
        .await?;
    let response = reqwest::Client::new()
        .delete(format!("{endpoint}/{bucket}"))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "deleting the bucket answered {}",
        response.status()
    );
    Ok(())
}
