//! API load: 64 concurrent connections on daily-metrics for one account over 90 days and on
//! funnel-metrics: while the pipeline applies a steady 2,000 CRM events/s (every batch's
//! commit outdates the response cache), and, beside it, with no writes, with the cache (the
//! default) and without it.
//! The load comes from wrk in a process of its own where it is installed (Debian package
//! `wrk`), else from a client in this process (which then shares its cores with the server).

use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::{percentile, BenchDb, Report, Scale};
use crm_analytics::api::{auth::Tokens, AppState, ServeOptions};

const SECTION: &str = "5. API under load (64 connections)";
const CONNECTIONS: usize = 64;
const TOKEN: &str = "bench";
/// CRM events/s applied while the API is under load (the freshness section's rate).
const WRITES_PER_SECOND: u64 = 2_000;

/// Requests per second and p99 latency of GETs of `url` for `seconds`.
async fn load(url: &str, seconds: u64, with_wrk: bool) -> anyhow::Result<(f64, Duration)> {
    if with_wrk {
        load_with_wrk(url, seconds).await
    } else {
        load_in_process(url, seconds).await
    }
}

/// wrk's own measurement.
async fn load_with_wrk(url: &str, seconds: u64) -> anyhow::Result<(f64, Duration)> {
    let output = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}"), url])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success() && !text.contains("Non-2xx"),
        "wrk failed on {url}: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok());
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_duration(v.trim()));
    match (rate, p99) {
        (Some(rate), Some(p99)) => Ok((rate, p99)),
        _ => anyhow::bail!("cannot read wrk's output: {text}"),
    }
}

/// wrk prints latencies as 653.00us, 2.92ms or 1.02s.
fn parse_wrk_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let value: f64 = text[..split].parse().ok()?;
    let seconds = match &text[split..] {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

async fn load_in_process(url: &str, seconds: u64) -> anyhow::Result<(f64, Duration)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (client, url) = (client.clone(), url.to_string());
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
    crm_analytics::migrate::all(&pool, &pool, "public", true).await?;
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
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 100) i")
        .execute(&pool)
        .await?;
    let to = chrono::Utc::now().date_naive();
    let from = to - chrono::Duration::days(89);
    let seconds = scale.oltp_seconds.clamp(3, 15);
    // Decided once, so that the label says what produced every row below.
    let with_wrk = wrk_installed().await;
    let generator = if with_wrk {
        "wrk, 2 threads"
    } else {
        "in-process client"
    };
    report.add(SECTION, "load generator", generator, None);
    let paths = [
        ("daily-metrics, one account, 90 days", format!("/api/daily-metrics/?account_id=00000000-0000-0000-0000-000000000007&from={from}&to={to}")),
        ("funnel-metrics, first page", "/api/funnel-metrics/".to_string()),
    ];

    // While the pipeline applies a steady load: every batch's commit outdates the cache.
    let running = super::InProcess::start(&db).await?;
    let load_stop = CancellationToken::new();
    let writes = super::freshness::steady_load(pool.clone(), WRITES_PER_SECOND, load_stop.clone());
    let started = Instant::now();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let options = ServeOptions {
        tokens: Tokens::parse(TOKEN),
        cache_ttl: Duration::from_secs(1),
        public_url: None,
    };
    let server_task = tokio::spawn(crm_analytics::api::serve_on(
        listener,
        running.pipeline.api_state(),
        options,
        running.stop.clone(),
    ));
    let mut measured = Vec::new();
    for (label, path) in &paths {
        measured.push((
            label,
            load(&format!("{base}{path}"), seconds, with_wrk).await?,
        ));
    }
    load_stop.cancel();
    let events = writes.await?;
    let achieved = events as f64 / started.elapsed().as_secs_f64();
    running.stop().await?;
    server_task.await??;
    let under = format!("while the pipeline applies {achieved:.0} events/s of CRM writes (asked {WRITES_PER_SECOND})");
    for (label, (rate, p99)) in measured {
        let ms = p99.as_secs_f64() * 1000.0;
        report.add(
            SECTION,
            format!("{label}, cached, {under}: throughput"),
            format!("{rate:.0} req/s"),
            Some(("at least 10,000 req/s".into(), rate >= 10_000.0)),
        );
        report.add(
            SECTION,
            format!("{label}, cached, {under}: p99 latency"),
            format!("{ms:.1} ms"),
            Some(("under 10 ms".into(), ms < 10.0)),
        );
    }

    // Without writes: the cache is never outdated; and without the cache.
    let queue = crm_analytics::queue::open(
        &crm_analytics::queue::QueueSpec::Postgres,
        &pool,
        &crm_analytics::queue::QueueOptions::default(),
    )
    .await?;
    let state = AppState {
        crm: pool.clone(),
        analytics: pool.clone(),
        queue,
    };
    for (cache, cache_ttl) in [
        ("cached (default), no writes", Duration::from_secs(1)),
        (
            "no cache (CRM_ANALYTICS_API_CACHE_TTL=0s), no writes",
            Duration::ZERO,
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let options = ServeOptions {
            tokens: Tokens::parse(TOKEN),
            cache_ttl,
            public_url: None,
        };
        let server_task = tokio::spawn(crm_analytics::api::serve_on(
            listener,
            state.clone(),
            options,
            stop.clone(),
        ));
        for (label, path) in &paths {
            let (rate, p99) = load(&format!("{base}{path}"), seconds, with_wrk).await?;
            let ms = p99.as_secs_f64() * 1000.0;
            report.add(
                SECTION,
                format!("{label}, {cache}: throughput"),
                format!("{rate:.0} req/s"),
                None,
            );
            report.add(
                SECTION,
                format!("{label}, {cache}: p99 latency"),
                format!("{ms:.1} ms"),
                None,
            );
        }
        stop.cancel();
        server_task.await??;
    }
    pool.close().await;
    db.drop_db().await?;
    Ok(())
}

async fn wrk_installed() -> bool {
    tokio::process::Command::new("wrk")
        .arg("--version")
        .output()
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latencies() {
        assert_eq!(
            parse_wrk_duration("653.00us"),
            Some(Duration::from_micros(653))
        );
        assert_eq!(
            parse_wrk_duration("2.92ms"),
            Some(Duration::from_micros(2920))
        );
        assert_eq!(
            parse_wrk_duration("1.50s"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_wrk_duration("fast"), None);
    }
}
