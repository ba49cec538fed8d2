//! Shared test harness: one fresh database per test on the real PostgreSQL server, the
//! reference CRM schema with capture attached, an in-process pipeline, and drain/verify.
#![allow(dead_code)]

pub mod brokers;
pub mod outage;

use crm_analytics::archive::Archive;
use crm_analytics::config::PipelineArgs;
use crm_analytics::pipeline::Pipeline;
use crm_analytics::queue::{Queue, QueueOptions, QueueSpec};
use crm_analytics::worker::apply::Applier;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The PostgreSQL server tests create their databases on.
pub fn server_url() -> String {
    std::env::var("CRM_ANALYTICS_TEST_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

pub struct TestDb {
    pub name: String,
    pub url: String,
    pub archive: PathBuf,
}

/// The prefix of every test database's name; the rest is its creation time and a uuid.
const TEST_DB_PREFIX: &str = "crm_analytics_test_";

/// A test database older than this is a leftover (a test that panicked before dropping it).
const LEFTOVER_AGE_SECONDS: u64 = 2 * 60 * 60;

/// A new test database's name: its creation time in it, so that leftovers can be found.
fn test_db_name() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{TEST_DB_PREFIX}{now}_{}", uuid::Uuid::new_v4().simple())
}

/// Drops, once per test binary, the test databases (and archive folders) that earlier runs
/// left behind, so that failed tests do not fill the disk over many runs. Only names older
/// than [`LEFTOVER_AGE_SECONDS`] are touched: a run under way elsewhere keeps its own.
async fn sweep_leftovers(admin: &mut PgConnection) {
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(TEST_DB_PREFIX)
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for name in names {
        let created = name
            .strip_prefix(TEST_DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|seconds| seconds.parse::<u64>().ok());
        if created.is_some_and(|created| created + LEFTOVER_AGE_SECONDS < now) {
            let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&name));
        }
    }
}

impl TestDb {
    /// A new, empty database of this test's own.
    pub async fn create() -> Self {
        let name = test_db_name();
        let mut admin = PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("PostgreSQL must be running for the integration tests (see README)");
        sweep_leftovers(&mut admin).await;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let archive = std::env::temp_dir().join(&name);
        Self {
            url: format!("{}/{name}", server_url()),
            name,
            archive,
        }
    }

    /// A file-level copy of this database (`CREATE DATABASE … TEMPLATE`), as a restore of a
    /// backup into a new database gives. Connections still open to this database are ended.
    pub async fn copy(&self) -> Self {
        let name = test_db_name();
        let mut admin = PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("connect");
        // Connections just closed may take a moment to end on the server; any still open
        // (a listener ending in the background) are ended, as a restore would.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let _ = sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&self.name)
            .execute(&mut admin)
            .await;
            let copied = sqlx::raw_sql(&format!("CREATE DATABASE {name} TEMPLATE {}", self.name))
                .execute(&mut admin)
                .await;
            match copied {
                Ok(_) => break,
                Err(error) if std::time::Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("copy the test database (connections still open?): {error}"),
            }
        }
        let archive = std::env::temp_dir().join(&name);
        Self {
            url: format!("{}/{name}", server_url()),
            name,
            archive,
        }
    }

    /// A fresh database with the reference CRM schema, capture and analytics installed.
    pub async fn migrated() -> (Self, PgPool) {
        let db = Self::create().await;
        let pool = db.pool(10).await;
        crm_analytics::migrate::all(&pool, &pool, "public", true)
            .await
            .expect("migrate");
        (db, pool)
    }

    pub async fn pool(&self, max: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max)
            .connect(&self.url)
            .await
            .expect("connect to test database")
    }

    /// Settings for a test pipeline: small batches, fast polling and retries.
    pub fn args(&self) -> PipelineArgs {
        let mut args = PipelineArgs::from_env();
        args.workers = Some(3);
        args.batch_size = 200;
        args.poll_interval = Duration::from_millis(250);
        args.retry_backoff = Duration::from_millis(100);
        args.archive.location = self.archive.to_string_lossy().into_owned();
        args
    }

    /// Closes the test's pool, then drops the database.
    pub async fn finish(self, pool: PgPool) {
        pool.close().await;
        self.drop_db().await;
    }

    /// Drops the database (after the pools using it are closed).
    pub async fn drop_db(self) {
        let mut admin = PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("connect");
        let _ = sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await;
        let _ = std::fs::remove_dir_all(&self.archive);
    }
}

/// A pipeline running in this process until the returned token is cancelled.
pub struct Running {
    pub pipeline: Arc<Pipeline>,
    pub stop: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = &self.pipeline;
        self.task
            .await
            .expect("pipeline task")
            .expect("pipeline ran without error");
    }
}

/// A pipeline wired as `crm-analytics run` wires it (pools sized the same), over the
/// queue `make_queue` builds on the analytics pool.
pub async fn start_with<F>(db: &TestDb, args: &PipelineArgs, make_queue: F) -> Running
where
    F: FnOnce(PgPool) -> Arc<dyn Queue>,
{
    spawn_pipeline(assemble(db, args, make_queue).await)
}

/// [`start_with`], the workers archiving to `archive` instead of where `args` says: an
/// archive opened with settings of its own (S3 credentials given in code, as the tests of
/// one binary share the process environment).
pub async fn start_archiving_to<F>(
    db: &TestDb,
    args: &PipelineArgs,
    archive: Archive,
    make_queue: F,
) -> Running
where
    F: FnOnce(PgPool) -> Arc<dyn Queue>,
{
    // The archive is given, not opened from the settings (which would create a folder).
    let mut args = args.clone();
    args.archive.location = "none".into();
    let mut pipeline = assemble(db, &args, make_queue).await;
    pipeline.applier = Arc::new(Applier {
        pool: pipeline.analytics.clone(),
        archive: Some(archive),
    });
    spawn_pipeline(pipeline)
}

async fn assemble<F>(db: &TestDb, args: &PipelineArgs, make_queue: F) -> Pipeline
where
    F: FnOnce(PgPool) -> Arc<dyn Queue>,
{
    let crm = db
        .pool(crm_analytics::pipeline::crm_pool_size(args.relays as usize))
        .await;
    let analytics = db
        .pool(crm_analytics::pipeline::analytics_pool_size(args.workers()))
        .await;
    let queue = make_queue(analytics.clone());
    Pipeline::assemble(crm, analytics, queue, args).expect("assemble pipeline")
}

fn spawn_pipeline(pipeline: Pipeline) -> Running {
    let pipeline = Arc::new(pipeline);
    let stop = CancellationToken::new();
    let task = pipeline.spawn_all(stop.clone());
    Running {
        pipeline,
        stop,
        task,
    }
}

pub async fn start(db: &TestDb, args: &PipelineArgs) -> Running {
    let analytics = db
        .pool(crm_analytics::pipeline::analytics_pool_size(args.workers()))
        .await;
    let queue = open_queue(&analytics, args.queue_capacity).await;
    start_with(db, args, move |_| queue).await
}

/// The queue the tests run on, through the same factory as the binary.
pub async fn open_queue(analytics: &PgPool, capacity: u64) -> Arc<dyn Queue> {
    let options = QueueOptions {
        capacity,
        ..QueueOptions::default()
    };
    crm_analytics::queue::open(&QueueSpec::Postgres, analytics, &options)
        .await
        .expect("open the queue")
}

/// The outbox as the queue on the analytics pool (the test's one database), keeping
/// consumed rows in event_outbox_processed when `keep_processed`.
pub async fn open_outbox(analytics: &PgPool, keep_processed: bool) -> Arc<dyn Queue> {
    let options = QueueOptions {
        keep_processed,
        ..QueueOptions::default()
    };
    crm_analytics::queue::open(&QueueSpec::Outbox, analytics, &options)
        .await
        .expect("open the outbox as the queue")
}

/// A pipeline on the outbox as the queue (no relay), as `crm-analytics run` runs by default.
pub async fn start_on_outbox(db: &TestDb, args: &PipelineArgs) -> Running {
    let analytics = db
        .pool(crm_analytics::pipeline::analytics_pool_size(args.workers()))
        .await;
    let queue = open_outbox(&analytics, !args.outbox_retention.is_zero()).await;
    start_with(db, args, move |_| queue).await
}

/// Waits until the outbox and the queue are both empty.
pub async fn drain(pool: &PgPool, timeout: Duration) {
    let queue = open_queue(pool, u64::MAX).await;
    drain_through(pool, &*queue, timeout).await
}

/// Waits until the outbox and `queue` (any backend) are both empty.
pub async fn drain_through(pool: &PgPool, queue: &dyn Queue, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
            .fetch_one(pool)
            .await
            .expect("count the outbox");
        let queue = queue.depth().await.expect("queue depth").events;
        if outbox == 0 && queue == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pipeline did not drain in {timeout:?}: outbox {outbox}, queue {queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every aggregate equals a full SQL recomputation over the CRM tables, row for row.
pub async fn assert_exact(pool: &PgPool) {
    assert_exact_across(pool, pool).await
}

/// [`assert_exact`] with the CRM and the aggregates in databases of their own.
pub async fn assert_exact_across(crm: &PgPool, analytics: &PgPool) {
    let found = crm_analytics::aggregates::verify::verify(crm, analytics, "public", 10)
        .await
        .expect("verify");
    assert!(
        found.differences == 0,
        "{} aggregate rows differ from the recomputation, first: {:#?}",
        found.differences,
        found.shown
    );
}

/// Non-empty aggregates exist, so an "exact" comparison is not vacuous.
pub async fn assert_nontrivial(pool: &PgPool) {
    let (daily, funnel, revenue): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM analytics.daily_account_metrics),
                (SELECT count(*) FROM analytics.lead_funnel_metrics),
                (SELECT count(*) FROM analytics.revenue_metrics)",
    )
    .fetch_one(pool)
    .await
    .expect("count aggregates");
    assert!(
        daily > 10 && funnel > 5 && revenue > 3,
        "too little data: {daily} {funnel} {revenue}"
    );
}

/// event_counts.processed equals the relayed events kept by the outbox retention.
pub async fn assert_counts_match_outbox(pool: &PgPool) {
    let mismatches: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "WITH relayed AS (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS date,
                   split_part(event_type, '.', 1) AS table_name,
                   split_part(event_type, '.', 2) AS operation, count(DISTINCT event_id) AS n
            FROM crm_analytics.event_outbox_processed GROUP BY 1, 2, 3
         ), counted AS (
            SELECT date, table_name, operation, processed FROM analytics.event_counts
            WHERE operation <> 'snapshot'
         )
         SELECT coalesce(r.table_name, c.table_name), coalesce(r.operation, c.operation),
                coalesce(r.n, 0), coalesce(c.processed, 0)
         FROM relayed r FULL JOIN counted c USING (date, table_name, operation)
         WHERE coalesce(r.n, 0) <> coalesce(c.processed, 0)",
    )
    .fetch_all(pool)
    .await
    .expect("compare event counts");
    assert!(
        mismatches.is_empty(),
        "event_counts differ from relayed events: {mismatches:?}"
    );
}

/// Runs a seeded random CRM workload to completion.
pub async fn run_workload(
    pool: &PgPool,
    writers: usize,
    transactions: u64,
    seed: u64,
) -> Arc<crm_analytics::workload::WorkloadStats> {
    let config = crm_analytics::workload::WorkloadConfig {
        writers,
        transactions_per_writer: Some(transactions),
        rollback_ratio: 0.1,
        seed,
        crm_schema: "public".into(),
    };
    let stats = Arc::new(crm_analytics::workload::WorkloadStats::default());
    crm_analytics::workload::run(pool, &config, stats.clone(), CancellationToken::new())
        .await
        .expect("workload");
    stats
}

/// A pipeline runs while a random workload writes; returns once everything is applied.
pub async fn workload_through_pipeline(
    db: &TestDb,
    pool: &PgPool,
    writers: usize,
    transactions: u64,
    seed: u64,
) {
    let running = start(db, &db.args()).await;
    run_workload(pool, writers, transactions, seed).await;
    drain(pool, Duration::from_secs(60)).await;
    running.stop().await;
}

/// Drops a cluster-wide role a test created.
pub async fn drop_role(role: &str) {
    let mut admin = PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .expect("connect");
    let _ = sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {role}"))
        .execute(&mut admin)
        .await;
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_crm-analytics")
}

pub const TOKEN: &str = "test-token-123";

/// The API server on a free port of its own, over the test database.
pub struct Server {
    pub base: String,
    pub stop: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// A server with relative next/previous links (no public URL configured).
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(db, false).await
    }

    /// With `public_url`, the server is configured with its own address as its public URL.
    pub async fn start_with(db: &TestDb, public_url: bool) -> Self {
        let crm = db.pool(4).await;
        let analytics = db.pool(8).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        // A long time-to-live: any answer staler than the aggregates shows up in the tests.
        let options = crm_analytics::api::ServeOptions {
            tokens: crm_analytics::api::auth::Tokens::parse(&format!("other-token,{TOKEN}")),
            cache_ttl: std::time::Duration::from_secs(3600),
            public_url: public_url.then(|| base.clone()),
        };
        Self::serve_on(listener, crm, analytics, options).await
    }

    /// The API over given pools (say, one of them pointing at a database that is down) on a
    /// free port of its own.
    pub async fn serve(
        crm: PgPool,
        analytics: PgPool,
        options: crm_analytics::api::ServeOptions,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::serve_on(listener, crm, analytics, options).await
    }

    async fn serve_on(
        listener: tokio::net::TcpListener,
        crm: PgPool,
        analytics: PgPool,
        options: crm_analytics::api::ServeOptions,
    ) -> Self {
        let queue = open_queue(&analytics, u64::MAX).await;
        let state = crm_analytics::api::AppState {
            crm,
            analytics,
            queue,
        };
        Self::serve_state_on(listener, state, options)
    }

    /// The API over a state built by the caller (a queue opened before its pool filled up).
    pub async fn serve_state(
        state: crm_analytics::api::AppState,
        options: crm_analytics::api::ServeOptions,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::serve_state_on(listener, state, options)
    }

    fn serve_state_on(
        listener: tokio::net::TcpListener,
        state: crm_analytics::api::AppState,
        options: crm_analytics::api::ServeOptions,
    ) -> Self {
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(crm_analytics::api::serve_on(
            listener,
            state,
            options,
            stop.clone(),
        ));
        Self { base, stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A client that does not follow redirects, so tests see them.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// GET with the token; returns status and JSON body.
pub async fn get_json(base: &str, path: &str) -> (u16, serde_json::Value) {
    let response = client()
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// Every page of a list, following `next` (relative links resolve against `base`).
pub async fn get_all(base: &str, path: &str) -> Vec<serde_json::Value> {
    let mut url = format!("{base}{path}");
    let mut rows = Vec::new();
    loop {
        let page: serde_json::Value = client()
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        rows.extend(page["results"].as_array().expect("results").iter().cloned());
        match page["next"].as_str() {
            Some(next) if next.starts_with('/') => url = format!("{base}{next}"),
            Some(next) => url = next.to_string(),
            None => return rows,
        }
    }
}

/// GET with the token over a plain TCP connection, for request targets longer than an
/// HTTP client accepts to send (reqwest refuses URIs over 64 KB); returns the status code.
pub async fn raw_get_status(base: &str, target: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .expect("an answer, not a dropped connection");
    let line = String::from_utf8_lossy(&head);
    line.strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"))
}

/// A server a test needs besides PostgreSQL: its address from `variable`, else `default`.
/// Outside CI a test whose server is not listening skips (None, with a message saying how
/// to start it); in CI (`CI` set) it fails instead, so that nothing passes by not running.
fn external_server(variable: &str, default: &str, what: &str) -> Option<String> {
    let url = std::env::var(variable).unwrap_or_else(|_| default.to_string());
    let parsed = url::Url::parse(&url).expect("a server URL");
    let address = format!(
        "{}:{}",
        parsed.host_str().unwrap_or("127.0.0.1"),
        parsed.port_or_known_default().unwrap_or(0)
    );
    let reachable = std::net::TcpStream::connect_timeout(
        &address
            .parse()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into()),
        Duration::from_secs(2),
    )
    .is_ok();
    if reachable {
        return Some(url);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is not listening at {url} ({variable}); .ci/services starts it");
    }
    eprintln!("skipped: {what} is not listening at {url}; run `eval \"$(.ci/services)\"` first");
    None
}

/// The local SQS- and S3-compatible server (moto), or None to skip outside CI.
pub fn aws_endpoint() -> Option<String> {
    external_server(
        "CRM_ANALYTICS_TEST_AWS_ENDPOINT",
        "http://127.0.0.1:4566",
        "the SQS/S3-compatible server",
    )
}

/// The NATS server with JetStream, or None to skip outside CI.
pub fn nats_url() -> Option<String> {
    external_server(
        "CRM_ANALYTICS_TEST_NATS",
        "nats://127.0.0.1:4222",
        "NATS with JetStream",
    )
}

/// Settles every delivery of `batches` as done.
pub async fn settle_all(batches: Vec<Box<dyn crm_analytics::queue::ReceivedBatch>>) {
    for batch in batches {
        let done = (0..batch.deliveries().len()).collect();
        batch
            .settle(crm_analytics::queue::Settlement {
                done,
                retry: Vec::new(),
            })
            .await
            .expect("settle");
    }
}

/// Writes a poison event straight into the outbox: a lead insert whose created_at is not
/// a date, which every worker attempt rejects.
pub async fn insert_poison_lead(pool: &PgPool, lead: uuid::Uuid) {
    sqlx::query(
        "INSERT INTO crm_analytics.event_outbox (event_type, aggregate_id, payload)
         VALUES ('leads.insert', $1, jsonb_build_object('new', jsonb_build_object(
             'id', $1, 'account_id', null, 'source', 'web', 'status', 'new',
             'converted_at', null, 'created_at', 'not a date')))",
    )
    .bind(lead)
    .execute(pool)
    .await
    .expect("insert a poison event");
}

/// What an operator does about the event of [`insert_poison_lead`] once it is parked:
/// corrects its date in failed_events, and the CRM has the lead, written with capture off
/// (SET LOCAL: this transaction only) so that replaying the parked event is its only event.
pub async fn fix_poison_lead(pool: &PgPool, lead: uuid::Uuid) {
    sqlx::raw_sql(
        "UPDATE crm_analytics.failed_events
            SET payload = jsonb_set(payload, '{new,created_at}', '\"2026-01-01T00:00:00+00:00\"')",
    )
    .execute(pool)
    .await
    .expect("fix the parked payload");
    let mut conn = pool.begin().await.expect("begin");
    sqlx::raw_sql("SET LOCAL session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .expect("capture off");
    sqlx::query(
        "INSERT INTO leads (id, source, status, created_at)
         VALUES ($1, 'web', 'new', '2026-01-01 00:00+00')",
    )
    .bind(lead)
    .execute(&mut *conn)
    .await
    .expect("insert the lead");
    conn.commit().await.expect("commit");
}

/// Every object of `archive` (path and bytes), read back through object_store: listed,
/// then fetched 16 at a time.
pub async fn archived_objects(archive: &Archive) -> Vec<(String, Vec<u8>)> {
    use futures::{StreamExt, TryStreamExt};
    use object_store::ObjectStore;
    let (store, prefix) = archive.store();
    let prefix = Some(&prefix).filter(|p| !p.as_ref().is_empty());
    let objects: Vec<object_store::ObjectMeta> = store
        .list(prefix)
        .try_collect()
        .await
        .expect("list the archive");
    futures::stream::iter(objects)
        .map(|meta| {
            let store = store.clone();
            async move {
                let body = store
                    .get(&meta.location)
                    .await
                    .expect("get an archived object")
                    .bytes()
                    .await
                    .expect("read an archived object");
                (meta.location.to_string(), body.to_vec())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}
