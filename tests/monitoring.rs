//! Monitoring with a database or the queue down: /metrics keeps the outbox lag moving and
//! reports which database (or the queue) is down; /api/health/, /readyz and `status` name
//! what is unreachable, each on its own.

mod common;

use async_trait::async_trait;
use common::{Server, TestDb, TOKEN};
use crm_analytics::queue::{Depth, Message, Queue, QueueError, ReceivedBatch};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    crm_analytics::migrate::all(&crm, &analytics, "public", true)
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
    // The embedded queue is in the analytics database: down with it.
    assert!(
        stdout.contains("queue          postgres, unreachable"),
        "{stdout}"
    );
    assert!(stdout.contains("queue depth    unknown"), "{stdout}");
    assert!(
        stderr.contains("the queue (postgres, CRM_ANALYTICS_QUEUE) is unreachable"),
        "{stderr}"
    );
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
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

/// What [`Flaky`]'s depth does.
const ANSWERS: u8 = 0;
const FAILS: u8 = 1;
const HANGS: u8 = 2;

/// The real PostgreSQL queue, except that its depth can fail or never answer, as a broker
/// that is down does while the analytics database is fine.
struct Flaky {
    inner: Arc<dyn Queue>,
    mode: Arc<AtomicU8>,
}

#[async_trait]
impl Queue for Flaky {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn publish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        self.inner.publish_messages(messages).await
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn ReceivedBatch>, QueueError> {
        self.inner.receive(max, wait).await
    }
    async fn depth(&self) -> Result<Depth, QueueError> {
        match self.mode.load(Ordering::SeqCst) {
            FAILS => Err(QueueError::Broker {
                backend: "postgres",
                operation: "depth",
                message: "connection refused".into(),
                retryable: true,
            }),
            HANGS => std::future::pending().await,
            _ => self.inner.depth().await,
        }
    }
    async fn is_full(&self) -> Result<bool, QueueError> {
        self.inner.is_full().await
    }
    fn shared_pool(&self) -> Option<&sqlx::PgPool> {
        self.inner.shared_pool()
    }
}

#[tokio::test]
async fn a_queue_that_does_not_answer_is_reported_on_its_own() {
    let (db, crm) = TestDb::migrated().await;
    let analytics = db.pool(8).await;
    let mode = Arc::new(AtomicU8::new(ANSWERS));
    let queue: Arc<dyn Queue> = Arc::new(Flaky {
        inner: common::open_queue(&analytics, u64::MAX).await,
        mode: mode.clone(),
    });
    let state = crm_analytics::api::AppState {
        crm: crm.clone(),
        analytics: analytics.clone(),
        queue: queue.clone(),
    };
    let options = crm_analytics::api::ServeOptions {
        tokens: crm_analytics::api::auth::Tokens::parse(TOKEN),
        cache_ttl: Duration::from_secs(0),
        public_url: None,
    };
    let server = Server::serve_state(state, options).await;
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
    let ready = || async {
        common::client()
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };

    // Everything answers.
    let (status, health) = common::get_json(&base, "/api/health/").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["databases"]["queue"], "up", "{health}");
    assert_eq!(health["queue_backend"], "postgres", "{health}");
    assert_eq!(health["queue_depth"], 0, "{health}");
    assert_eq!(ready().await, 200);
    let text = scrape().await;
    assert_eq!(gauge(&text, "crm_analytics_queue_up "), 1.0, "{text}");
    assert_eq!(gauge(&text, "crm_analytics_queue_depth "), 0.0, "{text}");

    // The queue fails: it alone is down, not the analytics database.
    mode.store(FAILS, Ordering::SeqCst);
    let report = crm_analytics::status::Report::read(&crm, &analytics, &*queue).await;
    assert!(report.crm.is_ok() && report.analytics.is_ok(), "{report:?}");
    assert!(
        matches!(
            &report.queue,
            Err(crm_analytics::status::Unread::Unreachable(e)) if e.contains("connection refused")
        ),
        "{report:?}"
    );
    assert!(report.unreachable().is_empty(), "{report:?}");
    assert!(report.queue_unreachable() && !report.all_reachable());
    let error = report.into_status().expect_err("the queue is down");
    assert!(
        error
            .to_string()
            .contains("the queue (postgres) is unreachable"),
        "{error}"
    );
    let (status, health) = common::get_json(&base, "/api/health/").await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["databases"]["crm"], "up", "{health}");
    assert_eq!(health["databases"]["analytics"], "up", "{health}");
    assert_eq!(health["databases"]["queue"], "unreachable", "{health}");
    assert!(health["queue_depth"].is_null(), "{health}");
    assert!(health["queue_depth_approximate"].is_null(), "{health}");
    assert_eq!(
        health["failed_events"], 0,
        "the analytics side is still read"
    );
    assert_eq!(health["detail"], "unreachable queue: postgres", "{health}");
    assert_eq!(ready().await, 503);
    let text = scrape().await;
    assert_eq!(gauge(&text, "crm_analytics_queue_up "), 0.0, "{text}");
    assert_eq!(
        gauge(&text, "crm_analytics_database_up{database=\"analytics\"}"),
        1.0,
        "{text}"
    );

    // Back up: so are health, readiness and the gauge.
    mode.store(ANSWERS, Ordering::SeqCst);
    let (status, health) = common::get_json(&base, "/api/health/").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(ready().await, 200);
    assert_eq!(gauge(&scrape().await, "crm_analytics_queue_up "), 1.0);

    // A queue that never answers is given up on within the read timeout.
    mode.store(HANGS, Ordering::SeqCst);
    let started = Instant::now();
    let (status, health) = common::get_json(&base, "/api/health/").await;
    assert!(
        started.elapsed() < crm_analytics::status::READ_TIMEOUT + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["databases"]["queue"], "unreachable", "{health}");
    assert_eq!(health["databases"]["analytics"], "up", "{health}");
    assert_eq!(ready().await, 503);
    assert_eq!(gauge(&scrape().await, "crm_analytics_queue_up "), 0.0);

    server.stop().await;
    drop(queue);
    analytics.close().await;
    db.finish(crm).await;
}

#[tokio::test]
async fn status_names_the_queue_backend_and_its_state() {
    let (db, pool) = TestDb::migrated().await;
    let status = |json: bool| {
        let mut command = Command::new(common::binary());
        command
            .arg("status")
            .env("DATABASE_URL", &db.url)
            .env_remove("ANALYTICS_DATABASE_URL")
            .env_remove("CRM_ANALYTICS_QUEUE");
        if json {
            command.arg("--json");
        }
        command.output().unwrap()
    };
    let output = status(false);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    // One database and no setting: the outbox itself is the queue.
    assert!(stdout.contains("queue          outbox, up"), "{stdout}");
    assert!(stdout.contains("queue depth    0 events"), "{stdout}");
    let output = status(true);
    assert!(output.status.success());
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(value["queue_backend"], "outbox", "{value}");
    assert_eq!(value["queue_depth"], 0, "{value}");
    assert_eq!(value["queue_depth_approximate"], false, "{value}");
    assert_eq!(
        value["databases"],
        serde_json::json!({"crm": "up", "analytics": "up", "queue": "up"})
    );
    db.finish(pool).await;
}
