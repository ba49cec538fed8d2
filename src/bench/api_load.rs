//! API load: 64 concurrent connections on daily-metrics for one account over 90 days and on
//! funnel-metrics, against the server in this process (the load generator shares the
//! machine's cores with the server and PostgreSQL, as a sidecar client would).

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::{percentile, BenchDb, Report, Scale};
use crate::api::{auth::Tokens, AppState};
use crate::queue::postgres::PostgresQueue;

const SECTION: &str = "5. API under load (64 connections)";
const CONNECTIONS: usize = 64;
const TOKEN: &str = "bench";

/// Requests per second and p99 latency of GETs of `path` for `seconds`.
async fn load(base: &str, path: &str, seconds: u64) -> anyhow::Result<(f64, Duration)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (client, url) = (client.clone(), format!("{base}{path}"));
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                let response = client.get(&url).bearer_auth(TOKEN).send().await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "{url}: {}",
                    response.status()
                );
                response.bytes().await?;
                latencies.push(started.elapsed());
            }
            Ok(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    all.sort();
    let p99 = percentile(&all, 0.99);
    Ok((all.len() as f64 / seconds as f64, p99))
}

pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let db = BenchDb::create(server, "api").await?;
    let pool = db.pool(12).await?;
    crate::cli::migrate_all(&pool, &pool, "public", true).await?;
    // 1,000 accounts with a row for each of 120 days, and a funnel of 120 cohorts x 5 sources.
    sqlx::raw_sql(
        "INSERT INTO analytics.daily_account_metrics
         SELECT ('00000000-0000-0000-0000-' || lpad(a::text, 12, '0'))::uuid, current_date - d, d % 7, d % 3, d % 11, d % 2, (d % 5) * 100.25
         FROM generate_series(1, 1000) a, generate_series(0, 119) d;
         INSERT INTO analytics.lead_funnel_metrics
         SELECT current_date - d, s, 5, 4, 3, 2, 1, 15
         FROM generate_series(0, 119) d, unnest(ARRAY['web','event','referral','outbound','partner']) s;
         ANALYZE;",
    )
    .execute(&pool)
    .await?;
    let queue = PostgresQueue::connect(pool.clone(), u64::MAX).await?;
    let state = AppState {
        crm: pool.clone(),
        analytics: pool.clone(),
        queue: Arc::new(queue),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let server_task = tokio::spawn(crate::api::serve_on(
        listener,
        state,
        crate::api::ServeOptions {
            tokens: Tokens::parse(TOKEN),
            cache_ttl: Duration::from_secs(1),
        },
        stop.clone(),
    ));
    let to = chrono::Utc::now().date_naive();
    let from = to - chrono::Duration::days(89);
    let seconds = scale.oltp_seconds.clamp(3, 20);
    for (label, path) in [
        ("daily-metrics, one account, 90 days", format!("/api/daily-metrics/?account_id=00000000-0000-0000-0000-000000000007&from={from}&to={to}")),
        ("funnel-metrics, first page", "/api/funnel-metrics/".to_string()),
    ] {
        let (rate, p99) = load(&base, &path, seconds).await?;
        report.add(SECTION, format!("{label}: throughput"), format!("{rate:.0} req/s"), Some(("at least 10,000 req/s".into(), rate >= 10_000.0)));
        let ms = p99.as_secs_f64() * 1000.0;
        report.add(SECTION, format!("{label}: p99 latency"), format!("{ms:.1} ms"), Some(("under 10 ms".into(), ms < 10.0)));
    }
    stop.cancel();
    server_task.await??;
    pool.close().await;
    db.drop_db().await?;
    Ok(())
}
