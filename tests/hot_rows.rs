//! Concurrent batches do not queue behind each other's archive write. A batch whose archive
//! write is stalled (an S3 endpoint that accepts connections and never answers) holds no
//! lock on the rows every batch shares (today's event_counts, this minute's latency
//! histogram) nor on the aggregate rows, so another batch of the same account, day, table
//! and operation applies at once.
//!
//! Alone in its test binary: it points the AWS_* variables of this process at the stalled
//! endpoint.

mod common;

use common::TestDb;
use crm_analytics::aggregates::rows::decode;
use crm_analytics::archive::{Archive, Layout};
use crm_analytics::event::Envelope;
use crm_analytics::relay::{relay_once, RelayConfig};
use crm_analytics::worker::apply::{Applier, Prepared};
use std::sync::Arc;
use std::time::Duration;

/// A TCP server that accepts connections, keeps them open and never answers; notifies on
/// each connection.
async fn stalled_endpoint() -> (String, Arc<tokio::sync::Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let connected = Arc::new(tokio::sync::Notify::new());
    let notify = connected.clone();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
            notify.notify_one();
        }
    });
    (format!("http://{address}"), connected)
}

fn prepare(deliveries: &[crm_analytics::queue::Delivery]) -> Vec<Prepared> {
    deliveries
        .iter()
        .enumerate()
        .map(|(index, delivery)| Prepared {
            index,
            event: decode(&Envelope::from_json(&delivery.body).unwrap()).unwrap(),
            json: delivery.body.clone(),
        })
        .collect()
}

#[tokio::test]
async fn a_stalled_archive_write_holds_no_shared_row() {
    let (endpoint, connected) = stalled_endpoint().await;
    for (name, value) in [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(name, value);
    }
    let stalled_archive = Archive::open("s3://stalled/events", Layout::Batch).unwrap();

    let (db, pool) = TestDb::migrated().await;
    // Forty leads of one account and source, created now: every event of both batches
    // lands on the same event_counts, latency, daily and funnel rows.
    sqlx::raw_sql(
        "INSERT INTO accounts (name) VALUES ('Hot');
         INSERT INTO leads (account_id, source) SELECT id, 'web' FROM accounts, generate_series(1, 40);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let queue = common::open_queue(&pool, 10_000).await;
    let relay = RelayConfig {
        loops: 1,
        batch_size: 1000,
        poll_interval: Duration::from_secs(1),
        outbox_retention: Duration::ZERO,
        timeout: Duration::from_secs(30),
        renew_ledger_after: Duration::from_secs(1800),
    };
    let relayed = relay_once(&pool, &pool, &*queue, &relay).await.unwrap();
    assert_eq!(relayed, 41);
    // The account's event and 20 leads, then the other 20 leads (outbox order).
    let batch = queue.receive(1000, Duration::ZERO).await.unwrap();
    let mut first = prepare(batch.deliveries());
    assert_eq!(first.len(), 41);
    let second = first.split_off(21);

    // The first batch stops in its archive write, its transaction open.
    let stalled = Applier {
        pool: pool.clone(),
        archive: Some(stalled_archive),
    };
    let stuck = tokio::spawn(async move {
        let refs: Vec<&Prepared> = first.iter().collect();
        stalled.apply(&refs).await.map(|_| ())
    });
    tokio::time::timeout(Duration::from_secs(20), connected.notified())
        .await
        .expect("the first batch reached its archive write");

    // The second batch, on the same rows, applies while that write hangs.
    let local = Applier {
        pool: pool.clone(),
        archive: Some(Archive::open(db.archive.to_str().unwrap(), Layout::Batch).unwrap()),
    };
    let refs: Vec<&Prepared> = second.iter().collect();
    let applied = tokio::time::timeout(Duration::from_secs(5), local.apply(&refs))
        .await
        .expect("a batch waited for another batch's archive write")
        .expect("the second batch applies");
    assert_eq!((applied.fresh, applied.duplicates), (20, 0));
    assert!(!stuck.is_finished(), "the archive write was not stalled");

    let (processed, created, funnel, latency): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT processed FROM analytics.event_counts
                 WHERE table_name = 'leads' AND operation = 'insert'),
                (SELECT leads_created FROM analytics.daily_account_metrics),
                (SELECT total FROM analytics.lead_funnel_metrics),
                (SELECT sum(events)::int8 FROM crm_analytics.latency_histogram)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((processed, created, funnel, latency), (20, 20, 20, 20));

    // The stalled batch is given up: nothing of it was applied.
    stuck.abort();
    let _ = stuck.await;
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.applied_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 20);
    drop(batch);
    db.finish(pool).await;
}
