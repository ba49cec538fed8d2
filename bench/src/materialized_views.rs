//! Against what a user would do instead: the same metrics as plain PostgreSQL materialized
//! views refreshed with REFRESH MATERIALIZED VIEW CONCURRENTLY, at growing CRM sizes. At each
//! size the same change volume is applied incrementally by the pipeline and then picked up
//! by one refresh of the views; afterwards the views and the aggregates must agree. Then the
//! freshness of each is measured the same way: probes commit a lead and poll until they see
//! it, in the aggregates while the pipeline runs, in the funnel view while it is refreshed
//! back to back.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::plot::{line_chart, Axes, Plot, Series};
use super::{percentile, BenchDb, Report, Scale};
use crm_analytics::aggregates::recompute;
use crm_analytics::workload::{WorkloadConfig, WorkloadStats};

const SECTION: &str = "4. Against materialized views (REFRESH MATERIALIZED VIEW CONCURRENTLY)";
const PROBES: usize = 20;
/// Probes of the refreshed view: each waits for up to two refreshes, which take over ten
/// seconds each at 10M rows.
const VIEW_PROBES: usize = 5;

/// What one size measured.
struct AtSize {
    rows: i64,
    events: i64,
    incremental: Duration,
    refresh: Duration,
    freshness_p50: Duration,
    /// Commit to visible in the funnel view refreshed back to back, p50, and the probes.
    view_freshness_p50: Duration,
    view_probes: usize,
}

pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let mut results = Vec::new();
    let changes = scale.mv_changes;
    for &rows in scale.mv_sizes {
        let at = one_size(server, rows, changes).await?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let label = human(at.rows);
        report.add(
            SECTION,
            format!("{label} CRM rows: one refresh of the four views"),
            format!("{:.0} ms", ms(at.refresh)),
            None,
        );
        report.add(
            SECTION,
            format!(
                "{label} CRM rows: the same {} events ({changes} CRM transactions) applied incrementally",
                at.events
            ),
            format!("{:.0} ms", ms(at.incremental)),
            None,
        );
        let ratio = at.refresh.as_secs_f64() / at.incremental.as_secs_f64();
        report.add(
            SECTION,
            format!("{label} CRM rows: refresh / incremental"),
            format!("{ratio:.1}x"),
            None,
        );
        report.add(
            SECTION,
            format!(
                "{label} CRM rows: freshness p50, commit to visible: funnel view refreshed back to back ({} probes) / incremental ({PROBES} probes)",
                at.view_probes
            ),
            format!(
                "{:.0} ms / {:.1} ms",
                ms(at.view_freshness_p50),
                ms(at.freshness_p50)
            ),
            None,
        );
        results.push(at);
    }
    let ms_series = |name: &str, pick: fn(&AtSize) -> Duration| Series {
        name: name.to_string(),
        points: results
            .iter()
            .map(|r| (r.rows as f64, pick(r).as_secs_f64() * 1000.0))
            .collect(),
    };
    let svg = line_chart(
        "Cost of picking up the same change volume, by CRM size",
        Axes {
            x: "CRM rows (log)",
            y: "milliseconds (log)",
            log: true,
        },
        &[
            ms_series("REFRESH MATERIALIZED VIEW CONCURRENTLY, 4 views", |r| {
                r.refresh
            }),
            ms_series("incremental (crm-analytics run)", |r| r.incremental),
            ms_series("incremental freshness p50", |r| r.freshness_p50),
            ms_series("view freshness p50, refreshed back to back", |r| {
                r.view_freshness_p50
            }),
        ],
    )?;
    report.add_plot(
        SECTION,
        Plot {
            file: "materialized-views.svg".into(),
            caption: "refresh cost versus incremental cost and freshness, by CRM size".into(),
            svg,
        },
    );
    Ok(())
}

fn human(rows: i64) -> String {
    match rows {
        r if r >= 1_000_000 && r % 1_000_000 == 0 => format!("{}M", r / 1_000_000),
        r if r >= 1_000 && r % 1_000 == 0 => format!("{}k", r / 1_000),
        r => r.to_string(),
    }
}

async fn one_size(server: &str, rows: i64, changes: u64) -> anyhow::Result<AtSize> {
    let db = BenchDb::create(server, "mv").await?;
    let pool = db.pool(8).await?;
    crm_analytics::migrate::all(&pool, &pool, "public", true).await?;
    let started = Instant::now();
    load_crm(&pool, rows).await?;
    println!(
        "  {} CRM rows loaded in {:.0?}",
        human(rows),
        started.elapsed()
    );
    crm_analytics::backfill::run(&pool, &pool, "public", false).await?;
    create_views(&pool).await?;

    // The change volume, captured into the outbox while nothing drains it.
    let stats = Arc::new(WorkloadStats::default());
    let workload = WorkloadConfig {
        writers: 4,
        transactions_per_writer: Some(changes / 4),
        rollback_ratio: 0.0,
        seed: 7,
        crm_schema: "public".into(),
    };
    crm_analytics::workload::run(&pool, &workload, stats, CancellationToken::new()).await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await?;

    // Incremental: the pipeline drains those events; then probes measure freshness.
    let started = Instant::now();
    let running = super::InProcess::start(&db).await?;
    while !super::drain::drained(&pool, &*running.pipeline.queue).await? {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{events} events did not drain"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let incremental = started.elapsed();
    let freshness_p50 = probe_freshness(&pool).await?;
    running.stop().await?;

    // The alternative: one refresh of every view picks up the same changes.
    let started = Instant::now();
    for (view, _, _) in VIEWS {
        sqlx::raw_sql(&format!(
            "REFRESH MATERIALIZED VIEW CONCURRENTLY bench_mv.{view}"
        ))
        .execute(&pool)
        .await?;
    }
    let refresh = started.elapsed();
    check_views_match_aggregates(&pool).await?;
    // Freshness of the views themselves (after the check: its probes change the CRM).
    let view_freshness_p50 = probe_view_freshness(&pool).await?;
    pool.close().await;
    db.drop_db().await?;
    Ok(AtSize {
        rows,
        events,
        incremental,
        refresh,
        freshness_p50,
        view_freshness_p50,
        view_probes: VIEW_PROBES,
    })
}

/// Accounts, leads, projects and activities in the proportions of a CRM (1 : 35 : 10 : 54),
/// written with triggers off: the data existed before capture was attached.
async fn load_crm(pool: &sqlx::PgPool, rows: i64) -> anyhow::Result<()> {
    let part = |share: f64| ((rows as f64) * share).round() as i64;
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO accounts (name, created_at) SELECT 'account ' || i, now() - (i % 700) * interval '1 day' FROM generate_series(1, $1) i")
        .bind(part(0.01).max(10))
        .execute(&mut *conn)
        .await?;
    for (sql, share) in [
        ("INSERT INTO leads (account_id, source, status, converted_at, created_at)
          SELECT a.ids[1 + i % a.n], (ARRAY['web','event','referral','outbound','partner'])[1 + i % 5],
                 (ARRAY['new','contacted','qualified','converted','lost'])[1 + i % 5],
                 CASE WHEN i % 5 = 3 THEN now() - (i % 300) * interval '1 day' END,
                 now() - (i % 365) * interval '1 day' - (i % 1440) * interval '1 minute'
          FROM generate_series(1, $1) i, (SELECT array_agg(id) ids, count(*) n FROM accounts) a", 0.35),
        ("INSERT INTO projects (account_id, name, status, amount, closed_at)
          SELECT a.ids[1 + i % a.n], 'deal ' || i, (ARRAY['open','won','lost'])[1 + i % 3], (i % 9000) + 0.25,
                 CASE WHEN i % 3 > 0 THEN now() - (i % 730) * interval '1 day' END
          FROM generate_series(1, $1) i, (SELECT array_agg(id) ids, count(*) n FROM accounts) a", 0.10),
        ("INSERT INTO activities (account_id, activity_type, occurred_at)
          SELECT a.ids[1 + i % a.n], (ARRAY['call','email','meeting','note','task'])[1 + i % 5],
                 now() - (i % 365) * interval '1 day'
          FROM generate_series(1, $1) i, (SELECT array_agg(id) ids, count(*) n FROM accounts) a", 0.54),
    ] {
        sqlx::query(sql).bind(part(share)).execute(&mut *conn).await?;
    }
    sqlx::raw_sql("RESET session_replication_role")
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql("VACUUM ANALYZE").execute(&mut *conn).await?;
    Ok(())
}

/// The views a user would write: the same SQL the aggregates are verified against, and for
/// the fourth, rows per table and day (views see rows, not events).
const VIEWS: [(&str, &str, &str); 4] = [
    (
        "daily_account_metrics",
        "account_id, date, leads_created, leads_converted, activities, deals_won, revenue_won",
        "account_id, date",
    ),
    (
        "lead_funnel_metrics",
        "cohort_date, source, new, contacted, qualified, converted, lost, total",
        "cohort_date, source",
    ),
    (
        "revenue_metrics",
        "account_id, month, deals_won, revenue",
        "account_id, month",
    ),
    (
        "rows_per_day",
        "date, table_name, count",
        "date, table_name",
    ),
];

async fn create_views(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let rows_per_day = "SELECT (created_at AT TIME ZONE 'UTC')::date, t, count(*) FROM (
            SELECT created_at, 'accounts' AS t FROM public.accounts
            UNION ALL SELECT created_at, 'leads' FROM public.leads
            UNION ALL SELECT created_at, 'projects' FROM public.projects
            UNION ALL SELECT created_at, 'activities' FROM public.activities) r GROUP BY 1, 2"
        .to_string();
    let queries = [
        recompute::daily_sql("public"),
        recompute::funnel_sql("public"),
        recompute::revenue_sql("public"),
        rows_per_day,
    ];
    sqlx::raw_sql("CREATE SCHEMA bench_mv")
        .execute(pool)
        .await?;
    for ((view, columns, key), query) in VIEWS.iter().zip(queries) {
        sqlx::raw_sql(&format!(
            "CREATE MATERIALIZED VIEW bench_mv.{view} ({columns}) AS {query};
             CREATE UNIQUE INDEX ON bench_mv.{view} ({key});"
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// After the refresh, the three shared metrics must be the same rows in both.
async fn check_views_match_aggregates(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    for (view, _, _) in &VIEWS[..3] {
        let differing: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM (
                (SELECT * FROM bench_mv.{view} EXCEPT SELECT * FROM analytics.{view})
                UNION ALL
                (SELECT * FROM analytics.{view} EXCEPT SELECT * FROM bench_mv.{view})) d"
        ))
        .fetch_one(pool)
        .await?;
        anyhow::ensure!(
            differing == 0,
            "{view}: the materialized view and the aggregates differ in {differing} rows"
        );
    }
    Ok(())
}

/// Where a probe looks for its lead: our funnel aggregate or the funnel view, with how long
/// it waits at most and how often it looks.
struct Probed {
    table: &'static str,
    prefix: &'static str,
    timeout: Duration,
    poll: Duration,
}

/// Commit to visible in `probed.table` for `probes` single-lead transactions; the p50.
async fn freshness_p50(
    pool: &sqlx::PgPool,
    probes: usize,
    probed: Probed,
) -> anyhow::Result<Duration> {
    let mut samples = Vec::with_capacity(probes);
    let seen_sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE source = $1)",
        probed.table
    );
    for probe in 0..probes {
        let source = format!("{}-{probe}", probed.prefix);
        sqlx::query("INSERT INTO leads (source) VALUES ($1)")
            .bind(&source)
            .execute(pool)
            .await?;
        let committed = Instant::now();
        loop {
            let seen: bool = sqlx::query_scalar(&seen_sql)
                .bind(&source)
                .fetch_one(pool)
                .await?;
            if seen {
                samples.push(committed.elapsed());
                break;
            }
            anyhow::ensure!(
                committed.elapsed() < probed.timeout,
                "a probe never became visible in {}",
                probed.table
            );
            tokio::time::sleep(probed.poll).await;
        }
    }
    samples.sort();
    Ok(percentile(&samples, 0.5))
}

/// Commit to visible in the funnel view while it is refreshed back to back (CONCURRENTLY,
/// so that readers are never blocked), for single-lead transactions: the best freshness
/// the views offer at this size. p50 of VIEW_PROBES probes.
async fn probe_view_freshness(pool: &sqlx::PgPool) -> anyhow::Result<Duration> {
    let stop = CancellationToken::new();
    let refresher = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                sqlx::raw_sql(
                    "REFRESH MATERIALIZED VIEW CONCURRENTLY bench_mv.lead_funnel_metrics",
                )
                .execute(&pool)
                .await?;
            }
            Ok::<_, sqlx::Error>(())
        })
    };
    let probed = Probed {
        table: "bench_mv.lead_funnel_metrics",
        prefix: "view-probe",
        timeout: Duration::from_secs(600),
        poll: Duration::from_millis(10),
    };
    let p50 = freshness_p50(pool, VIEW_PROBES, probed).await;
    stop.cancel();
    refresher.await??;
    p50
}

/// Commit to visible in the funnel aggregate, for single-lead transactions.
async fn probe_freshness(pool: &sqlx::PgPool) -> anyhow::Result<Duration> {
    let probed = Probed {
        table: "analytics.lead_funnel_metrics",
        prefix: "probe",
        timeout: Duration::from_secs(30),
        poll: Duration::from_millis(1),
    };
    freshness_p50(pool, PROBES, probed).await
}
