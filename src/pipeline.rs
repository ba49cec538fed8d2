//! Pipeline: wires the stages together in one process (relay, workers, maintenance) from
//! the settings, and stops them gracefully: a batch under way finishes or is released.

use clap::Parser;
use sqlx::PgPool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::archive::Archive;
use crate::config::{DatabaseArgs, PipelineArgs};
use crate::maintenance::{self, MaintenanceConfig};
use crate::queue::{postgres::PostgresQueue, Queue};
use crate::relay::{self, RelayConfig};
use crate::worker::{self, apply::Applier, WorkerConfig};

/// Which stages a process runs.
#[derive(Debug, Clone, Copy)]
pub struct Roles {
    pub relay: bool,
    pub workers: bool,
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

/// Opens the archive named by the settings, or none when it is "none".
pub fn open_archive(args: &PipelineArgs) -> anyhow::Result<Option<Archive>> {
    if args.archive.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Ok(Some(Archive::open(&args.archive, args.archive_layout)?))
}

/// Most connections a pool opens by default; larger pools are set explicitly
/// (CRM_ANALYTICS_CRM_POOL_SIZE, CRM_ANALYTICS_ANALYTICS_POOL_SIZE).
pub const DEFAULT_POOL_CAP: u32 = 40;

/// Connections the analytics pool needs so that no stage ever waits for another's: per
/// worker a queue lease and an apply transaction; one each for the queue listener, the
/// relay's publishing, maintenance and status, and a few for the API server. Capped.
pub fn analytics_pool_size(workers: usize) -> u32 {
    u32::try_from(workers * 2 + 8)
        .unwrap_or(u32::MAX)
        .min(DEFAULT_POOL_CAP)
}

/// The least analytics pool that cannot starve: a lease and an apply transaction per
/// worker, plus the queue listener and one to spare.
pub fn analytics_pool_minimum(workers: usize) -> u32 {
    u32::try_from(workers * 2 + 2).unwrap_or(u32::MAX)
}

/// Connections of the CRM pool: one claim per relay loop, plus the outbox listener,
/// the sleep flag, maintenance and status. Capped.
pub fn crm_pool_size(relays: usize) -> u32 {
    u32::try_from(relays + 4)
        .unwrap_or(u32::MAX)
        .min(DEFAULT_POOL_CAP)
}

impl PipelineArgs {
    /// The CRM pool's size: the setting, or the default for the relay loops.
    pub fn crm_connections(&self) -> u32 {
        self.crm_pool_size
            .unwrap_or_else(|| crm_pool_size(self.relays as usize))
    }

    /// The analytics pool's size: the setting, or the default for the workers.
    pub fn analytics_connections(&self) -> u32 {
        self.analytics_pool_size
            .unwrap_or_else(|| analytics_pool_size(self.workers()))
    }

    /// Refuses an analytics pool too small for the workers (they would wait on each other
    /// for connections until the pool's acquire timeout, again and again).
    pub fn check_pool_sizes(&self) -> anyhow::Result<()> {
        let (relays, size) = (self.relays, self.crm_connections());
        // A claim per relay loop, the outbox listener and the sleep flag.
        if size < relays + 2 {
            anyhow::bail!(
                "the CRM pool ({size} connections, CRM_ANALYTICS_CRM_POOL_SIZE) is too small for \
                 {relays} relay loops, which need at least {}: raise CRM_ANALYTICS_CRM_POOL_SIZE \
                 or lower CRM_ANALYTICS_RELAYS",
                relays + 2
            );
        }
        let (workers, size) = (self.workers(), self.analytics_connections());
        let needed = analytics_pool_minimum(workers);
        if size < needed {
            anyhow::bail!(
                "the analytics pool ({size} connections, CRM_ANALYTICS_ANALYTICS_POOL_SIZE) is too \
                 small for {workers} workers, which need at least {needed} (two each, plus two): \
                 raise CRM_ANALYTICS_ANALYTICS_POOL_SIZE or lower CRM_ANALYTICS_WORKERS"
            );
        }
        Ok(())
    }
}

impl Pipeline {
    pub async fn connect(db: &DatabaseArgs, args: &PipelineArgs) -> anyhow::Result<Self> {
        args.check_pool_sizes()?;
        let (crm_size, analytics_size) = (args.crm_connections(), args.analytics_connections());
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
        let queue: Arc<dyn Queue> =
            Arc::new(PostgresQueue::connect(analytics.clone(), args.queue_capacity).await?);
        Self::assemble(crm, analytics, queue, args)
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
        if roles.relay {
            let (crm, queue, config, stop) = (
                self.crm.clone(),
                self.queue.clone(),
                self.relay.clone(),
                shutdown.clone(),
            );
            tasks.spawn(async move { relay::run(crm, queue, config, stop).await });
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
            let (analytics, stop) = (self.analytics.clone(), shutdown.clone());
            let interval = self.vacuum_interval;
            tasks.spawn(async move {
                maintenance::vacuum_loop(analytics, &["crm_analytics.queue"], interval, stop).await;
                Ok(())
            });
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
