//! The connections a command opens, in one place: which databases, how many connections
//! each, and the check that our schemas are installed, made once before the command runs.

use sqlx::PgPool;

use super::Command;
use crate::config::{DatabaseArgs, PipelineArgs};
use crate::pipeline::Roles;

/// The pools a command opened. A database the command does not use has no pool; `status`
/// keeps a failed connection as its error, to report it beside what it could read.
pub(super) struct Connections {
    crm: Option<anyhow::Result<PgPool>>,
    analytics: Option<anyhow::Result<PgPool>>,
}

impl Connections {
    /// Opens what `command` needs. Every command but `migrate`, `status` and `demo` stops
    /// here with "run `crm-analytics migrate`" when our schemas are missing or old; `demo`
    /// creates databases of its own and connects to those.
    pub async fn for_command(db: &DatabaseArgs, command: &Command) -> anyhow::Result<Self> {
        const RELAY: Roles = Roles {
            relay: true,
            workers: false,
        };
        const WORKERS: Roles = Roles {
            relay: false,
            workers: true,
        };
        match command {
            Command::Migrate { .. } => Self::open(db, Some(2), Some(4), false).await,
            Command::Backfill | Command::Rebuild | Command::Verify { archive: None, .. } => {
                Self::open(db, Some(2), Some(4), true).await
            }
            // Only the analytics database: the archive is the source.
            Command::Verify { .. } | Command::Replay(_) => {
                Self::open(db, None, Some(2), true).await
            }
            // The API's queries and its response cache's listener.
            Command::Serve { .. } => Self::open(db, Some(4), Some(8), true).await,
            Command::Failed { .. } => Self::open(db, None, Some(4), true).await,
            Command::Run { pipeline, .. } => Self::pipeline(db, pipeline, Roles::ALL, true).await,
            Command::Relay { pipeline, .. } => Self::pipeline(db, pipeline, RELAY, false).await,
            Command::Worker { pipeline, .. } => Self::pipeline(db, pipeline, WORKERS, false).await,
            Command::Status { .. } => Self::each_on_its_own(db).await,
            Command::Demo(_) => Ok(Self {
                crm: None,
                analytics: None,
            }),
        }
    }

    /// Pools of fixed sizes (None: not needed), one after the other; then, if `installed`,
    /// the check.
    async fn open(
        db: &DatabaseArgs,
        crm: Option<u32>,
        analytics: Option<u32>,
        installed: bool,
    ) -> anyhow::Result<Self> {
        let crm = match crm {
            Some(size) => Some(crate::db::connect(db.crm_url()?, db.crm_setting(), size).await?),
            None => None,
        };
        let analytics = match analytics {
            Some(size) => {
                let url = db.analytics_url()?;
                Some(crate::db::connect(url, db.analytics_setting(), size).await?)
            }
            None => None,
        };
        if installed {
            crate::migrate::require_installed(db, crm.as_ref(), analytics.as_ref()).await?;
        }
        Ok(Self {
            crm: crm.map(Ok),
            analytics: analytics.map(Ok),
        })
    }

    /// Pools sized for the pipeline stages the process runs (refused when too small for
    /// them or too large for the servers), then the check.
    async fn pipeline(
        db: &DatabaseArgs,
        args: &PipelineArgs,
        roles: Roles,
        serving: bool,
    ) -> anyhow::Result<Self> {
        let (crm, analytics) = crate::pipeline::connect_pools(db, args, roles, serving).await?;
        crate::migrate::require_installed(db, Some(&crm), Some(&analytics)).await?;
        Ok(Self {
            crm: Some(Ok(crm)),
            analytics: Some(Ok(analytics)),
        })
    }

    /// `status`: both databases at once and each on its own, so that one being down
    /// neither hides nor delays the other's numbers; the check on those that answered.
    async fn each_on_its_own(db: &DatabaseArgs) -> anyhow::Result<Self> {
        // A malformed URL is a mistake in the command, not a database that is down.
        crate::db::parse_url(db.crm_url()?, db.crm_setting())?;
        crate::db::parse_url(db.analytics_url()?, db.analytics_setting())?;
        // Connecting is bounded by db::CONNECT_TIMEOUT.
        let (crm, analytics) = tokio::join!(
            crate::db::connect(db.crm_url()?, db.crm_setting(), 2),
            crate::db::connect(db.analytics_url()?, db.analytics_setting(), 4)
        );
        // Reachable but not migrated: one sentence saying so, not two half-reports.
        tokio::time::timeout(
            crate::db::CONNECT_TIMEOUT,
            crate::migrate::require_installed(db, crm.as_ref().ok(), analytics.as_ref().ok()),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the databases did not answer within {:?} when asked for their schema versions",
                crate::db::CONNECT_TIMEOUT
            )
        })??;
        Ok(Self {
            crm: Some(crm),
            analytics: Some(analytics),
        })
    }

    /// The CRM pool (the command declared it above).
    pub fn crm(&self) -> anyhow::Result<&PgPool> {
        pool(&self.crm, "CRM")
    }

    /// The analytics pool (the command declared it above).
    pub fn analytics(&self) -> anyhow::Result<&PgPool> {
        pool(&self.analytics, "analytics")
    }

    /// The CRM pool, or why it could not connect (`status`).
    pub fn crm_outcome(&self) -> Result<&PgPool, String> {
        outcome(&self.crm, "CRM")
    }

    /// The analytics pool, or why it could not connect (`status`).
    pub fn analytics_outcome(&self) -> Result<&PgPool, String> {
        outcome(&self.analytics, "analytics")
    }
}

fn pool<'a>(slot: &'a Option<anyhow::Result<PgPool>>, name: &str) -> anyhow::Result<&'a PgPool> {
    outcome(slot, name).map_err(anyhow::Error::msg)
}

fn outcome<'a>(slot: &'a Option<anyhow::Result<PgPool>>, name: &str) -> Result<&'a PgPool, String> {
    match slot {
        Some(Ok(pool)) => Ok(pool),
        Some(Err(error)) => Err(format!("{error:#}")),
        // A command reaching for a pool it did not declare in for_command.
        None => Err(format!("this command opened no {name} connections")),
    }
}
