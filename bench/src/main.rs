//! `crm-analytics-bench`: the benchmark suite of crm-analytics. Every comparison runs side
//! by side in the same run on the same machine and is reported as a ratio; `--quick` is the
//! small version CI runs so the harness cannot rot (it asserts nothing about times).
//!
//! Each measurement gets fresh databases of its own on the server of DATABASE_URL (or the
//! local one), and drops them afterwards. The pipelines measured in processes of their own
//! are the `crm-analytics` binary's (see `--crm-analytics-bin`); the suite itself uses the
//! library's public API only.

mod api_load;
mod baselines;
mod brokers;
mod capture_cost;
mod cpu;
mod drain;
mod freshness;
mod materialized_views;
mod memory;
mod plot;
mod queues;
mod replay;
mod report;
mod scale_out;
mod sqs_ceiling;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser};
use sqlx::{Connection, PgConnection, PgPool};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;

pub use report::Report;

/// Runs the benchmark suite of crm-analytics and writes BENCHMARKS.md (needs only
/// PostgreSQL, and the `crm-analytics` binary: build both with `cargo build --release`).
#[derive(Debug, Clone, Parser)]
#[command(name = "crm-analytics-bench", version, about, long_about)]
pub struct BenchArgs {
    // The database settings of `crm-analytics`, under the same names: the suite creates its
    // databases on the server of DATABASE_URL; the processes it starts get their own settings.
    #[command(flatten)]
    pub db: crm_analytics::config::DatabaseArgs,
    /// The `crm-analytics` binary whose `run`, `relay`, `worker`, `replay` and `rebuild`
    /// processes are measured. Default: the one beside this executable (the same target
    /// folder after `cargo build --release`).
    #[arg(long, env = "CRM_ANALYTICS_BIN", value_name = "PATH")]
    pub crm_analytics_bin: Option<PathBuf>,
    /// Small sizes and short runs (a couple of minutes): what CI runs.
    #[arg(long)]
    pub quick: bool,
    /// Where the report goes (Markdown; plots go to a `benchmarks` folder beside it).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub output: PathBuf,
    /// Run only these measurements (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Measure>,
}

/// The measurements of the suite, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Measure {
    Capture,
    Drain,
    Freshness,
    MaterializedViews,
    Api,
    Memory,
    ScaleOut,
    Queues,
    Replay,
}

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub backlog: i64,
    pub bulk_rows: i64,
    pub oltp_seconds: u64,
    pub freshness_seconds: u64,
    /// CRM sizes (rows of the four tables) of the materialized-view comparison.
    pub mv_sizes: &'static [i64],
    /// CRM transactions applied at each of those sizes.
    pub mv_changes: u64,
    /// Length of the steady run that watches memory.
    pub steady_seconds: u64,
    /// Workload events drained by 1, 2 and 4 worker processes.
    pub scale_out_backlog: i64,
    /// Events drained through the PostgreSQL and NATS queues.
    pub queues_backlog: i64,
    /// Events drained through SQS, and sent through the SQS server alone: smaller, as a
    /// local SQS-compatible server carries far fewer events per second than the others.
    pub queues_sqs_backlog: i64,
    /// Longest a drain through a queue backend is watched: one that has not finished by
    /// then is reported with the events applied so far (a slow local SQS server).
    pub queues_drain_cap_seconds: u64,
    /// Length of the freshness run through each queue backend.
    pub queues_freshness_seconds: u64,
    /// Workload events drained by 1, 2 and 4 worker processes through NATS, and through SQS.
    pub queues_scale_out_backlog: i64,
    pub queues_sqs_scale_out_backlog: i64,
}

impl Scale {
    fn of(quick: bool) -> Self {
        if quick {
            Self {
                backlog: 40_000,
                bulk_rows: 20_000,
                oltp_seconds: 4,
                freshness_seconds: 8,
                mv_sizes: &[10_000, 40_000],
                mv_changes: 400,
                steady_seconds: 20,
                scale_out_backlog: 10_000,
                queues_backlog: 5_000,
                queues_sqs_backlog: 200,
                queues_drain_cap_seconds: 30,
                queues_freshness_seconds: 3,
                queues_scale_out_backlog: 5_000,
                queues_sqs_scale_out_backlog: 100,
            }
        } else {
            Self {
                backlog: 1_000_000,
                bulk_rows: 100_000,
                oltp_seconds: 30,
                freshness_seconds: 60,
                mv_sizes: &[100_000, 1_000_000, 10_000_000],
                mv_changes: 4_000,
                steady_seconds: 600,
                scale_out_backlog: 200_000,
                queues_backlog: 200_000,
                queues_sqs_backlog: 1_000,
                queues_drain_cap_seconds: 180,
                queues_freshness_seconds: 30,
                queues_scale_out_backlog: 50_000,
                queues_sqs_scale_out_backlog: 1_000,
            }
        }
    }
}

/// A database of the bench's own, dropped by [`BenchDb::drop_db`].
pub struct BenchDb {
    pub name: String,
    pub url: String,
    server: String,
}

impl BenchDb {
    pub async fn create(server: &str, label: &str) -> anyhow::Result<Self> {
        let name = format!(
            "crm_analytics_bench_{label}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut admin = PgConnection::connect(&format!("{server}/postgres")).await?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        Ok(Self {
            url: format!("{server}/{name}"),
            name,
            server: server.to_string(),
        })
    }

    pub async fn pool(&self, max: u32) -> anyhow::Result<PgPool> {
        crm_analytics::db::connect(&self.url, "DATABASE_URL", max).await
    }

    pub async fn drop_db(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&format!("{}/postgres", self.server)).await?;
        sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// The pipeline of `crm-analytics run` (relay, workers, maintenance), in this process, on
/// a bench database; its archive goes to a temporary folder removed by [`InProcess::stop`].
pub struct InProcess {
    pub pipeline: std::sync::Arc<crm_analytics::pipeline::Pipeline>,
    /// Cancelled by `stop`; servers started beside the pipeline may share it.
    pub stop: tokio_util::sync::CancellationToken,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
    archive: PathBuf,
}

impl InProcess {
    /// Through the default queue (the outbox itself: one database, no setting).
    pub async fn start(db: &BenchDb) -> anyhow::Result<Self> {
        Self::start_on(db, None).await
    }

    /// Through `queue` when given (a broker's fresh stream or queue, opened with its own
    /// options and credentials), else the default queue.
    pub async fn start_on(
        db: &BenchDb,
        queue: Option<&brokers::FreshQueue>,
    ) -> anyhow::Result<Self> {
        let dbargs = crm_analytics::config::DatabaseArgs {
            database_url: Some(db.url.clone()),
            analytics_database_url: None,
            urls_from_flags: Default::default(),
            crm_schema: "public".into(),
            queue: Default::default(),
        };
        let mut args = crm_analytics::config::PipelineArgs::from_env();
        let archive = std::env::temp_dir().join(&db.name);
        args.archive.location = archive.to_string_lossy().into_owned();
        let pipeline = match queue {
            None => crm_analytics::pipeline::Pipeline::connect(&dbargs, &args).await?,
            Some(queue) => {
                let roles = crm_analytics::pipeline::Roles::ALL;
                let (crm, analytics) =
                    crm_analytics::pipeline::connect_pools(&dbargs, &args, roles, false).await?;
                let opened = queue.open(&analytics).await?;
                crm_analytics::pipeline::Pipeline::assemble(crm, analytics, opened, &args)?
            }
        };
        let pipeline = std::sync::Arc::new(pipeline);
        let stop = tokio_util::sync::CancellationToken::new();
        let running = pipeline.spawn_all(stop.clone());
        Ok(Self {
            pipeline,
            stop,
            running,
            archive,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.running.await??;
        self.pipeline.crm.close().await;
        self.pipeline.analytics.close().await;
        let _ = std::fs::remove_dir_all(&self.archive);
        Ok(())
    }
}

/// Times a drain from samples of the events applied so far: from the last sample that found
/// none applied to the first that found them all. Starting the processes (connecting,
/// checking the schema) is not counted, the first batch is, and a drain always spans at
/// least one sample interval, however few batches it takes.
pub struct DrainClock {
    idle_until: std::time::Instant,
}

impl DrainClock {
    /// Started when the draining processes are.
    pub fn start() -> Self {
        Self {
            idle_until: std::time::Instant::now(),
        }
    }

    /// Takes a sample of `processed` events applied; once all `backlog` are, the time the
    /// drain took.
    pub fn sample(&mut self, processed: i64, backlog: i64) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        if processed <= 0 {
            self.idle_until = now;
            return None;
        }
        (processed >= backlog).then(|| now - self.idle_until)
    }

    /// The time since the last sample that found nothing applied (for a drain stopped
    /// before it finished).
    pub fn so_far(&self) -> std::time::Duration {
        self.idle_until.elapsed()
    }
}

/// A size from /proc/<pid>/status (Linux), e.g. VmRSS (now) or VmHWM (peak), in MB.
fn proc_status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The `q` quantile of sorted durations (nearest rank).
fn percentile(sorted: &[std::time::Duration], q: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The server part of DATABASE_URL (without the database), or the local server.
fn server_of(database_url: Option<&str>) -> String {
    match database_url.and_then(|u| url::Url::parse(u).ok()) {
        Some(mut url) => {
            url.set_path("");
            url.to_string().trim_end_matches('/').to_string()
        }
        None => "postgres://postgres@127.0.0.1:5432".to_string(),
    }
}

/// What the report says about the PostgreSQL server: its version as it reports it, and
/// whether it runs on this machine (a loopback address or a Unix socket: then it shares
/// the cores the suite measures).
async fn describe_server(server: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(&format!("{server}/postgres")).await?;
    let version: String = sqlx::query_scalar("SELECT split_part(version(), ' on ', 1)")
        .fetch_one(&mut conn)
        .await?;
    let local: bool = sqlx::query_scalar(
        "SELECT inet_server_addr() IS NULL OR host(inet_server_addr())::inet <<= '127.0.0.0/8'::inet
                OR inet_server_addr() = '::1'::inet",
    )
    .fetch_one(&mut conn)
    .await?;
    Ok(if local {
        format!("{version} on this machine, sharing its cores")
    } else {
        format!("{version} on another host")
    })
}

/// The `crm-analytics` binary the suite runs, found once at the start (see [`find_binary`]).
static CRM_ANALYTICS_BIN: OnceLock<PathBuf> = OnceLock::new();

/// A `crm-analytics` command of the binary the suite measures.
pub fn crm_analytics() -> anyhow::Result<tokio::process::Command> {
    let path = CRM_ANALYTICS_BIN
        .get()
        .context("the crm-analytics binary has not been located yet")?;
    Ok(tokio::process::Command::new(path))
}

/// The `crm-analytics` binary: the one `--crm-analytics-bin` / CRM_ANALYTICS_BIN names, else
/// the one beside this executable; checked by running its `--version`, so that a missing
/// binary fails here, naming the setting and the fix, rather than in a measurement.
async fn find_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let (path, how) = match given {
        Some(path) => (path, "as --crm-analytics-bin / CRM_ANALYTICS_BIN names it"),
        None => {
            let own = std::env::current_exe().context("cannot locate this executable")?;
            let dir = own
                .parent()
                .context("this executable's path has no parent folder")?;
            (
                dir.join(format!("crm-analytics{}", std::env::consts::EXE_SUFFIX)),
                "beside crm-analytics-bench; --crm-analytics-bin or CRM_ANALYTICS_BIN names another",
            )
        }
    };
    anyhow::ensure!(
        path.is_file(),
        "the crm-analytics binary is not at {} ({how}): build it first with \
         `cargo build --release`, which builds both binaries into target/release",
        path.display()
    );
    let output = tokio::process::Command::new(&path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| {
            format!(
                "cannot run the crm-analytics binary at {} ({how})",
                path.display()
            )
        })?;
    let version = String::from_utf8_lossy(&output.stdout);
    let version = version.lines().next().unwrap_or_default();
    anyhow::ensure!(
        output.status.success() && version.starts_with("crm-analytics "),
        "{} ({how}) is not a crm-analytics binary: `--version` says {version:?}; name one, \
         or build it with `cargo build --release`",
        path.display()
    );
    Ok(path)
}

#[tokio::main]
async fn main() -> ExitCode {
    crm_analytics::telemetry::init_logging();
    // Environment variables' values stay out of `--help`, as in `crm-analytics`: a set one
    // may be a secret.
    let matches = BenchArgs::command()
        .mut_args(|arg| arg.hide_env_values(true))
        .get_matches();
    let args = BenchArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let binary = find_binary(args.crm_analytics_bin.clone()).await?;
    let binary = CRM_ANALYTICS_BIN.get_or_init(|| binary);
    let server = server_of(args.db.database_url.as_deref());
    let scale = Scale::of(args.quick);
    let mut report = Report::new(args.quick, scale, describe_server(&server).await?);
    println!(
        "benchmarks ({} mode) on {}",
        if args.quick { "quick" } else { "full" },
        crm_analytics::db::redact(&server)
    );
    println!("crm-analytics binary: {}", binary.display());
    let wanted = |m: Measure| args.only.is_empty() || args.only.contains(&m);
    if wanted(Measure::Capture) {
        capture_cost::run(&server, scale, &mut report).await?;
    }
    if wanted(Measure::Drain) {
        drain::run(&server, scale, &mut report).await?;
    }
    if wanted(Measure::Freshness) {
        freshness::run(&server, scale, &mut report).await?;
    }
    if wanted(Measure::MaterializedViews) {
        materialized_views::run(&server, scale, &mut report).await?;
    }
    if wanted(Measure::Api) {
        api_load::run(&server, scale, &mut report).await?;
    }
    if wanted(Measure::Memory) {
        memory::run(&server, scale, &mut report).await?;
    }
    if wanted(Measure::ScaleOut) {
        scale_out::run(&server, scale, &mut report).await?;
    }
    if wanted(Measure::Queues) {
        queues::run(&server, scale, &mut report).await?;
    }
    if wanted(Measure::Replay) {
        replay::run(&server, scale, &mut report).await?;
    }
    report.print();
    report.write(&args.output)?;
    println!("written to {}", args.output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_binary_names_the_setting_and_the_fix() {
        let missing = std::env::temp_dir().join("crm-analytics-bench-test-no-such-binary");
        let error = find_binary(Some(missing))
            .await
            .expect_err("a path with no binary is refused");
        let message = format!("{error:#}");
        assert!(message.contains("CRM_ANALYTICS_BIN"), "{message}");
        assert!(message.contains("cargo build --release"), "{message}");
    }
}
