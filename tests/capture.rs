//! Capture: the outbox is written in the CRM transaction, and only by our triggers.

mod common;

use common::TestDb;
use serde_json::Value;

#[tokio::test]
async fn migrate_is_idempotent_and_versioned() {
    let (db, pool) = TestDb::migrated().await;
    let catalog = "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname IN ('crm_analytics', 'analytics')";
    let objects_before: i64 = sqlx::query_scalar(catalog).fetch_one(&pool).await.unwrap();
    let triggers_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'crm_analytics%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        triggers_before, 16,
        "four triggers on each of the four tables"
    );

    let created = crm_analytics::capture::attach(&pool, "public")
        .await
        .unwrap();
    assert_eq!(created, 0, "a second run creates no trigger");
    let applied =
        crm_analytics::migrate::apply(&pool, "analytics", crm_analytics::aggregates::MIGRATIONS)
            .await
            .unwrap();
    assert!(applied.is_empty(), "a second run applies no migration");
    let objects_after: i64 = sqlx::query_scalar(catalog).fetch_one(&pool).await.unwrap();
    assert_eq!(objects_before, objects_after);
    let versions: Vec<(String, i32)> = sqlx::query_as(
        "SELECT component, version FROM crm_analytics.schema_migrations ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        versions,
        vec![
            ("analytics".into(), 1),
            ("analytics".into(), 2),
            ("analytics".into(), 3),
            ("analytics".into(), 4),
            ("analytics".into(), 5),
            ("capture".into(), 1),
            ("capture".into(), 2),
            ("capture".into(), 3),
            ("capture".into(), 4),
            ("capture".into(), 5),
            ("capture".into(), 6),
            ("postgres_queue".into(), 1)
        ]
    );
    let applied = crm_analytics::queue::migrate(&pool).await.unwrap();
    assert!(
        applied.is_empty(),
        "a second run applies no queue migration"
    );
    db.finish(pool).await;
}

/// An installation of the release before the embedded queue had migrations of its own: the
/// queue's table came with analytics migration 1 and may hold events. Commands ask for
/// `migrate`, which records the queue's migration and keeps the table and its events.
#[tokio::test]
async fn an_installation_whose_queue_came_with_analytics_upgrades_in_place() {
    let db = TestDb::create().await;
    let pool = db.pool(4).await;
    crm_analytics::capture::create_reference_schema(&pool, "public")
        .await
        .unwrap();
    crm_analytics::capture::attach(&pool, "public")
        .await
        .unwrap();
    crm_analytics::migrate::apply(&pool, "analytics", crm_analytics::aggregates::MIGRATIONS)
        .await
        .unwrap();
    // The table as analytics migration 1 created it (the same statements), unbookkept.
    sqlx::raw_sql(crm_analytics::queue::postgres::MIGRATIONS[0].sql)
        .execute(&pool)
        .await
        .unwrap();
    let queue = common::open_queue(&pool, u64::MAX).await;
    let waiting = crm_analytics::queue::Message {
        event_id: uuid::Uuid::new_v4(),
        event_type: "accounts.insert".into(),
        body: "{}".into(),
    };
    queue.publish_messages(&[waiting]).await.unwrap();

    let run = |args: &[&str]| {
        std::process::Command::new(common::binary())
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env_remove("ANALYTICS_DATABASE_URL")
            .env_remove("CRM_ANALYTICS_QUEUE")
            .output()
            .expect("run crm-analytics")
    };
    let output = run(&["status"]);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("the embedded queue (CRM_ANALYTICS_QUEUE=postgres) is not installed")
            && said.contains("run `crm-analytics migrate`"),
        "{said}"
    );
    let output = run(&["migrate"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = run(&["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        status["queue_depth"], 1,
        "the waiting event is kept: {status}"
    );
    let recorded: Vec<i32> = sqlx::query_scalar(
        "SELECT version FROM crm_analytics.schema_migrations WHERE component = 'postgres_queue'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(recorded, vec![1]);
    drop(queue);
    db.finish(pool).await;
}

#[tokio::test]
async fn migrate_names_what_is_missing_when_the_crm_is_absent() {
    let db = TestDb::create().await;
    let output = std::process::Command::new(common::binary())
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .output()
        .expect("run migrate");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing table accounts"), "{stderr}");
    assert!(stderr.contains("--create-crm-schema"), "{stderr}");

    let output = std::process::Command::new(common::binary())
        .arg("migrate")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")
        .output()
        .expect("run migrate");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to PostgreSQL") && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );
    // The demo says the same in one sentence, instead of a stack of errors.
    let output = std::process::Command::new(common::binary())
        .args(["demo", "--duration", "1s"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")
        .output()
        .expect("run demo");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to PostgreSQL at")
            && stderr.contains("Start PostgreSQL or fix DATABASE_URL"),
        "{stderr}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_commit_writes_old_and_new_images_and_a_rollback_writes_nothing() {
    let (db, pool) = TestDb::migrated().await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO accounts (name) VALUES ('Rolled back')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "a rolled-back change leaves no event");

    let account: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO accounts (name) VALUES ('Acme') RETURNING id")
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query("UPDATE accounts SET name = 'Acme Inc' WHERE id = $1")
        .bind(account)
        .execute(&pool)
        .await
        .unwrap();
    // An UPDATE that changes nothing is not captured.
    sqlx::query("UPDATE accounts SET name = name WHERE id = $1")
        .bind(account)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM accounts WHERE id = $1")
        .bind(account)
        .execute(&pool)
        .await
        .unwrap();
    let events: Vec<(String, Option<uuid::Uuid>, Value)> = sqlx::query_as(
        "SELECT event_type, aggregate_id, payload FROM crm_analytics.event_outbox ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        ["accounts.insert", "accounts.update", "accounts.delete"]
    );
    assert!(events.iter().all(|e| e.1 == Some(account)));
    // Event ids are sequential (cheap index appends): their order is the order of the writes.
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id::text FROM crm_analytics.event_outbox ORDER BY xid")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        ids.windows(2)
            .all(|w| w[0] < w[1] && w[0][..18] == w[1][..18]),
        "{ids:?}"
    );
    assert_eq!(events[0].2["new"]["name"], "Acme");
    assert!(events[0].2.get("old").is_none());
    assert_eq!(events[1].2["old"]["name"], "Acme");
    assert_eq!(events[1].2["new"]["name"], "Acme Inc");
    assert_eq!(events[2].2["old"]["name"], "Acme Inc");
    // Row images are in UTC whatever the session's time zone.
    assert!(events[0].2["new"]["created_at"]
        .as_str()
        .unwrap()
        .ends_with("+00:00"));
    db.finish(pool).await;
}

#[tokio::test]
async fn an_application_role_writes_the_crm_but_cannot_read_the_outbox() {
    let (db, pool) = TestDb::migrated().await;
    let role = format!("crm_app_{}", &db.name[db.name.len() - 8..]);
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA public TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mut app = pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!("SET ROLE {role}"))
        .execute(&mut *app)
        .await
        .unwrap();
    sqlx::query("INSERT INTO accounts (name) VALUES ('Written by the app')")
        .execute(&mut *app)
        .await
        .expect("the application role writes the CRM through the capture trigger");
    let denied = sqlx::query("SELECT * FROM crm_analytics.event_outbox")
        .execute(&mut *app)
        .await
        .expect_err("the outbox is not readable by the application role");
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    let denied = sqlx::query("SELECT * FROM analytics.daily_account_metrics")
        .execute(&mut *app)
        .await;
    assert!(denied.is_err(), "nor are the analytics tables");
    sqlx::raw_sql("RESET ROLE")
        .execute(&mut *app)
        .await
        .unwrap();
    drop(app);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    db.finish(pool).await;
    common::drop_role(&role).await;
}

#[tokio::test]
async fn truncate_of_a_captured_table_is_refused() {
    let (db, pool) = TestDb::migrated().await;
    sqlx::query("INSERT INTO accounts (name) VALUES ('Kept')")
        .execute(&pool)
        .await
        .unwrap();
    let error = sqlx::raw_sql("TRUNCATE activities, leads, projects, accounts")
        .execute(&pool)
        .await
        .expect_err("TRUNCATE must be refused");
    assert!(error.to_string().contains("TRUNCATE on public."), "{error}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    db.finish(pool).await;
}

/// Writes wake a relay only while one may be asleep: with the flag down (a relay polling
/// under load) a commit sends no notification, with it up it does, and a rolled-back
/// write never does.
#[tokio::test]
async fn writes_notify_only_while_a_relay_sleeps() {
    let (db, pool) = TestDb::migrated().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener
        .listen(crm_analytics::capture::OUTBOX_CHANNEL)
        .await
        .unwrap();
    let wait = std::time::Duration::from_millis(300);
    let insert = "INSERT INTO leads (source) VALUES ('web')";

    let up: i64 = sqlx::query_scalar("SELECT last_value FROM crm_analytics.relay_asleep")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(up, 1, "until a relay says it is awake, writes notify");
    sqlx::query(insert).execute(&pool).await.unwrap();
    let note = tokio::time::timeout(wait, listener.recv()).await;
    assert!(matches!(note, Ok(Ok(_))), "flag up: a commit notifies");

    sqlx::query("SELECT setval('crm_analytics.relay_asleep', 0)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(insert).execute(&pool).await.unwrap();
    let note = tokio::time::timeout(wait, listener.recv()).await;
    assert!(note.is_err(), "flag down: no notification, got {note:?}");

    sqlx::query("SELECT setval('crm_analytics.relay_asleep', 1)")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(insert).execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let note = tokio::time::timeout(wait, listener.recv()).await;
    assert!(note.is_err(), "a rollback notifies nobody, got {note:?}");
    sqlx::query(insert).execute(&pool).await.unwrap();
    let note = tokio::time::timeout(wait, listener.recv()).await;
    assert!(
        matches!(note, Ok(Ok(_))),
        "flag up again: a commit notifies"
    );
    drop(listener);
    db.finish(pool).await;
}
