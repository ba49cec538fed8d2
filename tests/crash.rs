//! Crashes: the `run` process is killed with SIGKILL at random moments while the CRM keeps
//! writing, and restarted; nothing is lost and nothing counted twice. SIGTERM stops it
//! gracefully.

mod common;

use common::TestDb;
use crm_analytics::workload::{self, WorkloadConfig, WorkloadStats};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

fn spawn_run(db: &TestDb) -> Child {
    Command::new(common::binary())
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("CRM_ANALYTICS_ARCHIVE", &db.archive)
        .env("CRM_ANALYTICS_OUTBOX_RETENTION", "1h")
        .env("CRM_ANALYTICS_WORKERS", "3")
        .env("CRM_ANALYTICS_BATCH_SIZE", "100")
        .env("CRM_ANALYTICS_POLL_INTERVAL", "200ms")
        .env("CRM_ANALYTICS_RETRY_BACKOFF", "100ms")
        .env("CRM_ANALYTICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start crm-analytics run")
}

/// Sends SIGTERM and expects a clean exit within 15 seconds.
async fn terminate(mut child: Child) {
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("stops within 15 s of SIGTERM")
        .expect("exit status");
    assert!(status.success(), "graceful stop exits 0: {status:?}");
}

#[tokio::test]
async fn sigkill_at_random_moments_loses_nothing_and_doubles_nothing() {
    let (db, pool) = TestDb::migrated().await;
    let stats = Arc::new(WorkloadStats::default());
    let writers = {
        let (pool, stats) = (pool.clone(), stats.clone());
        tokio::spawn(async move {
            let config = WorkloadConfig {
                writers: 3,
                transactions_per_writer: Some(700),
                rollback_ratio: 0.1,
                seed: 21,
                crm_schema: "public".into(),
            };
            workload::run(&pool, &config, stats, CancellationToken::new()).await
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut kills = 0;
    while kills < 5 {
        let mut child = spawn_run(&db);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1500))).await;
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reap");
        kills += 1;
    }
    writers.await.unwrap().expect("workload");
    assert!(stats.committed() > 1000);

    let child = spawn_run(&db);
    common::drain(&pool, Duration::from_secs(90)).await;
    // Give it time to install its signal handlers even if there was nothing left to drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    terminate(child).await;

    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn sigterm_under_load_finishes_or_releases_batches() {
    let (db, pool) = TestDb::migrated().await;
    sqlx::raw_sql(
        "INSERT INTO accounts (name) SELECT 'A' || i FROM generate_series(1, 200) i;
         INSERT INTO leads (account_id, source) SELECT id, 'web' FROM accounts, generate_series(1, 20);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let child = spawn_run(&db);
    tokio::time::sleep(Duration::from_millis(700)).await;
    terminate(child).await;
    // Whatever was not applied is still waiting, not lost: a new process finishes it.
    let mut child = spawn_run(&db);
    common::drain(&pool, Duration::from_secs(60)).await;
    child.start_kill().ok();
    child.wait().await.ok();
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}
