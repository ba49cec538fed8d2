//! CLI: the `crm-analytics` command, its subcommands and their output.
//!
//! Owns argument parsing (through [`crate::config`]), what each subcommand prints, and the
//! exit codes. Every stage's logic lives in its own module; this one only wires it.

mod demo;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;
use uuid::Uuid;

use crate::api::AppState;
use crate::config::{DatabaseArgs, MetricsArgs, PipelineArgs, ServerArgs};
use crate::pipeline::{shutdown_on_signals, Pipeline, Roles};
use crate::worker::failed;

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
        /// What row images carry into the outbox, queue, archive and failed_events: every
        /// column (all), or only the id and the columns the metrics read (metrics), which
        /// keeps personal data out of them. Unset: keep what is attached (all at first).
        #[arg(long, env = "CRM_ANALYTICS_CAPTURE_COLUMNS", value_enum)]
        capture_columns: Option<crate::capture::CaptureColumns>,
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
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Run only workers (queue to aggregates).
    Worker {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
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
        /// How many to show (at least 1; PostgreSQL refuses a negative LIMIT).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
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

/// The command line as clap sees it. Environment variables' values stay out of `--help`:
/// clap would print an unset one as `[env: NAME=]`, as if it were set to empty, and a set
/// one may be a secret.
pub fn command() -> clap::Command {
    fn hide_env_values(command: clap::Command) -> clap::Command {
        command
            .mut_args(|arg| arg.hide_env_values(true))
            .mut_subcommands(hide_env_values)
    }
    hide_env_values(Cli::command())
}

/// Parses the process's arguments (exits with clap's message on bad ones).
pub fn parse() -> Cli {
    let matches = command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.db.urls_from_flags.crm = given_as_flag(&matches, "database_url");
    cli.db.urls_from_flags.analytics = given_as_flag(&matches, "analytics_database_url");
    cli
}

/// Whether a global argument was written on the command line (at any subcommand level).
fn given_as_flag(matches: &ArgMatches, id: &str) -> bool {
    let mut level = Some(matches);
    while let Some(m) = level {
        if matches!(m.try_contains_id(id), Ok(true))
            && m.value_source(id) == Some(ValueSource::CommandLine)
        {
            return true;
        }
        level = m.subcommand().map(|(_, sub)| sub);
    }
    false
}

/// Entry point of the binary.
pub async fn main() -> ExitCode {
    crate::telemetry::init_logging();
    let cli = parse();
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
        Command::Migrate {
            create_crm_schema,
            capture_columns,
        } => {
            let crm = crate::db::connect(db.crm_url()?, db.crm_setting(), 2).await?;
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            migrate_all_with(
                &crm,
                &analytics,
                &db.crm_schema,
                create_crm_schema,
                capture_columns,
            )
            .await?;
        }
        Command::Backfill | Command::Rebuild => {
            let crm = crate::db::connect(db.crm_url()?, db.crm_setting(), 2).await?;
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            require_installed(db, Some(&crm), Some(&analytics)).await?;
            let report = crate::backfill::run(&crm, &analytics, &db.crm_schema, true).await?;
            println!(
                "aggregates recomputed from {} CRM rows (snapshot {})",
                report.crm_rows, report.snapshot
            );
        }
        Command::Verify => {
            let crm = crate::db::connect(db.crm_url()?, db.crm_setting(), 2).await?;
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            require_installed(db, Some(&crm), Some(&analytics)).await?;
            let found = verify(&crm, &analytics, &db.crm_schema, VERIFY_SHOWN).await?;
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
            run_pipeline(db, &pipeline, roles, Serving::Api(&server)).await?
        }
        Command::Relay { pipeline, metrics } => {
            let roles = Roles {
                relay: true,
                workers: false,
            };
            run_pipeline(db, &pipeline, roles, Serving::Metrics(&metrics)).await?
        }
        Command::Worker { pipeline, metrics } => {
            let roles = Roles {
                relay: false,
                workers: true,
            };
            run_pipeline(db, &pipeline, roles, Serving::Metrics(&metrics)).await?
        }
        Command::Serve { server } => {
            let shutdown = shutdown_on_signals();
            let state = api_state(db).await?;
            let options = crate::api::ServeOptions::from_args(&server);
            crate::api::serve(server.listen, state, options, shutdown).await?
        }
        Command::Status { json } => {
            // A malformed URL is a mistake in the command, not a database that is down.
            crate::db::parse_url(db.crm_url()?, db.crm_setting())?;
            crate::db::parse_url(db.analytics_url()?, db.analytics_setting())?;
            // Each database on its own and at once: one being down must not hide (or
            // delay) the other's numbers. Connecting is bounded by db::CONNECT_TIMEOUT.
            let (crm, analytics) = tokio::join!(
                crate::db::connect(db.crm_url()?, db.crm_setting(), 2),
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4)
            );
            // Reachable but not migrated: one sentence saying so, not two half-reports.
            tokio::time::timeout(
                crate::db::CONNECT_TIMEOUT,
                require_installed(db, crm.as_ref().ok(), analytics.as_ref().ok()),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the databases did not answer within {:?} when asked for their schema \
                     versions",
                    crate::db::CONNECT_TIMEOUT
                )
            })??;
            let analytics = match analytics {
                Ok(pool) => db
                    .queue
                    .open_unbounded(&pool)
                    .await
                    .map(|queue| (pool, queue))
                    .map_err(anyhow::Error::from),
                Err(error) => Err(error),
            };
            let unreachable =
                |error: &anyhow::Error| crate::status::Unread::Unreachable(format!("{error:#}"));
            // A side read alone (the other failed to connect) is bounded like both together.
            let (crm_read, analytics_read) = tokio::join!(
                async {
                    match &crm {
                        Ok(pool) => crate::status::read_crm_bounded(pool).await,
                        Err(error) => Err(unreachable(error)),
                    }
                },
                async {
                    match &analytics {
                        Ok((pool, queue)) => {
                            crate::status::read_analytics_bounded(pool, &**queue).await
                        }
                        Err(error) => Err(unreachable(error)),
                    }
                }
            );
            let report = crate::status::Report {
                crm: crm_read,
                analytics: analytics_read,
            };
            let settings = [
                ("crm", db.crm_setting(), report.crm.as_ref().err()),
                (
                    "analytics",
                    db.analytics_setting(),
                    report.analytics.as_ref().err(),
                ),
            ];
            if json {
                let mut value = serde_json::json!({
                    "outbox_lag": report.crm.as_ref().ok().map(|l| l.events),
                    "outbox_lag_estimated": report.crm.as_ref().ok().map(|l| l.estimated),
                    "queue_depth": report.analytics.as_ref().ok().map(|a| a.queue_depth),
                    "queue_depth_approximate": report.analytics.as_ref().ok().map(|a| a.queue_depth_approximate),
                    "failed_events": report.analytics.as_ref().ok().map(|a| a.failed_events),
                    "latency_ms": report.analytics.as_ref().ok().and_then(|a| a.latency_ms.clone()),
                });
                for (name, _, error) in &settings {
                    value["databases"][name] = serde_json::json!(match error {
                        None => "up",
                        Some(unread) => unread.state(),
                    });
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                match &report.crm {
                    Ok(lag) if lag.estimated => {
                        println!("outbox lag     about {} events (estimate)", lag.events)
                    }
                    Ok(lag) => println!("outbox lag     {} events", lag.events),
                    Err(_) => println!("outbox lag     unknown"),
                }
                match &report.analytics {
                    Ok(a) => {
                        let about = if a.queue_depth_approximate {
                            "about "
                        } else {
                            ""
                        };
                        println!("queue depth    {about}{} events", a.queue_depth);
                        println!("failed events  {}", a.failed_events);
                        match &a.latency_ms {
                            Some(l) => println!(
                                "latency        p50 {} ms, p99 {} ms (last 5 minutes)",
                                l.p50, l.p99
                            ),
                            None => println!("latency        no events in the last 5 minutes"),
                        }
                    }
                    Err(_) => println!(
                        "queue depth    unknown\nfailed events  unknown\nlatency        unknown"
                    ),
                }
            }
            let mut down = false;
            for (name, setting, error) in settings {
                if let Some(error) = error {
                    let state = error.state();
                    eprintln!("error: the {name} database ({setting}) is {state}: {error}");
                    down = true;
                }
            }
            if down {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Failed { action } => {
            let analytics =
                crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4).await?;
            require_installed(db, None, Some(&analytics)).await?;
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
                    let queue = db.queue.open_unbounded(&analytics).await?;
                    let selection = if all {
                        failed::Selection::All
                    } else {
                        failed::Selection::Ids(ids)
                    };
                    let report = failed::retry(&analytics, &*queue, selection).await?;
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
    migrate_all_with(crm, analytics, crm_schema, create_crm_schema, None).await
}

/// [`migrate_all`], choosing what row images carry (`None`: keep what is attached).
pub async fn migrate_all_with(
    crm: &sqlx::PgPool,
    analytics: &sqlx::PgPool,
    crm_schema: &str,
    create_crm_schema: bool,
    capture_columns: Option<crate::capture::CaptureColumns>,
) -> anyhow::Result<()> {
    if create_crm_schema {
        crate::capture::create_reference_schema(crm, crm_schema).await?;
    }
    // Before anything changes: the aggregates' NULL-tolerant keys need PostgreSQL 15.
    crate::migrate::require_server_version(analytics, 150_000, "the analytics schema").await?;
    let triggers = crate::capture::attach_with(crm, crm_schema, capture_columns).await?;
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
pub async fn verify(
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

/// Stops a command that needs our schemas with "run `crm-analytics migrate`" when they are
/// missing or older than this release, before it touches a table that is not there.
async fn require_installed(
    db: &DatabaseArgs,
    crm: Option<&sqlx::PgPool>,
    analytics: Option<&sqlx::PgPool>,
) -> anyhow::Result<()> {
    use crate::migrate::require;
    if let Some(crm) = crm {
        let capture = crate::capture::MIGRATIONS;
        require(crm, "capture", capture, "capture", db.crm_setting()).await?;
    }
    if let Some(analytics) = analytics {
        let schema = crate::aggregates::MIGRATIONS;
        let (what, setting) = ("the analytics schema", db.analytics_setting());
        require(analytics, "analytics", schema, what, setting).await?;
    }
    Ok(())
}

/// The API's connections for a process that runs no pipeline.
async fn api_state(db: &DatabaseArgs) -> anyhow::Result<AppState> {
    let crm = crate::db::connect(db.crm_url()?, db.crm_setting(), 4).await?;
    let analytics = crate::db::connect(db.analytics_url()?, db.analytics_setting(), 8).await?;
    require_installed(db, Some(&crm), Some(&analytics)).await?;
    let queue = db.queue.open_unbounded(&analytics).await?;
    Ok(AppState {
        crm,
        analytics,
        queue,
    })
}

/// What a pipeline process serves besides its stages.
enum Serving<'a> {
    /// The API server (with /metrics), as `run` does.
    Api(&'a ServerArgs),
    /// Only /metrics and /healthz, when CRM_ANALYTICS_METRICS_LISTEN is set (`relay`, `worker`).
    Metrics(&'a MetricsArgs),
}

async fn run_pipeline(
    db: &DatabaseArgs,
    args: &PipelineArgs,
    roles: Roles,
    serving: Serving<'_>,
) -> anyhow::Result<()> {
    // Signals first: a SIGTERM during start-up must stop the process gracefully too.
    let shutdown = shutdown_on_signals();
    // Bound before anything connects: a taken address fails at once. The recorder is
    // installed before any stage records, so /metrics counts from the first event.
    let metrics_listener = match serving {
        Serving::Metrics(MetricsArgs {
            metrics_listen: Some(listen),
        }) => Some(crate::telemetry::server::bind(*listen).await?),
        _ => None,
    };
    let server = match serving {
        Serving::Api(server) => Some(server),
        Serving::Metrics(_) => None,
    };
    let pipeline = Pipeline::connect_for(db, args, roles, server.is_some()).await?;
    require_installed(db, Some(&pipeline.crm), Some(&pipeline.analytics)).await?;
    tracing::info!(
        workers = pipeline.worker.workers,
        batch_size = args.batch_size,
        ?roles,
        "pipeline running"
    );
    let served: futures::future::BoxFuture<'_, anyhow::Result<()>> =
        match (server, metrics_listener) {
            (Some(server), _) => Box::pin(crate::api::serve(
                server.listen,
                pipeline.api_state(),
                crate::api::ServeOptions::from_args(server),
                shutdown.clone(),
            )),
            (None, Some(listener)) => Box::pin(crate::telemetry::server::serve_on(
                listener,
                pipeline.api_state(),
                shutdown.clone(),
            )),
            (None, None) => return pipeline.run(roles, shutdown).await,
        };
    let (ran, served) = tokio::join!(pipeline.run(roles, shutdown.clone()), async {
        // The server failing (say, its address is taken) stops the whole process.
        let result = served.await;
        shutdown.cancel();
        result
    });
    ran.and(served)
}

#[cfg(test)]
mod limit_tests {
    use super::Cli;
    use clap::Parser;

    #[test]
    fn failed_list_refuses_a_limit_below_one_before_any_query() {
        for bad in ["-1", "0"] {
            let flag = format!("--limit={bad}");
            let parsed = Cli::try_parse_from(["crm-analytics", "failed", "list", &flag]);
            assert!(parsed.is_err(), "--limit={bad}");
        }
        assert!(Cli::try_parse_from(["crm-analytics", "failed", "list", "--limit=5"]).is_ok());
    }
}
