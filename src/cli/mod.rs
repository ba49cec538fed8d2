//! CLI: the `crm-analytics` command, its subcommands and their output.
//!
//! Owns argument parsing (through [`crate::config`]), the connections each subcommand opens
//! (`connections`), what each subcommand prints, and the exit codes. Every stage's and
//! every domain operation's logic (migrate, verify, status) lives in the library; this
//! module only wires it. Nothing in the library depends on this module.

mod connections;
mod demo;
mod status;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::aggregates::verify;
use crate::api::AppState;
use crate::config::{DatabaseArgs, MetricsArgs, PipelineArgs, ServerArgs};
use crate::pipeline::{shutdown_on_signals, Pipeline, Roles};
use crate::worker::failed;
use connections::Connections;

/// Live, exact sales analytics from a PostgreSQL CRM.
///
/// Triggers capture every change of accounts, leads, projects and activities into an
/// outbox in the same transaction; workers apply them exactly once to pre-aggregated
/// tables in schema `analytics`, reading the outbox itself or, with a separate analytics
/// database or a broker, a queue a relay fills. Start with `demo`.
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
    Verify {
        /// Compare with a recomputation from the archive instead of the CRM tables, to know
        /// that a replay would give these numbers back. URL: the archive's location
        /// (default CRM_ANALYTICS_ARCHIVE, as the pipeline writes it).
        #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
        archive: Option<String>,
        /// The S3-compatible server of an s3:// archive (see `run --help`).
        #[arg(long, env = "CRM_ANALYTICS_S3_ENDPOINT",
              value_parser = crate::config::SecretSafe(crate::archive::parse_endpoint))]
        s3_endpoint: Option<String>,
    },
    /// Rebuild the aggregates from the archive alone (after losing or damaging them).
    ///
    /// Reads every archived event (both layouts, local folder or S3), counts each event id
    /// once, and leaves out events parked in failed_events. Safe while the CRM writes and
    /// `run` runs: workers pause for the duration, and every event applied by the replay is
    /// recorded in the idempotency ledger, so that whatever the queue still delivers is
    /// counted exactly once.
    ///
    /// Without --from/--to every aggregate is replaced (and event_counts' processed
    /// counts). With them only the rows those dates own are recomputed, from every archived
    /// event, whenever it happened: a daily_account_metrics row by its date (the day a lead
    /// was created or converted, an activity occurred, a deal was won), a
    /// lead_funnel_metrics row by its cohort date (the day its leads were created, however
    /// late they changed status), a revenue_metrics row by its month when the month
    /// overlaps the range (the whole month is recomputed). Rows with a NULL date belong to
    /// no range.
    ///
    /// The archive holds the events applied since capture was attached: rows that existed
    /// before (loaded by `backfill`) are not in it; `rebuild` recomputes from the CRM
    /// tables instead. After a backfill or rebuild, a date range must start after that
    /// month. A full replay refuses an archive that lacks events the idempotency ledger
    /// records as applied (see --allow-incomplete).
    Replay(crate::config::ReplayArgs),
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
    /// Run only the relay (outbox to queue; nothing to do on the outbox as the queue).
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
    // Signals first for the commands that run until stopped: a SIGTERM during start-up
    // must stop them gracefully too. Other commands keep Ctrl-C's default.
    let shutdown = match cli.command {
        Command::Run { .. }
        | Command::Relay { .. }
        | Command::Worker { .. }
        | Command::Serve { .. } => shutdown_on_signals(),
        _ => CancellationToken::new(),
    };
    // Bound before anything connects: a taken address fails at once. The recorder is
    // installed before any stage records, so /metrics counts from the first event.
    let metrics_listener = match &cli.command {
        Command::Relay { metrics, .. } | Command::Worker { metrics, .. } => {
            match metrics.metrics_listen {
                Some(listen) => Some(crate::telemetry::server::bind(listen).await?),
                None => None,
            }
        }
        _ => None,
    };
    let connections = Connections::for_command(db, &cli.command).await?;
    let relay_only = matches!(cli.command, Command::Relay { .. });
    match cli.command {
        Command::Migrate {
            create_crm_schema,
            capture_columns,
        } => {
            crate::migrate::all_with(
                connections.crm()?,
                connections.analytics()?,
                &db.crm_schema,
                create_crm_schema,
                capture_columns,
            )
            .await?;
        }
        Command::Backfill | Command::Rebuild => {
            let (crm, analytics) = (connections.crm()?, connections.analytics()?);
            let report = crate::backfill::run(crm, analytics, &db.crm_schema, true).await?;
            println!(
                "aggregates recomputed from {} CRM rows (snapshot {})",
                report.crm_rows, report.snapshot
            );
        }
        Command::Verify { archive: None, .. } => {
            let (crm, analytics) = (connections.crm()?, connections.analytics()?);
            let found = verify::verify(crm, analytics, &db.crm_schema, verify::SHOWN).await?;
            return Ok(report_comparison(&found, "a full recomputation"));
        }
        Command::Verify {
            archive: Some(location),
            s3_endpoint,
        } => {
            let location = match location.as_str() {
                "" => std::env::var("CRM_ANALYTICS_ARCHIVE")
                    .unwrap_or_else(|_| crate::config::DEFAULT_ARCHIVE.to_string()),
                _ => location,
            };
            let args = crate::config::ArchiveArgs {
                location,
                s3_endpoint,
            };
            let archive = open_archive_to_read(&args).await?;
            let found = crate::replay::verify::verify_archive(
                connections.analytics()?,
                &archive,
                &args.location,
                verify::SHOWN,
            )
            .await?;
            return Ok(report_comparison(
                &found,
                "a recomputation from the archive",
            ));
        }
        Command::Replay(args) => {
            if let (Some(from), Some(to)) = (args.from, args.to) {
                anyhow::ensure!(
                    from <= to,
                    "--to {to} is before --from {from}: nothing would be recomputed; give \
                     --from the earlier day"
                );
            }
            let archive = open_archive_to_read(&args.archive).await?;
            let range =
                (args.from.is_some() || args.to.is_some()).then_some(crate::replay::DateRange {
                    from: args.from,
                    to: args.to,
                });
            let options = crate::replay::ReplayOptions {
                range,
                allow_incomplete: args.allow_incomplete,
                location: args.archive.location.clone(),
                outbox_is_queue: crate::queue::resolve(db, connections.analytics()?).await?
                    == crate::queue::QueueSpec::Outbox,
            };
            let report =
                crate::replay::replay(connections.analytics()?, &archive, &options).await?;
            let scope = match range {
                Some(range) => format!(
                    "the rows owned by {} to {} recomputed",
                    range
                        .from
                        .map_or("the start".to_string(), |d| d.to_string()),
                    range.to.map_or("today".to_string(), |d| d.to_string())
                ),
                None => "every aggregate replaced".to_string(),
            };
            println!(
                "{scope}: {} events replayed from {} archive objects in {:.1} s ({:.0} events/s); \
                 {} copies of retried batches, {} parked events and {} events still waiting \
                 in the outbox (the workers apply them) left out{}",
                report.events,
                report.objects,
                report.elapsed.as_secs_f64(),
                report.events_per_second(),
                report.duplicates,
                report.parked,
                report.waiting,
                match range {
                    Some(_) => format!(
                        "; {} events no worker had applied yet were counted whole (their \
                         delivery will be dropped as a duplicate)",
                        report.claimed
                    ),
                    None => String::new(),
                }
            );
        }
        Command::Run { pipeline, server } => {
            run_pipeline(
                db,
                &connections,
                &pipeline,
                Roles::ALL,
                Serving::Api(&server),
                shutdown,
            )
            .await?
        }
        Command::Relay { pipeline, .. } | Command::Worker { pipeline, .. } => {
            let roles = Roles {
                relay: relay_only,
                workers: !relay_only,
            };
            let serving = match metrics_listener {
                Some(listener) => Serving::Metrics(listener),
                None => Serving::Nothing,
            };
            run_pipeline(db, &connections, &pipeline, roles, serving, shutdown).await?
        }
        Command::Serve { server } => {
            let analytics = connections.analytics()?;
            let state = AppState {
                crm: connections.crm()?.clone(),
                analytics: analytics.clone(),
                queue: db
                    .queue
                    .open_unbounded(&crate::queue::resolve(db, analytics).await?, analytics)
                    .await?,
            };
            let options = crate::api::ServeOptions::from_args(&server);
            crate::api::serve(server.listen, state, options, shutdown).await?
        }
        Command::Status { json } => return status::run(db, &connections, json).await,
        Command::Failed { action } => {
            let analytics = connections.analytics()?;
            match action {
                FailedAction::List { limit, json } => {
                    let events = failed::list(analytics, limit).await?;
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
                    let spec = crate::queue::resolve(db, analytics).await?;
                    let queue = db.queue.open_unbounded(&spec, analytics).await?;
                    let selection = if all {
                        failed::Selection::All
                    } else {
                        failed::Selection::Ids(ids)
                    };
                    let report = failed::retry(analytics, &*queue, selection).await?;
                    println!("{} events put back on the queue", report.requeued);
                    for id in report.not_events {
                        println!("{id}: not an event (see raw_message); fix or delete it by hand");
                    }
                }
            }
        }
        Command::Demo(args) => demo::run(db, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what a verification found; exit code 1 on any difference.
fn report_comparison(found: &verify::Comparison, against: &str) -> ExitCode {
    if found.differences == 0 {
        println!("aggregates match {against}");
        return ExitCode::SUCCESS;
    }
    for line in &found.shown {
        println!("{line}");
    }
    if found.differences > found.shown.len() as u64 {
        println!("(only the first {} are shown)", found.shown.len());
    }
    println!(
        "{} differences from {against} (is the pipeline drained?)",
        found.differences
    );
    ExitCode::from(1)
}

/// The archive `replay` and `verify --archive` read, checked to be reachable.
async fn open_archive_to_read(
    args: &crate::config::ArchiveArgs,
) -> anyhow::Result<crate::archive::Archive> {
    // Opening a local archive creates its folder (for writers): a mistyped one must not
    // be created and then reported empty.
    if !args.location.contains("://") || args.location.starts_with("file://") {
        let folder = args.location.trim_start_matches("file://");
        if !args.location.eq_ignore_ascii_case("none") && !std::path::Path::new(folder).is_dir() {
            anyhow::bail!(
                "the archive folder {folder:?} does not exist; give the folder the pipeline \
                 archives to with --archive (or CRM_ANALYTICS_ARCHIVE); nothing was changed"
            );
        }
    }
    let Some(archive) = crate::pipeline::open_archive_at(args, crate::archive::Layout::Batch)?
    else {
        anyhow::bail!(
            "the archive setting is \"none\" (--archive or CRM_ANALYTICS_ARCHIVE): there is no \
             archive to read; give its location with --archive (a folder, file:///path or \
             s3://bucket/prefix)"
        );
    };
    archive.check().await?;
    Ok(archive)
}

/// What a pipeline process serves besides its stages.
enum Serving<'a> {
    /// The API server (with /metrics), as `run` does.
    Api(&'a ServerArgs),
    /// Only /metrics and /healthz on CRM_ANALYTICS_METRICS_LISTEN (`relay`, `worker`).
    Metrics(tokio::net::TcpListener),
    Nothing,
}

async fn run_pipeline(
    db: &DatabaseArgs,
    connections: &Connections,
    args: &PipelineArgs,
    roles: Roles,
    serving: Serving<'_>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (crm, analytics) = (connections.crm()?, connections.analytics()?);
    let pipeline = Pipeline::open(crm.clone(), analytics.clone(), db, args, roles).await?;
    tracing::info!(
        relay_loops = if roles.relay && pipeline.queue.needs_relay() {
            args.relays
        } else {
            0
        },
        workers = if roles.workers {
            pipeline.worker.workers
        } else {
            0
        },
        batch_size = args.batch_size,
        queue = pipeline.queue.backend(),
        "pipeline running"
    );
    let served: futures::future::BoxFuture<'_, anyhow::Result<()>> = match serving {
        Serving::Api(server) => Box::pin(crate::api::serve(
            server.listen,
            pipeline.api_state(),
            crate::api::ServeOptions::from_args(server),
            shutdown.clone(),
        )),
        Serving::Metrics(listener) => Box::pin(crate::telemetry::server::serve_on(
            listener,
            pipeline.api_state(),
            shutdown.clone(),
        )),
        Serving::Nothing => return pipeline.run(roles, shutdown).await,
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
