//! The archive on a real S3-compatible server (moto at `common::aws_endpoint()`): every
//! applied event lands under `events/YYYY/MM/DD/<table>/` in both layouts, read back through
//! object_store; a missing bucket or an unreachable endpoint stops the start with a message
//! naming the settings; a write failure is retried whole and parks nothing.

mod common;

use common::brokers::{bucket_name, create_bucket, moto};
use common::{Running, TestDb};
use crm_analytics::archive::{Archive, Layout, S3Options};
use crm_analytics::config::PipelineArgs;
use crm_analytics::event::Envelope;
use sqlx::PgPool;
use std::collections::HashSet;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A pipeline as `run` wires it with `args`, writing its archive to `archive`.
async fn start_archiving(db: &TestDb, args: PipelineArgs, archive: Archive) -> Running {
    let analytics = db
        .pool(crm_analytics::pipeline::analytics_pool_size(args.workers()))
        .await;
    let queue = common::open_queue(&analytics, args.queue_capacity).await;
    common::start_archiving_to(db, &args, archive, move |_| queue).await
}

/// Every archived event id, read back through object_store (list, then get), after checking
/// that each object sits at `{prefix}/events/YYYY/MM/DD/<table>/` of its events' date and
/// table, in the form of `layout`.
async fn archived_ids(archive: &Archive, layout: Layout) -> HashSet<Uuid> {
    let (_, prefix) = archive.store();
    let bodies = common::archived_objects(archive).await;
    let mut ids = HashSet::new();
    for (path, body) in &bodies {
        let parts: Vec<&str> = path.split('/').collect();
        let [root, events, year, month, day, table, file] = parts[..] else {
            panic!("{path} is not {prefix}/events/YYYY/MM/DD/<table>/<object>");
        };
        assert_eq!((root, events), (prefix.as_ref(), "events"), "{path}");
        let lines: Vec<String> = match layout {
            Layout::Event => {
                assert!(file.ends_with(".json"), "{path}");
                vec![String::from_utf8(body.clone()).expect("UTF-8 JSON")]
            }
            Layout::Batch => {
                let stem = file.strip_suffix(".jsonl.gz").expect("a .jsonl.gz object");
                Uuid::parse_str(stem).expect("batch objects are named by a UUID");
                let mut text = String::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_string(&mut text)
                    .expect("gzip JSON Lines");
                text.lines().map(str::to_string).collect()
            }
        };
        assert!(!lines.is_empty(), "{path} is empty");
        for line in lines {
            let envelope = Envelope::from_json(&line).expect("archived lines are envelopes");
            assert_eq!(
                envelope.event_type.split('.').next(),
                Some(table),
                "{path}: {}",
                envelope.event_type
            );
            assert_eq!(
                envelope.created_at.format("%Y/%m/%d").to_string(),
                format!("{year}/{month}/{day}"),
                "{path}"
            );
            if layout == Layout::Event {
                assert_eq!(file, format!("{}.json", envelope.event_id), "{path}");
            }
            ids.insert(envelope.event_id);
        }
    }
    if layout == Layout::Event {
        assert_eq!(bodies.len(), ids.len(), "one object per event");
    }
    ids
}

/// The events the outbox handed over (kept with CRM_ANALYTICS_OUTBOX_RETENTION): on the
/// outbox as the queue, the applied ones, since a row leaves it when its batch commits.
async fn consumed_ids(pool: &PgPool) -> HashSet<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM crm_analytics.event_outbox_processed")
        .fetch_all(pool)
        .await
        .expect("read the consumed events")
        .into_iter()
        .collect()
}

async fn applied_ids(pool: &PgPool) -> HashSet<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM crm_analytics.applied_events")
        .fetch_all(pool)
        .await
        .expect("read the applied events")
        .into_iter()
        .collect()
}

async fn every_applied_event_is_archived_on_s3(layout: Layout) {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let bucket = bucket_name();
    create_bucket(&endpoint, &bucket).await;
    let archive = Archive::open_with(&format!("s3://{bucket}/archive"), layout, &moto(&endpoint))
        .expect("open the archive");
    archive.check().await.expect("the bucket exists");

    let (db, pool) = TestDb::migrated().await;
    let running = start_archiving(&db, db.args(), archive.clone()).await;
    common::run_workload(&pool, 3, 60, 11).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;

    let applied = applied_ids(&pool).await;
    assert!(applied.len() > 100, "only {} events applied", applied.len());
    let archived = archived_ids(&archive, layout).await;
    assert_eq!(
        archived, applied,
        "the archive holds exactly the applied events"
    );
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn batch_layout_on_s3_archives_every_applied_event() {
    every_applied_event_is_archived_on_s3(Layout::Batch).await;
}

#[tokio::test]
async fn event_layout_on_s3_archives_every_applied_event() {
    every_applied_event_is_archived_on_s3(Layout::Event).await;
}

#[tokio::test]
async fn a_missing_bucket_is_found_at_start_and_named() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let bucket = bucket_name();
    let archive = Archive::open_with(
        &format!("s3://{bucket}/archive"),
        Layout::Batch,
        &moto(&endpoint),
    )
    .expect("opening makes no request");
    let error = archive
        .check()
        .await
        .expect_err("no such bucket")
        .to_string();
    let quoted = format!("{bucket:?}");
    for needed in [
        quoted.as_str(),
        "does not exist",
        "CRM_ANALYTICS_ARCHIVE",
        "CRM_ANALYTICS_S3_ENDPOINT",
        endpoint.as_str(),
    ] {
        assert!(error.contains(needed), "{needed} missing: {error}");
    }
}

#[tokio::test]
async fn an_unreachable_endpoint_is_found_at_start_and_named() {
    // A port nobody listens on: bound, read, released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let archive = Archive::open_with("s3://archive/crm", Layout::Batch, &moto(&endpoint))
        .expect("opening makes no request");
    let started = Instant::now();
    let error = archive
        .check()
        .await
        .expect_err("nothing listens")
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    for needed in [
        "cannot be reached",
        "CRM_ANALYTICS_ARCHIVE=s3://archive/crm",
        "CRM_ANALYTICS_S3_ENDPOINT",
        endpoint.as_str(),
    ] {
        assert!(error.contains(needed), "{needed} missing: {error}");
    }
}

#[test]
fn a_location_without_a_bucket_or_a_bad_endpoint_is_refused() {
    for location in ["s3://", "s3:///prefix"] {
        let error = Archive::open(location, Layout::Batch)
            .err()
            .expect("no bucket")
            .to_string();
        assert!(
            error.contains("CRM_ANALYTICS_ARCHIVE") && error.contains("s3://bucket"),
            "{error}"
        );
    }
    let options = S3Options {
        endpoint: Some("127.0.0.1:9000".into()),
        ..S3Options::default()
    };
    let error = Archive::open_with("s3://bucket", Layout::Batch, &options)
        .err()
        .expect("not a URL")
        .to_string();
    assert!(
        error.contains("CRM_ANALYTICS_S3_ENDPOINT") && error.contains("http://127.0.0.1:9000"),
        "{error}"
    );
}

/// The binary with the archive's settings in its environment (the child's own).
fn crm_analytics(
    command: &str,
    db: &TestDb,
    archive: &str,
    endpoint: &str,
) -> tokio::process::Command {
    let mut child = tokio::process::Command::new(common::binary());
    child
        .arg(command)
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("CRM_ANALYTICS_ARCHIVE", archive)
        .env("CRM_ANALYTICS_ARCHIVE_LAYOUT", "event")
        .env("CRM_ANALYTICS_S3_ENDPOINT", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("CRM_ANALYTICS_WORKERS", "2")
        .env("CRM_ANALYTICS_POLL_INTERVAL", "200ms")
        .env("CRM_ANALYTICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    child
}

#[tokio::test]
async fn a_worker_whose_bucket_is_missing_stops_at_start_saying_so() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    let location = format!("s3://{}/archive", bucket_name());
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        crm_analytics("worker", &db, &location, &endpoint)
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("the worker stops at start")
    .expect("run the worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not exist") && stderr.contains(&location),
        "{stderr}"
    );
    assert!(!stderr.contains("pipeline running"), "{stderr}");
    db.finish(pool).await;
}

#[tokio::test]
async fn the_binary_archives_to_s3_through_its_settings() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let bucket = bucket_name();
    create_bucket(&endpoint, &bucket).await;
    let location = format!("s3://{bucket}/crm");
    let (db, pool) = TestDb::migrated().await;
    let mut child = crm_analytics("run", &db, &location, &endpoint)
        .env("CRM_ANALYTICS_OUTBOX_RETENTION", "1h")
        .stderr(Stdio::null())
        .spawn()
        .expect("start crm-analytics run");
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'Account ' || i FROM generate_series(1, 5) i;
         INSERT INTO leads (account_id, source) SELECT id, 'web' FROM accounts;",
    )
    .execute(&pool)
    .await
    .expect("write CRM rows");
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumed_ids(&pool).await.len() < 10 {
        assert!(Instant::now() < deadline, "events were not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("stops after SIGTERM")
        .expect("exit status");
    assert!(status.success(), "{status:?}");

    let reader = Archive::open_with(&location, Layout::Event, &moto(&endpoint)).expect("open");
    assert_eq!(
        archived_ids(&reader, Layout::Event).await,
        consumed_ids(&pool).await
    );
    db.finish(pool).await;
}

#[tokio::test]
async fn a_failing_archive_write_retries_the_batch_whole_and_parks_nothing() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    // The bucket does not exist yet: every write fails until it is created.
    let bucket = bucket_name();
    let archive = Archive::open_with(&format!("s3://{bucket}/a"), Layout::Batch, &moto(&endpoint))
        .expect("opening makes no request");
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.max_attempts = 1;
    let running = start_archiving(&db, args, archive.clone()).await;
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'Account ' || i FROM generate_series(1, 4) i;
         INSERT INTO leads (account_id, source) SELECT id, 'web' FROM accounts;
         INSERT INTO projects (account_id, name, status, amount, closed_at)
             SELECT id, 'Deal', 'won', 100, now() FROM accounts;",
    )
    .execute(&pool)
    .await
    .expect("write CRM rows");
    // Workers meet the failing archive again and again meanwhile; with one attempt allowed,
    // a write failure counted against the events would park them at once.
    let queue = common::open_queue(&pool, u64::MAX).await;
    let failing = Instant::now();
    let mut waiting = 0;
    while failing.elapsed() < Duration::from_secs(4) {
        let (parked, applied): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM crm_analytics.failed_events),
                    (SELECT count(*) FROM crm_analytics.applied_events)",
        )
        .fetch_one(&pool)
        .await
        .expect("read the ledger");
        assert_eq!(
            (parked, applied),
            (0, 0),
            "an archive failure counted against the events, or a batch committed without its archive"
        );
        waiting = queue.depth().await.expect("queue depth").events;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waiting > 0, "the failing archive held the events back");

    create_bucket(&endpoint, &bucket).await;
    common::drain(&pool, Duration::from_secs(90)).await;
    running.stop().await;
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.failed_events")
        .fetch_one(&pool)
        .await
        .expect("count parked events");
    assert_eq!(parked, 0);
    let applied = applied_ids(&pool).await;
    assert_eq!(applied.len(), 12);
    assert_eq!(archived_ids(&archive, Layout::Batch).await, applied);
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}
