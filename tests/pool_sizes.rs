//! Pool sizes: settings with checks at start. A process whose pools the server cannot
//! take, or whose analytics pool would starve its workers, fails at once and says which
//! setting to change.

mod common;

use common::TestDb;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `crm-analytics worker` with `env`; returns its exit status and stderr, or None if
/// it was still running after `patience` (then it is killed).
fn worker_with(db: &TestDb, env: &[(&str, &str)], patience: Duration) -> Option<(bool, String)> {
    command_with("worker", db, env, patience)
}

/// Runs `crm-analytics <command>` with `env`, like [`worker_with`].
fn command_with(
    command: &str,
    db: &TestDb,
    env: &[(&str, &str)],
    patience: Duration,
) -> Option<(bool, String)> {
    let mut child = Command::new(common::binary())
        .arg(command)
        .env("CRM_ANALYTICS_LISTEN", "127.0.0.1:0")
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("CRM_ANALYTICS_ARCHIVE", "none")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start crm-analytics");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let output = child.wait_with_output().expect("stderr");
            return Some((
                status.success(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ));
        }
        if started.elapsed() > patience {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn pools_larger_than_the_server_allows_fail_at_start() {
    let (db, pool) = TestDb::migrated().await;
    let max: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&pool)
        .await
        .unwrap();
    let too_many = (max.parse::<u32>().unwrap() + 10).to_string();
    let outcome = worker_with(
        &db,
        &[("CRM_ANALYTICS_ANALYTICS_POOL_SIZE", &too_many)],
        Duration::from_secs(20),
    );
    let (ok, stderr) = outcome.expect("the worker started although its pool cannot fit");
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("max_connections")
            && stderr.contains(&format!("CRM_ANALYTICS_ANALYTICS_POOL_SIZE={too_many}"))
            && stderr.contains("CRM_ANALYTICS_CRM_POOL_SIZE"),
        "{stderr}"
    );

    // A pool too small for the workers is refused too, naming both settings.
    let (ok, stderr) = worker_with(
        &db,
        &[
            ("CRM_ANALYTICS_WORKERS", "8"),
            ("CRM_ANALYTICS_ANALYTICS_POOL_SIZE", "6"),
        ],
        Duration::from_secs(20),
    )
    .expect("the worker started with a pool too small for its workers");
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("CRM_ANALYTICS_ANALYTICS_POOL_SIZE")
            && stderr.contains("CRM_ANALYTICS_WORKERS")
            && stderr.contains("at least 18"),
        "{stderr}"
    );

    // Sizes that fit pass the check.
    crm_analytics::db::check_room(&[crm_analytics::db::PoolRequest {
        url: &db.url,
        url_setting: "DATABASE_URL",
        size: 4,
        size_setting: "CRM_ANALYTICS_CRM_POOL_SIZE",
    }])
    .await
    .expect("four connections fit");
    db.finish(pool).await;
}

#[tokio::test]
async fn pool_minimums_follow_what_the_process_runs() {
    let (db, pool) = TestDb::migrated().await;
    let patience = Duration::from_secs(5);
    let too_small = |outcome: &Option<(bool, String)>| {
        outcome
            .as_ref()
            .is_some_and(|(ok, stderr)| !ok && stderr.contains("too small"))
    };

    // The default pool passes its own check although the cap of 40 is below the minimum.
    let outcome = worker_with(&db, &[("CRM_ANALYTICS_WORKERS", "20")], patience);
    assert!(!too_small(&outcome), "{outcome:?}");

    // A relay-only process needs no connections for workers it does not run.
    let outcome = command_with(
        "relay",
        &db,
        &[
            ("CRM_ANALYTICS_WORKERS", "40"),
            ("CRM_ANALYTICS_ANALYTICS_POOL_SIZE", "10"),
        ],
        patience,
    );
    assert!(!too_small(&outcome), "{outcome:?}");

    // `run` counts its relays' publishes and the API's connections too: 2 x 4 + 2 + 2 + 2.
    let (ok, stderr) = command_with(
        "run",
        &db,
        &[
            ("CRM_ANALYTICS_WORKERS", "4"),
            ("CRM_ANALYTICS_RELAYS", "2"),
            ("CRM_ANALYTICS_ANALYTICS_POOL_SIZE", "10"),
        ],
        Duration::from_secs(20),
    )
    .expect("`run` started with an analytics pool that leaves the API nothing");
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("at least 14") && stderr.contains("CRM_ANALYTICS_RELAYS"),
        "{stderr}"
    );
    db.finish(pool).await;
}

#[tokio::test]
async fn localhost_and_127_0_0_1_are_one_server() {
    let (db, pool) = TestDb::migrated().await;
    let (max, in_use): (i32, i64) = sqlx::query_as(
        "SELECT current_setting('max_connections')::int4,
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // Each pool alone fits; both together do not.
    let each = u32::try_from((i64::from(max) - in_use) * 2 / 3).unwrap();
    let by_name = db.url.replacen("127.0.0.1", "localhost", 1);
    assert_ne!(by_name, db.url, "the test server is expected at 127.0.0.1");
    let request = |url| crm_analytics::db::PoolRequest {
        url,
        url_setting: "DATABASE_URL",
        size: each,
        size_setting: "CRM_ANALYTICS_CRM_POOL_SIZE",
    };
    crm_analytics::db::check_room(&[request(&db.url)])
        .await
        .expect("one pool fits");
    let error = crm_analytics::db::check_room(&[request(&db.url), request(&by_name)])
        .await
        .expect_err("two pools to one server, named two ways, were not added up")
        .to_string();
    assert!(error.contains("max_connections"), "{error}");
    db.finish(pool).await;
}
