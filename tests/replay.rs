//! Replay from the archive: after schema `analytics` is dropped, `migrate` and `replay` give
//! back aggregates equal to a recomputation from the CRM, from a local folder or S3, with
//! the processed outbox gone (the archive the only source), copies of retried batches
//! counted once; a replay while `run` runs and the CRM writes ends exact; an event archived
//! by a batch that rolled back is counted once (and, on the outbox as the queue, left to
//! the workers); a date-range replay recomputes only the rows
//! its dates own; `verify --archive` finds an archive that would not give the numbers back.

mod common;

use common::brokers::{bucket_name, create_bucket, moto};
use common::TestDb;
use crm_analytics::aggregates::rows::decode;
use crm_analytics::archive::{Archive, ArchivedEvent, Layout};
use crm_analytics::event::Envelope;
use crm_analytics::pipeline::{Pipeline, Roles};
use crm_analytics::replay::{replay, DateRange, ReplayOptions, ReplayReport};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn options(range: Option<DateRange>) -> ReplayOptions {
    ReplayOptions {
        range,
        allow_incomplete: false,
        location: "test archive".into(),
        outbox_is_queue: false,
    }
}

async fn replay_all(pool: &PgPool, archive: &Archive) -> ReplayReport {
    replay(pool, archive, &options(None))
        .await
        .expect("replay the archive")
}

async fn aggregate_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM analytics.daily_account_metrics)
              + (SELECT count(*) FROM analytics.lead_funnel_metrics)
              + (SELECT count(*) FROM analytics.revenue_metrics)",
    )
    .fetch_one(pool)
    .await
    .expect("count the aggregate rows")
}

/// Drops schema `analytics` and heals it with `migrate`: the aggregates are empty.
async fn lose_the_aggregates(pool: &PgPool) {
    sqlx::raw_sql("DROP SCHEMA analytics CASCADE")
        .execute(pool)
        .await
        .expect("drop schema analytics");
    crm_analytics::migrate::all(pool, pool, "public", false)
        .await
        .expect("migrate heals");
    assert_eq!(aggregate_rows(pool).await, 0);
}

/// The processed outbox rows are gone: the archive is the only record of the events.
async fn forget_the_outbox(pool: &PgPool) {
    sqlx::raw_sql("DELETE FROM crm_analytics.event_outbox_processed")
        .execute(pool)
        .await
        .expect("prune the processed outbox");
}

/// Every file under a local archive folder, sorted.
fn archive_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the archive folder") {
            let path = entry.expect("an archive entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Archives every object again under a new name: what retried batches leave behind.
fn copy_every_object(root: &std::path::Path) -> usize {
    let objects: Vec<_> = archive_files(root)
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    for path in &objects {
        let folder = path.parent().expect("an object sits in a folder");
        let copy = folder.join(format!("{}.jsonl.gz", uuid::Uuid::new_v4()));
        std::fs::copy(path, copy).expect("copy an archive object");
    }
    objects.len()
}

/// An event archived by attempts that failed and then parked: in the archive, never applied
/// (its lead is not in the CRM).
async fn archive_a_parked_event(pool: &PgPool, archive: &Archive) {
    let (event_id, lead) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let now = chrono::Utc::now();
    let json = serde_json::json!({
        "event_id": event_id,
        "event_type": "leads.insert",
        "aggregate_id": lead,
        "xid": 1,
        "created_at": now,
        "payload": {"new": {"id": lead, "account_id": null, "source": "web", "status": "new",
                            "converted_at": null, "created_at": now}},
    })
    .to_string();
    let event = decode(&Envelope::from_json(&json).expect("an envelope")).expect("an event");
    archive
        .write(&[ArchivedEvent {
            event_id,
            date: event.date(),
            table: event.table,
            json: &json,
        }])
        .await
        .expect("archive the event");
    sqlx::query(
        "INSERT INTO crm_analytics.failed_events (event_id, event_type, error_message, retry_count)
         VALUES ($1, 'leads.insert', 'rejected by the database', 3)",
    )
    .bind(event_id)
    .execute(pool)
    .await
    .expect("park the event");
}

#[tokio::test]
async fn migrate_and_replay_give_back_dropped_aggregates_from_a_local_archive_alone() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 3, 150, 41).await;
    common::assert_nontrivial(&pool).await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.applied_events")
        .fetch_one(&pool)
        .await
        .expect("count applied events");

    lose_the_aggregates(&pool).await;
    forget_the_outbox(&pool).await;
    let copies = copy_every_object(&db.archive);
    assert!(copies > 0);
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    archive_a_parked_event(&pool, &archive).await;
    let report = replay_all(&pool, &archive).await;

    common::assert_exact(&pool).await;
    assert_eq!(report.parked, 1, "the parked event left out");
    assert_eq!(report.events as i64, applied, "each applied event once");
    assert_eq!(report.duplicates, report.events, "every copy dropped");
    let counted: i64 =
        sqlx::query_scalar("SELECT sum(processed)::int8 FROM analytics.event_counts")
            .fetch_one(&pool)
            .await
            .expect("sum the event counts");
    assert_eq!(counted, applied, "event_counts rebuilt from the archive");

    // Again: a replay over replayed aggregates changes nothing.
    replay_all(&pool, &archive).await;
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn migrate_and_replay_give_back_dropped_aggregates_from_s3_in_either_layout() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    for layout in [Layout::Batch, Layout::Event] {
        let bucket = bucket_name();
        create_bucket(&endpoint, &bucket).await;
        let archive =
            Archive::open_with(&format!("s3://{bucket}/archive"), layout, &moto(&endpoint))
                .expect("open the archive");
        let (db, pool) = TestDb::migrated().await;
        let analytics = db
            .pool(crm_analytics::pipeline::analytics_pool_size(3))
            .await;
        let queue = common::open_queue(&analytics, 200_000).await;
        let running =
            common::start_archiving_to(&db, &db.args(), archive.clone(), move |_| queue).await;
        common::run_workload(&pool, 3, 120, 43).await;
        common::drain(&pool, Duration::from_secs(60)).await;
        running.stop().await;
        common::assert_nontrivial(&pool).await;

        lose_the_aggregates(&pool).await;
        forget_the_outbox(&pool).await;
        let report = replay_all(&pool, &archive).await;
        assert!(report.events > 100, "{layout:?}: {report:?}");
        common::assert_exact(&pool).await;
        analytics.close().await;
        db.finish(pool).await;
    }
}

#[tokio::test]
async fn a_replay_while_run_runs_and_the_crm_writes_ends_exact() {
    let (db, pool) = TestDb::migrated().await;
    let running = common::start(&db, &db.args()).await;
    let writes = {
        let pool = pool.clone();
        tokio::spawn(async move { common::run_workload(&pool, 3, 300, 47).await })
    };
    // Some events applied, more coming: the aggregates are lost and replayed meanwhile.
    let deadline = Instant::now() + Duration::from_secs(60);
    while aggregate_rows(&pool).await < 20 {
        assert!(Instant::now() < deadline, "nothing applied in 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::raw_sql(
        "DELETE FROM analytics.daily_account_metrics;
         DELETE FROM analytics.lead_funnel_metrics;
         DELETE FROM analytics.revenue_metrics;",
    )
    .execute(&pool)
    .await
    .expect("lose the aggregates");
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let report = replay_all(&pool, &archive).await;
    assert!(report.events > 0);
    assert!(
        !writes.is_finished(),
        "the CRM must still be writing when the replay ends"
    );
    writes.await.expect("workload");
    common::drain(&pool, Duration::from_secs(90)).await;
    running.stop().await;
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

/// The relay alone moves the outbox into the queue; then a batch of the queued events is
/// archived as a worker does before its transaction, and the transaction "rolls back": the
/// events are in the archive and still in the queue, applied nowhere.
async fn archive_queued_events_as_a_failed_batch(db: &TestDb, pool: &PgPool) -> usize {
    let args = db.args();
    let analytics = db.pool(8).await;
    let queue = common::open_queue(&analytics, args.queue_capacity).await;
    let pipeline =
        Arc::new(Pipeline::assemble(db.pool(4).await, analytics, queue, &args).expect("assemble"));
    let stop = CancellationToken::new();
    let relay = {
        let (pipeline, stop) = (pipeline.clone(), stop.clone());
        let roles = Roles {
            relay: true,
            workers: false,
        };
        tokio::spawn(async move { pipeline.run(roles, stop).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
            .fetch_one(pool)
            .await
            .expect("count the outbox");
        if outbox == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the relay left {outbox} events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    relay.await.expect("relay task").expect("relay ran");

    let bodies: Vec<String> =
        sqlx::query_scalar("SELECT body FROM crm_analytics.queue ORDER BY id LIMIT 150")
            .fetch_all(pool)
            .await
            .expect("read the queue");
    let events: Vec<_> = bodies
        .iter()
        .map(|body| {
            let envelope = Envelope::from_json(body).expect("an envelope");
            decode(&envelope).expect("an event")
        })
        .collect();
    let archived: Vec<ArchivedEvent> = events
        .iter()
        .zip(&bodies)
        .map(|(event, body)| ArchivedEvent {
            event_id: event.event_id,
            date: event.date(),
            table: event.table,
            json: body,
        })
        .collect();
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    archive.write(&archived).await.expect("archive the batch");
    archived.len()
}

#[tokio::test]
async fn an_event_archived_by_a_batch_that_rolled_back_is_counted_once() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 2, 40, 53).await;
    common::run_workload(&pool, 2, 40, 54).await;
    let pending = archive_queued_events_as_a_failed_batch(&db, &pool).await;
    assert!(pending > 50);

    // The replay counts them; the queue still delivers them afterwards.
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    replay_all(&pool, &archive).await;
    let running = common::start(&db, &db.args()).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

/// On the outbox as the queue, a batch applied and archived whose transaction then rolled
/// back: its events are in the archive and still in the outbox. Replay leaves them to the
/// workers (no ledger on that path would stop them from counting twice).
#[tokio::test]
async fn on_the_outbox_an_event_archived_by_a_batch_that_rolled_back_is_left_to_the_workers() {
    use crm_analytics::worker::apply::{Applier, Idempotency, Prepared};
    let (db, pool) = TestDb::migrated().await;
    let args = db.args();
    common::run_workload(&pool, 2, 40, 61).await;
    let running = common::start_on_outbox(&db, &args).await;
    let analytics = db.pool(4).await;
    let outbox = common::open_outbox(&analytics, false).await;
    common::drain_through(&pool, &*outbox, Duration::from_secs(60)).await;
    running.stop().await;

    common::run_workload(&pool, 2, 40, 62).await;
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let applier = Applier {
        pool: analytics.clone(),
        archive: Some(archive.clone()),
    };
    let mut batch = outbox
        .receive(150, Duration::from_secs(5))
        .await
        .expect("claim a batch");
    let prepared: Vec<Prepared> = batch
        .deliveries()
        .iter()
        .enumerate()
        .map(|(index, delivery)| Prepared {
            index,
            event: decode(&Envelope::from_json(&delivery.body).expect("an envelope"))
                .expect("an event"),
            json: delivery.body.clone(),
        })
        .collect();
    let pending = prepared.len();
    assert!(pending > 50, "{pending} events claimed");
    let refs: Vec<&Prepared> = prepared.iter().collect();
    let tx = batch
        .transaction()
        .expect("an outbox batch holds its transaction");
    applier
        .apply_in(tx, &refs, Idempotency::Removal)
        .await
        .expect("apply and archive the batch");
    drop(batch); // the worker died before its commit: applied nowhere, archived

    let report = replay_all(&pool, &archive).await;
    assert_eq!(report.waiting, pending as u64, "{report:?}");
    let running = common::start_on_outbox(&db, &args).await;
    common::drain_through(&pool, &*outbox, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn a_date_range_replay_recomputes_only_the_rows_its_dates_own() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 3, 80, 59).await;
    let days: Vec<chrono::NaiveDate> = sqlx::query_scalar(
        "SELECT DISTINCT date FROM analytics.daily_account_metrics
         WHERE date IS NOT NULL ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("read the days");
    assert!(days.len() >= 6, "too few days: {days:?}");
    let range = DateRange {
        from: Some(days[days.len() / 3]),
        to: Some(days[2 * days.len() / 3]),
    };
    // Every row damaged; the range's rows must come back, the others stay damaged.
    sqlx::raw_sql(
        "UPDATE analytics.daily_account_metrics SET activities = activities + 1000;
         UPDATE analytics.lead_funnel_metrics SET total = total + 1000;
         UPDATE analytics.revenue_metrics SET deals_won = deals_won + 1000;",
    )
    .execute(&pool)
    .await
    .expect("damage the aggregates");
    forget_the_outbox(&pool).await;
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let report = replay(&pool, &archive, &options(Some(range)))
        .await
        .expect("replay the range");
    assert_eq!(report.claimed, 0, "every event was applied: {report:?}");

    let damaged: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT 'daily', date BETWEEN $1 AND $2, activities >= 1000
           FROM analytics.daily_account_metrics WHERE date IS NOT NULL
         UNION ALL
         SELECT 'funnel', cohort_date BETWEEN $1 AND $2, total >= 1000
           FROM analytics.lead_funnel_metrics WHERE cohort_date IS NOT NULL
         UNION ALL
         SELECT 'revenue', month BETWEEN date_trunc('month', $1::date)::date AND $2,
                deals_won >= 1000
           FROM analytics.revenue_metrics WHERE month IS NOT NULL",
    )
    .bind(range.from)
    .bind(range.to)
    .fetch_all(&pool)
    .await
    .expect("read the rows");
    for table in ["daily", "funnel", "revenue"] {
        let rows: Vec<_> = damaged.iter().filter(|(t, _, _)| t == table).collect();
        assert!(
            rows.iter().any(|(_, inside, _)| *inside) && rows.iter().any(|(_, inside, _)| !inside),
            "{table}: rows on both sides of the range"
        );
        for (_, inside, still_damaged) in rows {
            assert_eq!(
                *still_damaged, !inside,
                "{table}: rows inside the range recomputed, the others untouched"
            );
        }
    }
    // The recomputed rows are right: every row that differs lies outside the range.
    let found = crm_analytics::aggregates::verify::verify(&pool, &pool, "public", 100_000)
        .await
        .expect("verify");
    assert!(found.differences > 0);
    for line in &found.shown {
        let date = key_date(line).unwrap_or_else(|| panic!("no date in {line}"));
        let owned = if line.starts_with("revenue_metrics") {
            range.owns_month(Some(date))
        } else {
            range.owns_day(Some(date))
        };
        assert!(!owned, "a recomputed row differs: {line}");
    }
    // A full replay repairs the rest, and then all match.
    replay_all(&pool, &archive).await;
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

/// The date in a verify line's key, e.g. `daily_account_metrics (Some(…), Some(2026-08-25))`.
fn key_date(line: &str) -> Option<chrono::NaiveDate> {
    let key = line.split("):").next()?;
    key.match_indices("Some(").find_map(|(at, _)| {
        let text = key.get(at + 5..at + 15)?;
        chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
    })
}

#[tokio::test]
async fn a_parked_event_put_back_on_the_queue_counts_as_corrected_not_as_archived() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 2, 40, 83).await;
    // A lead event the database rejected on every attempt: each attempt archived a copy
    // (here: source "stale") before its transaction rolled back, and it is parked.
    let lead = uuid::Uuid::new_v4();
    common::insert_poison_lead(&pool, lead).await;
    let running = common::start(&db, &db.args()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let event_id: uuid::Uuid = loop {
        let parked: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT event_id FROM crm_analytics.failed_events")
                .fetch_optional(&pool)
                .await
                .expect("read failed_events");
        if let Some(id) = parked {
            break id;
        }
        assert!(Instant::now() < deadline, "the poison event was not parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    running.stop().await;
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let now = chrono::Utc::now();
    let stale = serde_json::json!({
        "event_id": event_id, "event_type": "leads.insert", "aggregate_id": lead, "xid": 1,
        "created_at": now,
        "payload": {"new": {"id": lead, "account_id": null, "source": "stale", "status": "new",
                            "converted_at": null, "created_at": "2026-01-01T00:00:00+00:00"}},
    })
    .to_string();
    archive
        .write(&[ArchivedEvent {
            event_id,
            date: now.date_naive(),
            table: crm_analytics::event::CrmTable::Leads,
            json: &stale,
        }])
        .await
        .expect("archive the failed attempt's copy");

    // The operator corrects it and puts it back; a replay runs before a worker applies it.
    common::fix_poison_lead(&pool, lead).await;
    let queue = common::open_queue(&pool, u64::MAX).await;
    crm_analytics::worker::failed::retry(
        &pool,
        &*queue,
        crm_analytics::worker::failed::Selection::All,
    )
    .await
    .expect("failed retry");
    let report = replay_all(&pool, &archive).await;
    assert_eq!(report.parked, 1, "{report:?}");
    let running = common::start(&db, &db.args()).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exact(&pool).await;
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.retried_events")
        .fetch_one(&pool)
        .await
        .expect("count retried events");
    assert_eq!(waiting, 0, "forgotten once applied");
    db.finish(pool).await;
}

#[tokio::test]
async fn a_date_range_replay_after_a_rebuild_starts_after_its_month() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 2, 40, 71).await;
    crm_analytics::backfill::run(&pool, &pool, "public", false)
        .await
        .expect("rebuild");
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let today = chrono::Utc::now().date_naive();
    let refused = replay(
        &pool,
        &archive,
        &options(Some(DateRange {
            from: Some(today),
            to: None,
        })),
    )
    .await
    .expect_err("a range over rows the rebuild loaded");
    assert!(refused.to_string().contains("give --from"), "{refused}");
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn a_full_replay_refuses_an_archive_missing_applied_events() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 2, 40, 73).await;
    let mut objects = archive_files(&db.archive);
    objects.retain(|path| path.to_string_lossy().contains("/leads/"));
    std::fs::remove_file(&objects[0]).expect("lose a leads object");
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let refused = replay(&pool, &archive, &options(None))
        .await
        .expect_err("an incomplete archive");
    assert!(
        refused.to_string().contains("--allow-incomplete"),
        "{refused}"
    );
    common::assert_exact(&pool).await;

    let mut allowed = options(None);
    allowed.allow_incomplete = true;
    replay(&pool, &archive, &allowed)
        .await
        .expect("replay what is there");
    let found = crm_analytics::aggregates::verify::verify(&pool, &pool, "public", 10)
        .await
        .expect("verify");
    assert!(found.differences > 0, "the lost events are left out");
    db.finish(pool).await;
}

#[tokio::test]
async fn the_last_copy_written_of_an_event_is_the_one_replayed() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 2, 40, 79).await;
    // An older copy of an applied lead event, as a failed attempt wrote it before an
    // operator corrected the event: another source.
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let bodies = common::archived_objects(&archive).await;
    let line = bodies
        .iter()
        .filter(|(path, _)| path.contains("/leads/"))
        .flat_map(|(_, body)| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text)
                .expect("gzip");
            text.lines().map(str::to_string).collect::<Vec<_>>()
        })
        .find(|line| line.contains("\"insert\"") || line.contains(".insert"))
        .expect("an archived lead insert");
    let mut stale: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    stale["payload"]["new"]["source"] = "stale-copy".into();
    let stale = stale.to_string();
    let event = decode(&Envelope::from_json(&stale).expect("an envelope")).expect("an event");
    let folder = db
        .archive
        .join(event.date().format("events/%Y/%m/%d/leads").to_string());
    let path = folder.join(format!("{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&path, &stale).expect("write the stale copy");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .expect("open the stale copy")
        .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(86_400))
        .expect("date it before the committed copy");

    lose_the_aggregates(&pool).await;
    let report = replay_all(&pool, &archive).await;
    assert_eq!(report.duplicates, 1, "{report:?}");
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn a_date_range_replay_takes_over_events_no_batch_applied_yet() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 2, 40, 61).await;
    common::run_workload(&pool, 2, 40, 62).await;
    let pending = archive_queued_events_as_a_failed_batch(&db, &pool).await;
    // A ledger with a history (an entry an hour old): what it holds covers everything
    // applied since, so an event missing from it and younger was not applied.
    sqlx::query(
        "INSERT INTO crm_analytics.applied_events (event_id, applied_at)
         VALUES (gen_random_uuid(), now() - interval '1 hour')",
    )
    .execute(&pool)
    .await
    .expect("an old ledger entry");
    let day = chrono::Utc::now().date_naive();
    let range = DateRange {
        from: Some(day),
        to: Some(day),
    };
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let report = replay(&pool, &archive, &options(Some(range)))
        .await
        .expect("replay the range");
    assert_eq!(report.claimed as usize, pending, "{report:?}");
    let running = common::start(&db, &db.args()).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

/// Runs the binary with `args` against `db`; returns its exit code and output.
fn crm_analytics(db: &TestDb, args: &[&str]) -> (i32, String) {
    let output = std::process::Command::new(common::binary())
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("CRM_ANALYTICS_ARCHIVE", &db.archive)
        .env("RUST_LOG", "info")
        .output()
        .expect("run the binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn verify_archive_and_replay_from_the_command_line() {
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 2, 40, 67).await;

    let (code, out) = crm_analytics(&db, &["verify", "--archive"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("aggregates match a recomputation from the archive"),
        "{out}"
    );

    // A lost archive object: the archive would no longer give these numbers back.
    let mut objects = archive_files(&db.archive);
    objects.retain(|path| path.to_string_lossy().contains("/leads/"));
    let lost = objects.first().expect("an archived leads object").clone();
    let kept = std::env::temp_dir().join(format!("kept-{}", uuid::Uuid::new_v4()));
    std::fs::rename(&lost, &kept).expect("move the object aside");
    let (code, out) = crm_analytics(&db, &["verify", "--archive"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the archive gives"), "{out}");
    std::fs::rename(&kept, &lost).expect("put the object back");

    // Replay from the command line, its progress in the log.
    lose_the_aggregates(&pool).await;
    let archive = db.archive.to_string_lossy().into_owned();
    let (code, out) = crm_analytics(&db, &["replay", "--archive", &archive]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("replay progress") && out.contains("events replayed from"),
        "{out}"
    );
    common::assert_exact(&pool).await;

    // Bad input: named, nothing changed.
    let (code, out) = crm_analytics(&db, &["replay", "--from", "2026-02-30"]);
    assert_ne!(code, 0);
    assert!(
        out.contains("--from") && out.contains("YYYY-MM-DD"),
        "{out}"
    );
    let (code, out) = crm_analytics(
        &db,
        &["replay", "--from", "2026-03-02", "--to", "2026-03-01"],
    );
    assert_ne!(code, 0);
    assert!(out.contains("--to") && out.contains("before"), "{out}");
    let empty = std::env::temp_dir().join(format!("empty-{}", uuid::Uuid::new_v4()));
    let (code, out) = crm_analytics(&db, &["replay", "--archive", empty.to_str().expect("path")]);
    assert_ne!(code, 0);
    assert!(
        out.contains("does not exist") && out.contains("nothing was changed"),
        "{out}"
    );
    assert!(!empty.exists(), "a mistyped folder is not created");
    std::fs::create_dir_all(&empty).expect("an empty folder");
    let (code, out) = crm_analytics(&db, &["replay", "--archive", empty.to_str().expect("path")]);
    assert_ne!(code, 0);
    assert!(
        out.contains("holds no events") && out.contains("nothing was changed"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&empty);
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

/// On the outbox as the queue the workers write no ledger; a ledger with a history (from
/// before an upgrade, or an earlier full replay) must not make a date-range replay take
/// the events they applied since as not applied yet, and count them twice.
#[tokio::test]
async fn on_the_outbox_a_date_range_replay_takes_what_the_workers_applied_as_applied() {
    let (db, pool) = TestDb::migrated().await;
    let args = db.args();
    sqlx::query(
        "INSERT INTO crm_analytics.applied_events (event_id, applied_at)
         VALUES (gen_random_uuid(), now() - interval '1 hour')",
    )
    .execute(&pool)
    .await
    .expect("an old ledger entry");
    let running = common::start_on_outbox(&db, &args).await;
    common::run_workload(&pool, 2, 40, 71).await;
    let analytics = db.pool(4).await;
    let outbox = common::open_outbox(&analytics, false).await;
    common::drain_through(&pool, &*outbox, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exact(&pool).await;
    let today = chrono::Utc::now().date_naive();
    let range = DateRange {
        from: Some(today),
        to: Some(today),
    };
    let archive = Archive::open(db.archive.to_str().expect("UTF-8 path"), Layout::Batch)
        .expect("open the archive");
    let on_outbox = ReplayOptions {
        outbox_is_queue: true,
        ..options(Some(range))
    };
    let report = replay(&pool, &archive, &on_outbox)
        .await
        .expect("replay the range");
    assert_eq!(report.claimed, 0, "{report:?}");
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}
