//! Capture: the transactional outbox in the CRM database.
//!
//! Owns schema `crm_analytics` there (the `event_outbox` table and the trigger functions),
//! attaching row triggers to the four CRM tables, the TRUNCATE guard, and the reference CRM
//! schema that demos and tests create. A change and its outbox row commit or roll back together.

use sqlx::PgPool;

use crate::event::CrmTable;
use crate::migrate::{self, Migration};

/// Migrations of the CRM database (component "capture").
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "event outbox and capture trigger functions",
        sql: include_str!("sql/001_outbox.sql"),
    },
    Migration {
        version: 2,
        description: "sequential event ids",
        sql: include_str!("sql/002_sequential_ids.sql"),
    },
    Migration {
        version: 3,
        description: "notifications only while a relay may be asleep",
        sql: include_str!("sql/003_quiet_when_busy.sql"),
    },
    Migration {
        version: 4,
        description: "trigger functions owned by a role with only capture's rights",
        sql: include_str!("sql/004_capture_role.sql"),
    },
];

/// Owner of the trigger functions: may append to the outbox and read the sleep flag, no more.
pub const CAPTURE_ROLE: &str = "crm_analytics_capture";

/// Channel the capture triggers notify on commit.
pub const OUTBOX_CHANNEL: &str = "crm_analytics_outbox";

/// Columns each captured table must have: the ones the metrics read.
const REQUIRED_COLUMNS: [(CrmTable, &[&str]); 4] = [
    (CrmTable::Accounts, &["id"]),
    (
        CrmTable::Leads,
        &[
            "id",
            "account_id",
            "source",
            "status",
            "converted_at",
            "created_at",
        ],
    ),
    (
        CrmTable::Projects,
        &["id", "account_id", "status", "amount", "closed_at"],
    ),
    (CrmTable::Activities, &["id", "account_id", "occurred_at"]),
];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the CRM schema {schema:?} is missing {missing}. Point DATABASE_URL at the CRM database (and --crm-schema at its schema), or create the reference CRM schema with `crm-analytics migrate --create-crm-schema`")]
    MissingCrm { schema: String, missing: String },
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    #[error("capture setup failed: {0}")]
    Database(#[from] sqlx::Error),
}

/// Creates the reference CRM tables (for demos and tests; a real CRM brings its own).
pub async fn create_reference_schema(pool: &PgPool, crm_schema: &str) -> Result<(), CaptureError> {
    let sql = include_str!("sql/crm_reference_schema.sql").replace("{crm}", crm_schema);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('crm_analytics.migrate'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS {crm_schema};"))
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(&sql).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Checks that the four CRM tables exist with the columns the metrics need.
pub async fn check_crm_tables(pool: &PgPool, crm_schema: &str) -> Result<(), CaptureError> {
    let present: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = $1",
    )
    .bind(crm_schema)
    .fetch_all(pool)
    .await?;
    let mut missing = Vec::new();
    for (table, columns) in REQUIRED_COLUMNS {
        let has_table = present.iter().any(|(t, _)| t == table.name());
        if !has_table {
            missing.push(format!("table {}", table.name()));
            continue;
        }
        for column in columns {
            if !present
                .iter()
                .any(|(t, c)| t == table.name() && c == column)
            {
                missing.push(format!("column {}.{}", table.name(), column));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::MissingCrm {
            schema: crm_schema.to_string(),
            missing: missing.join(", "),
        })
    }
}

/// Installs or upgrades the outbox, then attaches the triggers that are not attached yet.
/// Running it again changes nothing. Returns the number of triggers it created.
pub async fn attach(pool: &PgPool, crm_schema: &str) -> Result<usize, CaptureError> {
    check_crm_tables(pool, crm_schema).await?;
    migrate::apply(pool, "capture", MIGRATIONS).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('crm_analytics.migrate'))")
        .execute(&mut *tx)
        .await?;
    let mut created = 0;
    for table in CrmTable::ALL {
        let qualified = format!("{crm_schema}.{}", table.name());
        let triggers = [
            (
                "crm_analytics_capture",
                format!(
                    "CREATE TRIGGER crm_analytics_capture AFTER INSERT OR DELETE ON {qualified}
                     FOR EACH ROW EXECUTE FUNCTION crm_analytics.capture_row_change()"
                ),
            ),
            // An UPDATE that changes no column changes no metric: not captured.
            (
                "crm_analytics_capture_update",
                format!(
                    "CREATE TRIGGER crm_analytics_capture_update AFTER UPDATE ON {qualified}
                     FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)
                     EXECUTE FUNCTION crm_analytics.capture_row_change()"
                ),
            ),
            (
                "crm_analytics_notify",
                format!(
                    "CREATE TRIGGER crm_analytics_notify AFTER INSERT OR UPDATE OR DELETE ON {qualified}
                     FOR EACH STATEMENT EXECUTE FUNCTION crm_analytics.notify_outbox()"
                ),
            ),
            (
                "crm_analytics_no_truncate",
                format!(
                    "CREATE TRIGGER crm_analytics_no_truncate BEFORE TRUNCATE ON {qualified}
                     FOR EACH STATEMENT EXECUTE FUNCTION crm_analytics.refuse_truncate()"
                ),
            ),
        ];
        for (name, ddl) in triggers {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgname = $1 AND tgrelid = to_regclass($2))",
            )
            .bind(name)
            .bind(&qualified)
            .fetch_one(&mut *tx)
            .await?;
            if !exists {
                sqlx::raw_sql(&ddl).execute(&mut *tx).await?;
                created += 1;
            }
        }
    }
    tx.commit().await?;
    Ok(created)
}
