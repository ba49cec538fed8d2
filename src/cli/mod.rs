//! CLI: the `crm-analytics` command, its subcommands and their output.
//!
//! Owns argument parsing (through [`crate::config`]), what each subcommand prints, and the
//! exit codes. Every stage's logic lives in its own module; this one only wires it.

mod demo;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use uuid::Uuid;

use crate::api::AppState;
use crate::config::{DatabaseArgs, PipelineArgs, ServerArgs};
use crate::pipeline::{shutdown_on_signals, Pipeline, Roles};
use crate::queue::{postgres::PostgresQueue, Queue};
use crate::worker::failed;
use std::sync::Arc;

/// Live, exact sales analytics from a PostgreSQL CRM.
///
/// Triggers capture every change of accounts, leads, projects and activities into an
/// outbox in the same transaction; a relay moves events to a queue; workers apply them
/// exactly once to pre-aggregated tables in schema `analytics`. Start with `demo`.
#[derive(Debug, Parser)]
#[command(name = "crm-analytics", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install or upgrade our schemas and attach the capture triggers (idempotent).
    Migrate {
        /// Also create the reference CRM tables if they do not exist (demos and tests).
        #[arg(long)]
        create_crm_schema: bool,
    },
    /// Load rows that existed before capture was attached into the aggregates (exact while
    /// the CRM keeps writing; safe to run again).
    Backfill,
    /// Recompute every aggregate from the CRM tables (when they are suspected corrupt).
    Rebuild,
    /// Compare the aggregates with a full recomputation; exit code 1 if they differ.
    Verify,
    /// Run relay, workers and the API server in one process until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run only the API server: REST API, dashboard, /metrics.
    Serve {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run only the relay (outbox to queue).
    Relay {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Run only workers (queue to aggregates).
    Worker {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Show outbox lag, queue depth, failed events and latency.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and replay events parked after their last attempt.
    Failed {
        #[command(subcommand)]
        action: FailedAction,
    },
    /// Run a live demo: a CRM workload with the pipeline attached (needs only PostgreSQL).
    Demo(demo::DemoArgs),
    /// Run the benchmark suite and write BENCHMARKS.md (needs only PostgreSQL).
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
pub enum FailedAction {
    /// List parked events, oldest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put parked events back on the queue (after fixing the cause).
    Retry {
        /// Event ids to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<Uuid>,
        /// Replay every parked event.
        #[arg(long)]
        all: bool,
    },
}

/// Entry point of the binary.
pub async fn main() -> ExitCode {
    crate::telemetry::init_logging();
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let db = &cli.db;
    match cli.command {
        Command::Migrate { create_crm_schema } => {
            let crm = crate::db::connect(db.crm_url()?, "DATABASE_URL", 2).await?;
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            migrate_all(&crm, &analytics, &db.crm_schema, create_crm_schema).await?;
        }
        Command::Backfill | Command::Rebuild => {
            let crm = crate::db::connect(db.crm_url()?, "DATABASE_URL", 2).await?;
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            let report = crate::backfill::run(&crm, &analytics, &db.crm_schema, true).await?;
            println!(
                "aggregates recomputed from {} CRM rows (snapshot {})",
                report.crm_rows, report.snapshot
            );
        }
        Command::Verify => {
            let crm = crate::db::connect(db.crm_url()?, "DATABASE_URL", 2).await?;
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            let found = verify_report(&crm, &analytics, &db.crm_schema, VERIFY_SHOWN).await?;
            if found.differences == 0 {
                println!("aggregates match a full recomputation");
            } else {
                for line in &found.shown {
                    println!("{line}");
                }
                if found.differences > found.shown.len() as u64 {
                    println!("(only the first {} are shown)", found.shown.len());
                }
                println!(
                    "{} differences (is the pipeline drained?)",
                    found.differences
                );
                return Ok(ExitCode::from(1));
            }
        }
        Command::Run { pipeline, server } => {
            let roles = Roles {
                relay: true,
                workers: true,
            };
            run_pipeline(db, &pipeline, roles, Some(&server)).await?
        }
        Command::Relay { pipeline } => {
            let roles = Roles {
                relay: true,
                workers: false,
            };
            run_pipeline(db, &pipeline, roles, None).await?
        }
        Command::Worker { pipeline } => {
            let roles = Roles {
                relay: false,
                workers: true,
            };
            run_pipeline(db, &pipeline, roles, None).await?
        }
        Command::Serve { server } => {
            let shutdown = shutdown_on_signals();
            let state = api_state(db).await?;
            let options = crate::api::ServeOptions::from_args(&server);
            crate::api::serve(server.listen, state, options, shutdown).await?
        }
        Command::Status { json } => {
            let crm = crate::db::connect(db.crm_url()?, "DATABASE_URL", 2).await?;
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            let queue = PostgresQueue::connect(analytics.clone(), u64::MAX).await?;
            let status = crate::status::read(&crm, &analytics, &queue).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("outbox lag     {} events", status.outbox_lag);
                println!("queue depth    {} events", status.queue_depth);
                println!("failed events  {}", status.failed_events);
                match status.latency_ms {
                    Some(l) => println!(
                        "latency        p50 {} ms, p99 {} ms (last 5 minutes)",
                        l.p50, l.p99
                    ),
                    None => println!("latency        no events in the last 5 minutes"),
                }
            }
        }
        Command::Failed { action } => {
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            match action {
                FailedAction::List { limit, json } => {
                    let events = failed::list(&analytics, limit).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&events)?);
                    } else if events.is_empty() {
                        println!("no failed events");
                    } else {
                        for e in events {
                            println!(
                                "{}  {:<18} attempts {}  failed {}  {}",
                                e.event_id,
                                e.event_type,
                                e.retry_count,
                                e.failed_at.format("%Y-%m-%d %H:%M:%S"),
                                e.error_message
                            );
                        }
                    }
                }
                FailedAction::Retry { ids, all } => {
                    let queue = PostgresQueue::connect(analytics.clone(), u64::MAX).await?;
                    let selection = if all {
                        failed::Selection::All
                    } else {
                        failed::Selection::Ids(ids)
                    };
                    let report = failed::retry(&analytics, &queue as &dyn Queue, selection).await?;
                    println!("{} events put back on the queue", report.requeued);
                    for id in report.not_events {
                        println!("{id}: not an event (see raw_message); fix or delete it by hand");
                    }
                }
            }
        }
        Command::Demo(args) => demo::run(db, args).await?,
        Command::Bench(args) => crate::bench::run(db.database_url.as_deref(), args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `migrate`: the CRM side (optionally creating the reference schema), then analytics.
pub async fn migrate_all(
    crm: &sqlx::PgPool,
    analytics: &sqlx::PgPool,
    crm_schema: &str,
    create_crm_schema: bool,
) -> anyhow::Result<()> {
    if create_crm_schema {
        crate::capture::create_reference_schema(crm, crm_schema).await?;
    }
    let triggers = crate::capture::attach(crm, crm_schema).await?;
    let applied =
        crate::migrate::apply(analytics, "analytics", crate::aggregates::MIGRATIONS).await?;
    tracing::info!(triggers_created = triggers, analytics_migrations = ?applied, "migrated");
    Ok(())
}

/// Differences `verify` describes line by line; beyond that they are only counted, so a
/// badly diverged database neither floods the terminal nor grows memory.
pub const VERIFY_SHOWN: usize = 1000;

/// Compares the aggregates with a recomputation, streaming both in key order (bounded
/// memory at any size): the number of differing rows and the first `shown` of them.
pub async fn verify_report(
    crm: &sqlx::PgPool,
    analytics: &sqlx::PgPool,
    crm_schema: &str,
    shown: usize,
) -> anyhow::Result<crate::aggregates::recompute::Comparison> {
    use anyhow::Context;
    let mut crm = crm
        .acquire()
        .await
        .context("connecting to the CRM database")?;
    let mut analytics = analytics
        .acquire()
        .await
        .context("connecting to the analytics database")?;
    let found =
        crate::aggregates::recompute::compare(&mut crm, &mut analytics, crm_schema, shown).await?;
    Ok(found)
}

/// Differences between the aggregates and a recomputation, one line each (the first
/// [`VERIFY_SHOWN`]; a last line counts the rest).
pub async fn verify(
    crm: &sqlx::PgPool,
    analytics: &sqlx::PgPool,
    crm_schema: &str,
) -> anyhow::Result<Vec<String>> {
    let found = verify_report(crm, analytics, crm_schema, VERIFY_SHOWN).await?;
    let mut lines = found.shown;
    let hidden = found.differences - lines.len() as u64;
    if hidden > 0 {
        lines.push(format!("... and {hidden} more differences"));
    }
    Ok(lines)
}

/// The API's connections for a process that runs no pipeline.
async fn api_state(db: &DatabaseArgs) -> anyhow::Result<AppState> {
    let crm = crate::db::connect(db.crm_url()?, "DATABASE_URL", 4).await?;
    let analytics = crate::db::connect(db.analytics_url()?, db.analytics_setting(), 8).await?;
    let queue = PostgresQueue::connect(analytics.clone(), u64::MAX).await?;
    Ok(AppState {
        crm,
        analytics,
        queue: Arc::new(queue),
    })
}

async fn run_pipeline(
    db: &DatabaseArgs,
    args: &PipelineArgs,
    roles: Roles,
    server: Option<&ServerArgs>,
) -> anyhow::Result<()> {
    // Signals first: a SIGTERM during start-up must stop the process gracefully too.
    let shutdown = shutdown_on_signals();
    let pipeline = Pipeline::connect(db, args).await?;
    tracing::info!(
        workers = pipeline.worker.workers,
        batch_size = args.batch_size,
        ?roles,
        "pipeline running"
    );
    let Some(server) = server else {
        return pipeline.run(roles, shutdown).await;
    };
    let api = crate::api::serve(
        server.listen,
        pipeline.api_state(),
        crate::api::ServeOptions::from_args(server),
        shutdown.clone(),
    );
    let (ran, served) = tokio::join!(pipeline.run(roles, shutdown.clone()), async {
        // The server failing (say, its address is taken) stops the whole process.
        let result = api.await;
        shutdown.cancel();
        result
    });
    ran.and(served)
}
