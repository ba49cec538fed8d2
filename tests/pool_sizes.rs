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
    let mut child = Command::new(common::binary())
        .arg("worker")
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
