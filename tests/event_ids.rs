//! Event ids never repeat across restores: a CRM database restored from a backup (here a
//! file-level copy into a new database) hands out ids of its own, so the analytics ledger,
//! which remembers the ids the original handed out after the backup, never drops the
//! restored database's new events as duplicates.

mod common;

use common::TestDb;
use crm_analytics::pipeline::{Pipeline, Roles};
use sqlx::PgPool;
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn outbox_ids(pool: &PgPool) -> HashSet<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM crm_analytics.event_outbox")
        .fetch_all(pool)
        .await
        .expect("read the outbox")
        .into_iter()
        .collect()
}

async fn insert_accounts(pool: &PgPool, n: i32) {
    sqlx::query("INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, $1) i")
        .bind(n)
        .execute(pool)
        .await
        .expect("insert accounts");
}

fn prefix(id: &Uuid) -> String {
    id.simple().to_string()[..16].to_string()
}

#[tokio::test]
async fn a_copy_of_the_crm_hands_out_ids_the_original_never_did() {
    let (db, pool) = TestDb::migrated().await;
    insert_accounts(&pool, 10).await;
    let before = outbox_ids(&pool).await;
    pool.close().await;
    let copy = db.copy().await;

    // The original and the copy go on from the same sequence value.
    let original = db.pool(4).await;
    insert_accounts(&original, 20).await;
    let after: HashSet<Uuid> = &outbox_ids(&original).await - &before;
    let restored = copy.pool(4).await;
    insert_accounts(&restored, 20).await;
    let restored_ids: HashSet<Uuid> = &outbox_ids(&restored).await - &before;
    assert_eq!((after.len(), restored_ids.len()), (20, 20));
    assert!(
        after.is_disjoint(&restored_ids),
        "the copy handed out ids the original did"
    );
    // Within one database every session uses one prefix, so ids stay sequential.
    let prefixes: HashSet<String> = after.iter().map(prefix).collect();
    assert_eq!(prefixes.len(), 1, "{prefixes:?}");
    copy.finish(restored).await;
    db.finish(original).await;
}

/// Runs relay and workers over `crm` and `analytics` until the token is cancelled.
async fn start(
    crm: &PgPool,
    analytics: &PgPool,
    args: &crm_analytics::config::PipelineArgs,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let queue = common::open_queue(analytics, u64::MAX).await;
    let pipeline =
        Pipeline::assemble(crm.clone(), analytics.clone(), queue, args).expect("assemble");
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { pipeline.run(Roles::ALL, stop).await }
    });
    (stop, task)
}

/// Writes a workload on `crm` with the pipeline running, and waits until it is applied.
async fn write_and_apply(crm_db: &TestDb, analytics: &PgPool, seed: u64) {
    let crm = crm_db.pool(12).await;
    let args = crm_db.args();
    let (stop, task) = start(&crm, analytics, &args).await;
    common::run_workload(&crm, 2, 40, seed).await;
    let queue = common::open_queue(analytics, u64::MAX).await;
    common::drain_through(&crm, &*queue, Duration::from_secs(60)).await;
    stop.cancel();
    task.await.expect("join").expect("pipeline");
    crm.close().await;
}

/// The CRM's database is restored from a backup taken before some events that the
/// pipeline applied; after a rebuild from the restored CRM, its new events all count.
#[tokio::test]
async fn a_crm_restored_to_an_earlier_point_gets_its_new_events_applied() {
    let crm_db = TestDb::create().await;
    let analytics_db = TestDb::create().await;
    let analytics = analytics_db.pool(12).await;
    {
        let crm = crm_db.pool(4).await;
        crm_analytics::migrate::all(&crm, &analytics, "public", true)
            .await
            .expect("migrate");
        crm.close().await;
    }
    write_and_apply(&crm_db, &analytics, 1).await;
    let backup = crm_db.copy().await;
    // After the backup: events the ledger remembers.
    write_and_apply(&crm_db, &analytics, 2).await;

    // The CRM is restored from the backup; the aggregates are rebuilt from it, and the
    // CRM goes on writing.
    let restored = backup.pool(4).await;
    crm_analytics::backfill::run(&restored, &analytics, "public", false)
        .await
        .expect("rebuild");
    restored.close().await;
    write_and_apply(&backup, &analytics, 3).await;

    let restored = backup.pool(4).await;
    common::assert_exact_across(&restored, &analytics).await;
    let applied_new: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&restored)
        .await
        .expect("outbox");
    assert_eq!(applied_new, 0, "everything relayed");
    backup.finish(restored).await;
    crm_db.drop_db().await;
    analytics_db.finish(analytics).await;
}
