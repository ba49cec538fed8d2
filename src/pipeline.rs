//! Pipeline: wires the stages together in one process (relay, workers, maintenance and the
//! queue backend's own upkeep) from the settings, and stops them gracefully: a batch under way finishes or is released.

use clap::Parser;
use sqlx::PgPool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::archive::{Archive, Layout, S3Options};
use crate::config::{ArchiveArgs, DatabaseArgs, PipelineArgs};
use crate::maintenance::{self, MaintenanceConfig};
use crate::queue::Queue;
use crate::relay::{self, RelayConfig};
use crate::worker::{self, apply::Applier, WorkerConfig};

/// Which stages a process runs.
#[derive(Debug, Clone, Copy)]
pub struct Roles {
    pub relay: bool,
    pub workers: bool,
}

impl Roles {
    /// Relay and workers.
    pub const ALL: Roles = Roles {
        relay: true,
        workers: true,
    };
}

pub struct Pipeline {
    pub crm: PgPool,
    pub analytics: PgPool,
    pub queue: Arc<dyn Queue>,
    pub applier: Arc<Applier>,
    pub relay: RelayConfig,
    pub worker: WorkerConfig,
    pub maintenance: MaintenanceConfig,
    pub vacuum_interval: std::time::Duration,
}

#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    pipeline: PipelineArgs,
}

impl PipelineArgs {
    /// The defaults (and CRM_ANALYTICS_* variables), as if no flag were given.
    pub fn from_env() -> Self {
        DefaultsOnly::parse_from(["crm-analytics"]).pipeline
    }
}

/// Opens the archive named by the settings, or none when it is "none". No request is made
/// yet: [`Archive::check`] (at start of a worker process) does that.
pub fn open_archive(args: &PipelineArgs) -> anyhow::Result<Option<Archive>> {
    open_archive_at(&args.archive, args.archive_layout)
}

/// [`open_archive`] from the archive settings alone (`replay`, `verify --archive` read with
/// any layout: `layout` only decides how writes are grouped).
pub fn open_archive_at(args: &ArchiveArgs, layout: Layout) -> anyhow::Result<Option<Archive>> {
    let on_s3 = args.location.starts_with("s3://");
    if args.s3_endpoint.is_some() && !on_s3 {
        tracing::warn!(
            archive = %args.location,
            "CRM_ANALYTICS_S3_ENDPOINT is set but CRM_ANALYTICS_ARCHIVE is not an s3:// URL: \
             the endpoint is not used"
        );
    }
    if args.location.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let s3 = S3Options {
        endpoint: args.s3_endpoint.clone(),
        ..S3Options::default()
    };
    Ok(Some(Archive::open_with(&args.location, layout, &s3)?))
}

/// Most connections a pool opens by default; larger pools are set explicitly
/// (CRM_ANALYTICS_CRM_POOL_SIZE, CRM_ANALYTICS_ANALYTICS_POOL_SIZE). A default never falls
/// below its pool's minimum, though: the cap must not make a default refuse itself.
pub const DEFAULT_POOL_CAP: u32 = 40;

/// Connections a default analytics pool keeps beyond its minimum, for maintenance, status
/// reads and API queries that arrive while every stage holds its own.
const ANALYTICS_HEADROOM: u32 = 6;
/// The same for the CRM pool, which only maintenance and status share with the relays.
const CRM_HEADROOM: u32 = 2;

/// What one process runs, which decides how many connections each pool needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolNeeds {
    /// Relay loops (0: no relay in this process).
    pub relays: usize,
    /// Workers (0: no workers in this process).
    pub workers: usize,
    /// Whether this process also serves the API (its cache listener and its queries).
    pub serving: bool,
}

impl PoolNeeds {
    /// The needs of a process running `roles` with these settings.
    pub fn of(args: &PipelineArgs, roles: Roles, serving: bool) -> Self {
        Self {
            relays: if roles.relay { args.relays as usize } else { 0 },
            workers: if roles.workers { args.workers() } else { 0 },
            serving,
        }
    }

    /// The least analytics pool that cannot starve: a lease and an apply transaction per
    /// worker, a publish per relay loop, the queue listener and one to spare (maintenance,
    /// status); serving adds the response cache's listener and one for API queries.
    pub fn analytics_minimum(&self) -> u32 {
        let serving = if self.serving { 2 } else { 0 };
        saturate(self.workers * 2 + self.relays + 2 + serving)
    }

    /// The least CRM pool: a claim per relay loop, the outbox listener and the sleep flag;
    /// without relays one for maintenance and status; serving adds one for API reads.
    pub fn crm_minimum(&self) -> u32 {
        let base = if self.relays > 0 { self.relays + 2 } else { 1 };
        saturate(base + usize::from(self.serving))
    }

    /// The analytics pool's default: the minimum plus headroom, capped, never below the
    /// minimum.
    pub fn analytics_default(&self) -> u32 {
        with_headroom(self.analytics_minimum(), ANALYTICS_HEADROOM)
    }

    /// The CRM pool's default: the minimum plus headroom, capped, never below the minimum.
    pub fn crm_default(&self) -> u32 {
        with_headroom(self.crm_minimum(), CRM_HEADROOM)
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn with_headroom(minimum: u32, headroom: u32) -> u32 {
    minimum
        .saturating_add(headroom)
        .min(DEFAULT_POOL_CAP)
        .max(minimum)
}

/// The default analytics pool of a worker process (two per worker plus 8, capped, never
/// below the minimum).
pub fn analytics_pool_size(workers: usize) -> u32 {
    PoolNeeds {
        relays: 0,
        workers,
        serving: false,
    }
    .analytics_default()
}

/// The default CRM pool of a relay process (relays + 4, capped, never below the minimum).
pub fn crm_pool_size(relays: usize) -> u32 {
    PoolNeeds {
        relays,
        workers: 0,
        serving: false,
    }
    .crm_default()
}

impl PipelineArgs {
    /// The CRM pool's size: the setting, or the default for what the process runs.
    pub fn crm_connections(&self, needs: &PoolNeeds) -> u32 {
        self.crm_pool_size.unwrap_or_else(|| needs.crm_default())
    }

    /// The analytics pool's size: the setting, or the default for what the process runs.
    pub fn analytics_connections(&self, needs: &PoolNeeds) -> u32 {
        self.analytics_pool_size
            .unwrap_or_else(|| needs.analytics_default())
    }

    /// Refuses pools too small for what the process runs (its stages would wait on each
    /// other for connections until the pool's acquire timeout, again and again).
    pub fn check_pool_sizes(&self, needs: &PoolNeeds) -> anyhow::Result<()> {
        let (size, needed) = (self.crm_connections(needs), needs.crm_minimum());
        if size < needed {
            anyhow::bail!(
                "the CRM pool ({size} connections, CRM_ANALYTICS_CRM_POOL_SIZE) is too small for \
                 {} relay loops{}, which need at least {needed}: raise \
                 CRM_ANALYTICS_CRM_POOL_SIZE or lower CRM_ANALYTICS_RELAYS",
                needs.relays,
                if needs.serving { " and the API" } else { "" },
            );
        }
        let (size, needed) = (self.analytics_connections(needs), needs.analytics_minimum());
        if size < needed {
            anyhow::bail!(
                "the analytics pool ({size} connections, CRM_ANALYTICS_ANALYTICS_POOL_SIZE) is too \
                 small for {} workers and {} relay loops{}, which need at least {needed} (two per \
                 worker, one per relay loop, two more, and two for the API): raise \
                 CRM_ANALYTICS_ANALYTICS_POOL_SIZE or lower CRM_ANALYTICS_WORKERS or \
                 CRM_ANALYTICS_RELAYS",
                needs.workers,
                needs.relays,
                if needs.serving { " and the API" } else { "" },
            );
        }
        Ok(())
    }
}

/// Connects the CRM and analytics pools sized for the stages a process runs (and the API
/// when `serving`), after refusing sizes too small for them or too large for the servers.
pub async fn connect_pools(
    db: &DatabaseArgs,
    args: &PipelineArgs,
    roles: Roles,
    serving: bool,
) -> anyhow::Result<(PgPool, PgPool)> {
    let needs = PoolNeeds::of(args, roles, serving);
    args.check_pool_sizes(&needs)?;
    let (crm_size, analytics_size) = (
        args.crm_connections(&needs),
        args.analytics_connections(&needs),
    );
    // Before any pool opens: a server that cannot fit them fails now, not under load.
    crate::db::check_room(&[
        crate::db::PoolRequest {
            url: db.crm_url()?,
            url_setting: db.crm_setting(),
            size: crm_size,
            size_setting: "CRM_ANALYTICS_CRM_POOL_SIZE",
        },
        crate::db::PoolRequest {
            url: db.analytics_url()?,
            url_setting: db.analytics_setting(),
            size: analytics_size,
            size_setting: "CRM_ANALYTICS_ANALYTICS_POOL_SIZE",
        },
    ])
    .await?;
    let crm = crate::db::connect(db.crm_url()?, db.crm_setting(), crm_size).await?;
    let analytics =
        crate::db::connect(db.analytics_url()?, db.analytics_setting(), analytics_size).await?;
    Ok((crm, analytics))
}

impl Pipeline {
    /// Connects pools sized for every stage (relay and workers), without the API.
    pub async fn connect(db: &DatabaseArgs, args: &PipelineArgs) -> anyhow::Result<Self> {
        Self::connect_for(db, args, Roles::ALL, false).await
    }

    /// Connects pools sized for the stages this process runs (and the API when `serving`).
    pub async fn connect_for(
        db: &DatabaseArgs,
        args: &PipelineArgs,
        roles: Roles,
        serving: bool,
    ) -> anyhow::Result<Self> {
        let (crm, analytics) = connect_pools(db, args, roles, serving).await?;
        Self::open(crm, analytics, db, args, roles).await
    }

    /// Opens the queue the settings name over connected pools, and builds the pipeline for
    /// the stages `roles` names (workers check the archive is reachable).
    pub async fn open(
        crm: PgPool,
        analytics: PgPool,
        db: &DatabaseArgs,
        args: &PipelineArgs,
        roles: Roles,
    ) -> anyhow::Result<Self> {
        let options = crate::queue::QueueOptions {
            consumes: roles.workers,
            keep_processed: !args.outbox_retention.is_zero(),
            ..db.queue.options(args.queue_capacity)
        };
        let spec = crate::queue::resolve(db, &analytics).await?;
        if roles.relay && !roles.workers && spec == crate::queue::QueueSpec::Outbox {
            tracing::warn!(
                "the outbox is the queue (CRM_ANALYTICS_QUEUE, or its default with one \
                 database): the workers read it themselves, and this relay process has nothing \
                 to do; it waits idle until stopped"
            );
        }
        let queue = crate::queue::open(&spec, &analytics, &options).await?;
        let pipeline = Self::assemble(crm, analytics, queue, args)?;
        // Workers write the archive: a wrong endpoint or a missing bucket stops the process
        // now, not at the first batch (which would then retry forever).
        if roles.workers {
            if let Some(archive) = &pipeline.applier.archive {
                archive.check().await?;
            }
        }
        Ok(pipeline)
    }

    /// Builds a pipeline over given pools and queue (tests substitute their own queue).
    pub fn assemble(
        crm: PgPool,
        analytics: PgPool,
        queue: Arc<dyn Queue>,
        args: &PipelineArgs,
    ) -> anyhow::Result<Self> {
        let applier = Arc::new(Applier {
            pool: analytics.clone(),
            archive: open_archive(args)?,
        });
        Ok(Self {
            crm,
            analytics,
            queue,
            applier,
            relay: RelayConfig {
                loops: args.relays as usize,
                batch_size: args.batch_size as usize,
                poll_interval: args.poll_interval,
                outbox_retention: args.outbox_retention,
                timeout: args.relay_timeout,
                renew_ledger_after: args.dedup_retention / 2,
            },
            worker: WorkerConfig {
                workers: args.workers(),
                batch_size: args.batch_size as usize,
                poll_interval: args.poll_interval,
                max_attempts: args.max_attempts,
                retry_backoff: args.retry_backoff,
            },
            maintenance: MaintenanceConfig {
                outbox_retention: args.outbox_retention,
                dedup_retention: args.dedup_retention,
            },
            vacuum_interval: args.vacuum_interval,
        })
    }

    /// What the API server needs, sharing this pipeline's connections.
    pub fn api_state(&self) -> crate::api::AppState {
        crate::api::AppState {
            crm: self.crm.clone(),
            analytics: self.analytics.clone(),
            queue: self.queue.clone(),
        }
    }

    /// Runs relay and workers in a task of their own until `shutdown` is cancelled.
    pub fn spawn_all(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let pipeline = self.clone();
        let roles = Roles {
            relay: true,
            workers: true,
        };
        tokio::spawn(async move { pipeline.run(roles, shutdown).await })
    }

    /// Runs the chosen stages until `shutdown` is cancelled, then waits for them to stop.
    pub async fn run(&self, roles: Roles, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        // The outbox as the queue has no relay: its workers read the outbox themselves.
        if roles.relay && self.queue.needs_relay() {
            let (crm, analytics, queue, config, stop) = (
                self.crm.clone(),
                self.analytics.clone(),
                self.queue.clone(),
                self.relay.clone(),
                shutdown.clone(),
            );
            tasks.spawn(async move { relay::run(crm, analytics, queue, config, stop).await });
            let (crm, stop) = (self.crm.clone(), shutdown.clone());
            let interval = self.vacuum_interval;
            tasks.spawn(async move {
                maintenance::vacuum_loop(crm, &["crm_analytics.event_outbox"], interval, stop)
                    .await;
                Ok(())
            });
        }
        if roles.workers {
            let (queue, applier, config, stop) = (
                self.queue.clone(),
                self.applier.clone(),
                self.worker.clone(),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                worker::run(queue, applier, config, stop).await;
                Ok(())
            });
            let (crm, analytics, config, stop) = (
                self.crm.clone(),
                self.analytics.clone(),
                self.maintenance.clone(),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                maintenance::run(crm, analytics, config, stop).await;
                Ok(())
            });
            // The queue's own upkeep (the embedded queue vacuums its table), where it has one.
            if let Some(upkeep) = self
                .queue
                .maintenance(self.vacuum_interval, shutdown.clone())
            {
                tasks.spawn(async move {
                    upkeep.await;
                    Ok(())
                });
            }
        }
        if tasks.is_empty() {
            // A relay process on the outbox as the queue: idle, not exited (a supervisor
            // would start it again and again).
            shutdown.cancelled().await;
        }
        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(error) = outcome {
                // One stage failing to start stops the others: better down than half-up.
                shutdown.cancel();
                result = Err(error);
            }
        }
        result
    }
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        trigger.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stopping: finishing the batches under way");
        trigger.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> PipelineArgs {
        let mut argv = vec!["crm-analytics"];
        argv.extend_from_slice(flags);
        DefaultsOnly::parse_from(argv).pipeline
    }

    const ROLES: [Roles; 3] = [
        Roles::ALL,
        Roles {
            relay: true,
            workers: false,
        },
        Roles {
            relay: false,
            workers: true,
        },
    ];

    #[test]
    fn default_pools_pass_their_own_check() {
        for workers in [1, 8, 16, 19, 20, 40, 256] {
            for relays in [1, 2, 38, 39, 64] {
                let args = args(&[
                    "--workers",
                    &workers.to_string(),
                    "--relays",
                    &relays.to_string(),
                ]);
                for roles in ROLES {
                    for serving in [false, true] {
                        let needs = PoolNeeds::of(&args, roles, serving);
                        assert!(
                            args.check_pool_sizes(&needs).is_ok(),
                            "{workers} workers, {relays} relays, {roles:?}, serving {serving}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_analytics_minimum_counts_relays_and_the_api() {
        let args = args(&["--workers", "16", "--relays", "2"]);
        let run = PoolNeeds::of(&args, Roles::ALL, true);
        // 2 per worker, a publish per relay loop, listener and spare, cache listener and query.
        assert_eq!(run.analytics_minimum(), 32 + 2 + 2 + 2);
        let worker = PoolNeeds::of(&args, ROLES[2], false);
        assert_eq!(worker.analytics_minimum(), 34);
        assert_eq!(analytics_pool_size(16), 40);
        assert_eq!(crm_pool_size(2), 6);
        // A relay-only process is not sized for workers it does not run.
        let relay = PoolNeeds::of(&args, ROLES[1], false);
        assert_eq!(relay.analytics_minimum(), 4);
        let small = PipelineArgs {
            analytics_pool_size: Some(4),
            ..args.clone()
        };
        assert!(small.check_pool_sizes(&relay).is_ok());
        let error = small
            .check_pool_sizes(&run)
            .expect_err("too small for run")
            .to_string();
        assert!(error.contains("at least 38"), "{error}");
    }
}
