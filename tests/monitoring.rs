//! Monitoring with a database down: /metrics keeps the outbox lag moving and reports which
//! database is down; /api/health/ and `status` name the unreachable database.

mod common;

use common::{Server, TestDb, TOKEN};
use std::process::Command;

fn gauge(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_outbox_lag_stays_visible_while_analytics_is_down() {
    // The CRM in one database, the aggregates and the queue in another.
    let crm_db = TestDb::create().await;
    let analytics_db = TestDb::create().await;
    let crm = crm_db.pool(4).await;
    let analytics = analytics_db.pool(4).await;
    crm_analytics::cli::migrate_all(&crm, &analytics, "public", true)
        .await
        .unwrap();
    let options = crm_analytics::api::ServeOptions {
        tokens: crm_analytics::api::auth::Tokens::parse(TOKEN),
        cache_ttl: std::time::Duration::from_secs(1),
        public_url: None,
    };
    let server = Server::serve(crm.clone(), analytics.clone(), options).await;
    let base = server.base.clone();
    let scrape = || async {
        common::client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let text = scrape().await;
    assert_eq!(
        gauge(&text, "crm_analytics_database_up{database=\"crm\"}"),
        1.0
    );
    assert_eq!(
        gauge(&text, "crm_analytics_database_up{database=\"analytics\"}"),
        1.0
    );
    assert_eq!(gauge(&text, "crm_analytics_outbox_lag "), 0.0);
    let (status, health) = common::get_json(&base, "/api/health/").await;
    assert_eq!(status, 200);
    assert_eq!(health["databases"]["analytics"], "up");

    // The analytics database goes away; the CRM keeps writing.
    analytics.close().await;
    let analytics_name = analytics_db.name.clone();
    let analytics_url = analytics_db.url.clone();
    analytics_db.drop_db().await;
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 7) i")
        .execute(&crm)
        .await
        .unwrap();

    let text = scrape().await;
    assert_eq!(gauge(&text, "crm_analytics_outbox_lag "), 7.0, "{text}");
    assert_eq!(
        gauge(&text, "crm_analytics_database_up{database=\"crm\"}"),
        1.0
    );
    assert_eq!(
        gauge(&text, "crm_analytics_database_up{database=\"analytics\"}"),
        0.0
    );
    let (status, health) = common::get_json(&base, "/api/health/").await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["databases"]["crm"], "up");
    assert_eq!(health["databases"]["analytics"], "unreachable");
    assert_eq!(health["outbox_lag"], 7);
    // A metric list cannot be answered: 503 (retry later), not a 500 (a bug).
    for path in ["/api/funnel-metrics/", "/api/daily-metrics/?limit=1"] {
        let (status, body) = common::get_json(&base, path).await;
        assert_eq!(status, 503, "{path}: {body}");
    }
    assert!(health["queue_depth"].is_null());
    assert!(
        health["detail"].as_str().unwrap().contains("analytics"),
        "{health}"
    );
    server.stop().await;

    // `status` says the same, and fails.
    let output = Command::new(common::binary())
        .arg("status")
        .env("DATABASE_URL", &crm_db.url)
        .env("ANALYTICS_DATABASE_URL", &analytics_url)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("outbox lag     7 events"), "{stdout}");
    assert!(
        stderr.contains("analytics database (ANALYTICS_DATABASE_URL) is unreachable")
            && stderr.contains(&analytics_name),
        "{stderr}"
    );
    assert!(!stderr.contains("crm database"), "{stderr}");
    crm_db.finish(crm).await;
}

#[tokio::test]
async fn a_large_backlog_is_estimated_without_counting_it() {
    let (db, pool) = TestDb::migrated().await;
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 1500) i")
        .execute(&pool)
        .await
        .unwrap();
    let lag = crm_analytics::status::read_crm(&pool).await.unwrap();
    assert!(lag.estimated, "{lag:?}");
    assert!(
        lag.events > crm_analytics::status::EXACT_LAG_LIMIT as u64,
        "{lag:?}"
    );
    sqlx::raw_sql("DELETE FROM crm_analytics.event_outbox WHERE event_id IN (SELECT event_id FROM crm_analytics.event_outbox LIMIT 1000)")
        .execute(&pool)
        .await
        .unwrap();
    let lag = crm_analytics::status::read_crm(&pool).await.unwrap();
    assert_eq!(
        lag,
        crm_analytics::status::OutboxLag {
            events: 500,
            estimated: false
        }
    );
    db.finish(pool).await;
}

#[tokio::test]
async fn a_pool_with_every_connection_in_use_is_busy_not_unreachable() {
    let (db, crm) = TestDb::migrated().await;
    // A small analytics pool: the queue's listener holds one, a stage holds the rest.
    let analytics = db.pool(2).await;
    let queue = common::open_queue(&analytics, u64::MAX).await;
    let held = analytics.acquire().await.unwrap();
    let report = crm_analytics::status::Report::read(&crm, &analytics, &*queue).await;
    assert!(report.crm.is_ok(), "{report:?}");
    assert!(
        matches!(
            report.analytics,
            Err(crm_analytics::status::Unread::Busy(_))
        ),
        "{report:?}"
    );
    assert!(report.unreachable().is_empty(), "{report:?}");

    // Health says "busy" without a 503, and /metrics keeps database_up at 1.
    let options = crm_analytics::api::ServeOptions {
        tokens: crm_analytics::api::auth::Tokens::parse(TOKEN),
        cache_ttl: std::time::Duration::from_secs(0),
        public_url: None,
    };
    // The queue was opened before the pool filled up: opening it now would wait for a
    // connection like everything else.
    let state = crm_analytics::api::AppState {
        crm: crm.clone(),
        analytics: analytics.clone(),
        queue,
    };
    let server = Server::serve_state(state, options).await;
    let base = server.base.clone();
    let (status, health) = common::get_json(&base, "/api/health/").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["databases"]["analytics"], "busy", "{health}");
    assert_eq!(health["databases"]["crm"], "up", "{health}");
    let text = common::client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        gauge(&text, "crm_analytics_pool_busy{database=\"analytics\"}"),
        1.0
    );
    assert_ne!(
        text.lines()
            .find(|l| l.starts_with("crm_analytics_database_up{database=\"analytics\"}"))
            .and_then(|l| l.rsplit(' ').next()),
        Some("0"),
        "{text}"
    );
    drop(held);
    server.stop().await;
    analytics.close().await;
    db.finish(crm).await;
}

#[tokio::test]
async fn status_is_bounded_when_a_server_never_answers() {
    let (db, crm) = TestDb::migrated().await;
    // A server that accepts TCP connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!(
        "postgres://postgres@{}/analytics",
        silent.local_addr().unwrap()
    );
    // The CRM connects, but its outbox is locked: the read alone must be bounded too.
    let mut locker = crm.begin().await.unwrap();
    sqlx::query("LOCK TABLE crm_analytics.event_outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let mut child = Command::new(common::binary())
        .arg("status")
        .env("DATABASE_URL", &db.url)
        .env("ANALYTICS_DATABASE_URL", &silent_url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let finished = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if started.elapsed() > std::time::Duration::from_secs(40) {
            let _ = child.kill();
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(finished, "`status` still waited after 40 s: {stderr}");
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("analytics database (ANALYTICS_DATABASE_URL) is unreachable")
            && stderr.contains("no answer within"),
        "{stderr}"
    );
    assert!(stderr.contains("crm database"), "{stderr}");
    locker.rollback().await.unwrap();
    drop(silent);
    db.finish(crm).await;
}
