//! Queues side by side: the same measurements through each queue backend in one run, each
//! through a fresh stream or queue of its own (`brokers`), deleted afterwards.
//!
//! Per backend: drain throughput of `crm-analytics run` (a child process with default
//! settings, as a user runs it) on a copy of one backlog (a smaller one for SQS, whose
//! local server is far slower), timed by [`DrainClock`] and verified exact against the
//! CRM afterwards. A drain is watched for a bounded time: one not finished by then (the
//! local SQS server can be that slow) is reported with the events applied so far,
//! unverified, and its log is kept. For SQS also the server's own ceiling
//! (`sqs_ceiling`) and the drain's ratio to it. Then freshness under a steady load
//! (section 3's measurement through that queue) of 2,000 events/s, or half of what the
//! queue carried above when that is less, so that the load is one the queue keeps up
//! with. Last, 1, 2 and 4 worker processes through NATS and SQS, archiving locally
//! (section 7's runs; section 7 has PostgreSQL's, and compares the archives).

use sqlx::PgPool;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Child;

use super::brokers::{Broker, FreshQueue};
use super::scale_out::Rows;
use super::{BenchDb, DrainClock, Report, Scale};
use crm_analytics::event::Envelope;
use crm_analytics::queue::Message;

const SECTION: &str = "8. Queues side by side";
/// Events of the backlog whose bodies the SQS ceiling sends (cycling through them).
const SAMPLE: i64 = 1_000;
/// How often the drain is checked: often enough to time short drains to a few percent.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// The drain throughput the PostgreSQL and NATS queues must reach.
const DRAIN_TARGET: f64 = 25_000.0;
/// The share of the server's own ceiling the SQS drain must reach.
const CEILING_TARGET: f64 = 0.8;

pub async fn run(server: &str, scale: Scale, report: &mut Report) -> anyhow::Result<()> {
    println!("{SECTION}");
    let brokers = Broker::all().await;
    let measured: Vec<&str> = brokers.iter().flatten().map(Broker::name).collect();
    report.add(
        SECTION,
        "queues measured; on each, a backlog of mixed events of the four tables drained by \
         `crm-analytics run` (a child process, default settings) through a fresh stream or \
         queue of its own, events/s from the last check with none applied to the first with \
         all applied, aggregates verified exact against the CRM afterwards",
        measured.join(", "),
        None,
    );
    for broker in &brokers {
        match broker {
            Ok(broker) => one_queue(server, scale, broker, report).await?,
            Err((name, why)) => report.add(SECTION, *name, format!("skipped ({why})"), None),
        }
    }
    for broker in brokers.iter().flatten() {
        let events = match broker {
            Broker::Postgres => continue,
            Broker::Nats { .. } => scale.queues_scale_out_backlog,
            Broker::Sqs { .. } => scale.queues_sqs_scale_out_backlog,
        };
        // The local archive only: section 7 compares the archives, this the queues.
        let rows = Rows {
            section: SECTION,
            prefix: format!("{}: ", broker.name()),
            s3_archive: false,
        };
        super::scale_out::run_with_queue(server, events, report, broker, &rows).await?;
    }
    Ok(())
}

/// Drain, ceiling (SQS) and freshness through one backend.
async fn one_queue(
    server: &str,
    scale: Scale,
    broker: &Broker,
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = broker.name();
    let events = match broker {
        Broker::Sqs { .. } => scale.queues_sqs_backlog,
        _ => scale.queues_backlog,
    };
    let cap = Duration::from_secs(scale.queues_drain_cap_seconds);
    let (template, backlog) = super::drain::template(server, events).await?;
    let drained = match sample(&template).await {
        Ok(messages) => drain(server, &template, backlog, broker, cap)
            .await
            .map(|drained| (messages, drained)),
        Err(error) => Err(error),
    };
    template.drop_db().await?;
    let (messages, drained) = drained?;
    let rate = drained.events_per_second;
    let target = match broker {
        Broker::Sqs { .. } => None,
        _ => Some(("at least 25,000 events/s".into(), rate >= DRAIN_TARGET)),
    };
    let value = match drained.applied < backlog {
        true => format!(
            "{rate:.0} events/s (stopped after {} s with {} applied, not verified)",
            cap.as_secs(),
            drained.applied
        ),
        false => format!("{rate:.0} events/s"),
    };
    report.add(
        SECTION,
        format!("{name}: drain throughput ({backlog} events)"),
        value,
        target,
    );
    // What the queue carries: the drain, and for SQS the server's own ceiling when lower.
    let mut carried = rate;
    if matches!(broker, Broker::Sqs { .. }) {
        carried = carried.min(ceiling(broker, &messages, backlog, cap, rate, report).await?);
    }
    let load = (super::freshness::EVENTS_PER_SECOND as f64).min(carried / 2.0) as u64;
    freshness(server, scale, broker, load, report).await
}

/// An outbox row as the relay reads it: id, type, aggregate, xid, creation time, payload.
type OutboxRow = (
    uuid::Uuid,
    String,
    Option<uuid::Uuid>,
    i64,
    chrono::DateTime<chrono::Utc>,
    String,
);

/// Up to [`SAMPLE`] events of the backlog as the queue carries them (the relay's query).
async fn sample(template: &BenchDb) -> anyhow::Result<Vec<Message>> {
    let pool = template.pool(1).await?;
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT event_id, event_type, aggregate_id, xid::text::int8, created_at, payload::text
         FROM crm_analytics.event_outbox ORDER BY random() LIMIT $1",
    )
    .bind(SAMPLE)
    .fetch_all(&pool)
    .await?;
    // The template must have no session left when it is copied.
    pool.close().await;
    let mut messages = Vec::with_capacity(rows.len());
    for (event_id, event_type, aggregate_id, xid, created_at, payload) in rows {
        let envelope = Envelope {
            event_id,
            event_type,
            aggregate_id,
            xid: xid as u64,
            created_at,
            payload: serde_json::value::RawValue::from_string(payload)?,
        };
        messages.push(Message::from(&envelope));
    }
    Ok(messages)
}

/// What a drain measured.
struct Drained {
    events_per_second: f64,
    /// Events applied: all of the backlog, unless the drain was stopped at the cap.
    applied: i64,
}

/// Drains a copy of the backlog through a fresh queue of `broker`, watched for at most
/// `cap`.
async fn drain(
    server: &str,
    template: &BenchDb,
    backlog: i64,
    broker: &Broker,
    cap: Duration,
) -> anyhow::Result<Drained> {
    let db = super::drain::copy(server, template, "queues").await?;
    let queue = broker.fresh()?;
    let drained = drain_on(&db, backlog, &queue, cap).await;
    queue.remove_or_warn().await;
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&db.name));
    db.drop_db().await?;
    drained
}

fn spawn_run(db: &BenchDb, queue: &FreshQueue, log: &std::path::Path) -> anyhow::Result<Child> {
    Ok(crate::crm_analytics()?
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .envs(queue.env.iter().cloned())
        .env("CRM_ANALYTICS_ARCHIVE", std::env::temp_dir().join(&db.name))
        .env("CRM_ANALYTICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .kill_on_drop(true)
        .spawn()?)
}

async fn drain_on(
    db: &BenchDb,
    backlog: i64,
    queue: &FreshQueue,
    cap: Duration,
) -> anyhow::Result<Drained> {
    let pool = db.pool(2).await?;
    let log = std::env::temp_dir().join(format!("{}-run.log", db.name));
    let mut child = spawn_run(db, queue, &log)?;
    let timed = time_drain(&pool, backlog, cap, &mut child, &log).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let (took, applied) = timed?;
    if applied < backlog {
        // Kept: it says why (the relay's and workers' warnings).
        println!(
            "  (stopped after {cap:?} with {applied} of {backlog} events applied through {}; \
             the log of `crm-analytics run`: {})",
            queue.spec,
            log.display()
        );
    } else {
        let found = crm_analytics::aggregates::verify::verify(&pool, &pool, "public", 3).await?;
        anyhow::ensure!(
            found.differences == 0,
            "after the drain through {}, {} aggregate rows differ from the CRM, first: {:?}",
            queue.spec,
            found.differences,
            found.shown
        );
        let _ = std::fs::remove_file(&log);
    }
    pool.close().await;
    Ok(Drained {
        events_per_second: applied as f64 / took.as_secs_f64().max(f64::EPSILON),
        applied,
    })
}

/// Waits until `backlog` events are applied, or `cap` has passed; returns how long they
/// took ([`DrainClock`]) and how many were applied.
async fn time_drain(
    pool: &PgPool,
    backlog: i64,
    cap: Duration,
    child: &mut Child,
    log: &std::path::Path,
) -> anyhow::Result<(Duration, i64)> {
    let started = Instant::now();
    let mut clock = DrainClock::start();
    loop {
        // Every applied event is counted once in event_counts, in the transaction that
        // applies it, whatever the queue.
        let processed: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(processed), 0)::int8 FROM analytics.event_counts",
        )
        .fetch_one(pool)
        .await?;
        if let Some(took) = clock.sample(processed, backlog) {
            return Ok((took, processed));
        }
        if started.elapsed() >= cap {
            return Ok((clock.so_far(), processed));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "crm-analytics run exited ({status}); its log: {}",
                log.display()
            );
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// Section 3's freshness measurement through a fresh queue of `broker`, under `load`
/// CRM events/s.
async fn freshness(
    server: &str,
    scale: Scale,
    broker: &Broker,
    load: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let queue = broker.fresh()?;
    let seconds = scale.queues_freshness_seconds;
    let measured = super::freshness::measure(server, seconds, load, Some(&queue)).await;
    queue.remove_or_warn().await;
    let measured = measured?;
    let (p50, p99) = (measured.p50(), measured.p99());
    let limit = match broker {
        Broker::Sqs { .. } => Duration::from_millis(250),
        _ => Duration::from_millis(50),
    };
    let asked = match load < super::freshness::EVENTS_PER_SECOND {
        true => format!("asked {load}: half of what this queue carried above"),
        false => format!("asked {load}"),
    };
    report.add(
        SECTION,
        format!(
            "{}: freshness, commit to visible through the API under {:.0} events/s of CRM \
             writes ({asked}), {} probes, p50 / p99",
            broker.name(),
            measured.rate,
            measured.samples.len()
        ),
        format!(
            "{:.1} ms / {:.1} ms",
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0
        ),
        Some((format!("p99 under {} ms", limit.as_millis()), p99 < limit)),
    );
    Ok(())
}

/// The SQS server's own ceiling on a fresh queue, watched for at most `cap` (returned,
/// events/s), and the drain's ratio to it.
async fn ceiling(
    broker: &Broker,
    messages: &[Message],
    backlog: i64,
    cap: Duration,
    drained: f64,
    report: &mut Report,
) -> anyhow::Result<f64> {
    let queue = broker.fresh()?;
    let measured = super::sqs_ceiling::measure(&queue, messages, backlog as usize, cap).await;
    queue.remove_or_warn().await;
    let measured = measured?;
    let ceiling = measured.events_per_second;
    let mean = messages.iter().map(|m| m.body.len()).sum::<usize>() / messages.len().max(1);
    report.add(
        SECTION,
        format!(
            "sqs: server ceiling, a plain AWS SDK loop on a fresh queue (SendMessageBatch of \
             10 while ReceiveMessage of 10, short polls, + DeleteMessageBatch, {} calls in \
             flight each, {backlog} messages sampled from the backlog, bodies of {mean} bytes \
             on average)",
            crm_analytics::queue::sqs::PARALLEL_CALLS
        ),
        match measured.deleted < backlog as usize {
            true => format!(
                "{ceiling:.0} events/s (stopped after {} s with {} deleted)",
                cap.as_secs(),
                measured.deleted
            ),
            false => format!("{ceiling:.0} events/s"),
        },
        None,
    );
    let ratio = drained / ceiling;
    report.add(
        SECTION,
        "sqs: drain / server ceiling",
        format!("{ratio:.2}x"),
        Some((
            format!("at least {CEILING_TARGET:.1}x"),
            ratio >= CEILING_TARGET,
        )),
    );
    Ok(ceiling)
}
