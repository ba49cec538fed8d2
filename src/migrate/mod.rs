//! Versioned, idempotent schema migrations.
//!
//! Owns the bookkeeping table `crm_analytics.schema_migrations`, one row per applied
//! version and component ("capture" in the CRM database, "analytics" in the analytics
//! database, "postgres_queue" for the embedded queue's table). A second run applies
//! nothing; a later release appends migrations. Only versions are recorded, not the text
//! of the files: an applied migration never runs again, whatever its file says now.
//!
//! [`all`] installs every component at once (`crm-analytics migrate`) and recreates what
//! went missing since (see `heal`); [`require_installed`] is the check every other command
//! makes first.

mod heal;
mod install;

use sqlx::PgPool;

pub use heal::{heal_analytics, missing_analytics_objects};
pub use install::{all, all_reporting, all_with, require_installed, InstallError, Installed};

/// One forward-only schema change.
pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub sql: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {component} v{version} ({description}) failed: {source}")]
    Step {
        component: &'static str,
        version: i32,
        description: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "{what} is not installed in this database ({setting}): run `crm-analytics migrate` first"
    )]
    NotInstalled {
        what: &'static str,
        setting: &'static str,
    },
    #[error("{what} in this database ({setting}) is at schema version {have}, this release needs {want}: run `crm-analytics migrate` to upgrade it")]
    Outdated {
        what: &'static str,
        setting: &'static str,
        have: i32,
        want: i32,
    },
    #[error("{what} needs PostgreSQL {need} or later; this server runs {found}. Upgrade PostgreSQL, or point the setting at a newer server")]
    ServerTooOld {
        what: &'static str,
        need: String,
        found: String,
    },
    #[error("could not read the server's version: {0}")]
    Version(#[source] sqlx::Error),
    #[error("could not read the migrations of {component}: {source}")]
    Read {
        component: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not record migrations of {component}: {source}")]
    Bookkeeping {
        component: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A setting that cannot work with these databases, saying which and what to do.
    #[error("{0}")]
    Setting(String),
}

/// Applies the migrations of `component` not applied yet, in one transaction, under an
/// advisory lock so that two `migrate` runs at once do not race. Returns the versions applied.
pub async fn apply(
    pool: &PgPool,
    component: &'static str,
    migrations: &[Migration],
) -> Result<Vec<i32>, MigrateError> {
    let book = |source| MigrateError::Bookkeeping { component, source };
    let mut tx = pool.begin().await.map_err(book)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('crm_analytics.migrate'))")
        .execute(&mut *tx)
        .await
        .map_err(book)?;
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS crm_analytics;
         REVOKE ALL ON SCHEMA crm_analytics FROM PUBLIC;
         CREATE TABLE IF NOT EXISTS crm_analytics.schema_migrations (
             component text NOT NULL,
             version integer NOT NULL,
             description text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (component, version)
         );",
    )
    .execute(&mut *tx)
    .await
    .map_err(book)?;
    let current: Option<i32> = sqlx::query_scalar(
        "SELECT max(version) FROM crm_analytics.schema_migrations WHERE component = $1",
    )
    .bind(component)
    .fetch_one(&mut *tx)
    .await
    .map_err(book)?;
    let mut applied = Vec::new();
    for migration in migrations
        .iter()
        .filter(|m| m.version > current.unwrap_or(0))
    {
        let step = |source| MigrateError::Step {
            component,
            version: migration.version,
            description: migration.description,
            source,
        };
        sqlx::raw_sql(migration.sql)
            .execute(&mut *tx)
            .await
            .map_err(step)?;
        sqlx::query(
            "INSERT INTO crm_analytics.schema_migrations (component, version, description)
             VALUES ($1, $2, $3)",
        )
        .bind(component)
        .bind(migration.version)
        .bind(migration.description)
        .execute(&mut *tx)
        .await
        .map_err(step)?;
        applied.push(migration.version);
    }
    tx.commit().await.map_err(book)?;
    Ok(applied)
}

/// Fails with a message that says to run `migrate` unless every migration of `component`
/// is applied in the database behind `pool`. Commands other than `migrate` call it first,
/// so that they stop with that sentence instead of retrying a missing table forever.
/// `what` names the component for people ("capture", "the analytics schema"); `setting`
/// names where the database's URL came from.
pub async fn require(
    pool: &PgPool,
    component: &'static str,
    migrations: &[Migration],
    what: &'static str,
    setting: &'static str,
) -> Result<(), MigrateError> {
    let read = |source| MigrateError::Read { component, source };
    let bookkept: bool =
        sqlx::query_scalar("SELECT to_regclass('crm_analytics.schema_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await
            .map_err(read)?;
    let have: Option<i32> = if bookkept {
        sqlx::query_scalar(
            "SELECT max(version) FROM crm_analytics.schema_migrations WHERE component = $1",
        )
        .bind(component)
        .fetch_one(pool)
        .await
        .map_err(read)?
    } else {
        None
    };
    let want = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    match have {
        None => Err(MigrateError::NotInstalled { what, setting }),
        Some(have) if have < want => Err(MigrateError::Outdated {
            what,
            setting,
            have,
            want,
        }),
        Some(_) => Ok(()),
    }
}

/// Fails unless the server behind `pool` is at least `min_version_num` (as in
/// `server_version_num`, e.g. 150000 for 15.0).
pub async fn require_server_version(
    pool: &PgPool,
    min_version_num: i32,
    what: &'static str,
) -> Result<(), MigrateError> {
    let (num, found): (i32, String) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int4, current_setting('server_version')",
    )
    .fetch_one(pool)
    .await
    .map_err(MigrateError::Version)?;
    if num >= min_version_num {
        return Ok(());
    }
    Err(MigrateError::ServerTooOld {
        what,
        need: (min_version_num / 10_000).to_string(),
        found,
    })
}
