//! Capture columns: with `metrics`, row images carry only the id and the columns the
//! metrics read (no personal data in the outbox, queue, archive or failed events), the
//! aggregates stay exact, and `migrate` switches between the settings.

mod common;

use common::TestDb;
use crm_analytics::archive::Layout;
use crm_analytics::capture::CaptureColumns;
use std::collections::BTreeMap;
use std::time::Duration;

/// Table -> the keys of its row images found in `table`'s payloads.
async fn image_keys(pool: &sqlx::PgPool, table: &str) -> BTreeMap<String, Vec<String>> {
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as(&format!(
        "SELECT split_part(event_type, '.', 1), array_agg(DISTINCT k ORDER BY k)
         FROM crm_analytics.{table},
              LATERAL (SELECT jsonb_object_keys(payload->'new')
                       UNION ALL SELECT jsonb_object_keys(payload->'old')) AS keys(k)
         GROUP BY 1"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

fn keys(names: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    keys.sort();
    keys
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.push(path);
            }
        }
    }
    files
}

async fn last_payload(pool: &sqlx::PgPool) -> serde_json::Value {
    sqlx::query_scalar(
        "SELECT payload FROM crm_analytics.event_outbox ORDER BY event_id DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn outbox_len(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn metrics_functions(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc
         WHERE pronamespace = 'crm_analytics'::regnamespace AND proname LIKE 'capture\\_%\\_metrics'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn metrics_images_carry_only_what_the_metrics_read_and_stay_exact() {
    let db = TestDb::create().await;
    let pool = db.pool(12).await;
    crm_analytics::capture::create_reference_schema(&pool, "public")
        .await
        .unwrap();
    // Personal data in columns the metrics never read.
    sqlx::raw_sql(
        "ALTER TABLE leads ADD COLUMN email text DEFAULT 'someone@example.com';
         ALTER TABLE accounts ADD COLUMN phone text DEFAULT '+1 555 0100';",
    )
    .execute(&pool)
    .await
    .unwrap();
    crm_analytics::migrate::all_with(&pool, &pool, "public", false, Some(CaptureColumns::Metrics))
        .await
        .unwrap();

    let mut args = db.args();
    args.outbox_retention = Duration::from_secs(3600); // to read what was relayed
    args.archive_layout = Layout::Event;
    let running = common::start(&db, &args).await;
    common::run_workload(&pool, 2, 150, 31).await;
    common::drain(&pool, Duration::from_secs(60)).await;
    running.stop().await;

    let relayed = image_keys(&pool, "event_outbox_processed").await;
    assert_eq!(relayed["accounts"], keys(&["id"]));
    assert_eq!(
        relayed["leads"],
        keys(&[
            "id",
            "account_id",
            "source",
            "status",
            "converted_at",
            "created_at"
        ])
    );
    assert_eq!(
        relayed["projects"],
        keys(&["id", "account_id", "status", "amount", "closed_at"])
    );
    assert_eq!(
        relayed["activities"],
        keys(&["id", "account_id", "occurred_at"])
    );
    let archived = files_under(&db.archive);
    assert!(archived.len() > 100, "{} archive objects", archived.len());
    for file in &archived {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            !text.contains("example.com") && !text.contains("+1 555"),
            "personal data archived in {}: {text}",
            file.display()
        );
    }
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;

    // `migrate` without the setting keeps it; a change of personal data alone is no event.
    let created = crm_analytics::capture::attach(&pool, "public")
        .await
        .unwrap();
    assert_eq!(created, 0, "a second run changes no trigger");
    let lead: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO leads (source) VALUES ('web') RETURNING id")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(last_payload(&pool).await["new"].get("email").is_none());
    let before = outbox_len(&pool).await;
    sqlx::query("UPDATE leads SET email = 'other@example.com' WHERE id = $1")
        .bind(lead)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(outbox_len(&pool).await, before, "no metric column changed");

    // Back to every column.
    let created = crm_analytics::capture::attach_with(&pool, "public", Some(CaptureColumns::All))
        .await
        .unwrap();
    assert_eq!(created, 8, "both capture triggers of each table replaced");
    let triggers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'crm_analytics%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(triggers, 16);
    assert_eq!(
        metrics_functions(&pool).await,
        0,
        "the metrics capture functions are dropped"
    );
    sqlx::query("UPDATE leads SET email = 'third@example.com' WHERE id = $1")
        .bind(lead)
        .execute(&pool)
        .await
        .unwrap();
    let payload = last_payload(&pool).await;
    assert_eq!(payload["old"]["email"], "other@example.com");
    assert_eq!(payload["new"]["email"], "third@example.com");
    db.finish(pool).await;
}

#[tokio::test]
async fn a_switch_behind_a_long_transaction_gives_up_without_blocking_reads() {
    let db = TestDb::create().await;
    let pool = db.pool(6).await;
    crm_analytics::capture::create_reference_schema(&pool, "public")
        .await
        .unwrap();
    crm_analytics::migrate::all_with(&pool, &pool, "public", false, Some(CaptureColumns::Metrics))
        .await
        .unwrap();
    sqlx::query("INSERT INTO leads (source) VALUES ('web')")
        .execute(&pool)
        .await
        .unwrap();
    // A CRM transaction that wrote to leads and stays open (a long report, a stuck client).
    let mut long = pool.begin().await.unwrap();
    sqlx::query("UPDATE leads SET source = 'ads'")
        .execute(&mut *long)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let switch = tokio::time::timeout(
        Duration::from_secs(20),
        crm_analytics::capture::attach_with(&pool, "public", Some(CaptureColumns::All)),
    );
    // While the switch waits for its lock, CRM reads of the table go on.
    let read = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM leads").fetch_one(&pool),
        )
        .await
    };
    let (result, read) = tokio::join!(switch, read);
    assert!(
        matches!(read, Ok(Ok(1))),
        "a read waits behind the switch: {read:?}"
    );
    let result = result.expect("the switch gives up within its lock timeout instead of hanging");
    let error = result
        .expect_err("the switch cannot get its lock")
        .to_string();
    assert!(
        error.contains("leads") && error.contains("retry when the CRM is less busy"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    // Nothing changed: the metrics triggers are still attached (accounts included).
    let created = crm_analytics::capture::attach(&pool, "public")
        .await
        .unwrap();
    assert_eq!(created, 0);
    assert_eq!(metrics_functions(&pool).await, 4);

    long.commit().await.unwrap();
    let created = crm_analytics::capture::attach_with(&pool, "public", Some(CaptureColumns::All))
        .await
        .unwrap();
    assert_eq!(created, 8, "the retry switches");
    assert_eq!(metrics_functions(&pool).await, 0);
    db.finish(pool).await;
}
