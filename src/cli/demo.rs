//! `crm-analytics demo`: a one-command tour. Creates a database of its own on the local
//! PostgreSQL (or uses DATABASE_URL), the reference CRM schema, attaches capture, and runs a
//! realistic CRM workload while the pipeline runs, showing live what it does; at the end it
//! drains and checks the aggregates against a full recomputation.

use clap::Args;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::api::auth::Tokens;
use crate::config::{parse_duration, DatabaseArgs, PipelineArgs, ServerArgs};
use crate::pipeline::{shutdown_on_signals, Pipeline};
use crate::workload::{self, WorkloadConfig, WorkloadStats};
use std::io::IsTerminal;

const LOCAL_SERVER: &str = "postgres://postgres@localhost:5432";
const DEMO_DATABASE: &str = "crm_analytics_demo";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the workload runs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent CRM writers.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Seed of the random workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Creates the demo database on the local server if needed and returns its URL.
async fn local_database() -> anyhow::Result<String> {
    use sqlx::Connection;
    let admin_url = format!("{LOCAL_SERVER}/postgres");
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach PostgreSQL on localhost:5432 ({e}): start PostgreSQL, or set \
             DATABASE_URL to a database the demo may use"
        )
    })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DEMO_DATABASE)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        sqlx::raw_sql(&format!("CREATE DATABASE {DEMO_DATABASE}"))
            .execute(&mut admin)
            .await?;
    }
    Ok(format!("{LOCAL_SERVER}/{DEMO_DATABASE}"))
}

pub async fn run(db: &DatabaseArgs, args: DemoArgs) -> anyhow::Result<()> {
    let mut db = db.clone();
    if db.database_url.is_none() {
        db.database_url = Some(local_database().await?);
    }
    let crm_url = db.crm_url()?.to_string();
    println!("crm-analytics demo on {}", crate::db::redact(&crm_url));

    // The demo serves the dashboard too: its pools count the API's connections.
    let pipeline =
        Pipeline::connect_for(&db, &args.pipeline, crate::pipeline::Roles::ALL, true).await?;
    crate::migrate::all(&pipeline.crm, &pipeline.analytics, &db.crm_schema, true).await?;
    let report =
        crate::backfill::run(&pipeline.crm, &pipeline.analytics, &db.crm_schema, false).await?;
    println!(
        "schema ready; {} existing CRM rows backfilled",
        report.crm_rows
    );

    let shutdown = shutdown_on_signals();
    let pipeline = Arc::new(pipeline);
    // The pipeline stops before the server, so the dashboard outlives the workload.
    let pipeline_stop = shutdown.child_token();
    // Bound before anything runs, so that a taken address fails the demo at once.
    let listener = tokio::net::TcpListener::bind(args.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} ({e}): pass --listen with a free address, e.g. --listen 127.0.0.1:8181", args.server.listen))?;
    let running = pipeline.spawn_all(pipeline_stop.clone());
    // A token of the demo's own unless tokens are configured.
    let token = match args
        .server
        .api_tokens
        .split(',')
        .map(str::trim)
        .find(|t| !t.is_empty())
    {
        Some(token) => token.to_string(),
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    let server = {
        let (state, stop) = (pipeline.api_state(), shutdown.clone());
        let options = crate::api::ServeOptions {
            tokens: Tokens::parse(&token),
            cache_ttl: args.server.api_cache_ttl,
            public_url: args.server.public_url.clone(),
        };
        tokio::spawn(async move { crate::api::serve_on(listener, state, options, stop).await })
    };
    println!("dashboard: http://{}/#token={token}", args.server.listen);
    println!(
        "API:       curl -H 'Authorization: Bearer {token}' http://{}/api/funnel-metrics/",
        args.server.listen
    );

    let stats = Arc::new(WorkloadStats::default());
    let writers_stop = CancellationToken::new();
    let workload = {
        let config = WorkloadConfig {
            writers: args.writers,
            transactions_per_writer: None,
            rollback_ratio: 0.05,
            seed: args.seed,
            crm_schema: db.crm_schema.clone(),
        };
        let (pool, stats, stop) = (pipeline.crm.clone(), stats.clone(), writers_stop.clone());
        tokio::spawn(async move { workload::run(&pool, &config, stats, stop).await })
    };

    println!(
        "writing to the CRM with {} writers for {:?} (Ctrl-C stops)",
        args.writers, args.duration
    );
    let started = Instant::now();
    // Events applied before this run (a demo database is reused) are not this run's.
    let mut progress = Progress::start(applied_events(&pipeline).await, started);
    while started.elapsed() < args.duration && !shutdown.is_cancelled() {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        print_line(&pipeline, &stats, &mut progress).await;
    }
    writers_stop.cancel();
    workload.await??;

    println!("writers stopped; draining the pipeline");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status =
            crate::status::read(&pipeline.crm, &pipeline.analytics, &*pipeline.queue).await?;
        if status.outbox_lag == 0 && status.queue_depth == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pipeline_stop.cancel();
    running.await??;
    let seconds = started.elapsed().as_secs_f64().max(1e-3);
    let applied = (applied_events(&pipeline).await - progress.applied_before).max(0);
    println!(
        "this run: {} transactions committed ({:.0}/s while writing), {applied} events applied ({:.0}/s including the drain)",
        stats.committed(),
        stats.committed() as f64 / args.duration.as_secs_f64().min(seconds).max(1e-3),
        applied as f64 / seconds,
    );

    let found =
        crate::aggregates::verify::verify(&pipeline.crm, &pipeline.analytics, &db.crm_schema, 10)
            .await?;
    if found.differences == 0 {
        println!("✔ every aggregate equals a full recomputation over the CRM tables");
    } else {
        println!(
            "✘ {} aggregate rows differ from a recomputation:",
            found.differences
        );
        for line in &found.shown {
            println!("  {line}");
        }
    }
    print_summary(&pipeline).await?;
    let shown = crate::db::redact(&crm_url);
    let masked = if shown == crm_url {
        ""
    } else {
        " (with your password in place of ***)"
    };
    println!(
        "\nNext: `DATABASE_URL={shown} crm-analytics status`{masked}, or query schema analytics directly."
    );
    if std::io::stdin().is_terminal() && !shutdown.is_cancelled() {
        println!(
            "The dashboard stays up at http://{}/#token={token}; Ctrl-C quits.",
            args.server.listen
        );
        shutdown.cancelled().await;
    }
    shutdown.cancel();
    server.await??;
    Ok(())
}

/// Totals of this run and the rates over the last interval, for the demo's progress line.
struct Progress {
    applied_before: i64,
    started: Instant,
    last: (Instant, u64, i64),
}

impl Progress {
    fn start(applied_before: i64, started: Instant) -> Self {
        Self {
            applied_before,
            started,
            last: (started, 0, 0),
        }
    }

    /// Rates per second since the previous call, as (transactions, events).
    fn rates(&mut self, transactions: u64, events: i64) -> (f64, f64) {
        let now = Instant::now();
        let (then, t0, e0) = self.last;
        let seconds = now.duration_since(then).as_secs_f64().max(1e-3);
        self.last = (now, transactions, events);
        (
            transactions.saturating_sub(t0) as f64 / seconds,
            (events - e0).max(0) as f64 / seconds,
        )
    }
}

async fn applied_events(pipeline: &Pipeline) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(processed), 0)::int8 FROM analytics.event_counts WHERE operation <> 'snapshot'",
    )
    .fetch_one(&pipeline.analytics)
    .await
    .unwrap_or(0)
}

async fn print_line(pipeline: &Pipeline, stats: &WorkloadStats, progress: &mut Progress) {
    let applied = (applied_events(pipeline).await - progress.applied_before).max(0);
    let committed = stats.committed();
    let (tx_rate, event_rate) = progress.rates(committed, applied);
    match crate::status::read(&pipeline.crm, &pipeline.analytics, &*pipeline.queue).await {
        Ok(status) => {
            let latency = status
                .latency_ms
                .map(|l| format!("p50 {:>6} ms  p99 {:>6} ms", l.p50, l.p99))
                .unwrap_or_else(|| "no events yet".into());
            println!(
                "{:>4}s  transactions {:>7} ({:>5.0}/s)  events applied {:>8} ({:>6.0}/s)  outbox {:>5}  queue {:>5}  failed {}  latency {latency}",
                progress.started.elapsed().as_secs(),
                committed,
                tx_rate,
                applied,
                event_rate,
                status.outbox_lag,
                status.queue_depth,
                status.failed_events,
            );
        }
        Err(error) => println!("status unavailable: {error:#}"),
    }
}

async fn print_summary(pipeline: &Pipeline) -> anyhow::Result<()> {
    let funnel: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(total),0)::int8, coalesce(sum(new),0)::int8, coalesce(sum(contacted),0)::int8,
                coalesce(sum(qualified),0)::int8, coalesce(sum(converted),0)::int8, coalesce(sum(lost),0)::int8
         FROM analytics.lead_funnel_metrics",
    )
    .fetch_one(&pipeline.analytics)
    .await?;
    println!(
        "\nlead funnel: {} leads = {} new, {} contacted, {} qualified, {} converted, {} lost",
        funnel.0, funnel.1, funnel.2, funnel.3, funnel.4, funnel.5
    );
    let revenue: Vec<(chrono::NaiveDate, i64, rust_decimal::Decimal)> = sqlx::query_as(
        "SELECT month, sum(deals_won)::int8, sum(revenue) FROM analytics.revenue_metrics
         GROUP BY month ORDER BY month DESC LIMIT 4",
    )
    .fetch_all(&pipeline.analytics)
    .await?;
    for (month, won, amount) in revenue {
        println!(
            "revenue {}: {won} deals won, {amount}",
            month.format("%Y-%m")
        );
    }
    Ok(())
}
