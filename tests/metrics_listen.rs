//! `relay` and `worker` processes run without the API server: with `--metrics-listen` they
//! serve /metrics and /healthz on an address of their own, and without it nothing listens.
//! The real binary, against a real database.

mod common;

use common::TestDb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sqlx::PgPool;
use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A port nothing listens on right now (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn crm_analytics(db: &TestDb, args: &[&str]) -> Command {
    let mut command = Command::new(common::binary());
    command
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env_remove("CRM_ANALYTICS_METRICS_LISTEN")
        .env("CRM_ANALYTICS_ARCHIVE", &db.archive)
        .env("CRM_ANALYTICS_WORKERS", "2")
        .env("CRM_ANALYTICS_RELAYS", "1")
        // The relay has metrics of its own only where it runs: behind the embedded queue.
        .env("CRM_ANALYTICS_QUEUE", "postgres")
        .env("CRM_ANALYTICS_POLL_INTERVAL", "200ms")
        .env("CRM_ANALYTICS_RETRY_BACKOFF", "100ms")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

fn spawn(db: &TestDb, args: &[&str]) -> Child {
    crm_analytics(db, args)
        .stderr(Stdio::null())
        .spawn()
        .expect("start crm-analytics")
}

/// SIGTERM, then a clean exit within 15 seconds.
async fn terminate(mut child: Child) {
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("stops within 15 s of SIGTERM")
        .expect("exit status");
    assert!(status.success(), "graceful stop exits 0: {status:?}");
}

/// GET `path` on `port`; None while nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Waits until the listener on `port` answers /healthz.
async fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((status, body)) = get(port, "/healthz").await {
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("ok"), "{body}");
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of a counter over its labels in a /metrics page (0 when it is not there yet).
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(port: u16) -> String {
    let (status, page) = get(port, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200, "{page}");
    page
}

async fn applied(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM crm_analytics.applied_events")
        .fetch_one(pool)
        .await
        .expect("count applied events")
}

/// Writes `n` accounts with a lead each: 2n events.
async fn write_rows(pool: &PgPool, n: i32) {
    sqlx::query(
        "WITH a AS (INSERT INTO accounts (name) SELECT 'Account ' || i FROM generate_series(1, $1) i
                    RETURNING id)
         INSERT INTO leads (account_id, source) SELECT id, 'web' FROM a",
    )
    .bind(n)
    .execute(pool)
    .await
    .expect("write CRM rows");
}

/// Waits until the worker's counter of applied events reaches `expected`, which the
/// database must agree with.
async fn wait_applied(pool: &PgPool, port: u16, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = counter(&scrape(port).await, "crm_analytics_events_processed_total");
        assert!(
            seen <= expected,
            "{seen} events counted, {expected} written"
        );
        if seen == expected {
            assert_eq!(applied(pool).await as f64, expected);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics counted {seen} of {expected} applied events"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn relay_and_worker_serve_metrics_on_their_own_listeners() {
    let (db, pool) = TestDb::migrated().await;
    let (worker_port, relay_port) = (free_port(), free_port());
    let worker = spawn(
        &db,
        &[
            "worker",
            "--metrics-listen",
            &format!("127.0.0.1:{worker_port}"),
        ],
    );
    let relay = crm_analytics(&db, &["relay"])
        .env(
            "CRM_ANALYTICS_METRICS_LISTEN",
            format!("127.0.0.1:{relay_port}"),
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("start the relay");
    wait_healthy(worker_port).await;
    wait_healthy(relay_port).await;
    let page = scrape(worker_port).await;
    assert_eq!(counter(&page, "crm_analytics_events_processed_total"), 0.0);
    // The same exporter as the API's: the backlog gauges are read at the scrape.
    assert!(page.contains("crm_analytics_queue_depth"), "{page}");
    assert!(
        page.contains("crm_analytics_database_up{database=\"analytics\"} 1"),
        "{page}"
    );

    write_rows(&pool, 5).await;
    wait_applied(&pool, worker_port, 10.0).await;
    // The counter keeps increasing as more events are applied.
    write_rows(&pool, 20).await;
    wait_applied(&pool, worker_port, 50.0).await;
    // The relay's own /metrics counts what it relayed (it counts just after its commit).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = scrape(relay_port).await;
        let relayed = counter(&page, "crm_analytics_events_relayed_total");
        if relayed == 50.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay counted {relayed} of 50"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    terminate(worker).await;
    terminate(relay).await;
    db.finish(pool).await;
}

/// Inodes of the TCP sockets in LISTEN state on this host (state 0A in /proc/net/tcp*).
fn listening_inodes() -> HashSet<String> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) == Some(&"0A") {
                if let Some(inode) = fields.get(9) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    inodes
}

/// Whether process `pid` holds a listening TCP socket.
fn listens(pid: u32) -> bool {
    let listening = listening_inodes();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's descriptors")
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .any(|inode| listening.contains(&inode))
}

/// Starts `args` and waits until it logs that the pipeline runs.
async fn started(db: &TestDb, args: &[&str]) -> Child {
    let mut child = crm_analytics(db, args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start crm-analytics");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let running = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            if line.contains("pipeline running") {
                return true;
            }
        }
        false
    })
    .await
    .expect("the pipeline starts within 60 s");
    assert!(running, "the process exited before its pipeline ran");
    // Keep reading so that the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

#[tokio::test]
async fn without_the_setting_nothing_listens() {
    let (db, pool) = TestDb::migrated().await;
    let quiet = started(&db, &["worker"]).await;
    let port = free_port();
    let listening = started(
        &db,
        &["worker", "--metrics-listen", &format!("127.0.0.1:{port}")],
    )
    .await;
    // The check sees a listener where there is one, so its "none" below means something.
    assert!(listens(listening.id().expect("pid")));
    assert!(
        !listens(quiet.id().expect("pid")),
        "a worker without --metrics-listen listens"
    );
    terminate(quiet).await;
    terminate(listening).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn a_taken_metrics_address_stops_the_process_naming_the_setting() {
    let db = TestDb::create().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("addr").to_string();
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        crm_analytics(&db, &["relay", "--metrics-listen", &address])
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("stops at once")
    .expect("run the relay");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&address) && stderr.contains("CRM_ANALYTICS_METRICS_LISTEN"),
        "{stderr}"
    );
    db.drop_db().await;
}

#[test]
fn run_does_not_take_the_setting() {
    // `run` serves /metrics with the API on CRM_ANALYTICS_LISTEN.
    let output = std::process::Command::new(common::binary())
        .args(["run", "--metrics-listen", "127.0.0.1:9100"])
        .output()
        .expect("run the binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--metrics-listen"), "{stderr}");
}
