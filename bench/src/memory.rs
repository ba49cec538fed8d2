//! Memory over a steady run: `crm-analytics run` under a steady mixed CRM load, its resident
//! memory sampled every second. Flat means the last minute holds no more than the first
//! minute after warm-up (plus a little allocator noise); a leak grows with every event.

use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::plot::{line_chart, Axes, Plot, Series};
use super::{BenchDb, Report, Scale};

const SECTION: &str = "6. Memory over a steady run";
const EVENTS_PER_SECOND: u64 = 2_000;
/// Each tick writes 10 events: 5 new leads, 3 activities, 2 lead status changes.
const EVENTS_PER_TICK: u64 = 10;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let db = BenchDb::create(server, "memory").await?;
    let pool = db.pool(4).await?;
    crm_analytics::migrate::all(&pool, &pool, "public", true).await?;
    sqlx::raw_sql("INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 500) i")
        .execute(&pool)
        .await?;
    let archive = std::env::temp_dir().join(&db.name);
    let mut child = super::drain::spawn(&db, "run", &archive, &super::drain::DEFAULT_QUEUE, &[])?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("crm-analytics run exited at once"))?;

    let stop = CancellationToken::new();
    let load = tokio::spawn(steady_load(pool.clone(), stop.clone()));
    let started = Instant::now();
    let total = Duration::from_secs(scale.steady_seconds);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < total {
        tick.tick().await;
        anyhow::ensure!(
            child.try_wait()?.is_none(),
            "crm-analytics run exited during the steady run"
        );
        if let Some(mb) = super::proc_status_mb(pid, "VmRSS") {
            samples.push((started.elapsed().as_secs_f64(), mb));
        }
    }
    stop.cancel();
    let events = load.await??;
    let _ = child.start_kill();
    let _ = child.wait().await;
    pool.close().await;
    db.drop_db().await?;
    let _ = std::fs::remove_dir_all(&archive);

    // Warm-up: the first sixth of the run (a minute of ten); then first and last window.
    let seconds = total.as_secs_f64();
    let window = (seconds / 10.0).max(2.0);
    let between = |from: f64, to: f64| {
        let mut values: Vec<f64> = samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, mb)| *mb)
            .collect();
        median(&mut values)
    };
    let first = between(window, 2.0 * window);
    let last = between(seconds - window, seconds + 1.0);
    let peak = samples.iter().map(|(_, mb)| *mb).fold(0.0, f64::max);
    let rate = events as f64 / seconds;
    report.add(
        SECTION,
        format!("steady mixed load for {:.0} s", seconds),
        format!("{rate:.0} events/s"),
        None,
    );
    report.add(
        SECTION,
        "RSS of `crm-analytics run`, median of the window after warm-up",
        format!("{first:.1} MB"),
        None,
    );
    report.add(
        SECTION,
        "same, median of the last window",
        format!("{last:.1} MB"),
        Some((
            "flat: at most 10% (+2 MB) above the first window".into(),
            last <= first * 1.10 + 2.0,
        )),
    );
    report.add(
        SECTION,
        "peak RSS during the steady run",
        format!("{peak:.1} MB"),
        Some(("under 150 MB".into(), peak < 150.0)),
    );
    let svg = line_chart(
        "Resident memory of crm-analytics run under a steady load",
        Axes {
            x: "seconds",
            y: "RSS (MB)",
            log: false,
        },
        &[Series {
            name: format!("RSS at {rate:.0} events/s"),
            points: samples,
        }],
    )?;
    report.add_plot(
        SECTION,
        Plot {
            file: "memory.svg".into(),
            caption: "resident memory over the steady run".into(),
            svg,
        },
    );
    Ok(())
}

/// Writes about EVENTS_PER_SECOND mixed events per second until stopped; returns events.
async fn steady_load(pool: sqlx::PgPool, stop: CancellationToken) -> anyhow::Result<u64> {
    let mut tick = tokio::time::interval(Duration::from_micros(
        1_000_000 * EVENTS_PER_TICK / EVENTS_PER_SECOND,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = 0u64;
    while !stop.is_cancelled() {
        tick.tick().await;
        let written = sqlx::raw_sql(
            "INSERT INTO leads (account_id, source)
               SELECT id, (ARRAY['web','event','referral'])[1 + (random() * 2)::int] FROM accounts ORDER BY random() LIMIT 5;
             INSERT INTO activities (account_id, activity_type)
               SELECT id, 'call' FROM accounts ORDER BY random() LIMIT 3;
             UPDATE leads SET status = (ARRAY['contacted','qualified','lost'])[1 + (random() * 2)::int]
               WHERE id IN (SELECT id FROM leads WHERE id >= gen_random_uuid() ORDER BY id LIMIT 2);",
        )
        .execute(&pool)
        .await;
        if written.is_ok() {
            events += EVENTS_PER_TICK;
        }
    }
    Ok(events)
}
