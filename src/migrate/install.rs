//! Installing: what `crm-analytics migrate` puts in each database (capture in the CRM
//! database; the analytics schema and the queue backends' tables in the analytics
//! database), and the check every other command makes first that it is all there.

use sqlx::PgPool;

use super::MigrateError;
use crate::capture::{CaptureColumns, CaptureError};
use crate::config::DatabaseArgs;

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// `migrate`: the CRM side (optionally creating the reference schema), then analytics and
/// the queue, keeping the row images capture writes as they are attached.
pub async fn all(
    crm: &PgPool,
    analytics: &PgPool,
    crm_schema: &str,
    create_crm_schema: bool,
) -> Result<(), InstallError> {
    all_with(crm, analytics, crm_schema, create_crm_schema, None).await
}

/// [`all`], choosing what row images carry (`None`: keep what is attached).
pub async fn all_with(
    crm: &PgPool,
    analytics: &PgPool,
    crm_schema: &str,
    create_crm_schema: bool,
    capture_columns: Option<CaptureColumns>,
) -> Result<(), InstallError> {
    all_reporting(
        crm,
        analytics,
        crm_schema,
        create_crm_schema,
        capture_columns,
    )
    .await
    .map(|_| ())
}

/// What a `migrate` run changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Capture triggers created: all of them on a first run; later, triggers that had gone
    /// missing (a CRM table recreated by the application loses its triggers).
    pub capture_triggers: usize,
    /// Whether capture was installed before this run (so triggers created were missing).
    pub capture_was_installed: bool,
    pub analytics_migrations: Vec<i32>,
    pub queue_migrations: Vec<i32>,
    /// Objects of the analytics component that had gone missing and were recreated.
    pub recreated: Vec<String>,
}

/// [`all_with`], returning what changed; says in the log what was recreated.
pub async fn all_reporting(
    crm: &PgPool,
    analytics: &PgPool,
    crm_schema: &str,
    create_crm_schema: bool,
    capture_columns: Option<CaptureColumns>,
) -> Result<Installed, InstallError> {
    if create_crm_schema {
        crate::capture::create_reference_schema(crm, crm_schema).await?;
    }
    // Before anything changes: the aggregates' NULL-tolerant keys need PostgreSQL 15.
    super::require_server_version(analytics, 150_000, "the analytics schema").await?;
    let capture_was_installed = super::require(
        crm,
        "capture",
        crate::capture::MIGRATIONS,
        "capture",
        "DATABASE_URL",
    )
    .await
    .is_ok();
    let triggers = crate::capture::attach_with(crm, crm_schema, capture_columns).await?;
    let applied = super::apply(analytics, "analytics", crate::aggregates::MIGRATIONS).await?;
    let recreated = super::heal_analytics(analytics).await?;
    let queue = crate::queue::migrate(analytics).await?;
    if capture_was_installed && triggers > 0 {
        tracing::warn!(
            triggers,
            crm_schema,
            "reattached capture triggers that were missing from CRM tables (a table recreated \
             by the application loses them): changes made meanwhile were not captured; \
             `crm-analytics verify` shows whether the aggregates differ, `rebuild` fixes them"
        );
    }
    if !recreated.is_empty() {
        tracing::warn!(
            recreated = ?recreated,
            "recreated what the analytics migrations had made and was missing; recreated \
             tables are empty: fill them with `crm-analytics replay` (from the archive) or \
             `crm-analytics rebuild` (from the CRM tables)"
        );
    }
    tracing::info!(
        triggers_created = triggers,
        analytics_migrations = ?applied,
        queue_migrations = ?queue,
        recreated = recreated.len(),
        "migrated"
    );
    Ok(Installed {
        capture_triggers: triggers,
        capture_was_installed,
        analytics_migrations: applied,
        queue_migrations: queue,
        recreated,
    })
}

/// Stops a command that needs our schemas with "run `crm-analytics migrate`" when they are
/// missing or older than this release, before it touches a table that is not there. Each
/// database is checked when given; the queue's tables when the queue backend needs them.
pub async fn require_installed(
    db: &DatabaseArgs,
    crm: Option<&PgPool>,
    analytics: Option<&PgPool>,
) -> Result<(), MigrateError> {
    if let Some(crm) = crm {
        let capture = crate::capture::MIGRATIONS;
        super::require(crm, "capture", capture, "capture", db.crm_setting()).await?;
    }
    if let Some(analytics) = analytics {
        let schema = crate::aggregates::MIGRATIONS;
        let (what, setting) = ("the analytics schema", db.analytics_setting());
        super::require(analytics, "analytics", schema, what, setting).await?;
        let spec = crate::queue::resolve(db, analytics)
            .await
            .map_err(|e| match e {
                crate::queue::QueueError::Postgres(source) => MigrateError::Read {
                    component: "postgres_queue",
                    source,
                },
                other => MigrateError::Setting(other.to_string()),
            })?;
        crate::queue::require_installed(&spec, analytics, setting).await?;
    }
    Ok(())
}
