//! Many processes on every queue backend: one relay and three worker processes at once,
//! workers and the relay killed with SIGKILL at random moments while the CRM keeps
//! writing, and the broker stopped mid-run and started again. Nothing is lost, nothing is
//! counted twice.

mod common;

use common::TestDb;
use crm_analytics::queue::Queue;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Where a test's queue is: the settings its processes get, and a handle to watch it.
struct TestQueue {
    env: Vec<(&'static str, String)>,
    queue: Arc<dyn Queue>,
    _keep: Option<common::brokers::FreshNats>,
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Postgres,
    Nats,
    Sqs,
}

async fn test_queue(backend: Backend, db: &TestDb, pool: &sqlx::PgPool) -> Option<TestQueue> {
    let _ = db;
    match backend {
        Backend::Postgres => Some(TestQueue {
            env: vec![("CRM_ANALYTICS_QUEUE", "postgres".into())],
            queue: common::open_queue(pool, u64::MAX).await,
            _keep: None,
        }),
        Backend::Nats => {
            let fresh = common::brokers::FreshNats::new(Duration::from_secs(5))?;
            let queue: Arc<dyn Queue> = Arc::new(fresh.open().await);
            Some(TestQueue {
                env: fresh.env(),
                queue,
                _keep: Some(fresh),
            })
        }
        Backend::Sqs => {
            // The local SQS-compatible server spends time linear in the queue's depth on
            // every message it hands out, so a deep queue slows it until batches outlast
            // their leases and come back as duplicates. The relay's capacity bound keeps
            // the queue shallow (backpressure, exercised too), and a longer lease rides
            // out its slow moments; a worker killed with a batch gives it back a lease later.
            let lease = Duration::from_secs(15);
            let fresh = common::brokers::FreshSqs::new(lease)?;
            let queue: Arc<dyn Queue> = Arc::new(fresh.open().await);
            let mut env = fresh.env();
            env.push(("CRM_ANALYTICS_QUEUE_CAPACITY", "300".into()));
            env.push(("CRM_ANALYTICS_QUEUE_LEASE", format!("{}s", lease.as_secs())));
            Some(TestQueue {
                env,
                queue,
                _keep: None,
            })
        }
    }
}

fn spawn(db: &TestDb, command: &str, queue: &TestQueue) -> Child {
    let mut child = Command::new(common::binary());
    child
        .arg(command)
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("CRM_ANALYTICS_ARCHIVE", &db.archive)
        .env("CRM_ANALYTICS_OUTBOX_RETENTION", "1h")
        .env("CRM_ANALYTICS_WORKERS", "2")
        .env("CRM_ANALYTICS_BATCH_SIZE", "100")
        .env("CRM_ANALYTICS_POLL_INTERVAL", "200ms")
        .env("CRM_ANALYTICS_RETRY_BACKOFF", "100ms")
        .env("CRM_ANALYTICS_QUEUE_LEASE", "5s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    // After the defaults above: a backend's own settings win.
    for (name, value) in &queue.env {
        child.env(name, value);
    }
    child.spawn().expect("start crm-analytics")
}

async fn terminate(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
}

/// One relay and three worker processes share the queue; while three writers commit,
/// a worker or the relay is killed (SIGKILL) every so often and replaced. The aggregates end exact and
/// every relayed event counts once.
async fn three_workers_killed_at_random(backend: Backend) {
    let (db, pool) = TestDb::migrated().await;
    let Some(queue) = test_queue(backend, &db, &pool).await else {
        return;
    };
    let mut relay = spawn(&db, "relay", &queue);
    let mut workers: Vec<Child> = (0..3).map(|_| spawn(&db, "worker", &queue)).collect();
    let writers = {
        let pool = pool.clone();
        // The local SQS-compatible server is slow under load: a smaller workload keeps the
        // test's time in line with the others.
        let transactions = if matches!(backend, Backend::Sqs) {
            300
        } else {
            500
        };
        tokio::spawn(async move { common::run_workload(&pool, 3, transactions, 31).await })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut kills = 0;
    while !writers.is_finished() || kills < 4 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
        kills += 1;
        // Every third kill is the relay's (perhaps between its publish and its commit:
        // the events are published again, and the duplicates count once).
        if kills % 3 == 0 {
            relay.start_kill().expect("SIGKILL");
            relay.wait().await.expect("reap");
            relay = spawn(&db, "relay", &queue);
            continue;
        }
        let victim = rng.gen_range(0..workers.len());
        let mut child = workers.swap_remove(victim);
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reap");
        workers.push(spawn(&db, "worker", &queue));
    }
    let stats = writers.await.expect("writers");
    assert!(stats.committed() > 600, "{} committed", stats.committed());
    common::drain_through(&pool, &*queue.queue, Duration::from_secs(240)).await;
    for child in workers {
        terminate(child).await;
    }
    terminate(relay).await;
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    drop(queue);
    db.finish(pool).await;
}

#[tokio::test]
async fn postgres_three_workers_killed_at_random() {
    three_workers_killed_at_random(Backend::Postgres).await
}

#[tokio::test]
async fn nats_three_workers_killed_at_random() {
    three_workers_killed_at_random(Backend::Nats).await
}

#[tokio::test]
async fn sqs_three_workers_killed_at_random() {
    three_workers_killed_at_random(Backend::Sqs).await
}

/// The NATS server stops mid-run (while the CRM writes) and starts again some 4 s later:
/// the relay's publishes fail and it keeps the events in the outbox meanwhile, the status
/// (the library's report and the `status` command) says the queue is unreachable, and
/// afterwards everything drains exactly once.
#[tokio::test]
async fn nats_outage_loses_nothing_and_doubles_nothing() {
    let Some(mut nats) = common::outage::PrivateNats::start() else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    let spec = crm_analytics::queue::nats::NatsSpec::new(&nats.url(), "OUTAGE").expect("spec");
    let options = crm_analytics::queue::QueueOptions {
        lease: Duration::from_secs(5),
        ..Default::default()
    };
    let queue: Arc<dyn Queue> = Arc::new(
        crm_analytics::queue::nats::NatsQueue::open(&spec, &options)
            .await
            .expect("open"),
    );
    let mut args = db.args();
    args.outbox_retention = Duration::from_secs(3600); // to count relayed events
    let running = common::start_with(&db, &args, {
        let queue = queue.clone();
        move |_| queue
    })
    .await;
    let writers = {
        let pool = pool.clone();
        tokio::spawn(async move { common::run_workload(&pool, 2, 600, 5).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    nats.stop();
    // While it is down: the CRM keeps committing, the events wait in the outbox, and the
    // status reports the queue unreachable (the databases are up).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = crm_analytics::status::Report::read(&pool, &pool, &*queue).await;
    assert!(report.crm.is_ok() && report.analytics.is_ok(), "{report:?}");
    assert!(
        matches!(&report.queue, Err(unread) if unread.state() == "unreachable"),
        "{:?}",
        report.queue
    );
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await
        .expect("outbox");
    assert!(
        waiting > 0,
        "events wait in the outbox while the broker is down"
    );
    let queue_env = [("CRM_ANALYTICS_QUEUE", format!("{}/OUTAGE", nats.url()))];
    common::outage::assert_outage_seen(&pool, &db.url, &queue_env).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart();
    let stats = writers.await.expect("writers");
    assert!(stats.committed() > 500);
    let started = Instant::now();
    common::drain_through(&pool, &*queue, Duration::from_secs(90)).await;
    eprintln!("drained {:?} after the broker came back", started.elapsed());
    running.stop().await;
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}

/// The SQS endpoint goes away mid-run (every connection dropped, new ones refused) and
/// comes back 4 s later: the relay keeps the events in the outbox meanwhile, the status
/// says the queue is unreachable, and afterwards everything drains exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_outage_loses_nothing_and_doubles_nothing() {
    // A lease long enough that the slow local server's calls do not outlast it.
    let Some(mut fresh) = common::brokers::FreshSqs::new(Duration::from_secs(10)) else {
        return;
    };
    if std::env::var_os("CRM_ANALYTICS_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("crm_analytics=debug,aws=info")
            .try_init();
    }
    let (db, pool) = TestDb::migrated().await;
    // The pipeline reaches SQS through a connection that the test can cut; the test
    // watches the queue directly.
    let watch: Arc<dyn Queue> = Arc::new(fresh.open().await);
    let server: std::net::SocketAddr = fresh
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("the SQS endpoint is host:port");
    let cuttable = common::outage::Cuttable::start(server).await;
    fresh.options.sqs.endpoint = Some(cuttable.url());
    // The relay's capacity bound keeps the queue shallow after the outage: the local server
    // spends time linear in its depth on every message it hands out.
    fresh.options.capacity = 300;
    let queue: Arc<dyn Queue> = Arc::new(fresh.open().await);
    let mut args = db.args();
    args.outbox_retention = Duration::from_secs(3600); // to count relayed events
    let running = common::start_with(&db, &args, {
        let queue = queue.clone();
        move |_| queue
    })
    .await;
    let writers = {
        let pool = pool.clone();
        // The local SQS-compatible server slows down as its queue deepens (each call scans
        // it), and an outage deepens it: a small workload keeps the test short.
        tokio::spawn(async move { common::run_workload(&pool, 2, 200, 9).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    cuttable.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = crm_analytics::status::Report::read(&pool, &pool, &*queue).await;
    assert!(report.crm.is_ok() && report.analytics.is_ok(), "{report:?}");
    assert!(
        matches!(&report.queue, Err(unread) if unread.state() == "unreachable"),
        "{:?}",
        report.queue
    );
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await
        .expect("outbox");
    assert!(
        waiting > 0,
        "events wait in the outbox while the broker is down"
    );
    let mut queue_env = fresh.env();
    for (name, value) in &mut queue_env {
        if *name == "CRM_ANALYTICS_SQS_ENDPOINT" {
            *value = cuttable.url(); // as the pipeline reaches it
        }
    }
    common::outage::assert_outage_seen(&pool, &db.url, &queue_env).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cuttable.restore();
    let stats = writers.await.expect("writers");
    assert!(stats.committed() > 150);
    let started = Instant::now();
    common::drain_through(&pool, &*watch, Duration::from_secs(180)).await;
    eprintln!(
        "drained {:?} after the endpoint came back",
        started.elapsed()
    );
    running.stop().await;
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}
