//! Freshness under load: steady CRM writes at a fixed event rate while probes measure the
//! time from a commit to its change being visible through the REST API. [`measure`] is
//! shared with section 8, which runs it through each queue backend.

use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::brokers::FreshQueue;
use super::{percentile, BenchDb, Report, Scale};

const SECTION: &str = "3. Freshness under load (commit to visible through the API)";
pub(super) const EVENTS_PER_SECOND: u64 = 2_000;
const LEADS_PER_TRANSACTION: u64 = 10;
const TOKEN: &str = "bench";

/// What a freshness run measured.
pub(super) struct Freshness {
    /// CRM events/s the steady load achieved.
    pub rate: f64,
    /// Commit to visible of every probe, sorted.
    pub samples: Vec<Duration>,
    /// Start of the writing transaction to applied (before the worker's commit), p50 and
    /// p99 in ms, from the workers' latency histogram over every event of the run.
    pub pipeline: Option<crm_analytics::status::Latency>,
}

impl Freshness {
    pub fn p50(&self) -> Duration {
        percentile(&self.samples, 0.5)
    }

    pub fn p99(&self) -> Duration {
        percentile(&self.samples, 0.99)
    }
}

/// Runs the pipeline and the API in this process on a database of its own, through
/// `queue` (None: the default queue), for `seconds` under a steady load of `rate` CRM
/// events/s (in transactions of ten).
pub(super) async fn measure(
    server: &str,
    seconds: u64,
    rate: u64,
    queue: Option<&FreshQueue>,
) -> anyhow::Result<Freshness> {
    let db = BenchDb::create(server, "fresh").await?;
    let measured = measure_on(&db, seconds, rate, queue).await;
    db.drop_db().await?;
    measured
}

/// Steady CRM writes: transactions of LEADS_PER_TRANSACTION leads (one event each) at a
/// fixed pace of `rate` events/s into the first accounts, until `stop`; the task returns the
/// events written. Up to WRITES_IN_FLIGHT transactions run at once, so that one slow commit
/// on a busy machine does not slow the pace (a CRM has many clients, not one).
pub(super) fn steady_load(
    pool: sqlx::PgPool,
    rate: u64,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    const WRITES_IN_FLIGHT: usize = 8;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(
            1_000_000 * LEADS_PER_TRANSACTION / rate.max(1),
        ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT));
        let mut writes = tokio::task::JoinSet::new();
        let mut events = 0u64;
        while !stop.is_cancelled() {
            tick.tick().await;
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let pool = pool.clone();
            writes.spawn(async move {
                let written = sqlx::query(
                    "INSERT INTO leads (account_id, source) SELECT id, 'load' FROM accounts LIMIT $1",
                )
                .bind(LEADS_PER_TRANSACTION as i64)
                .execute(&pool)
                .await
                .is_ok();
                drop(slot);
                if written {
                    LEADS_PER_TRANSACTION
                } else {
                    0
                }
            });
            while let Some(done) = writes.try_join_next() {
                events += done.unwrap_or(0);
            }
        }
        while let Some(done) = writes.join_next().await {
            events += done.unwrap_or(0);
        }
        events
    })
}

async fn measure_on(
    db: &BenchDb,
    seconds: u64,
    rate: u64,
    queue: Option<&FreshQueue>,
) -> anyhow::Result<Freshness> {
    let writers = db.pool(4).await?;
    crm_analytics::migrate::all(&writers, &writers, "public", true).await?;
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 100) i")
        .execute(&writers)
        .await?;

    let running = super::InProcess::start_on(db, queue).await?;
    let pipeline = running.pipeline.clone();
    let stop = running.stop.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server_task = tokio::spawn(crm_analytics::api::serve_on(
        listener,
        pipeline.api_state(),
        crm_analytics::api::ServeOptions {
            tokens: crm_analytics::api::auth::Tokens::parse(TOKEN),
            cache_ttl: std::time::Duration::from_secs(1),
            public_url: None,
        },
        stop.clone(),
    ));

    let load_stop = CancellationToken::new();
    let load = steady_load(writers.clone(), rate, load_stop.clone());

    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut probe = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        probe += 1;
        let source = format!("probe-{probe}");
        sqlx::query("INSERT INTO leads (source) VALUES ($1)")
            .bind(&source)
            .execute(&writers)
            .await?;
        let committed = Instant::now();
        let url = format!("{base}/api/funnel-metrics/?source={source}");
        loop {
            let page: serde_json::Value = client
                .get(&url)
                .bearer_auth(TOKEN)
                .send()
                .await?
                .json()
                .await?;
            if page["count"] == 1 {
                samples.push(committed.elapsed());
                break;
            }
            anyhow::ensure!(
                committed.elapsed() < Duration::from_secs(30),
                "a probe never became visible"
            );
            // The probe's own resolution: a change is seen at most this (and one request)
            // after it became visible.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load_stop.cancel();
    // The pipeline's own share, from the histogram its workers keep (every event of the
    // run, the steady load's included).
    let pipeline = crm_analytics::status::read_analytics(&writers)
        .await?
        .latency_ms;
    let events = load.await?;
    let achieved = events as f64 / started.elapsed().as_secs_f64();
    running.stop().await?;
    server_task.await??;
    writers.close().await;
    samples.sort();
    Ok(Freshness {
        rate: achieved,
        samples,
        pipeline,
    })
}

pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let measured = measure(server, scale.freshness_seconds, EVENTS_PER_SECOND, None).await?;
    let (rate, p50, p99) = (measured.rate, measured.p50(), measured.p99());
    report.add(
        SECTION,
        "steady load achieved",
        format!("{rate:.0} events/s"),
        None,
    );
    report.add(
        SECTION,
        format!(
            "probes: commit to visible in /api/funnel-metrics/ ({} samples), p50",
            measured.samples.len()
        ),
        format!("{:.1} ms", p50.as_secs_f64() * 1000.0),
        Some(("under 5 ms".into(), p50 < Duration::from_millis(5))),
    );
    report.add(
        SECTION,
        "same, p99",
        format!("{:.1} ms", p99.as_secs_f64() * 1000.0),
        Some(("under 25 ms".into(), p99 < Duration::from_millis(25))),
    );
    if let Some(pipeline) = &measured.pipeline {
        report.add(
            SECTION,
            "the pipeline alone, for every event of the run (not only the probes): writing transaction's start to applied, before the worker's commit (its latency histogram), p50 / p99",
            format!("{:.1} ms / {:.1} ms", pipeline.p50, pipeline.p99),
            None,
        );
    }
    Ok(())
}
